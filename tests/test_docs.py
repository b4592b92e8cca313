"""The documentation points at things that exist: README.md and docs/*.md links resolve (files and
#anchors), every repository file or module the README names is there, the README's test command is
the one CI runs, and there is one Troubleshooting page, holding every command's messages."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# files the commands write, named in the README beside the repository's own
OUTPUT_FILES = {"tables.md"}


def anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation other than '-' and '_' dropped, spaces → '-'."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", FENCE.sub("", markdown), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def links(path: Path) -> list[str]:
    return [target for target in LINK.findall(FENCE.sub("", path.read_text()))
            if not re.match(r"[a-z]+:", target)]  # http(s):, mailto: are not checked


def test_anchor_rule_matches_github():
    assert anchors("# A b\n## 7. The release's config keys\n```\n# not a heading\n```\n") == {
        "a-b", "7-the-releases-config-keys"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_local_link_resolves(doc):
    broken = []
    for target in links(doc):
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def named_paths(markdown: str) -> set[str]:
    """Repository paths the text names in code spans and code blocks: words with a '/' or a
    known file suffix, without placeholders (CAPITALS, '...', '<...>', '*', '{...}')."""
    text = "\n".join(CODE_SPAN.findall(FENCE.sub("", markdown))) + "\n" + "\n".join(
        block for block in re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.S | re.M))
    found = set()
    for word in re.split(r"[\s=(),]+", text):
        word = word.strip("'\"`:;")
        word = word[2:] if word.startswith("./") else word
        if not re.fullmatch(r"[\w./-]+", word) or word.startswith(("/", "http", ".[")) or ".." in word:
            continue
        if re.search(r"[A-Z]{2,}", word.replace("README", "").replace("BENCHMARKS", "")):
            continue  # CT/, DIR, CFG, CHECKPOINT: placeholders
        if word.endswith((".py", ".yaml", ".sh", ".md", ".txt", ".yml", ".toml")) or (
                "/" in word and word.split("/")[0] in {"minigpt4", "preprocessing", "benchmarks", "tests", "docs",
                                                        "train_configs", "eval_configs", "constraints", ".ci"}):
            found.add(word.rstrip("/"))
    return found


def test_named_paths_rule():
    text = ("`minigpt4/config.py`, `eval_configs/scan.yaml --inputs CT/ case7.nii.gz --out scans/`,\n"
            "```\npython train.py --cfg-path CFG\n```\n")
    assert named_paths(text) == {"minigpt4/config.py", "eval_configs/scan.yaml", "train.py"}


def test_every_file_and_module_the_readme_names_exists():
    readme = (REPO / "README.md").read_text()
    paths = named_paths(readme)
    assert {"quickstart.sh", "train.py", "scan.py", "demo.py", "eval_cascade.py"} <= paths  # the check reads them
    missing = sorted(p for p in paths - OUTPUT_FILES if not (REPO / p).exists() and not (REPO / "docs" / p).exists())
    modules = set(re.findall(r"python -m ([\w.]+)", readme)) - {"pytest", "pip"}
    assert {"preprocessing", "minigpt4.export", "minigpt4.inspect", "minigpt4.quickstart"} <= modules
    for module in modules:
        base = REPO.joinpath(*module.split("."))
        if not (base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()):
            missing.append(f"python -m {module}")
    assert not missing, f"README.md names what is not in the repository: {missing}"


def test_readme_test_command_is_the_one_ci_runs():
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^# 2\. The test suite.*\n(.+)$", readme, re.M).group(1)
    install, test = (shlex.split(part) for part in command.split("&&"))
    ci = [shlex.split(line, comments=True) for line in (REPO / ".ci" / "run").read_text().splitlines()
          if "-m pip install" in line or "-m pytest" in line]
    ci_install = next(words for words in ci if words[1:4] == ["-m", "pip", "install"])
    ci_test = next(words for words in ci if words[1:3] == ["-m", "pytest"])
    assert install[:2] == ["pip", "install"] and install[2:] == [w for w in ci_install[4:] if w != "-q"]
    assert test[0] == "python" and test[1:] == ci_test[1:]


def test_one_troubleshooting_page_with_every_command():
    titled = [doc.name for doc in DOCS if re.search(r"^#+ Troubleshooting", doc.read_text(), re.M)]
    assert titled == ["TROUBLESHOOTING.md"]
    sections = re.findall(r"^## (.+)$", (REPO / "docs" / "TROUBLESHOOTING.md").read_text(), re.M)
    assert sections == ["Training, evaluation, export and the demo", "Preprocessing"]
