"""What every benchmark record says about itself, and the argument checks its scripts share:
the commit and command line in its header, an output folder checked before any measuring,
integer options with a lower bound."""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

MIN_REPS = 5        # a median of fewer samples is no median to quote


def git_commit() -> str:
    """HEAD's short hash, "-dirty" when tracked files differ from it (a copied working tree
    whose .git is older, as on the lent GPU machine, says so instead of naming HEAD)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"],
                              capture_output=True,
                              text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(program: str, argv=None) -> str:
    """``program`` and its arguments (default: this process's), as one shell line."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join([program, *(shlex.quote(a) for a in args)])


def unwritable(out) -> str | None:
    """Why a record cannot be written into folder ``out`` (created if absent), or None."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        return "exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".bench-write-probe"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"cannot create or write the folder ({exc.strerror or exc})"
    return None


def ensure_out_dir(parser: argparse.ArgumentParser, out) -> None:
    """``--out`` created and writable before any measuring, else a parser error naming it."""
    problem = unwritable(out)
    if problem:
        parser.error(f"argument --out: {out}: {problem}")


def at_least(low: int):
    """argparse type: an int ≥ ``low``; anything else is a parser error naming the option."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {low}, got {value}")
        return value
    parse.__name__ = "int"
    return parse
