"""The Docker image without a Docker daemon: its file tree, assembled exactly as ``docker build`` would
(the Dockerfile's COPY lines, .dockerignore), imports and answers ``--help`` with the checkout's own
editable install out of the way; and ``make check-image``'s decision on recorded pip metadata.

The recorded reports (tests/data/pip-report-*.json) are what ``pip install --dry-run --report`` gave for
the Dockerfile's pins on PyPI (``python -m export.toolchain.image_check --report``), trimmed to the CUDA
libraries and the packages that require them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from export.toolchain import image_check
from tests.support.dockerfile import instructions

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


# --------------------------------------------------------------------------------------------------
# .dockerignore and COPY, as the Docker builder applies them
# --------------------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``, cleaned, relative to the context)."""
    pattern = os.path.normpath(pattern.strip()).lstrip("/")
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # "**/": any number of directories, none included
                out += "(?:.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith("^") else body) + "]"
            i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude, regex) per line, in order; comments and blank lines dropped."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rules.append((not negate, _pattern_regex(line[1:] if negate else line)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the context path ``path`` is left out: the last rule that matches it or one of its
    parent directories decides (Docker's ``MatchesOrParentMatches``)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for exclude, regex in rules:
        if any(regex.match(c) for c in candidates):
            result = exclude
    return result


def test_dockerignore_matcher_follows_docker() -> None:
    rules = dockerignore_rules("**/__pycache__\n*.pyc\nmodel_repository/*\n!model_repository/python_onnx\n")
    assert ignored("server/__pycache__/x.pyc", rules)
    assert ignored("__pycache__/x", rules)
    assert ignored("a.pyc", rules) and not ignored("server/a.pyc", rules)  # "*" stops at "/"
    assert ignored("model_repository/python_torch/model.py", rules)
    assert not ignored("model_repository/python_onnx/model.py", rules)
    assert not ignored("server/app.py", rules)


def image_tree(dest: Path) -> Path:
    """The image's WORKDIR as the Dockerfile's COPY lines fill it from the filtered build context."""
    rules = dockerignore_rules((ROOT / ".dockerignore").read_text())
    (workdir,) = [a for k, a in instructions() if k == "WORKDIR"]
    copies = [shlex.split(a) for k, a in instructions() if k == "COPY"]
    assert copies, "the Dockerfile copies nothing"
    for args in copies:
        assert not [a for a in args if a.startswith("--")], f"COPY flags are not modelled here: {args}"
        *sources, target = args
        base = dest / Path(target if target.startswith("/") else f"{workdir}/{target}").relative_to("/")
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the build context"
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            copied = 0
            for f in files:
                rel = f.relative_to(ROOT).as_posix()
                if ignored(rel, rules):
                    continue
                if path.is_dir():
                    out = base / f.relative_to(path)  # a directory's contents go into the target
                else:
                    out = base / f.name if target.endswith("/") or len(sources) > 1 else base
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)
                copied += 1
            assert copied, f"COPY {source}: .dockerignore leaves nothing of it in the build context"
    return dest / Path(workdir).relative_to("/")


def _isolated(code: str, paths: list[str], cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a Python that sees only ``paths`` and this interpreter's site-packages, without
    site processing: no .pth file runs, so the checkout's editable install (a .pth finder) is absent."""
    site = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    path = [*paths, *dict.fromkeys(site)]
    prelude = f"import sys; sys.path[:] = {path!r} + sys.path; sys.argv = {list(argv)!r}\n"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", prelude + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )


@pytest.fixture(scope="module")
def installed_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the image's WORKDIR tree, the project installed from it as the image's pip does)."""
    root = tmp_path_factory.mktemp("image")
    tree = image_tree(root / "fs")
    target = root / "site-packages"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(tree)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return tree, target


def test_image_tree_holds_what_the_image_installs(installed_image: tuple[Path, Path]) -> None:
    tree, target = installed_image
    for sub in ("python_onnx", "python_torch"):
        assert (tree / "model_repository" / sub / "model.py").is_file()
        assert (target / "model_repository" / sub / "model.py").is_file()
    assert not (tree / "tests").exists() and not (tree / ".git").exists()


def test_image_import_check_runs_from_the_image_tree(installed_image: tuple[Path, Path]) -> None:
    """The Dockerfile's own ``python3 -c "..."`` after the project install, from its WORKDIR."""
    tree, target = installed_image
    (install_run,) = [a for k, a in instructions() if k == "RUN" and 'pip install ".[export]"' in a]
    check = re.findall(r'python3 -c "([^"]+)"', install_run)[-1]
    probe = check + "\nimport export, server; print(export.__file__); print(server.__file__)"
    result = _isolated(probe, ["", str(target)], tree)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.split():
        assert Path(line).is_relative_to(tree) or Path(line).is_relative_to(target), line
        assert not Path(line).is_relative_to(ROOT), f"imported from the checkout: {line}"


