"""Independent float64 references of paper 2's back-matching signals, from eq. 11 itself:
every input unit solves its own least-squares problem min ‖δb − J[:, unit] δ'‖² against
the layer's explicit Jacobian J (``torch.linalg.lstsq``, minimum-norm). Shares no code
with the library."""
import torch
import torch.nn.functional as F


def per_unit_least_squares(jacobian, grad_out):
    """jacobian: (outputs, units); grad_out: (B, outputs). Returns (B, units)."""
    result = torch.empty(grad_out.shape[0], jacobian.shape[1], dtype=torch.float64)
    for unit in range(jacobian.shape[1]):
        column = jacobian[:, unit:unit + 1]
        sol = torch.linalg.lstsq(column, grad_out.T, driver="gelsd").solution   # (1, B)
        result[:, unit] = sol[0]
    return result


def matched_linear_input(weight, grad_out):
    """Eq. 12 for y = x Wᵀ: the Jacobian of one sample's output w.r.t. its input is W."""
    gy = grad_out.detach().double()
    rows = gy.reshape(-1, gy.shape[-1])
    return per_unit_least_squares(weight.detach().double(), rows).reshape(
        gy.shape[:-1] + (weight.shape[1],))


def matched_conv2d_input(x_shape, weight, grad_out, stride, padding, dilation, groups):
    """Eq. 22 exactly: the conv of one sample as a dense matrix, one problem per location."""
    w = weight.detach().double()
    conv = lambda v: F.conv2d(v.reshape((1,) + tuple(x_shape[1:])), w, None,  # noqa: E731
                              stride, padding, dilation, groups).reshape(-1)
    jac = torch.autograd.functional.jacobian(conv, torch.zeros(x_shape[1:]).double().reshape(-1))
    gy = grad_out.detach().double().reshape(grad_out.shape[0], -1)
    return per_unit_least_squares(jac, gy).reshape(x_shape)


def matched_batchnorm_input(x, gamma, grad_out, eps, running_var=None):
    """Eq. 26 with an affine γ: each unit's own slope is γ/σ (the batch mean and variance
    held fixed, as eq. 11 matches one unit at a time), so δ'a = δb σ / γ."""
    x = x.detach().double()
    dims = [0] + list(range(2, x.dim()))
    var = x.var(dims, unbiased=False) if running_var is None else running_var.double()
    sigma = torch.sqrt(var + eps)
    g = torch.ones_like(sigma) if gamma is None else gamma.detach().double()
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return grad_out.double() * (sigma / g).reshape(shape)
