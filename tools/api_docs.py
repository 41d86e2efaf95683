"""Write docs/api.md, the reference of every public name, from the docstrings.

Public: every name in ``consequential_ext.__all__``, and, for each public submodule there, every
name in that submodule's ``__all__`` (recursively). ``tests/test_architecture.py`` fails when the
committed page differs from what this prints, or when a public name has no docstring.

    python tools/api_docs.py          # rewrite docs/api.md
    python tools/api_docs.py --check  # exit 1 if docs/api.md is out of date
"""
from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path

PAGE = Path(__file__).parents[1] / "docs" / "api.md"

# Public constants carry no docstring of their own.
CONSTANTS = {
    "__version__": "The package version (PEP 440 string).",
    "RULES": "The names of the rules a C-layer understands, in the order of `rules.RULE_TABLE` "
             "(docs/design.md §2).",
    "DEFAULT_RIDGE": "The default ridge λ, relative to `A = X Xᵀ / N` (chosen on digits; "
                     "README, \"Choosing the ridge\").",
}

HEADER = """# API reference

Generated from the docstrings by `python tools/api_docs.py`; do not edit by hand
(`tests/test_architecture.py` fails when this page is out of date). What each name computes is
specified in `docs/design.md`; errors are raised in forward (or at construction), never inside
backward.
"""


def public_names(module) -> list[str]:
    return list(getattr(module, "__all__", []))


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def entries(module, prefix: str):
    """(qualified name, object) of every public name below ``module``, depth first."""
    for name in public_names(module):
        obj = getattr(module, name)
        yield f"{prefix}.{name}", obj
        if isinstance(obj, types.ModuleType):
            yield from entries(obj, f"{prefix}.{name}")


def docstring(qualname: str, obj) -> str | None:
    """The object's own docstring (a class's, not one inherited from nn.Linear)."""
    if isinstance(obj, type):
        own = obj.__dict__.get("__doc__")
    elif isinstance(obj, types.ModuleType) or callable(obj):
        own = obj.__doc__
    else:
        return CONSTANTS.get(qualname.rsplit(".", 1)[-1])
    return inspect.cleandoc(own) if own else None


def render(root) -> str:
    parts = [HEADER]
    for qualname, obj in entries(root, "cx"):
        doc = docstring(qualname, obj)
        if isinstance(obj, types.ModuleType):
            parts.append(f"## `{qualname}` (module)\n\n{doc}\n")
            continue
        if isinstance(obj, type):
            head = f"class {qualname}{_signature(obj)}"
        elif callable(obj):
            head = f"{qualname}{_signature(obj)}"
        else:
            head = f"{qualname} = {obj!r}"
        parts.append(f"### `{qualname}`\n\n```python\n{head}\n```\n\n{doc}\n")
    return "\n".join(parts)


def undocumented(root) -> list[str]:
    return [q for q, obj in entries(root, "cx") if not (docstring(q, obj) or "").strip()]


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(PAGE.parents[1]))
    import consequential_ext
    missing = undocumented(consequential_ext)
    if missing:
        print("public names without a docstring: " + ", ".join(missing))
        return 1
    text = render(consequential_ext)
    if "--check" in argv:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.name} is out of date: run python tools/api_docs.py")
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(PAGE.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
