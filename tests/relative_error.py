"""The norm-wise relative error tests compare with: a float32 solve of a ridge system loses
digits in proportion to its conditioning, spread over the whole result, so one small entry can
be off by more than an element-wise tolerance allows while the result as a whole is right."""
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()
