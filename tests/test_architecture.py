"""The repository's structure (docs/design.md §3–4): an acyclic import graph, one rule table,
and an API reference that matches the docstrings."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import consequential_ext as cx
from consequential_ext import rules

ROOT = Path(__file__).parents[1]


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_import_graph_has_no_cycle():
    done = _run("tools/check_imports.py")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith(" 0 cycles")


def test_import_checker_sees_function_local_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n")
    done = _run("tools/check_imports.py", str(pkg))
    assert done.returncode == 1
    assert "import cycle among: pkg.a, pkg.b" in done.stdout


def test_api_reference_is_current_and_complete():
    done = _run("tools/api_docs.py", "--check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_top_level_name_is_in_the_reference():
    page = (ROOT / "docs" / "api.md").read_text()
    for name in cx.__all__:
        assert f"`cx.{name}`" in page, name


def test_rules_are_one_table():
    assert cx.RULES == tuple(rules.RULE_TABLE)
    for name, rule in rules.RULE_TABLE.items():
        assert rule.name == name and isinstance(rule, rules.Rule)
    with pytest.raises(ValueError, match="rule must be one of 'consequential'"):
        rules.rule_named("nesterov")


class _HalfGradient(rules.Rule):
    """A toy rule: half the ordinary gradient, ordinary signal."""
    name = "half"

    def weight_grads(self, layer):
        gw, gb = layer.plain_weight_grads()
        return gw / 2, None if gb is None else gb / 2


def test_a_new_rule_is_one_entry(monkeypatch):
    monkeypatch.setitem(rules.RULE_TABLE, "half", _HalfGradient())
    torch.manual_seed(0)
    x = torch.randn(7, 3, 9, 8, dtype=torch.float64)
    conv = cx.CConv2d(3, 4, 3, stride=2, padding=1, rule="half").double()
    lin = cx.CLinear(8, 5, rule="half").double()
    for layer, twin in ((conv, torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)),
                        (lin, torch.nn.Linear(8, 5))):
        twin = twin.double()
        twin.load_state_dict(layer.state_dict())
        xi = x.clone().requires_grad_()
        xj = x.clone().requires_grad_()
        layer(xi).square().sum().backward()
        twin(xj).square().sum().backward()
        torch.testing.assert_close(layer.weight.grad, twin.weight.grad / 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(layer.bias.grad, twin.bias.grad / 2, rtol=1e-12, atol=0)
        torch.testing.assert_close(xi.grad, xj.grad, rtol=1e-12, atol=0)
