"""Claims equal tests: every test the README's support table and the docs name exists.

The README's "What is proven, and how" table marks each feature real boot, asserted
offline or recorded shape, and names the tests that prove it as
`tests/<path>.py::<test>` in backticks (a class method as `Class::test`, one
parametrized case as `test[id]`). A renamed or deleted test would leave a claim
with nothing behind it: this fails instead. Test names are read from the files'
syntax trees; parametrized IDs from pytest's own collection of that file.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A backticked reference to a test file, optionally with a test in it.
REF = re.compile(r"`(tests/[^`\s:]+\.py)(?:::([^`]+))?`")
PROOF_WORDS = ("real boot", "asserted offline", "recorded shape")
PROOF_HEADING = re.compile(r"^##+ What is (proven|supported)", re.I)


def proof_tables(path: Path) -> list[list[str]]:
    """The data rows (raw lines) of the tables under a 'What is proven/supported' heading."""
    tables, rows, inside = [], [], False
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            inside = bool(PROOF_HEADING.match(line))
        if inside and line.startswith("|"):
            rows.append(line)
        elif rows:
            tables.append(rows)
            rows = []
    if rows:
        tables.append(rows)
    # drop each table's header and separator lines
    return [[r for r in t[2:]] for t in tables if len(t) > 2]


def refs(text: str) -> list[tuple[str, str | None]]:
    return [(m.group(1), m.group(2)) for m in REF.finditer(text)]


@functools.lru_cache(maxsize=None)
def defined_tests(path: str) -> frozenset[str]:
    """`test_x` and `TestC::test_x` names defined in a test file (its syntax tree, nothing imported)."""
    tree = ast.parse((ROOT / path).read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name.startswith("test"):
                    names.add(f"{node.name}::{sub.name}")
    return frozenset(names)


@functools.lru_cache(maxsize=None)
def collected_ids(path: str) -> frozenset[str]:
    """Node IDs pytest collects from one file (for parametrized cases)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", path],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    return frozenset(line.split("::", 1)[1] for line in proc.stdout.splitlines() if line.startswith(path + "::"))


def missing(path: str, name: str | None) -> str | None:
    """Why the reference does not resolve, or None."""
    if "*" in path and name is None:  # a family of files, e.g. tests/unit/test_matrix_*.py
        return None if list(ROOT.glob(path)) else f"{path}: no file matches"
    if not (ROOT / path).is_file():
        return f"{path}: no such file"
    if name is None:
        return None
    base = name.split("[", 1)[0]
    if base not in defined_tests(path):
        return f"{path}::{name}: no test {base!r} in that file"
    if "[" in name:
        ids = collected_ids(path)
        if name in ids:
            return None
        # `test[a,b]` names two parametrized cases of one test
        head, _, params = name.partition("[")
        wanted = [f"{head}[{p.strip()}]" for p in params.rstrip("]").split(",")]
        lost = [w for w in wanted if w not in ids]
        if lost:
            return f"{path}::{name}: pytest collects no {', '.join(lost)}"
    return None


def test_every_named_test_exists():
    problems = []
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            for path, name in refs(line):
                if path.endswith(".py") and (why := missing(path, name)):
                    problems.append(f"{doc.relative_to(ROOT)}:{n}: {why}")
    assert problems == []


def test_every_readme_support_row_says_how_and_names_its_tests():
    [table] = proof_tables(ROOT / "README.md")
    assert len(table) >= 15
    for row in table:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        feature, proof = cells[0], " | ".join(cells[1:])
        assert any(word in proof for word in PROOF_WORDS), f"{feature[:60]}: real boot, asserted offline or recorded shape?"
        assert [r for r in refs(proof) if r[1]], f"{feature[:60]}: name the tests as `tests/<path>.py::<test>`"


def test_matrix_doc_rows_name_their_tests():
    [table] = proof_tables(ROOT / "docs" / "matrix.md")
    for row in table:
        assert [r for r in refs(row) if r[1]], row[:80]


def test_the_checker_catches_what_it_must(tmp_path):
    """The resolver itself fails on a wrong name, a wrong file, a wrong parametrized ID."""
    assert missing("tests/unit/test_claims.py", "test_every_named_test_exists") is None
    assert "no test" in missing("tests/unit/test_claims.py", "test_renamed_long_ago")
    assert "no such file" in missing("tests/unit/test_gone.py", None)
    assert missing("tests/unit/test_cla*.py", None) is None and "no file" in missing("tests/unit/test_gone*.py", None)
    assert missing("tests/unit/test_claims.py", "test_param_ids_resolve[a]") is None
    assert missing("tests/unit/test_claims.py", "test_param_ids_resolve[a,b]") is None
    assert "collects no" in missing("tests/unit/test_claims.py", "test_param_ids_resolve[c]")
    assert refs("x `tests/a.py::T::test_b[1-x]` y `tests/b.py`") == [("tests/a.py", "T::test_b[1-x]"),
                                                                  ("tests/b.py", None)]


@pytest.mark.parametrize("case", ["a", "b"])
def test_param_ids_resolve(case):
    """A parametrized test the checker's own test resolves by ID."""
    assert case in "ab"
