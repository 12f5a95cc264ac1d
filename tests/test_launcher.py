"""Tests for server.triton.launcher: the bundled tritonserver from the nvidia-pytriton wheel."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from export.fixtures.service import wait_until
from server.triton.launcher import (
    BundledTriton,
    TritonLaunchConfig,
    TritonStartError,
    build_command,
    prepare_backend_directory,
    process_stat,
    stub_model,
    stub_processes,
    tritonserver_binary,
    tritonserver_env,
)
from tests.support.service import needs_triton

CONFIG_PBTXT = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
dynamic_batching {{}}
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

ADD_ONE_MODEL_PY = textwrap.dedent(
    """\
    import numpy as np
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            return responses
    """
)

BROKEN_MODEL_PY = 'raise RuntimeError("deliberately broken model for the launcher test")\n'

SLOW_MODEL_PY = textwrap.dedent(
    """\
    import time


    class TritonPythonModel:
        def initialize(self, args):
            time.sleep(120)

        def execute(self, requests):
            return []
    """
)

# A direct opener: requests to 127.0.0.1 must not go through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def write_model(repository: Path, name: str, model_py: str) -> None:
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(CONFIG_PBTXT.format(name=name))
    (version_dir / "model.py").write_text(model_py)


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with _OPENER.open(url, timeout=5) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code), exc.read()


def infer_add_one(http_url: str, model: str, data: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    body = {
        "inputs": [
            {
                "name": "INPUT0",
                "shape": list(data.shape),
                "datatype": "FP32",
                "data": data.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "OUTPUT0"}],
    }
    request = urllib.request.Request(
        f"{http_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with _OPENER.open(request, timeout=30) as response:
        answer = json.loads(response.read())
    (output,) = answer["outputs"]
    assert output["name"] == "OUTPUT0"
    assert output["datatype"] == "FP32"
    return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])


def port_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def process_group_gone(pid: int) -> bool:
    """True when neither the process nor anything in its process group (python stubs) is alive."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        pass
    else:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    repo = tmp_path / "model_repository"
    repo.mkdir()
    return repo


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def launch() -> Iterator[list[BundledTriton]]:
    """Collects the servers a test creates and stops every one of them, pass or fail."""
    servers: list[BundledTriton] = []
    yield servers
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------------------------------
# No server process
# --------------------------------------------------------------------------------------------------


@needs_triton
def test_tritonserver_binary_is_in_the_wheel() -> None:
    binary = tritonserver_binary()
    assert binary.name == "tritonserver"
    assert binary.is_file()
    assert os.access(binary, os.X_OK)
    assert "pytriton" in binary.parts


def test_missing_wheel_gives_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "pytriton" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(TritonStartError, match="pip install"):
        tritonserver_binary()


@needs_triton
def test_backend_directory_is_built_once_and_reused(state_dir: Path) -> None:
    backends = prepare_backend_directory(state_dir)
    assert backends == state_dir / "backends"
    python_dir = backends / "python"
    names = {"libtriton_python.so", "triton_python_backend_utils.py", "triton_python_backend_stub"}
    assert names <= {p.name for p in python_dir.iterdir()}
    stub = python_dir / "triton_python_backend_stub"
    assert stub.stat().st_mode & stat.S_IXUSR
    expected_stub = (
        tritonserver_binary().parents[1]
        / "python_backend_stubs"
        / f"{sys.version_info.major}.{sys.version_info.minor}"
        / "triton_python_backend_stub"
    )
    assert stub.read_bytes() == expected_stub.read_bytes()

    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in python_dir.iterdir()}
    assert prepare_backend_directory(state_dir) == backends
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in python_dir.iterdir()}
    assert after == before, "identical files must be reused, not copied again"

    # A damaged copy is replaced.
    stub.write_bytes(b"garbage")
    prepare_backend_directory(state_dir)
    assert stub.read_bytes() == expected_stub.read_bytes()


