"""Mutation testing: do the tests catch realistic bugs? (``make mutate``; docs/mutation.md)

Each mutant of ``tools/mutants.py`` is applied in a scratch copy of the working tree
(default ``build/mutate``, kept between runs so the C++ build stays incremental), the
extension is rebuilt when the mutant is in a compiled source, the mutant's own tests run
(stopping at the first failure), and the file, its timestamp and the build are restored.
Prints one row per mutant — caught by which test, or SURVIVED — and the score; exits
non-zero when the score is below ``--min-score``, a snippet is no longer found exactly once,
a mutant does not build, or the unmutated tree fails its tests.

    python tools/mutate.py                    # every mutant
    python tools/mutate.py --only layerwise   # names containing 'layerwise'
    python tools/mutate.py --list
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from mutants import MUTANTS  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTENSION = pathlib.Path("consequential_ext/_C.abi3.so")
FILE_LIST = ".mutate-files"
PRISTINE = ".mutate-pristine"    # the unmutated build/ and extension, restored after C++ mutants
FIRST_FAILURE = re.compile(r"^(FAILED|ERROR) (.+?)(?: - .*)?$", re.M)  # -rfE summary


def _compiled(path: str) -> bool:
    """Sources linked into consequential_ext._C (csrc/cuda is run through the emulation
    tests, which compile it themselves; csrc/emu is test harness)."""
    return path.startswith("csrc/") and not path.startswith(("csrc/cuda/", "csrc/emu/"))


def _tree_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout
    return sorted(p for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def sync_scratch(scratch: pathlib.Path) -> None:
    """Make ``scratch`` hold the working tree: copy what differs (keeping the timestamps of
    what does not, for ninja), delete what the tree no longer has."""
    scratch.mkdir(parents=True, exist_ok=True)
    files = _tree_files()
    listing = scratch / FILE_LIST
    previous = set(listing.read_text().split("\n")) if listing.exists() else set()
    for gone in previous - set(files) - {""}:
        (scratch / gone).unlink(missing_ok=True)
    for rel in files:
        src, dst = ROOT / rel, scratch / rel
        if dst.exists() and dst.read_bytes() == src.read_bytes():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    listing.write_text("\n".join(files))


def _stale_extension(scratch: pathlib.Path) -> bool:
    extension = scratch / EXTENSION
    if not extension.exists():
        return True
    built = extension.stat().st_mtime
    return any((scratch / p).stat().st_mtime > built for p in _tree_files() if _compiled(p))


def build(scratch: pathlib.Path, python: str) -> subprocess.CompletedProcess:
    """In-place incremental build of the extension (--force: header edits count too; ninja
    still recompiles only what changed)."""
    return subprocess.run([python, "setup.py", "-q", "build_ext", "--inplace", "--force"],
                          cwd=scratch, capture_output=True, text=True,
                          env=dict(os.environ, FORCE_ONLY_CPU="1"))


def snapshot_build(scratch: pathlib.Path) -> None:
    pristine = scratch / PRISTINE
    shutil.rmtree(pristine, ignore_errors=True)
    shutil.copytree(scratch / "build", pristine / "build", symlinks=True)
    shutil.copy2(scratch / EXTENSION, pristine / EXTENSION.name)


def restore_build(scratch: pathlib.Path) -> None:
    pristine = scratch / PRISTINE
    shutil.rmtree(scratch / "build", ignore_errors=True)
    shutil.copytree(pristine / "build", scratch / "build", symlinks=True)
    shutil.copy2(pristine / EXTENSION.name, scratch / EXTENSION)


def run_tests(scratch: pathlib.Path, python: str, tests, timeout: float):
    """(passed, first failing test id or reason)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TMPDIR=str(scratch / ".tmp"))
    (scratch / ".tmp").mkdir(exist_ok=True)
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *tests]
    try:
        result = subprocess.run(cmd, cwd=scratch, capture_output=True, text=True, env=env,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timeout after {timeout:.0f} s"
    if result.returncode == 0:
        return True, ""
    match = FIRST_FAILURE.search(result.stdout)
    if match:
        return False, match.group(2)
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["?"]
    return False, f"pytest exit {result.returncode}: {tail[0][:80]}"


def apply_mutant(scratch, mutant, python, timeout):
    """Status ('caught' | 'survived' | 'stale' | 'build-error') and detail."""
    path = scratch / mutant.path
    original = path.read_bytes()
    stat = path.stat()
    text = original.decode()
    count = text.count(mutant.find)
    if count != 1:
        return "stale", f"snippet found {count} times in {mutant.path}"
    emulation_cache = set((scratch / ".tmp").glob("cx_cuda_emu_*"))
    try:
        path.write_text(text.replace(mutant.find, mutant.replace))
        if _compiled(mutant.path):
            built = build(scratch, python)
            if built.returncode:
                return "build-error", (built.stderr or built.stdout).strip()[-300:]
        passed, detail = run_tests(scratch, python, mutant.tests, timeout)
        return ("survived", "") if passed else ("caught", detail)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        if _compiled(mutant.path):
            restore_build(scratch)
        for new in set((scratch / ".tmp").glob("cx_cuda_emu_*")) - emulation_cache:
            shutil.rmtree(new, ignore_errors=True)   # a mutated kernel's emulation library


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="",
                        help="run the mutants whose name contains this (or, comma-separated, "
                             "any of these)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--scratch", type=pathlib.Path, default=ROOT / "build" / "mutate",
                        help="scratch copy of the tree (kept between runs)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with torch")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per test run")
    parser.add_argument("--min-score", type=float, default=0.95)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip checking that the unmutated tree passes the selected tests")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    mutants = [m for m in MUTANTS if any(w in m.name for w in wanted)]
    if args.list:
        for m in mutants:
            print(f"{m.name:48} {m.path:36} {m.why}")
        return 0
    if not mutants:
        print(f"no mutant name contains {args.only!r}", file=sys.stderr)
        return 2
    scratch = args.scratch.resolve()
    started = time.time()
    sync_scratch(scratch)
    # Rebuilt for C++ mutants, and when a compiled source is newer than the scratch's
    # extension: a Python mutant's tests would otherwise run against a stale build.
    if any(_compiled(m.path) for m in mutants) or _stale_extension(scratch):
        print("building the unmutated extension in", scratch, flush=True)
        built = build(scratch, args.python)
        if built.returncode:
            print(built.stderr[-2000:], file=sys.stderr)
            return 1
        snapshot_build(scratch)
    if not args.no_baseline:
        selection = list(dict.fromkeys(t for m in mutants for t in m.tests))
        print(f"baseline: {len(selection)} test selections on the unmutated tree", flush=True)
        passed, detail = run_tests(scratch, args.python, selection, args.timeout * 2)
        if not passed:
            print(f"the unmutated tree fails: {detail}", file=sys.stderr)
            return 1

    rows = []
    print(f"{'mutant':48} {'result':9} {'s':>5}  caught by", flush=True)
    for mutant in mutants:
        t0 = time.time()
        status, detail = apply_mutant(scratch, mutant, args.python, args.timeout)
        rows.append((mutant, status))
        print(f"{mutant.name:48} {status:9} {time.time() - t0:5.0f}  {detail}", flush=True)

    caught = sum(s == "caught" for _, s in rows)
    scored = sum(s in ("caught", "survived") for _, s in rows)
    broken = [m.name for m, s in rows if s in ("stale", "build-error")]
    score = caught / scored if scored else 0.0
    print(f"\nscore: {caught}/{scored} caught = {100 * score:.1f}% "
          f"({(time.time() - started) / 60:.1f} min)")
    for m, s in rows:
        if s == "survived":
            print(f"  survived: {m.name} ({m.path}) {m.why}")
    if broken:
        print(f"  fix these mutants (snippet gone or no longer builds): {', '.join(broken)}")
    return 0 if score >= args.min_score and not broken else 1


if __name__ == "__main__":
    sys.exit(main())
