"""Generate ``docs/api.md``, the API reference, from the public modules' docstrings with pdoc.

pdoc (``pip install -e ".[test]"`` brings it) reads each module below the way a user imports it:
its ``__all__``, every public class with its public methods and documented properties, every
function with its signature, each with its docstring as written (shapes, dtypes, errors). This
script only lays pdoc's model out as one Markdown page, so the page reads on GitHub and diffs in
review. ``tests/test_api_doc.py`` regenerates it and fails when the committed page differs, so the
reference cannot drift from the code.

    python tools/api_doc.py            # rewrite docs/api.md
    python tools/api_doc.py --check    # exit 1 (and say so) when docs/api.md is stale
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

import pdoc.doc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "api.md"

#: The modules a user imports, in reading order (each documented by its ``__all__``).
MODULES = [
    "mlakv",
    "mlakv.mem_cache",
    "mlakv.mem_cache.storage",
    "mlakv.mem_cache.storage.mooncake",
    "mlakv.jit_kernel",
    "mlakv.distributed.dcp",
]

HEADER = """\
# API reference

Generated from the docstrings by `python tools/api_doc.py` (pdoc's model of each module, laid out as
Markdown); `tests/test_api_doc.py` fails when this page is stale. Do not edit it by hand: edit the
docstring and regenerate. Modules: {modules}.
"""


def _anchor(name: str) -> str:
    """GitHub's anchor of a heading that reads `` `name` ``."""
    return re.sub(r"[^a-z0-9_ -]", "", name.lower()).replace(" ", "-")


_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`~?([^`]+)`")


def _doc(text: str) -> str:
    """A docstring as Markdown: dedented, Sphinx roles (``:class:`X```) as code spans."""
    return _ROLE.sub(r"`\1`", inspect.cleandoc(text)).strip() if text else ""


def _sig(fn: pdoc.doc.Function, method: bool) -> str:
    sig = fn.signature_without_self if method else fn.signature
    return re.sub(r" at 0x[0-9a-f]+", "", str(sig))  # no object addresses: the page must be reproducible


def _public(name: str) -> bool:
    return not name.startswith("_") or name == "__init__"


def _function(fn: pdoc.doc.Function, level: str, method: bool = False) -> list[str]:
    kind = "classmethod " if fn.is_classmethod else "staticmethod " if fn.is_staticmethod else ""
    out = [f"{level} {kind}`{fn.name}`", "", "```python", f"{fn.name}{_sig(fn, method)}", "```"]
    if fn.docstring:
        out += ["", _doc(fn.docstring)]
    return out + [""]


def _class(cls: pdoc.doc.Class) -> list[str]:
    bases = [b[2].removeprefix("builtins.") for b in cls.bases]
    out = [f"### class `{cls.name}`" + (f"({', '.join(bases)})" if bases else ""), ""]
    if cls.docstring:
        out += [_doc(cls.docstring), ""]
    for m in cls.own_members:
        if not _public(m.name):
            continue
        if isinstance(m, pdoc.doc.Function):
            if m.name == "__init__" and not m.docstring and not list(m.signature_without_self.parameters):
                continue
            out += _function(m, "####", method=True)
        elif isinstance(m, pdoc.doc.Variable) and m.docstring:
            ann = m.annotation_str.lstrip(": ").strip() if m.annotation_str else ""
            out += [f"#### `{m.name}`" + (f" : `{ann}`" if ann else ""), "", _doc(m.docstring), ""]
    return out


def _variable(v: pdoc.doc.Variable) -> list[str]:
    ann = v.annotation_str.lstrip(": ").strip() if v.annotation_str else ""
    out = [f"### `{v.name}`" + (f" : `{ann}`" if ann else ""), ""]
    if v.docstring:
        out += [_doc(v.docstring), ""]
    return out


def _top_level() -> list[str]:
    """``mlakv`` itself re-exports names documented under their own modules: a table of where."""
    import mlakv

    out = ["## `mlakv`", "", _doc(mlakv.__doc__ or ""), "", "`mlakv.__version__`: the package version.", "",
           "| name | documented under |", "|---|---|"]  # fmt: skip
    for name in mlakv.__all__:
        if name == "__version__":
            continue
        home = next((_home(_module(h).members[name]) for h in MODULES[1:] if name in _module(h).members), None)
        out.append(f"| `{name}` | " + (f"[`{home}`](#{_anchor(home)})" if home else "(not documented)") + " |")
    return out + [""]


_CACHE: dict[str, pdoc.doc.Module] = {}


def _module(name: str) -> pdoc.doc.Module:
    if name not in _CACHE:
        _CACHE[name] = pdoc.doc.Module(importlib.import_module(name))
    return _CACHE[name]


def _home(member: pdoc.doc.Doc) -> str:
    """The listed module a member is documented under: of those exporting it, the one nearest to
    where it is defined (``LocalFileStorage``: ``mlakv.mem_cache.storage``, not ``mlakv.mem_cache``)."""
    defined = member.taken_from[0]
    have = [m for m in MODULES[1:] if member.name in _module(m).members and (defined + ".").startswith(m + ".")]
    return max(have, key=len) if have else member.modulename


def render() -> str:
    """The whole page (a str ending in one newline)."""
    lines = [HEADER.format(modules=", ".join(f"[`{m}`](#{_anchor(m)})" for m in MODULES))]
    for name in MODULES:
        if name == "mlakv":
            lines += _top_level()
            continue
        mod = _module(name)
        lines += [f"## `{name}`", "", _doc(mod.docstring), ""]
        elsewhere = []
        for member in mod.members.values():
            if _home(member) != name and _home(member) in MODULES:
                elsewhere.append(member)
                continue
            if isinstance(member, pdoc.doc.Class):
                lines += _class(member)
            elif isinstance(member, pdoc.doc.Function):
                lines += _function(member, "###")
            elif isinstance(member, pdoc.doc.Variable):
                lines += _variable(member)
            elif isinstance(member, pdoc.doc.Module):
                lines += [f"### module `{member.modulename}`", "", _doc(member.docstring).split("\n\n")[0], ""]
        if elsewhere:
            lines += ["Also exported here, documented under their own module: "
                      + ", ".join(f"`{m.name}` ([`{_home(m)}`](#{_anchor(_home(m))}))" for m in elsewhere) + ".", ""]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/api.md from the docstrings (pdoc).")
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 when docs/api.md differs")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `python tools/api_doc.py`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
