"""The engine stays below the lab, the matrix and the command line: nothing in h2k/ imports them.

h2k/cli.py is the command line itself (it names every command module, lab's and matrix's
included, and imports only the one a command needs); h2k/__main__.py runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABOVE_THE_ENGINE = ("lab", "matrix", "h2k.cli")
THE_COMMAND_LINE = {"h2k/cli.py", "h2k/__main__.py"}


def imported(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            out.append((node.lineno, str(node.args[0].value)))
    return out


def test_the_engine_imports_nothing_above_it():
    offenders = []
    for path in sorted((ROOT / "h2k").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in THE_COMMAND_LINE:
            continue
        for line, name in imported(ast.parse(path.read_text())):
            if any(name == top or name.startswith(top + ".") for top in ABOVE_THE_ENGINE):
                offenders.append(f"{rel}:{line}: {name}")
    assert offenders == []


def test_the_check_sees_every_kind_of_import():
    tree = ast.parse("import matrix.reports\nfrom lab import boot\nfrom h2k import cli\n"
                     "import importlib\nimportlib.import_module('matrix.cli')\nfrom h2k.cli import main\n")
    names = {n for _, n in imported(tree)}
    assert {"matrix.reports", "lab", "h2k.cli", "matrix.cli"} <= names
