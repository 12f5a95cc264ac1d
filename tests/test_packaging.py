"""A non-editable install carries the Triton model sources, so ``t2i-export`` works from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_model_sources_and_export_finds_them(tmp_path: Path) -> None:
    """~20 s: build a wheel from a copy of the sources, install it (no deps) into a folder and import
    export from there, away from the checkout."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("server", "export"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    sources = sorted(p.parent.name for p in (ROOT / "model_repository").glob("python_*/model.py"))
    assert "python_onnx" in sources
    for name in sources:
        (source / "model_repository" / name).mkdir(parents=True)
        shutil.copy(ROOT / "model_repository" / name / "model.py", source / "model_repository" / name)
    # A generated repository beside them (as `make export` leaves one) must stay out of the wheel.
    generated = source / "model_repository" / "tiny-sd" / "unet" / "1"
    generated.mkdir(parents=True)
    (generated / "model.py").write_text("")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            ".",
        ],
        cwd=source,
        check=True,
    )
    (wheel,) = wheels.glob("triton_t2i-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
    )
    assert not (site / "model_repository" / "tiny-sd").exists()
    code = (
        "import export, export.toolchain.repository as r\n"
        "print(export.__file__)\n"
        "for name in " + repr(sources) + ": print(r.model_source(name))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout.split()
    assert out[0] == str(site / "export" / "__init__.py")
    for name, path in zip(sources, out[1:], strict=True):
        assert path == str(site / "model_repository" / name / "model.py")
        assert Path(path).read_bytes() == (ROOT / "model_repository" / name / "model.py").read_bytes()
