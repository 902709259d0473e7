"""Every document the code, the ``--help`` texts and the docs cite resolves inside the repository.

A citation is a path ending in ``.md`` (``docs/method.md``, ``method.md``, ``../README.md``), an
all-caps document name with a section (``METHOD §5``), or a markdown link's target. Each must be
a file: relative to the citing file, to the repository root or to ``docs/``; a section right
after it (``docs/method.md §2b``) must be a numbered heading of that document. Files the code
*writes* (``report.md``) are not citations: listed in :data:`WRITTEN`, under ``bench_out/``, or joined
to a directory in Python (``out / "report.md"``).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

from layerif_plugins.paths import REPO_ROOT

#: where citations live: the package, tests, benchmarks, integration scripts, recipes and every markdown file
SOURCES = ("layerif_plugins/**/*.py", "tests/**/*.py", "benchmarks/**/*.py", "integration/**/*.py", "recipes/**/*",
           "*.md", "docs/**/*.md", "benchmarks/**/*.md", "Makefile", "pyproject.toml")
#: markdown files the code writes (outputs, not citations); so is everything under bench_out/
WRITTEN = {"report.md", "engine.md", "engine_scale.md", "vllm_serve.md"}

_PATH = re.compile(r"(?<![\w/{}<>.-])((?:\.\.?/)?(?:[\w.-]+/)*[\w-]+\.md)\b(?:[`)\]]*,? §(\d+[a-z]?))?")
_CAPS = re.compile(r"\b([A-Z][A-Z_]{2,}) §(\d+[a-z]?)")
_JOINED = re.compile(r"/ *f?[\"']$")  # `out / "report.md"`: a file the code writes or reads back, not a citation
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_HEADING = re.compile(r"^#+ +(?:\d+\.)*?(\d+[a-z]?)\.? ", re.MULTILINE)


def _files() -> list[Path]:
    seen: set[Path] = set()
    for pattern in SOURCES:
        for path in REPO_ROOT.glob(pattern):
            if path.is_file() and ".venv" not in path.parts and path.suffix not in {".png", ".pyc", ".safetensors"}:
                seen.add(path)
    seen.discard(Path(__file__).resolve())  # its own examples of bad citations
    return sorted(seen)


@cache
def _sections(doc: Path) -> frozenset[str]:
    return frozenset(_HEADING.findall(doc.read_text(encoding="utf-8")))


def _resolve(ref: str, citing: Path) -> Path | None:
    for base in (citing.parent, REPO_ROOT, REPO_ROOT / "docs"):
        candidate = (base / ref).resolve()
        if candidate.is_file() and candidate.name in {p.name for p in candidate.parent.iterdir()}:  # exact case
            return candidate
    return None


def _problems(text: str, citing: Path, where: str) -> list[str]:
    problems = []
    for match in _PATH.finditer(text):
        ref, section = match.groups()
        if Path(ref).name in WRITTEN or ref.startswith("bench_out/") or _JOINED.search(text[:match.start()]):
            continue
        doc = _resolve(ref, citing)
        if doc is None:
            problems.append(f"{where}: {ref} does not exist")
        elif section and section not in _sections(doc):
            problems.append(f"{where}: {ref} has no section §{section}")
    for name, section in _CAPS.findall(text):
        problems.append(f"{where}: '{name} §{section}' names no document (cite docs/{name.lower()}.md §{section})"
                        if _resolve(f"{name}.md", citing) is None else "")
    if citing.suffix == ".md":
        for target in _LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if _resolve(target, citing) is None and not (citing.parent / target).exists():
                problems.append(f"{where}: link target {target} does not exist")
    return [p for p in problems if p]


def test_sources_cite_documents_that_exist():
    problems = []
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            problems += _problems(line, path, f"{path.relative_to(REPO_ROOT)}:{lineno}")
    assert not problems, "unresolved citations:\n" + "\n".join(problems)


def test_help_texts_cite_documents_that_exist():
    from layerif_plugins.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    problems = []
    for name, command in sub.choices.items():
        problems += _problems(command.format_help(), REPO_ROOT / "README.md", f"layerif {name} --help")
    assert not problems, "unresolved citations:\n" + "\n".join(problems)


def test_scores_files_cite_documents_that_exist(stories):
    """The ``higher_is`` sentence a scorer writes into every scores file, and each scorer's description."""
    from layerif_plugins.scorers import SCORERS, score_layers

    model, _ = stories
    problems = []
    for name, spec in SCORERS.items():
        texts = [spec.description, spec.direction.description]
        if not spec.needs:  # runs without data: the sentence it actually writes
            texts.append(score_layers(model, name).higher_is or "")
        for text in texts:
            problems += _problems(text, REPO_ROOT / "README.md", f"scorer {name}")
    assert not problems, "unresolved citations:\n" + "\n".join(problems)


@pytest.mark.parametrize("text,expected", [
    ("see docs/method.md §5", []),
    ("see docs/method.md §9", ["x: docs/method.md has no section §9"]),
    ("the control of METHOD.md §5", ["x: METHOD.md does not exist"]),
    ("layerif (METHOD §2a)", ["x: 'METHOD §2a' names no document (cite docs/method.md §2a)"]),
    ("writes ``report.md``", []),
    ('(tmp_path / "quality_x.md").read_text()', []),
])
def test_the_checker_catches_what_it_should(text, expected):
    assert _problems(text, REPO_ROOT / "layerif_plugins" / "x.py", "x") == expected
