"""``make check-image``: one CUDA major in the Docker image, checked against the wheels' real metadata.

Resolves what the Dockerfile's pip lines install, for the image's Python and platform, with
``pip install --dry-run --report`` (pip reads each wheel's metadata from the index; nothing is
installed), and fails when any CUDA library is of another major than the base image's
(``ARG CUDA_MAJOR``). The requirements come from the Dockerfile's own ``ARG`` pins and pyproject.toml,
so the check follows both.

How a package's CUDA major is read (:func:`cuda_majors`):

- a ``-cuNN`` suffix (``nvidia-cudnn-cu13``, ``tensorrt-cu13-bindings``) names it;
- the CUDA toolkit's own packages follow the toolkit's version (``cuda-toolkit 13.0.3``,
  ``nvidia-cuda-runtime 13.0.96``, ``nvidia-cublas 13.1``...);
- any other CUDA library (``nvidia-cufft 12.0`` is CUDA 13's cuFFT) takes the major of the packages
  that require it; one that nothing classified requires is reported as unknown (a failure: the check
  never guesses).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ubuntu 24.04's glibc is 2.39: wheels tagged manylinux_2_17 .. manylinux_2_39 install there.
IMAGE_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(39, 16, -1)),
    "manylinux2014_x86_64",
    "linux_x86_64",
)
IMAGE_PYTHON = "3.12"
# Packages of the CUDA toolkit whose version is the toolkit's (CUDA 13.0.x ships cuBLAS 13.1, nvrtc 13.0).
TOOLKIT_VERSIONED = frozenset(
    {
        "cuda-toolkit",
        "cuda-bindings",
        "cuda-python",
        "nvidia-cuda-runtime",
        "nvidia-cuda-nvrtc",
        "nvidia-cuda-cupti",
        "nvidia-cuda-nvcc",
        "nvidia-cuda-crt",
        "nvidia-cuda-cccl",
        "nvidia-cublas",
        "nvidia-nvjitlink",
        "nvidia-nvtx",
        "nvidia-nvvm",
    }
)
# Names starting with these that are not CUDA libraries.
NOT_CUDA = frozenset({"nvidia-ml-py", "nvidia-pytriton", "cuda-pathfinder"})
_SUFFIX = re.compile(r"-cu(\d+)(?:-|$)")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def is_cuda_library(name: str) -> bool:
    name = normalize(name)
    return name not in NOT_CUDA and (
        name.startswith(("nvidia-", "cuda-")) or _SUFFIX.search(name) is not None
    )


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    requires: tuple[str, ...]  # normalized names of its requirements (markers and extras ignored)


def packages_from_report(report: Mapping[str, object]) -> list[Package]:
    """The packages of a ``pip install --report`` document."""
    result = []
    for item in report["install"]:  # type: ignore[attr-defined]
        meta = item["metadata"]
        requires = tuple(
            normalize(m.group(1)) for r in meta.get("requires_dist") or () if (m := _NAME.match(r))
        )
        result.append(Package(normalize(meta["name"]), str(meta["version"]), requires))
    return result


def cuda_majors(packages: Sequence[Package]) -> dict[str, int | None]:
    """The CUDA major of every CUDA library in ``packages`` (None: cannot be told)."""
    majors: dict[str, int | None] = {}
    for p in packages:
        if not is_cuda_library(p.name):
            continue
        suffix = _SUFFIX.search(p.name)
        if suffix is not None:
            majors[p.name] = int(suffix.group(1))
        elif p.name in TOOLKIT_VERSIONED:
            majors[p.name] = int(p.version.split(".")[0])
        else:
            majors[p.name] = None
    # A library without its own marker takes the majors of the packages that require it (until stable).
    changed = True
    while changed:
        changed = False
        for name, major in majors.items():
            if major is not None:
                continue
            known = {majors.get(p.name) for p in packages if name in p.requires} - {None}
            if len(known) == 1:
                majors[name] = known.pop()
                changed = True
    return majors


def mismatches(packages: Sequence[Package], base_major: int) -> list[str]:
    """One line per CUDA library that is not of ``base_major`` (or whose major is unknown)."""
    versions = {p.name: p.version for p in packages}
    lines = []
    for name, major in sorted(cuda_majors(packages).items()):
        if major is None:
            lines.append(f"{name} {versions[name]}: CUDA major unknown (nothing classified requires it)")
        elif major != base_major:
            requirers = sorted(p.name for p in packages if name in p.requires)
            lines.append(
                f"{name} {versions[name]}: CUDA {major}, the base image is CUDA {base_major}"
                + (f" (required by {', '.join(requirers)})" if requirers else "")
            )
    return lines


def dockerfile_args(text: str) -> dict[str, str]:
    """The ``ARG NAME=value`` defaults of a Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", text, flags=re.MULTILINE))


def image_requirements(dockerfile: str, pyproject: Mapping[str, object]) -> list[str]:
    """What the Dockerfile's pip lines install: its pinned GPU wheels, then the project with [export]
    less the CPU onnxruntime that the Dockerfile uninstalls for onnxruntime-gpu."""
    args = dockerfile_args(dockerfile)
    project = pyproject["project"]
    assert isinstance(project, dict)
    own = [
        f"torch=={args['TORCH_VERSION']}",
        f"onnxruntime-gpu=={args['ONNXRUNTIME_GPU_VERSION']}",
        f"tensorrt-cu{args['CUDA_MAJOR']}-bindings=={args['TENSORRT_VERSION']}",
    ]
    pinned = {normalize(m.group(1)) for r in own if (m := _NAME.match(r))}
    rest = [*project["dependencies"], *project["optional-dependencies"]["export"]]
    return own + [
        r for r in rest if (m := _NAME.match(r)) and normalize(m.group(1)) not in pinned | {"onnxruntime"}
    ]


def resolve(requirements: Iterable[str], python: str = IMAGE_PYTHON) -> dict[str, object]:
    """``pip install --dry-run --report`` of ``requirements`` for the image's Python and platform."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
            "--only-binary=:all:", "--python-version", python, "--target", str(Path(tmp) / "target"),
            "--report", str(report),
            *(arg for p in IMAGE_PLATFORMS for arg in ("--platform", p)),
            *requirements,
        ]  # fmt: skip
        subprocess.run(command, check=True)
        data = json.loads(report.read_text())
    assert isinstance(data, dict)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="check-image", description=__doc__.splitlines()[0])
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "Dockerfile")
    parser.add_argument("--report", type=Path, help="write pip's resolution report here too")
    args = parser.parse_args(argv)
    dockerfile = args.dockerfile.read_text()
    base_major = int(dockerfile_args(dockerfile)["CUDA_MAJOR"])
    requirements = image_requirements(dockerfile, tomllib.loads((ROOT / "pyproject.toml").read_text()))
    print("resolving for Python", IMAGE_PYTHON, "on", IMAGE_PLATFORMS[0], ":", " ".join(requirements))
    report = resolve(requirements)
    if args.report is not None:
        args.report.write_text(json.dumps(report))
    packages = packages_from_report(report)
    majors = cuda_majors(packages)
    versions = {p.name: p.version for p in packages}
    for name, major in sorted(majors.items()):
        print(f"  {name}=={versions[name]}: CUDA {major if major is not None else '?'}")
    bad = mismatches(packages, base_major)
    if bad:
        print(f"check-image: FAIL, the base image is CUDA {base_major}:", *bad, sep="\n  ", file=sys.stderr)
        return 1
    print(f"check-image: OK, {len(majors)} CUDA libraries, all CUDA {base_major} like the base image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
