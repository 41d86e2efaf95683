"""The curated mutants (tools/mutants.py) still apply: each one's snippet occurs exactly once
in its file and its tests exist, so an edit that moves the code a mutant targets fails here,
in every CI run, instead of only when ``make mutate`` runs next."""
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutants import MUTANTS  # noqa: E402


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_to_exactly_one_place(mutant):
    text = (ROOT / mutant.path).read_text()
    assert text.count(mutant.find) == 1, f"{mutant.name}: snippet found {text.count(mutant.find)}×"
    assert mutant.find != mutant.replace
    for test in mutant.tests:
        assert (ROOT / test.split("::")[0]).is_file(), f"{mutant.name}: no {test}"
