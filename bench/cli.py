"""``python -m bench``: run the report's sections and write results, plots and report.md."""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch

from . import report, targets
from .context import Context
from .record import git_commit, unwritable

# Report order; each name is a module of this package with run(ctx) -> section dict.
SECTIONS = ("kernels", "layer_step", "toys", "mlp", "mnist1d_conv", "resnet", "lenet",
            "real_models")


def _sections(text: str):
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    return [n for n in SECTIONS if n in names]     # report order, duplicates dropped


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def _device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"cpu or cuda[:N], got {text!r}")
    return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="small configurations (the `make bench` run: < 10 min on 2 cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: results/quick with --quick, else results/full)")
    p.add_argument("--only", type=_sections, default=list(SECTIONS), metavar="SECTION[,...]",
                   help=f"sections to run, from: {', '.join(SECTIONS)}")
    p.add_argument("--seeds", type=_positive, default=None,
                   help="seeds per training configuration (default: per section)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--append", action="store_true",
                   help="keep the sections of an existing report in --out that this run does "
                        "not redo (run sections separately into one report)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = Path("results") / ("quick" if args.quick else "full")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch has no CUDA device")
    return args


def _meta(args, argv, allocator) -> dict:
    import consequential_ext as cx
    device = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
              else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    meta = {"title": "consequential_ext benchmark report",
            "command": "python -m bench " + " ".join(shlex.quote(a) for a in argv),
            "mode": "quick" if args.quick else "full",
            "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "git commit": git_commit(), "device": device, "torch": torch.__version__,
            "python": platform.python_version(), "rules": ", ".join(cx.RULES),
            "library": f"consequential_ext of this checkout (rules: {', '.join(cx.RULES)}; "
                       f"optim: {'yes' if hasattr(cx, 'optim') else 'no'}; "
                       f"amortize: {'yes' if hasattr(cx, 'amortize') else 'no'})",
            "training threads": "1 (see bench/protocol.py)", "allocator": allocator}
    if args.append:
        meta["note"] = ("this header is the last run's; the report may merge sections of "
                        "several runs (--append), each of which names its command and library")
    return meta


def previous_sections(out: Path) -> list:
    """Sections of the report already in ``out`` (none if absent or being rewritten)."""
    try:
        return json.loads((out / "results.json").read_text())["sections"]
    except (OSError, ValueError, KeyError):
        return []


def merge_sections(old: list, new: list) -> list:
    """One result per section, this run's over older ones, in report order."""
    by_name = {s["name"]: s for s in old}
    by_name.update({s["name"]: s for s in new})
    return [by_name[n] for n in SECTIONS if n in by_name]


def main(argv=None, allocator="as the process found it") -> int:
    """The command line; ``allocator``: what ``python -m bench`` did to malloc first, for the
    report's header (``bench/allocator.py``; not done where tests call this in-process)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ctx = Context(out=args.out, quick=args.quick, seeds=args.seeds, device=args.device)
    problem = unwritable(args.out)
    if problem:
        print(f"python -m bench: error: argument --out: {args.out}: {problem}", file=sys.stderr)
        return 2
    meta = _meta(args, argv, allocator)
    results, t_start, cpu_start, failed = [], time.perf_counter(), time.process_time(), 0

    def write():
        old = previous_sections(args.out) if args.append else []
        sections = merge_sections(old, results)
        summary = targets.summary(sections)
        return report.write_all(args.out, meta, sections + ([summary] if summary else []),
                                prune=SECTIONS + ("time_to_target",))

    def progress_status():
        meta["status"] = (f"INCOMPLETE: {len(results)} of {len(args.only)} sections of this run "
                          f"written (still running, or interrupted)")

    progress_status()
    write()                                           # an interrupted run says so from the start
    for name in args.only:
        print(f"[bench] section {name} ...", file=sys.stderr, flush=True)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = importlib.import_module(f"bench.{name}").run(ctx)
        except Exception as exc:      # one broken section must not lose the others' results
            traceback.print_exc()
            failed += 1
            result = {"name": name, "title": name, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = time.perf_counter() - t0
        result["cpu seconds"] = time.process_time() - c0
        result["command"] = meta["command"]
        result["library"] = meta["library"]
        results.append(result)
        progress_status()
        write()                                       # partial report after each section
    broken = [r["name"] for r in results if r.get("error")]
    meta["status"] = ("complete" if not broken else
                      f"FAILED: {len(broken)} of {len(results)} sections raised "
                      f"({', '.join(broken)}); see their sections")
    meta["total time"] = (f"{time.perf_counter() - t_start:.0f} s wall, "
                          f"{time.process_time() - cpu_start:.0f} s CPU process time")
    path = write()
    print(f"[bench] wrote {path}", file=sys.stderr)
    return 1 if failed else 0
