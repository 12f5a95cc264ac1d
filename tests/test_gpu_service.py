"""The service's side of the GPU path, without a GPU: out-of-memory messages, Triton's GPU memory in
/hardware, the host's tritonserver, resolution buckets (400) and engine repositories it refuses."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from server import hardware
from server.api.errors import status_of
from server.api.schemas import GPUComputeInfo, GPUUtilizationInfo
from server.errors import InferenceFailed, OutOfMemory, ServiceUnavailable
from server.settings import Settings
from server.triton.client import INTERNAL, classify
from server.triton.launcher import TritonLaunchConfig, TritonStartError, build_command, system_tritonserver
from server.triton.oom import is_out_of_memory
from tests.support.service import needs_triton, running_service

# Verbatim shapes of what the libraries write (see server/triton/oom.py for the sources).
OOM_MESSAGES = [
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Name:'/unet/conv_in/Conv' Status Message: CUDA failure 2: out of memory ; GPU=0 ; hostname=h ; "
    "file=/onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc ; line=129 ; "
    "expr=cudaMalloc(&p, size);",
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running MatMul node. "
    "Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* "
    "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, "
    "onnxruntime::WaitNotificationFn) Failed to allocate memory for requested buffer of size 4294967296",
    "CUBLAS failure 3: CUBLAS_STATUS_ALLOC_FAILED ; GPU=0 ; hostname=h ; expr=cublasCreate(&cublas_handle_);",
    "[executionContext.cpp::ExecutionContext::609] Error Code 2: OutOfMemory "
    "(Requested size was 150732800 bytes.)",
    "[defaultAllocator.cpp::allocate::31] Error Code 1: Cuda Runtime (out of memory)",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB",
]
OTHER_MESSAGES = [
    "unable to enqueue for inference unet",
    "Request for unknown model: 'unet' is not found",
    "unexpected shape for input 'sample' for model 'unet'",
]


@pytest.mark.parametrize("message", OOM_MESSAGES)
def test_out_of_memory_messages_become_the_contract_500(message: str) -> None:
    assert is_out_of_memory(message)
    error = classify("unet", INTERNAL, message, 30.0)
    assert isinstance(error, OutOfMemory)
    assert status_of(error, retry_statuses=False) == status_of(error, retry_statuses=True) == 500
    assert error.message == "Out of memory error. Try reducing output image resolution."


@pytest.mark.parametrize("message", OTHER_MESSAGES)
def test_other_failures_are_not_out_of_memory(message: str) -> None:
    assert not is_out_of_memory(message)
    error = classify("unet", INTERNAL, message, 30.0)
    assert not isinstance(error, OutOfMemory)
    assert isinstance(error, InferenceFailed | ServiceUnavailable)


class FakeNvml:
    """The few pynvml calls /hardware makes, for one GPU."""

    def nvmlDeviceGetCount(self) -> int:
        return 1

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"gpu{i}"

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> Any:
        return SimpleNamespace(total=80 << 30, free=60 << 30)

    def nvmlDeviceGetUUID(self, handle: str) -> bytes:
        return b"GPU-1234"

    def nvmlDeviceGetName(self, handle: str) -> str:
        return "NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> Any:
        return SimpleNamespace(gpu=40, memory=20)

    def nvmlDeviceGetCudaComputeCapability(self, handle: str) -> tuple[int, int]:
        return 9, 0


def test_hardware_reports_the_reference_runners_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """No per-process Triton memory: NVML's PIDs are the host's, which no container's namespace matches
    (Triton's own metrics port reports it per GPU)."""
    monkeypatch.setattr(hardware, "_nvml", FakeNvml)
    (info,) = hardware.gpu_devices(stats=False).values()
    assert info == {
        "id": "GPU-1234",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total": 80 << 30,
        "memory_free": 60 << 30,
        "major": 9,
        "minor": 0,
    }
    (stats,) = hardware.gpu_devices(stats=True).values()
    assert set(stats) == {
        "id",
        "name",
        "memory_total",
        "memory_free",
        "utilization_compute",
        "utilization_memory",
    }
    assert stats["utilization_compute"] == 40
    assert set(GPUComputeInfo.__struct_fields__) == set(info)
    assert set(GPUUtilizationInfo.__struct_fields__) == set(stats)


def test_host_tritonserver_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    with pytest.raises(TritonStartError, match="not an executable file"):
        system_tritonserver(str(binary))
    binary.chmod(0o755)
    assert system_tritonserver(str(binary)) == binary
    with pytest.raises(TritonStartError, match="not an executable file"):
        system_tritonserver(str(tmp_path / "missing"))
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    assert system_tritonserver("") == binary
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert system_tritonserver("") is None
    assert Settings.from_env({"MODEL_ID": "m", "TRITONSERVER": str(binary)}).tritonserver == str(binary)
    config = TritonLaunchConfig(model_repository=tmp_path, state_dir=tmp_path, binary=binary)
    # The host's tritonserver uses its own backends (TensorRT, onnxruntime, python).
    command = build_command(
        config, binary=binary, backend_directory=None, http_port=1, grpc_port=2, metrics_port=None
    )
    assert command[0] == str(binary) and "--backend-directory" not in command
    command = build_command(
        config, binary=binary, backend_directory=tmp_path / "b", http_port=1, grpc_port=2, metrics_port=None
    )
    assert command[command.index("--backend-directory") + 1] == str(tmp_path / "b")


def _manifest_copy(repository: Path, where: Path, **extra: object) -> Path:
    """A folder holding ``repository``'s manifest with ``extra`` keys: what the service reads."""
    where.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((repository / "t2i-repository.json").read_text())
    (where / "t2i-repository.json").write_text(json.dumps({**manifest, **extra}))
    return where


@needs_triton
def test_sizes_outside_the_buckets_are_400_naming_the_served_sizes(
    tmp_path_factory: pytest.TempPathFactory,
    repository: Callable[[str], Path],
    service: Callable[..., str],
) -> None:
    manifest = _manifest_copy(
        repository("sd"), tmp_path_factory.mktemp("buckets"), resolutions=["128x64", "64x64"]
    )
    url = service("sd", model_repository=manifest)
    body = {"prompt": "a cat", "num_inference_steps": 2, "seed": 1, "safety_check": False}
    for width, height in ((128, 128), (64, 128), (1024, 576)):
        response = httpx.post(
            f"{url}/text-to-image", json={**body, "width": width, "height": height}, timeout=60
        )
        assert response.status_code == 400, response.text
        assert response.json()["detail"]["msg"] == (
            f"Image size {width}x{height} is not served by this model's TensorRT engines; "
            "served sizes (width x height): 128x64, 64x64."
        )
    response = httpx.post(f"{url}/text-to-image", json={**body, "width": 128, "height": 64}, timeout=120)
    assert response.status_code == 200, response.text


def test_engines_from_another_host_are_refused_with_the_command(
    tmp_path: Path, repository: Callable[[str], Path], tiny_model: Callable[[str], Path]
) -> None:
    """Engines built elsewhere (here: on a GPU, and this host has none): ERROR, not a crash, with the
    command that rebuilds them; Triton is never started on them."""
    engine = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.8.0.43"}
    manifest = _manifest_copy(repository("sd"), tmp_path / "repo", target="tensorrt", engine=engine)
    settings = Settings(
        model_id=str(tiny_model("sd")), model_repository=manifest, state_dir=tmp_path / "state"
    )
    with running_service(settings, wait_for="ERROR", timeout_s=60) as running:
        error = running.app.state["supervisor"].error
        assert "NVIDIA H100 80GB HBM3 (sm 9.0) with TensorRT 10.8.0.43" in error
        assert f"t2i-export {tiny_model('sd')} --target tensorrt --out {manifest.resolve()}" in error
        assert running.app.state["backend"].triton is None
        assert httpx.get(f"{running.url}/health", timeout=5).json() == {"status": "ERROR"}


def test_no_exported_models_says_which_command_to_run(
    tmp_path: Path, tiny_model: Callable[[str], Path]
) -> None:
    empty = tmp_path / "repository"
    empty.mkdir()
    settings = Settings(model_id=str(tiny_model("sd")), model_repository=empty, state_dir=tmp_path / "state")
    with running_service(settings, wait_for="ERROR", timeout_s=60) as running:
        error = running.app.state["supervisor"].error
        assert f"t2i-export {tiny_model('sd')} --target python-onnx --out {empty.resolve()}" in error
        assert running.app.state["backend"].triton is None
    shutil.rmtree(empty)