@needs_triton
def test_environment_puts_wheel_libs_and_interpreter_first() -> None:
    env = tritonserver_env({"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    ld_entries = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert ld_entries[0].endswith("nvidia_pytriton.libs")
    assert Path(ld_entries[0]).is_dir()
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        assert ld_entries[1] == str(libdir)
    assert ld_entries[-1] == "/opt/lib"
    path_entries = env["PATH"].split(os.pathsep)
    assert path_entries[0] == str(Path(sys.executable).parent)
    assert path_entries[-1] == "/usr/bin"


def _command(config: TritonLaunchConfig, metrics_port: int | None = None) -> list[str]:
    return build_command(
        config,
        binary=Path("/bin/tritonserver"),
        backend_directory=Path("/state/backends"),
        http_port=1001,
        grpc_port=1002,
        metrics_port=metrics_port,
    )


def test_build_command_options(tmp_path: Path) -> None:
    plain = _command(TritonLaunchConfig(tmp_path / "repo", tmp_path))
    assert plain[:3] == ["/bin/tritonserver", "--model-repository", str(tmp_path / "repo")]
    joined = " ".join(plain)
    assert "--backend-directory /state/backends" in joined
    assert "--http-address 127.0.0.1 --http-port 1001" in joined
    assert "--grpc-address 127.0.0.1 --grpc-port 1002" in joined
    assert "--allow-metrics false" in joined
    assert "--log-verbose 0" in joined
    assert not any(arg.startswith("--model-control-mode") for arg in plain)
    assert not any(arg.startswith("--load-model") for arg in plain)

    explicit_all = _command(
        TritonLaunchConfig(tmp_path / "repo", tmp_path, explicit_model_control=True, metrics=True),
        metrics_port=1003,
    )
    assert "--model-control-mode=explicit" in explicit_all
    assert [a for a in explicit_all if a.startswith("--load-model")] == ["--load-model=*"]
    assert "--allow-metrics true --metrics-address 127.0.0.1 --metrics-port 1003" in " ".join(explicit_all)

    explicit_named = _command(
        TritonLaunchConfig(tmp_path / "repo", tmp_path, explicit_model_control=True, load_models=("a", "b"))
    )
    assert [a for a in explicit_named if a.startswith("--load-model")] == ["--load-model=a", "--load-model=b"]

    with pytest.raises(ValueError, match="explicit_model_control"):
        _command(TritonLaunchConfig(tmp_path / "repo", tmp_path, load_models=("a",)))


def test_urls_before_start_and_default_log_path(tmp_path: Path) -> None:
    server = BundledTriton(TritonLaunchConfig(tmp_path / "repo", tmp_path / "state"))
    assert server.log_path == tmp_path / "state" / "triton.log"
    assert not server.is_running()
    assert server.metrics_url is None
    with pytest.raises(RuntimeError):
        _ = server.http_url
    server.stop()  # stopping a server never started is fine


def test_missing_repository_is_a_start_error(tmp_path: Path) -> None:
    server = BundledTriton(TritonLaunchConfig(tmp_path / "nowhere", tmp_path / "state"))
    with pytest.raises(TritonStartError, match="nowhere"):
        server.start()


# --------------------------------------------------------------------------------------------------
# Real tritonserver
# --------------------------------------------------------------------------------------------------


@needs_triton
def test_serves_a_python_model_and_stops(
    repository: Path, state_dir: Path, tmp_path: Path, launch: list[BundledTriton]
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    log_path = tmp_path / "logs" / "server.log"
    server = BundledTriton(
        TritonLaunchConfig(repository, state_dir, log_path=log_path, metrics=True, startup_timeout_s=60)
    )
    launch.append(server)
    with server:
        assert server.is_running()
        pid = server.pid
        assert pid is not None
        http_port = server.http_port
        grpc_port = server.grpc_port
        assert server.http_url == f"http://127.0.0.1:{http_port}"
        assert server.grpc_url == f"127.0.0.1:{grpc_port}"
        assert server.log_path == log_path

        assert http_get(f"{server.http_url}/v2/health/ready")[0] == 200
        assert http_get(f"{server.http_url}/v2/models/add_one/ready")[0] == 200
        data = np.arange(6, dtype=np.float32).reshape(2, 3)
        np.testing.assert_array_equal(infer_add_one(server.http_url, "add_one", data), data + 1)

        assert server.metrics_url is not None
        status, metrics = http_get(server.metrics_url)
        assert status == 200
        assert b"nv_inference_request_success" in metrics

        assert log_path.is_file()
        log_text = log_path.read_text()
        assert "===== tritonserver start" in log_text
        assert "add_one" in log_text
        assert (state_dir / "backends" / "python" / "triton_python_backend_stub").is_file()

    assert not server.is_running()
    assert not port_answers(http_port)
    assert not port_answers(grpc_port)
    assert process_group_gone(pid)
    server.stop()  # idempotent


@needs_triton
def test_grpc_url_serves_tritonclient(repository: Path, state_dir: Path, launch: list[BundledTriton]) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60))
    launch.append(server)
    server.start()
    assert server.metrics_url is None
    data = np.array([[1.5, -2.0], [0.0, 10.0]], dtype=np.float32)
    client = grpcclient.InferenceServerClient(url=server.grpc_url)
    try:
        assert client.is_model_ready("add_one")
        infer_input = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        infer_input.set_data_from_numpy(data)
        result = client.infer("add_one", [infer_input])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data + 1)
    finally:
        client.close()  # an open client delays the server's shutdown
    server.stop()
    assert not server.is_running()