@pytest.mark.parametrize(
    "script", sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
)
def test_every_console_script_answers_help_from_the_image(
    installed_image: tuple[Path, Path], script: str, tmp_path: Path
) -> None:
    _, target = installed_image
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"][script]
    module, _, function = entry.partition(":")
    code = (
        f"import {module} as m\nassert m.__file__.startswith({str(target)!r}), m.__file__\n"
        f"sys.exit(m.{function}())"
    )
    result = _isolated(code, [str(target)], tmp_path, script, "--help")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"usage: {script}" in result.stdout


def test_a_missing_model_source_fails_the_image_check(tmp_path: Path) -> None:
    """The check can fail: a tree without model_repository/python_torch cannot export python-torch,
    and says so when used, while the import check (the tensorrt target needs neither) passes."""
    tree = image_tree(tmp_path / "fs")
    shutil.rmtree(tree / "model_repository" / "python_torch")
    code = (
        "import export.toolchain.cli\nfrom export.toolchain.repository import python_model\n"
        "try:\n    python_model('python-torch')\nexcept FileNotFoundError as e:\n    print('missing', e)\n"
    )
    result = _isolated(code, ["", str(tree)], tree)
    assert result.returncode == 0, result.stderr
    assert "missing" in result.stdout and "python_torch" in result.stdout


# --------------------------------------------------------------------------------------------------
# make check-image: the decision on recorded metadata
# --------------------------------------------------------------------------------------------------


def _report(name: str) -> list[image_check.Package]:
    return image_check.packages_from_report(json.loads((DATA / name).read_text()))


def test_cuda13_wheels_over_a_cuda12_base_fail() -> None:
    packages = _report("pip-report-image-cuda13.json")
    bad = image_check.mismatches(packages, base_major=12)
    assert any(line.startswith("nvidia-cudnn-cu13 ") for line in bad)
    assert any(line.startswith("cuda-toolkit 13.0.3") and "torch" in line for line in bad)
    # cuFFT 12.0 is CUDA 13's: read from what requires it, not from its own version.
    assert image_check.cuda_majors(packages)["nvidia-cufft"] == 13
    assert any(line.startswith("nvidia-cufft ") for line in bad)


def test_matching_majors_pass() -> None:
    assert image_check.mismatches(_report("pip-report-image-cuda13.json"), base_major=13) == []
    cuda12 = _report("pip-report-cuda12.json")
    assert image_check.mismatches(cuda12, base_major=12) == []
    assert image_check.mismatches(cuda12, base_major=13)


def test_an_unclassifiable_cuda_library_fails() -> None:
    lone = [image_check.Package("nvidia-cufft", "12.0.0.61", ())]
    assert image_check.cuda_majors(lone) == {"nvidia-cufft": None}
    assert "unknown" in image_check.mismatches(lone, 13)[0]
    assert image_check.cuda_majors([image_check.Package("nvidia-ml-py", "13.615.71", ())]) == {}


def test_image_requirements_follow_the_dockerfile_and_pyproject() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    args = image_check.dockerfile_args(dockerfile)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = image_check.image_requirements(dockerfile, pyproject)
    assert requirements[:3] == [
        f"torch=={args['TORCH_VERSION']}",
        f"onnxruntime-gpu=={args['ONNXRUNTIME_GPU_VERSION']}",
        f"tensorrt-cu{args['CUDA_MAJOR']}-bindings=={args['TENSORRT_VERSION']}",
    ]
    assert not [r for r in requirements if r.startswith(("onnxruntime=", "torch>"))]
    assert "diffusers==0.42.1" in requirements
    # The [tensorrt] extra is the image's TensorRT, exactly.
    (extra,) = pyproject["project"]["optional-dependencies"]["tensorrt"]
    assert extra == f"tensorrt-cu{args['CUDA_MAJOR']}=={args['TENSORRT_VERSION']}"
