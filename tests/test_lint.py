"""The code base's own rules, checked on every ``./dev test`` (and so in ``.ci/run``).

- ``ruff check`` clean (rules in ruff.toml);
- the layer contracts of ``lint-imports`` (pyproject.toml ``[tool.importlinter]``) kept;
- the emulated-AWS harness imported by the CLI's demo verb only, and only when it runs;
- nothing below the entry points (the CLI, the Batch job) reads the environment: settings come in
  through StageContext, function arguments or config objects;
- no module over 600 lines, no function in atlas/ over 60 lines of code.

Known violations that their owners are removing are listed by name (not by rule), and each list
fails once an entry is fixed, so the lists only shrink.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("atlas", "localcloud", "functions", "infra", "containers", "tests", "benchmarks", "app.py")
MAX_MODULE_LINES = 600

# Modules that may read the environment: the entry points, which pass settings down.
ENV_ENTRY_MODULES = {"atlas/aws/job.py"}       # the Batch job: its job definition's environment
ENV_ENTRY_PACKAGES = ("atlas/cli/",)             # the console command
# Issue 14: readers still below the entries, each to take its setting as an argument instead.
ENV_KNOWN_READERS = {
    "atlas/science/overview/site.py",             # viewer folder
    "atlas/science/segmentation/unet.py",         # configured weights, model cache folder
}
# Issue 14: modules being split (atlas/aws is reorganised by its owner).
OVERSIZED_KNOWN: set[str] = set()
MAX_FUNCTION_LINES = 60   # of code, docstring not counted
# Issue 14: functions still to be split by their owners.
LONG_FUNCTIONS_KNOWN: set[str] = set()


def _tool(name: str) -> str:
    """A console script of the test environment (the venv's bin, whether or not it is on PATH)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run ./dev setup (it comes with the dev extra)")
    return found


def _python_files(*tops: str) -> list[Path]:
    files: list[Path] = []
    for top in tops:
        path = ROOT / top
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*.py") if ".venv" not in p.parts)
    return files


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_ruff_finds_nothing():
    result = subprocess.run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check found problems (fix them; see ruff.toml):\n{result.stdout}"


def test_import_contracts_are_kept():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, f"lint-imports: a layer contract is broken:\n{result.stdout}{result.stderr}"
    assert "0 broken" in result.stdout


def _imports(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    """Every (module name, node) imported anywhere in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node))
    return found


def test_the_demo_harness_is_imported_only_lazily_by_the_demo_verb():
    """``atlas --help`` and every other verb work without localcloud (it is not in the images)."""
    importers = {}
    for path in _python_files("atlas"):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        for name, node in _imports(tree):
            if name.split(".")[0] == "localcloud":
                importers.setdefault(_rel(path), []).append(id(node) in top_level)
    assert set(importers) == {"atlas/cli/demo.py"}, importers
    assert not any(importers["atlas/cli/demo.py"]), "atlas/cli/demo.py must import localcloud inside the verb"


ENV_NAMES = ("environ", "environb", "getenv", "putenv")


def _reads_environment(node: ast.AST) -> bool:
    """``os.environ``/``os.getenv``..., a bare ``environ``/``getenv``, or ``from os import environ``."""
    if isinstance(node, ast.Attribute):
        return node.attr in ENV_NAMES and isinstance(node.value, ast.Name) and node.value.id == "os"
    if isinstance(node, ast.Name):
        return node.id in ENV_NAMES
    if isinstance(node, ast.ImportFrom):
        return node.module == "os" and any(alias.name in ENV_NAMES for alias in node.names)
    return False


def _environment_reads(tree: ast.AST) -> list[int]:
    """Lines that touch the process environment."""
    return sorted({node.lineno for node in ast.walk(tree) if _reads_environment(node)})


def _is_entry(rel: str) -> bool:
    return rel in ENV_ENTRY_MODULES or rel.startswith(ENV_ENTRY_PACKAGES)


def test_nothing_below_the_entry_points_reads_the_environment():
    readers = {}
    for path in _python_files("atlas"):
        rel = _rel(path)
        if not _is_entry(rel) and (lines := _environment_reads(ast.parse(path.read_text(), rel))):
            readers[rel] = lines
    new = {rel: lines for rel, lines in readers.items() if rel not in ENV_KNOWN_READERS}
    assert not new, (f"these modules read the environment (lines {new}); pass the setting in from the CLI or "
                     "the job entry (StageContext, an argument or a config object) instead")
    fixed = ENV_KNOWN_READERS - set(readers)
    assert not fixed, f"{sorted(fixed)} no longer read the environment: remove them from ENV_KNOWN_READERS"


def test_the_environment_scan_sees_every_spelling():
    """The scan above is only as good as its matcher: each way of reading the environment is found."""
    spellings = ["import os\nos.environ.get('A')", "import os\nos.getenv('A')", "import os\nx = os.environ['A']",
                 "from os import getenv\ngetenv('A')", "from os import environ\nenviron['A']",
                 "import os\nenv = dict(os.environ)"]
    for source in spellings:
        assert _environment_reads(ast.parse(source)), source
    assert not _environment_reads(ast.parse("import os\nos.path.join('a', 'environ')\nenv = {'environ': 1}"))


def test_no_module_is_over_600_lines():
    sizes = {_rel(p): len(p.read_text().splitlines()) for p in _python_files(*SOURCES)}
    over = {rel: n for rel, n in sizes.items() if n > MAX_MODULE_LINES and rel not in OVERSIZED_KNOWN}
    assert not over, f"split these modules by concern (at most {MAX_MODULE_LINES} lines each): {over}"
    fixed = {rel for rel in OVERSIZED_KNOWN if sizes.get(rel, 0) <= MAX_MODULE_LINES}
    assert not fixed, f"{sorted(fixed)} are now at most {MAX_MODULE_LINES} lines: remove them from OVERSIZED_KNOWN"


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = node.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1
    return node.end_lineno - body[1 if has_doc else 0].lineno + 1


def test_no_function_is_over_60_lines_of_code():
    long = {}
    for path in _python_files("atlas"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > MAX_FUNCTION_LINES:
                long[f"{_rel(path)}:{node.name}"] = _code_lines(node)
    new = {name: n for name, n in long.items() if name not in LONG_FUNCTIONS_KNOWN}
    assert not new, f"split these functions into named steps (at most {MAX_FUNCTION_LINES} lines of code): {new}"
    fixed = LONG_FUNCTIONS_KNOWN - set(long)
    assert not fixed, f"{sorted(fixed)} are short now: remove them from LONG_FUNCTIONS_KNOWN"


def test_the_function_length_counts_code_not_docstrings():
    doc = '"""' + "\n".join(["line"] * 30) + '"""'
    source = f"def f():\n    {doc}\n" + "".join(f"    x{i} = {i}\n" for i in range(61))
    (function,) = ast.parse(source).body
    assert _code_lines(function) == 61
