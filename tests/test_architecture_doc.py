"""docs/ARCHITECTURE.md names only modules, files and names that exist (issue 24).

Every path ``minigpt4/...``, ``preprocessing/...``, ``tests/...``, ``benchmarks/...`` must exist; every
dotted ``minigpt4.x.y`` / ``preprocessing.x.y`` must resolve to a module, and a name after the
module must be defined at its top level (def, class, assignment or import).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PATH_RE = re.compile(r"(?<![\w./])((?:minigpt4|preprocessing|tests|benchmarks)/[\w/]*\w(?:\.py)?)")
DOTTED_RE = re.compile(r"(?<![\w./])((?:minigpt4|preprocessing)(?:\.\w+)+)")


def _module_file(root: Path, parts: list[str]):
    base = root.joinpath(*parts)
    return next((c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()), None)


def dotted_problem(name: str, root: Path = ROOT) -> str | None:
    """None when ``name`` resolves, else what is wrong."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = _module_file(root, parts[:cut])
        if module is not None:
            break
    else:
        return f"{name}: no such module"
    if cut == len(parts):
        return None
    attr = parts[cut]
    text = module.read_text()
    defined = re.compile(rf"^(?:(?:async\s+)?def|class)\s+{attr}\b|^{attr}\b[^=\n]*=|^(?:from\s+\S+\s+)?import\b[^\n]*\b{attr}\b"
                         rf"|^\s+{attr},?$", re.M)
    return None if defined.search(text) else f"{name}: {'.'.join(parts[:cut])} defines no {attr}"


def doc_problems(text: str, root: Path = ROOT) -> list[str]:
    problems = [f"{p}: no such file or folder" for p in sorted(set(PATH_RE.findall(text)))
                if not (root / p).exists()]
    problems += [problem for name in sorted(set(DOTTED_RE.findall(text)))
                 if (problem := dotted_problem(name, root))]
    return problems


def test_the_checker_finds_missing_modules_files_and_names(tmp_path):
    (tmp_path / "minigpt4" / "sub").mkdir(parents=True)
    (tmp_path / "minigpt4" / "__init__.py").write_text("")
    (tmp_path / "minigpt4" / "sub" / "__init__.py").write_text("")
    (tmp_path / "minigpt4" / "sub" / "mod.py").write_text("def real():\n    pass\nCONSTANT = 1\n")
    text = ("`minigpt4/sub/mod.py` `minigpt4/sub/gone.py` `minigpt4.sub.mod.real` `minigpt4.sub.mod.CONSTANT` "
            "`minigpt4.sub.mod.missing` `minigpt4.nothing.here` `preprocessing.gone`")
    assert doc_problems(text, tmp_path) == [
        "minigpt4/sub/gone.py: no such file or folder",
        "minigpt4.nothing.here: minigpt4 defines no nothing",
        "minigpt4.sub.mod.missing: minigpt4.sub.mod defines no missing",
        "preprocessing.gone: no such module",
    ]


def test_architecture_doc_names_only_what_exists():
    text = DOC.read_text()
    assert len(PATH_RE.findall(text)) > 40 and len(DOTTED_RE.findall(text)) > 20  # the doc is read
    assert doc_problems(text) == []
