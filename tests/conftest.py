"""Shared fixtures: tiny models, their Triton repositories, real bundled Triton servers and services.

Everything heavy is session-scoped and built once: a tiny SD and a tiny SDXL model folder, exported
to one repository each, each served by its own bundled tritonserver.  Services (the Litestar app on
uvicorn, over real HTTP on a free loopback port) are cheap and made per settings.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from litestar import Litestar

from export.repository import export_repository
from export.tiny import build_tiny_model
from export.tiny_lora import build_tiny_lora
from server.app import create_app
from server.runtime import repository_models
from server.settings import Settings
from server.triton.launcher import BundledTriton, TritonLaunchConfig

FAMILIES = ("sd", "sdxl")
LORA_CASES = [("sd", "diffusers"), ("sd", "kohya"), ("sdxl", "diffusers"), ("sdxl", "kohya")]

# For tests that only need the bundled tritonserver; the project always installs it.
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None,
    reason="nvidia-pytriton (the bundled tritonserver) is not installed",
)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("t2i")


@pytest.fixture(scope="session")
def tiny_model(work_dir: Path) -> Callable[[str], Path]:
    def get(family: str) -> Path:
        return build_tiny_model(family, work_dir / "models" / f"tiny-{family}")  # type: ignore[arg-type]

    return get


@pytest.fixture(scope="session")
def repository(work_dir: Path, tiny_model: Callable[[str], Path]) -> Callable[[str], Path]:
    def get(family: str) -> Path:
        return export_repository(str(tiny_model(family)), work_dir / "repositories" / family)

    return get


@pytest.fixture(scope="session")
def triton(work_dir: Path, repository: Callable[[str], Path]) -> Iterator[Callable[[str], BundledTriton]]:
    """A running bundled tritonserver per family, started on first use, stopped at the end."""
    servers: dict[str, BundledTriton] = {}

    def get(family: str) -> BundledTriton:
        if family not in servers or not servers[family].is_running():
            # Explicit model control, as the service runs it: LoRA variants load and unload on demand.
            config = TritonLaunchConfig(
                model_repository=repository(family),
                state_dir=work_dir / f"state-{family}",
                explicit_model_control=True,
                load_models=repository_models(repository(family)),
            )
            server = BundledTriton(config)
            server.start()
            servers[family] = server
        return servers[family]

    yield get
    for server in servers.values():
        server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RunningService:
    url: str
    app: Litestar


@contextlib.contextmanager
def running_service(
    settings: Settings, wait_for: str | None = "OK", timeout_s: float = 120
) -> Iterator[RunningService]:
    """Run ``create_app(settings)`` on uvicorn in a thread until it reports ``wait_for``; always stop it."""
    port = free_port()
    settings = settings.with_overrides(host="127.0.0.1", port=port)
    app = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                status = httpx.get(f"{url}/health", timeout=5).json()["status"]
                if wait_for is None or status == wait_for:
                    break
                if status == "ERROR" and wait_for == "OK":
                    raise RuntimeError(f"service at {url} failed to start")
            time.sleep(0.1)
        else:
            raise TimeoutError(f"service at {url} did not reach {wait_for} (last status {status})")
        yield RunningService(url, app)
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="session")
def service(
    tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> Iterator[Callable[..., str]]:
    """``service(family, **settings)`` -> base URL of a ready service on that family's Triton.

    Services with the same arguments are shared for the session.
    """
    stack = contextlib.ExitStack()
    urls: dict[tuple, str] = {}

    def get(family: str, **overrides: object) -> str:
        key = (family, tuple(sorted(overrides.items())))
        if key not in urls:
            settings = Settings(
                model_id=str(tiny_model(family)),
                triton_url=triton(family).grpc_url,
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
