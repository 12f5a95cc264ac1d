"""The tree keeps the shape docs/ARCHITECTURE.md describes: what each layer may import, module sizes,
and that every file the code and the docs cite exists (the tests' own layout: tests/test_layout.py)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer -> the project layers it may import (besides itself). bench/ may import any layer but tests/.
ALLOWED: dict[str, frozenset[str]] = {
    "export.contract": frozenset(),
    "export.models": frozenset({"export.contract"}),
    "export.triton_models": frozenset({"export.contract", "export.models"}),
    "export.toolchain": frozenset({"export.contract", "export.models", "export.triton_models"}),
    "export.fixtures": frozenset({"export.contract", "export.models", "export.toolchain"}),
    "server": frozenset({"export.contract", "export.models"}),
    "model_repository": frozenset({"export.contract", "export.triton_models"}),
}
PROJECT = ("export", "server", "bench", "tests", "model_repository")
# Inside server/: module or package -> the server modules it may import (docs/ARCHITECTURE.md, section 1).
_BASE = frozenset({"errors", "metrics", "settings"})
SERVER_ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "served": frozenset(),
    "settings": frozenset({"served"}),
    "hardware": frozenset(),
    "engines": frozenset(),
    "pipeline": frozenset({"errors"}),
    "triton": frozenset({"errors", "settings"}),
    "metrics": frozenset({"pipeline"}),
    "admission": _BASE,
    "loras": _BASE,
    "container": _BASE,
    "variants": _BASE,
    "loaded": frozenset({"engines", "metrics", "pipeline", "settings", "triton", "variants"}),
    "registry": _BASE | {"engines", "loaded", "pipeline", "triton", "variants"},
    "supervisor": _BASE | {"engines", "hardware", "loaded", "pipeline", "registry", "triton", "variants"},
    "service": _BASE | {"admission", "api", "loaded", "loras", "pipeline", "registry", "supervisor"},
    "api": _BASE | {"hardware", "service"},
}
MAX_LINES = 500
# A path the code or the docs cite: a project folder, then a file name with an extension.
CITED = re.compile(
    r"(?<![\w./-])((?:server|export|bench|tests|model_repository|docs)/[\w./-]*\w\.(?:py|md|json|pbtxt|yml|toml|png))\b"
)


def _tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]


def _layer(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[0] == "export" and len(parts) > 2:
        return f"export.{parts[1]}"
    return parts[0]


def _imported_layers(path: Path) -> set[str]:
    layers = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] in PROJECT:
                layers.add(".".join(parts[:2]) if parts[0] == "export" and len(parts) > 1 else parts[0])
    return layers


def _sources() -> list[Path]:
    return [p for p in _tracked("*.py") if p.relative_to(ROOT).parts[0] in PROJECT]


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in _sources():
        layer = _layer(path)
        if layer == "tests":
            continue
        allowed = ALLOWED.get(layer)
        for imported in _imported_layers(path) - {layer}:
            if layer == "bench" and imported != "tests":
                continue
            if allowed is None or imported not in allowed:
                wrong.append(f"{path.relative_to(ROOT)} ({layer}) imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_server_modules_import_down_the_layers() -> None:
    wrong = []
    for path in _tracked("server/*.py"):
        own = path.relative_to(ROOT / "server").parts[0].removesuffix(".py")
        allowed = SERVER_ALLOWED.get(own)
        if allowed is None:  # app, __main__, __init__: the wiring
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "server" and len(parts) > 1 and parts[1] != own and parts[1] not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_no_module_outside_tests_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _sources()
        if _layer(p) != "tests" and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


@pytest.mark.parametrize("pattern", ["*.py", "*.md", "Makefile", "Dockerfile", "*.toml"])
def test_every_cited_file_exists(pattern: str) -> None:
    missing = set()
    for path in _tracked(pattern):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "tests" and rel.parts[1:2] == ("data",):
            continue
        for cited in CITED.findall(path.read_text()):
            if not (ROOT / cited).exists() and not (ROOT / cited.rstrip(".")).exists():
                missing.add(f"{rel}: {cited}")
    assert not missing, "\n".join(sorted(missing))
