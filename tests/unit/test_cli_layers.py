"""The command line is a thin layer over the Python API (issue 12): no cli*.py module imports the
engine, the store or the emulator itself, only orchestrator.api (and the modules it hands back
values of). An AST scan: every import anywhere in a module counts, at its top, inside a
function or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("orchestrator.engine", "orchestrator.store", "orchestrator.emulator", "orchestrator.wiring")

#: (module, function, imported module prefix) that may stay: the `emulator` command serves the emulator.
ALLOWED = {("cli_admin.py", "emulator", "orchestrator.emulator")}
#: Imported only for type annotations of what the API returns (Fabricflow.overview's Overview).
TYPE_ONLY = {"orchestrator.store.overview"}
#: Exceptions still to move behind the API: none.
PENDING: set[tuple[str, str]] = set()


def _imports(tree: ast.Module):
    """(imported module, enclosing function or None, under TYPE_CHECKING) for every import."""
    found = []

    def visit(node: ast.AST, function: str | None, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, function or child.name, type_only)
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                visit(child, function, True)
            elif isinstance(child, ast.Import):
                found.extend((alias.name, function, type_only) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.append((child.module, function, type_only))
                if child.module == "orchestrator":  # from orchestrator import store
                    found.extend((f"orchestrator.{alias.name}", function, type_only) for alias in child.names)
            else:
                visit(child, function, type_only)

    visit(tree, None, False)
    return found


def violations(path: Path) -> list[str]:
    bad = []
    for module, function, type_only in _imports(ast.parse(path.read_text(), str(path))):
        if not module.startswith(FORBIDDEN):
            continue
        if any(path.name == name and function == where and module.startswith(prefix)
               for name, where, prefix in ALLOWED):
            continue
        if type_only and module in TYPE_ONLY or (path.name, module) in PENDING:
            continue
        bad.append(f"{path.name}: {module} (in {function or 'the module'})")
    return bad


def test_cli_modules_import_no_engine_store_or_emulator_module():
    modules = sorted((ROOT / "orchestrator").glob("cli*.py"))
    assert {"cli.py", "cli_common.py", "cli_reading.py", "cli_lifecycle.py"} <= {p.name for p in modules}
    assert [line for path in modules for line in violations(path)] == []


def test_the_scan_finds_an_engine_import_inside_a_command(tmp_path):
    # The scan itself can fail: an import hidden in a function or under TYPE_CHECKING is seen.
    sample = tmp_path / "cli_sample.py"
    sample.write_text("from typing import TYPE_CHECKING\n"
                      "if TYPE_CHECKING:\n    from orchestrator.store.jobs import JobStore\n"
                      "def run():\n    from orchestrator.engine.runner import Runner\n"
                      "def emulator():\n    from orchestrator import emulator\n")
    assert violations(sample) == ["cli_sample.py: orchestrator.store.jobs (in the module)",
                                  "cli_sample.py: orchestrator.engine.runner (in run)",
                                  "cli_sample.py: orchestrator.emulator (in emulator)"]