@needs_triton
def test_broken_model_makes_start_fail_with_log_text(
    repository: Path, state_dir: Path, launch: list[BundledTriton], caplog: pytest.LogCaptureFixture
) -> None:
    # Default model control mode loads everything at start; with --exit-on-error (Triton's
    # default) a model that fails to load makes tritonserver exit with code 1 at once, also when
    # healthy models sit beside it (left out here: unloading them only makes the exit slower).
    write_model(repository, "broken", BROKEN_MODEL_PY)
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60))
    launch.append(server)
    caplog.set_level(logging.INFO, logger="server.triton.launcher")
    with pytest.raises(TritonStartError) as excinfo:
        server.start()
    message = str(excinfo.value)
    assert "exited with code" in message
    assert str(server.log_path) in message
    assert "deliberately broken model" in message  # the model's own exception, from the log
    assert "failed to load" in message
    assert not server.is_running()
    assert server.pid is None
    assert server.log_path.stat().st_size > 0
    (pid,) = (int(m) for m in re.findall(r"tritonserver started, pid (\d+)", caplog.text))
    assert process_group_gone(pid)


@needs_triton
def test_startup_timeout_raises_and_kills(
    repository: Path, state_dir: Path, launch: list[BundledTriton], caplog: pytest.LogCaptureFixture
) -> None:
    write_model(repository, "slow", SLOW_MODEL_PY)  # initialize() sleeps far longer than the timeout
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=2))
    launch.append(server)
    caplog.set_level(logging.INFO, logger="server.triton.launcher")
    with pytest.raises(TritonStartError, match="not ready after 2 s") as excinfo:
        server.start()
    assert str(server.log_path) in str(excinfo.value)
    assert "loading: slow:1" in str(excinfo.value)
    assert not server.is_running()
    pids = [int(m) for m in re.findall(r"tritonserver started, pid (\d+)", caplog.text)]
    assert len(pids) == 1
    assert process_group_gone(pids[0])  # tritonserver and the stub stuck in initialize() are gone
    # The killed stub's shared-memory region (/dev/shm) is removed, not leaked.
    removed = re.findall(r"removed leftover shared memory (\S+)", caplog.text)
    assert removed, "the python backend region of the killed model should have been cleaned up"
    assert all(not Path(region).exists() for region in removed)


