"""The report writer: Markdown tables, CSV per table, one JSON with every section.

A section's result is a dict: name, title, claim, verdicts (computed strings), notes
(fallbacks, caveats), tables ({title, columns, rows}), plots (paths relative to the
output folder), config, seconds. Numbers reach the report only from these dicts.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path


def fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}"
    return str(value)


def markdown_table(columns, rows) -> str:
    """A GitHub Markdown table; a row is a dict keyed by column (missing keys show —)."""
    def cell(v):
        return fmt(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_csv(path: Path, columns, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in columns})


def render(meta: dict, sections: list) -> str:
    """The whole Markdown report."""
    out = [f"# {meta['title']}", ""]
    out += [f"* {k}: `{v}`" if k == "command" else f"* {k}: {v}"
            for k, v in meta.items() if k != "title"]
    out.append("")
    for i, s in enumerate(sections, 1):
        out += [f"## {i}. {s['title']}", ""]
        if s.get("error"):
            out += [f"**This section failed:** `{s['error']}`", ""]
        if s.get("claim"):
            out += [f"**Paper's claim.** {s['claim']}", ""]
        if s.get("verdicts"):
            out += ["**What this run shows.**", ""] + [f"* {v}" for v in s["verdicts"]] + [""]
        for note in s.get("notes", []):
            out += [f"> Note: {note}", ""]
        for t in s.get("tables", []):
            out += [f"**{t['title']}**", "", markdown_table(t["columns"], t["rows"]), ""]
        for p in s.get("plots", []):
            out += [f"![{Path(p).stem}]({p})", ""]
        if s.get("config"):
            out += ["<details><summary>configuration</summary>", "", "```json",
                    json.dumps(s["config"], indent=1, default=str), "```", "</details>", ""]
        if "seconds" in s:
            out += [f"_Section time: {s['seconds']:.0f} s wall"
                    + (f", {s['cpu seconds']:.0f} s CPU" if "cpu seconds" in s else "")
                    + (f"; command: `{s['command']}`" if s.get("command") else "")
                    + (f"; library: {s['library']}" if s.get("library") else "") + "._", ""]
    return "\n".join(out)


def write_all(out: Path, meta: dict, sections: list, prune=()) -> Path:
    """report.md, results.json and one CSV per table under ``out``; returns the report path.

    ``prune``: section names whose ``<name>__*.csv`` files in ``out`` this report does not
    list are deleted, and so are the ``plots/*.png`` no section lists (an earlier run's
    leftovers would otherwise sit beside a report that does not hold them)."""
    out.mkdir(parents=True, exist_ok=True)
    # NaN / inf as results.json holds them (null, shown "—"): report.md and the CSVs say the
    # same, and a report re-rendered from results.json (--append) is the one first written.
    sections[:] = _finite(sections)
    written = set()
    for s in sections:
        for t in s.get("tables", []):
            name = f"{s['name']}__{slug(t['title'])}.csv"
            write_csv(out / name, t["columns"], t["rows"])
            t["csv"] = name
            written.add(name)
    if prune:
        for f in out.glob("*__*.csv"):
            if f.name.split("__", 1)[0] in prune and f.name not in written:
                f.unlink()
        listed = {Path(p).name for s in sections for p in s.get("plots", [])}
        for f in (out / "plots").glob("*.png"):
            if f.name not in listed:
                f.unlink()
    with open(out / "results.json", "w") as f:
        json.dump(_finite({"meta": meta, "sections": sections}), f, indent=1,
                  default=_json_default)
    path = out / "report.md"
    path.write_text(render(meta, sections))
    return path


def _finite(obj):
    """NaN / inf as null: strict JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
