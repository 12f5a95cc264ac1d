"""Shared fixtures: tiny models, their Triton repositories, real bundled Triton servers and services.

Everything heavy is session-scoped and built once: a tiny SD and a tiny SDXL model folder, exported
to one repository each, each served by its own bundled tritonserver.  Services (the Litestar app on
uvicorn, over real HTTP on a free loopback port) are cheap and made per settings.

Fixtures only: what test modules import is in :mod:`tests.support` (and the harness,
:mod:`export.fixtures.service`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from export.fixtures.tiny import build_tiny_model
from export.fixtures.tiny_lora import build_tiny_lora
from export.toolchain.options import RepositoryOptions
from export.toolchain.repository import export_repository
from server.engines import repository_models
from server.settings import Settings
from server.triton.launcher import BundledTriton, TritonLaunchConfig
from tests.support.lora import LORA_CASES
from tests.support.service import DEFAULT_TARGET, running_service


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("t2i")


@pytest.fixture(scope="session")
def tiny_model(work_dir: Path) -> Callable[[str], Path]:
    def get(family: str) -> Path:
        return build_tiny_model(family, work_dir / "models" / f"tiny-{family}")  # type: ignore[arg-type]

    return get


# The targets the bundled (CPU) Triton serves; python-torch starts its own Triton per family whose
# models import torch and diffusers, so its half of a parametrised test is marked slow.
CPU_TARGETS = (DEFAULT_TARGET, pytest.param("python-torch", marks=pytest.mark.slow))


@pytest.fixture(params=CPU_TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    """Each CPU Triton target (python-onnx, python-torch): tests that take it run once per target."""
    return str(request.param)


def _suffix(target: str) -> str:
    return "" if target == DEFAULT_TARGET else f"-{target}"


@pytest.fixture(scope="session")
def repository(work_dir: Path, tiny_model: Callable[[str], Path]) -> Callable[..., Path]:
    """``repository(family, target="python-onnx")``: the tiny model exported for that target."""

    def get(family: str, target: str = DEFAULT_TARGET) -> Path:
        out = work_dir / "repositories" / f"{family}{_suffix(target)}"
        return export_repository(str(tiny_model(family)), out, RepositoryOptions(target=target))  # type: ignore[arg-type]

    return get


@pytest.fixture(scope="session")
def triton(work_dir: Path, repository: Callable[..., Path]) -> Iterator[Callable[..., BundledTriton]]:
    """``triton(family, target="python-onnx")``: a running bundled tritonserver per family and target,
    started on first use, stopped at the end."""
    servers: dict[tuple[str, str], BundledTriton] = {}

    def get(family: str, target: str = DEFAULT_TARGET) -> BundledTriton:
        key = (family, target)
        if key not in servers or not servers[key].is_running():
            # Explicit model control, as the service runs it: LoRA variants load and unload on demand.
            config = TritonLaunchConfig(
                model_repository=repository(family, target),
                state_dir=work_dir / f"state-{family}{_suffix(target)}",
                explicit_model_control=True,
                load_models=repository_models(repository(family, target)),
                # python-torch models import torch and diffusers in each model's stub process first.
                startup_timeout_s=120 if target == DEFAULT_TARGET else 600,
            )
            server = BundledTriton(config)
            server.start()
            servers[key] = server
        return servers[key]

    yield get
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def service(
    tiny_model: Callable[[str], Path],
    triton: Callable[..., BundledTriton],
    repository: Callable[..., Path],
) -> Iterator[Callable[..., str]]:
    """``service(family, target="python-onnx", **settings)`` -> base URL of a ready service on that
    family's Triton for that target (a target other than the default also sets MODEL_REPOSITORY).

    Services with the same arguments are shared for the session.
    """
    stack = contextlib.ExitStack()
    urls: dict[tuple, str] = {}

    def get(family: str, target: str = DEFAULT_TARGET, **overrides: object) -> str:
        key = (family, target, tuple(sorted(overrides.items())))
        if key not in urls:
            if target != DEFAULT_TARGET:
                overrides = {"model_repository": repository(family, target), **overrides}
            settings = Settings(
                model_id=str(tiny_model(family)),
                triton_url=triton(family, target).http_url,
                **overrides,  # type: ignore[arg-type]
            )
            urls[key] = stack.enter_context(running_service(settings)).url
        return urls[key]

    with stack:
        yield get


@pytest.fixture(scope="session")
def lora_dir(work_dir: Path, tiny_model: Callable[[str], Path]) -> Path:
    """LoRAs per family and format: ``a`` with text-encoder layers too, ``b`` for the UNet only."""
    root = work_dir / "loras"
    for family, fmt in LORA_CASES:
        for name, seed, text in (("a", 1, True), ("b", 2, False), ("c", 3, False), ("d", 4, False)):
            out = root / f"{family}-{fmt}-{name}"
            if not out.exists():
                build_tiny_lora(family, out, fmt, seed, model_dir=tiny_model(family), text_encoder=text)  # type: ignore[arg-type]
    return root