@needs_triton
def test_explicit_model_control_without_names_loads_everything(
    repository: Path, state_dir: Path, launch: list[BundledTriton]
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    write_model(repository, "add_one_again", ADD_ONE_MODEL_PY)
    server = BundledTriton(
        TritonLaunchConfig(repository, state_dir, explicit_model_control=True, startup_timeout_s=60)
    )
    launch.append(server)
    server.start()
    data = np.ones((1, 4), dtype=np.float32)
    for name in ("add_one", "add_one_again"):
        assert http_get(f"{server.http_url}/v2/models/{name}/ready")[0] == 200
        np.testing.assert_array_equal(infer_add_one(server.http_url, name, data), data + 1)
    server.stop()


@needs_triton
def test_explicit_model_control_loads_only_named_models(
    repository: Path, state_dir: Path, launch: list[BundledTriton]
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    write_model(repository, "broken", BROKEN_MODEL_PY)
    server = BundledTriton(
        TritonLaunchConfig(
            repository,
            state_dir,
            explicit_model_control=True,
            load_models=("add_one",),
            startup_timeout_s=60,
        )
    )
    launch.append(server)
    server.start()  # the broken model is never loaded, so the start succeeds
    assert http_get(f"{server.http_url}/v2/models/add_one/ready")[0] == 200
    assert http_get(f"{server.http_url}/v2/models/broken/ready")[0] != 200
    data = np.array([[41.0]], dtype=np.float32)
    np.testing.assert_array_equal(infer_add_one(server.http_url, "add_one", data), data + 1)
    server.stop()


# --------------------------------------------------------------------------------------------------
# Faults: shared memory of one launch, death with the parent, stale servers of a state dir
# --------------------------------------------------------------------------------------------------

SHM = Path("/dev/shm")


def regions(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM.glob(f"{prefix}*"))


def stub_pids(server: BundledTriton) -> dict[str, int]:
    """Model name -> pid of its python-backend stub (any parent: also one its server left behind)."""
    return {stub_model(args): pid for pid, args in stub_processes(server.backend_directory).items()}


def gone(pid: int) -> bool:
    try:
        return process_stat(pid)[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def foreign_region() -> Iterator[Path]:
    """A region named like the python backend's default, made by this test: no cleanup may touch it."""
    region = SHM / f"triton_python_backend_shm_region_t2i-test-{os.getpid()}-{time.monotonic_ns()}"
    region.write_bytes(b"\0" * 16)
    yield region
    region.unlink(missing_ok=True)


@needs_triton
def test_regions_carry_a_launch_prefix_and_all_go_with_the_server_even_a_killed_stubs(
    repository: Path, state_dir: Path, launch: list[BundledTriton], foreign_region: Path
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    write_model(repository, "add_two", ADD_ONE_MODEL_PY)
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60))
    launch.append(server)
    server.start()
    prefix = server.shm_region_prefix
    assert prefix is not None and prefix.startswith("t2i_triton_")
    assert len(regions(prefix)) >= 2  # one per stub at least
    stubs = stub_pids(server)
    assert set(stubs) == {"add_one", "add_two"}
    assert server.model_stubs() == {"add_one": 1, "add_two": 1}
    os.kill(stubs["add_one"], signal.SIGKILL)
    wait_until(lambda: "add_one" not in server.model_stubs(), 10, "the killed stub to be gone")
    server.stop()
    assert regions(prefix) == [], "a region of the stopped server is left in /dev/shm"
    assert foreign_region.exists(), "a region that is not this launch's was removed"
    assert not (state_dir / "tritonserver.json").exists()


@needs_triton
def test_killed_server_leaves_no_region_or_stub(
    repository: Path, state_dir: Path, launch: list[BundledTriton], foreign_region: Path
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60))
    launch.append(server)
    server.start()
    prefix, pid = server.shm_region_prefix, server.pid
    assert prefix is not None and pid is not None and regions(prefix)
    stub = stub_pids(server)["add_one"]
    os.kill(pid, signal.SIGKILL)  # the server only: its stub outlives it for a while
    wait_until(lambda: not server.is_running(), 10, "the server to die")
    server.stop()  # what the service does once it sees the server gone
    assert gone(stub)
    assert regions(prefix) == []
    assert foreign_region.exists()


OWNER_SCRIPT = textwrap.dedent(
    """\
    import sys, time
    from pathlib import Path
    from server.triton.launcher import BundledTriton, TritonLaunchConfig
    server = BundledTriton(TritonLaunchConfig(Path(sys.argv[1]), Path(sys.argv[2]), startup_timeout_s=60))
    server.start()
    print(server.pid, server.shm_region_prefix, server.http_port, server.grpc_port, flush=True)
    time.sleep(600)
    """
)


def start_owner(repository: Path, state_dir: Path) -> tuple[subprocess.Popen[str], list[str]]:
    """A process that starts a server on ``state_dir`` and would keep it for 10 minutes."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(repository), str(state_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert owner.stdout is not None
    line = owner.stdout.readline().split()
    if len(line) != 4:
        owner.kill()
        owner.wait()
        raise AssertionError(f"the owner process did not start its server: {line}")
    return owner, line


@needs_triton
def test_server_dies_with_its_owner_and_leaves_nothing(
    repository: Path, state_dir: Path, launch: list[BundledTriton]
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    owner, (pid, prefix, http_port, grpc_port) = start_owner(repository, state_dir)
    stubs = [p for p in stub_pids(BundledTriton(TritonLaunchConfig(repository, state_dir))).values()]
    assert stubs and regions(prefix)
    owner.kill()  # kill -9: no cleanup code of the owner runs
    owner.wait()
    wait_until(
        lambda: gone(int(pid)) and all(gone(s) for s in stubs), 30, "tritonserver and its stub to exit"
    )
    assert regions(prefix) == []
    assert not port_answers(int(http_port)) and not port_answers(int(grpc_port))
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60))
    launch.append(server)
    server.start()  # the same state dir starts again
    data = np.ones((1, 2), dtype=np.float32)
    np.testing.assert_array_equal(infer_add_one(server.http_url, "add_one", data), data + 1)


@needs_triton
def test_start_ends_a_stale_server_of_its_state_dir_but_not_a_recycled_pid(
    repository: Path, state_dir: Path, launch: list[BundledTriton], tmp_path: Path
) -> None:
    write_model(repository, "add_one", ADD_ONE_MODEL_PY)
    owner, (pid, prefix, _, _) = start_owner(repository, state_dir)
    helper = BundledTriton(TritonLaunchConfig(repository, state_dir))
    stubs = list(stub_pids(helper).values())
    # A live owner: its state dir is in use, and nothing of it is touched.
    with pytest.raises(TritonStartError, match="in use by process"):
        BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60)).start()
    assert not gone(int(pid))
    # The owner dies without its server going with it (as if PR_SET_PDEATHSIG had not been set): the
    # server is stopped from running on by SIGSTOP, so only the next start can end it.
    os.kill(int(pid), signal.SIGSTOP)
    owner.kill()
    owner.wait()
    assert not gone(int(pid)) and regions(prefix)
    server = BundledTriton(TritonLaunchConfig(repository, state_dir, startup_timeout_s=60))
    launch.append(server)
    server.start()
    assert gone(int(pid)) and all(gone(s) for s in stubs)
    assert regions(prefix) == []
    server.stop()
    # A recorded pid that now belongs to another program is never killed.
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        record = {"pid": stranger.pid, "owner_pid": 2**22 + 1, "shm_region_prefix": "t2i_triton_0123_"}
        (state_dir / "tritonserver.json").write_text(json.dumps(record))
        server.start()
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
