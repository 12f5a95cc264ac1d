"""The suite's layout: no test module imports another test module or ``conftest`` (what tests share
lives in :mod:`tests.support` and :mod:`export.fixtures`), and the benchmarks import nothing of tests."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
BENCH = TESTS.parent / "bench"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions too), relative imports resolved
    against its package (``tests`` or ``bench``)."""
    package = path.parent.name
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(filter(None, (package, base)))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _is_test_module(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "tests" and len(parts) > 1 and (parts[1].startswith("test_") or parts[1] == "conftest")


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    offenders = {
        f"{path.name} imports {name}"
        for path in sorted(TESTS.rglob("*.py"))
        for name in imported_modules(path)
        if _is_test_module(name)
    }
    assert not offenders, sorted(offenders)


def test_the_benchmarks_import_nothing_of_the_tests() -> None:
    offenders = {
        f"{path.name} imports {name}"
        for path in sorted(BENCH.glob("*.py"))
        for name in imported_modules(path)
        if name == "tests" or name.startswith("tests.")
    }
    assert not offenders, sorted(offenders)


def test_shared_test_code_is_not_collected_as_tests() -> None:
    assert not list((TESTS / "support").glob("test_*.py"))


def test_the_check_sees_an_import_of_a_test_module(tmp_path: Path) -> None:
    sample = tmp_path / "tests" / "test_sample.py"
    sample.parent.mkdir()
    sample.write_text(
        "from tests.test_api import HOSTILE\nfrom .conftest import x\n"
        "def f():\n    import tests.test_parity\n"
    )
    found = {n for n in imported_modules(sample) if _is_test_module(n)}
    assert {"tests.test_api", "tests.conftest", "tests.test_parity"} <= found
