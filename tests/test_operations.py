"""What an orchestrator operator relies on: runner endpoints, metrics, model rules, limits, faults."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from export.fixtures.service import SERVING, ServiceProcess, free_port, health, wait_until
from server.errors import OutOfMemory
from server.pipeline.rules import MODEL_RULES, apply_rule, rule_for
from server.settings import Settings
from server.triton.launcher import BundledTriton, TritonLaunchConfig
from tests.support.images import assert_close, decode, generate, reference_image
from tests.support.service import metric, running_service

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}


# -- runner endpoints -------------------------------------------------------------------------------


def test_version_and_hardware_endpoints(
    service: Callable[..., str], tiny_model: Callable[[str], Path]
) -> None:
    url = service("sd", version="1.2.3")
    model_id = str(tiny_model("sd"))
    assert httpx.get(f"{url}/version").json() == {
        "pipeline": "text-to-image",
        "model_id": model_id,
        "version": "1.2.3",
    }
    assert httpx.get(f"{url}/hardware/info").json() == {
        "pipeline": "text-to-image",
        "model_id": model_id,
        "gpu_info": {},
    }
    stats = httpx.get(f"{url}/hardware/stats").json()
    assert stats == {"pipeline": "text-to-image", "model_id": model_id, "gpu_stats": {}}


def test_metrics_count_requests_stages_and_images(service: Callable[..., str]) -> None:
    url = service("sd", version="metrics")
    before_ok = metric(url, "t2i_requests_total", '{status="200"}')
    before_bad = metric(url, "t2i_requests_total", '{status="400"}')
    generate(url, prompt="x", **SMALL, num_images_per_prompt=2)
    assert httpx.post(f"{url}/text-to-image", json={"prompt": ""}).status_code == 400
    assert metric(url, "t2i_requests_total", '{status="200"}') == before_ok + 1
    assert metric(url, "t2i_requests_total", '{status="400"}') == before_bad + 1
    assert metric(url, "t2i_images_total") >= 2
    for stage in ("text_encoder", "unet_step", "vae", "png_encode"):
        assert metric(url, "t2i_stage_latency_seconds_count", f'{{stage="{stage}"}}') >= 1, stage
    assert metric(url, "t2i_request_latency_seconds_count", '{status="200"}') >= 1
    text = httpx.get(f"{url}/metrics").text
    for name in ("t2i_generations_in_flight", "t2i_queue_depth", "t2i_unet_batch_rows_bucket"):
        assert name in text


def test_openapi_describes_every_route_and_error_body(service: Callable[..., str]) -> None:
    schema = httpx.get(f"{service('sd')}/schema/openapi.json").json()
    paths = schema["paths"]
    for path in ("/text-to-image", "/health", "/version", "/hardware/info", "/hardware/stats", "/metrics"):
        assert path in paths, path
    responses = paths["/text-to-image"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "422", "500"}  # what go-livepeer and the SDK parse
    error = responses["400"]["content"]["application/json"]["schema"]
    assert error["$ref"].endswith("/HTTPError")
    assert "detail" in schema["components"]["schemas"]["HTTPError"]["properties"]


# -- model rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "request_", "expected"),
    [
        ("ByteDance/SDXL-Lightning-4step", (7.5, 50), (0.0, 4)),
        ("ByteDance/SDXL-Lightning-2step", (3.0, 0), (0.0, 2)),
        ("bytedance/sdxl-lightning-8step", (7.5, 1), (0.0, 8)),
        ("stabilityai/sdxl-turbo", (7.5, 4), (0.0, 4)),
        ("stabilityai/sd-turbo", (7.5, 0), (0.0, 1)),
        ("runwayml/stable-diffusion-v1-5", (7.5, 0), (7.5, 50)),
        ("runwayml/stable-diffusion-v1-5", (5.0, 30), (5.0, 30)),
    ],
)
def test_model_rules_table(model_id: str, request_: tuple[float, int], expected: tuple[float, int]) -> None:
    assert apply_rule(rule_for(model_id), *request_) == expected


def test_every_lightning_rule_uses_trailing_euler() -> None:
    for rule in MODEL_RULES:
        if "lightning" in rule.match:
            assert rule.scheduler == ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})


def test_lightning_model_forces_steps_scheduler_and_no_guidance(
    tmp_path: Path, tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> None:
    model = tmp_path / "sdxl-lightning-4step"
    shutil.copytree(tiny_model("sdxl"), model)
    settings = Settings(model_id=str(model), triton_url=triton("sdxl").http_url)
    with running_service(settings) as running:
        (image,) = generate(
            running.url,
            prompt="a dog",
            height=64,
            width=64,
            guidance_scale=7.5,
            num_inference_steps=50,
            seed=11,
        )
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(model)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing="trailing"
    )
    pipe.set_progress_bar_config(disable=True)
    import numpy as np
    import torch

    out = pipe(
        prompt="a dog",
        height=64,
        width=64,
        guidance_scale=0.0,
        num_inference_steps=4,
        generator=torch.Generator("cpu").manual_seed(11),
        output_type="np",
    ).images[0]
    assert_close(decode(image["url"]), np.asarray((out * 255).round().astype(np.uint8)))


def test_turbo_model_forces_no_guidance(
    tmp_path: Path, tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> None:
    model = tmp_path / "sd-turbo"
    shutil.copytree(tiny_model("sd"), model)
    settings = Settings(model_id=str(model), triton_url=triton("sd").http_url)
    with running_service(settings) as running:
        (image,) = generate(
            running.url,
            prompt="a cup",
            height=64,
            width=96,
            guidance_scale=9.0,
            num_inference_steps=3,
            seed=5,
        )
    expected = reference_image(
        tiny_model("sd"),
        "",
        seed=5,
        prompt="a cup",
        height=64,
        width=96,
        guidance_scale=0.0,
        num_inference_steps=3,
    )
    assert_close(decode(image["url"]), expected)


# -- operator limits --------------------------------------------------------------------------------


@pytest.mark.parametrize(("retry_statuses", "status"), [(False, 500), (True, 503)])
def test_busy_service_refuses_saying_why_and_keeps_serving(
    service: Callable[..., str], retry_statuses: bool, status: int
) -> None:
    url = service("sd", max_in_flight=1, max_queue=0, http_retry_statuses=retry_statuses)
    long = {"prompt": "long", "height": 256, "width": 256, "num_inference_steps": 40}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            first = asyncio.create_task(client.post("/text-to-image", json=long))
            while metric(url, "t2i_generations_in_flight") < 1:
                await asyncio.sleep(0.05)
            busy = await client.post("/text-to-image", json={"prompt": "x", **SMALL})
            assert busy.status_code == status, busy.text
            assert ("retry-after" in busy.headers) is retry_statuses
            assert "busy" in busy.json()["detail"]["msg"]
            assert metric(url, "t2i_requests_refused_total", '{reason="queue_full"}') == 1
            assert (await first).status_code == 200
        assert (
            httpx.post(f"{url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=60).status_code == 200
        )

    asyncio.run(scenario())


def test_queued_requests_wait_for_a_slot(service: Callable[..., str]) -> None:
    url = service("sd", max_in_flight=1, max_queue=4)

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            body = {"prompt": "q", "height": 64, "width": 64, "num_inference_steps": 10}
            responses = await asyncio.gather(*(client.post("/text-to-image", json=body) for _ in range(4)))
            return [r.status_code for r in responses]

    assert asyncio.run(scenario()) == [200] * 4


def test_request_past_its_deadline_is_500_and_the_service_keeps_serving(service: Callable[..., str]) -> None:
    url = service("sd", request_timeout_s=0.5)
    response = httpx.post(
        f"{url}/text-to-image",
        timeout=60,
        json={"prompt": "slow", "height": 256, "width": 256, "num_inference_steps": 100},
    )
    assert response.status_code == 500
    assert (
        "did not finish within 0.5 s (REQUEST_TIMEOUT_S): it was generating"
        in response.json()["detail"]["msg"]
    )
    assert metric(url, "t2i_requests_refused_total", '{reason="deadline"}') == 1
    assert metric(url, "t2i_generations_cancelled_total", '{reason="deadline"}') == 1
    assert httpx.post(f"{url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=60).status_code == 200


def test_too_many_steps_is_400(service: Callable[..., str]) -> None:
    url = service("sd", max_steps=20)
    response = httpx.post(
        f"{url}/text-to-image", json={"prompt": "x", "height": 64, "width": 64, "num_inference_steps": 21}
    )
    assert response.status_code == 400
    assert response.json()["detail"]["msg"] == "num_inference_steps must be at most 20, got 21."


# -- faults -----------------------------------------------------------------------------------------


def test_client_that_disconnects_stops_its_loop_within_one_step(service: Callable[..., str]) -> None:
    url = service("sd", version="disconnect")
    body = {"prompt": "gone", "height": 256, "width": 256, "num_inference_steps": 200}

    async def scenario() -> None:
        client = httpx.AsyncClient(base_url=url, timeout=300)
        task = asyncio.create_task(client.post("/text-to-image", json=body))
        while metric(url, "t2i_unet_steps_total") < 3:
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()

    asyncio.run(scenario())
    wait_until(
        lambda: metric(url, "t2i_generations_cancelled_total", '{reason="client_gone"}') == 1,
        10,
        "the generation to stop",
    )
    stopped_at = metric(url, "t2i_unet_steps_total")
    time.sleep(1.0)
    assert metric(url, "t2i_unet_steps_total") == stopped_at
    assert stopped_at < 50, "the loop ran on long after the client left"
    assert metric(url, "t2i_generations_in_flight") == 0


def test_out_of_memory_is_500_with_the_contract_message_and_the_service_keeps_serving(
    tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> None:
    settings = Settings(model_id=str(tiny_model("sd")), triton_url=triton("sd").http_url)
    with running_service(settings) as running:
        client = running.app.state.backend.client
        real_infer = client.infer
        calls = {"n": 0}

        async def infer_once_out_of_memory(model: str, *args: Any, **kwargs: Any) -> Any:
            if model == "unet" and calls["n"] == 0:
                calls["n"] += 1
                raise OutOfMemory()
            return await real_infer(model, *args, **kwargs)

        client.infer = infer_once_out_of_memory
        response = httpx.post(f"{running.url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=60)
        assert response.status_code == 500
        assert response.json() == {
            "detail": {"msg": "Out of memory error. Try reducing output image resolution."}
        }
        assert health(running.url) in SERVING
        assert (
            httpx.post(f"{running.url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=60).status_code
            == 200
        )


def test_triton_unreachable_at_start_is_loading_and_a_request_waits_for_it(
    work_dir: Path, tiny_model: Callable[[str], Path], repository: Callable[[str], Path]
) -> None:
    http_port = free_port()
    settings = Settings(
        model_id=str(tiny_model("sd")), triton_url=f"127.0.0.1:{http_port}", health_interval_s=0.2
    )
    # LOADING, not ERROR: go-livepeer gives up for good on an external runner that says ERROR at start
    with running_service(settings, wait_for="LOADING") as running:
        supervisor = running.app.state.supervisor
        wait_until(lambda: supervisor.error is not None, 30, "the first failed connection")
        assert health(running.url) == "LOADING" and "is not reachable" in supervisor.error
        waiting = concurrent.futures.ThreadPoolExecutor(1).submit(
            httpx.post, f"{running.url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=120
        )
        time.sleep(1)
        assert not waiting.done(), "a request while the service loads waits for it"
        config = TritonLaunchConfig(
            model_repository=repository("sd"), state_dir=work_dir / "state-late", http_port=http_port
        )
        with BundledTriton(config):
            response = waiting.result(timeout=90)
            assert response.status_code == 200, response.text
            assert health(running.url) in SERVING


def test_triton_url_at_the_grpc_port_is_an_error_that_says_so(
    tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> None:
    """TRITON_URL used to be Triton's gRPC address; pointed there now, /health says which port to use."""
    settings = Settings(model_id=str(tiny_model("sd")), triton_url=triton("sd").grpc_url)
    with running_service(settings, wait_for="LOADING") as running:
        supervisor = running.app.state.supervisor
        wait_until(lambda: supervisor.error is not None, 30, "the first failed connection")
        assert "not its gRPC port" in supervisor.error and "HTTP port" in supervisor.error, supervisor.error


def test_bundled_triton_killed_mid_request_fails_that_request_and_comes_back(
    work_dir: Path, tiny_model: Callable[[str], Path], repository: Callable[[str], Path]
) -> None:
    settings = Settings(
        model_id=str(tiny_model("sd")),
        model_repository=repository("sd"),
        state_dir=work_dir / "state-kill",
        health_interval_s=0.2,
    )
    with running_service(settings) as running:
        url, backend = running.url, running.app.state.backend

        async def scenario() -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                task = asyncio.create_task(
                    client.post(
                        "/text-to-image",
                        json={"prompt": "doomed", "height": 256, "width": 256, "num_inference_steps": 200},
                    )
                )
                while metric(url, "t2i_unet_steps_total") < 3:
                    await asyncio.sleep(0.02)
                os.killpg(backend.triton.pid, signal.SIGKILL)
                return await task

        response = asyncio.run(scenario())
        assert response.status_code == 500, response.text
        assert response.json()["detail"]["msg"]
        assert "Traceback" not in response.text
        assert health(url) == "ERROR"
        wait_until(lambda: health(url) in SERVING, 90, "the bundled Triton to be restarted")
        assert (
            httpx.post(f"{url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=60).status_code == 200
        )


def test_sigterm_finishes_requests_in_flight_then_exits(
    tmp_path: Path, tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> None:
    service = ServiceProcess(
        {"MODEL_ID": str(tiny_model("sd")), "TRITON_URL": triton("sd").http_url}, tmp_path / "service.log"
    )
    url = service.url
    process = service.start().process
    assert process is not None

    def refuses_connections() -> bool:
        try:
            httpx.get(f"{url}/health", timeout=1)  # a new connection each time
        except httpx.TransportError:
            return True
        return False

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            body = {"prompt": "finish me", "height": 128, "width": 128, "num_inference_steps": 150}
            task = asyncio.create_task(client.post("/text-to-image", json=body))
            while metric(url, "t2i_unet_steps_total") < 2:
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(wait_until, refuses_connections, 10, "the listener to close")
            assert not task.done(), "the generation ended before the listener closed"
            return await task

    try:
        wait_until(lambda: health(url) in SERVING, 120, "the service to start")
        response = asyncio.run(scenario())
        assert response.status_code == 200, response.text
        # uvicorn re-raises the signal once shut down: the process ends by SIGTERM (143 in a container)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_model_that_cannot_be_fetched_is_error_and_500(tmp_path: Path) -> None:
    settings = Settings(
        model_id="someone/not-downloadable", triton_url=f"127.0.0.1:{free_port()}", model_dir=tmp_path
    )
    with running_service(settings, wait_for="ERROR") as running:
        response = httpx.post(f"{running.url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=30)
        assert response.status_code == 500
        assert (
            response.json()["detail"]["msg"]
            == "The service could not load model 'someone/not-downloadable'; see its log."
        )
        assert running.app.state.supervisor.error.startswith("cannot load model 'someone/not-downloadable'")


def test_starting_the_app_imports_no_serving_code() -> None:
    """Cold start: what ``t2i-serve`` imports before it listens leaves torch, diffusers, transformers
    and onnx to the supervisor, which loads them in a worker thread while Triton starts."""
    heavy = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "tensorrt")
    code = f"import sys, server.__main__; print(sorted(set({heavy!r}) & set(sys.modules)))"
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_model_that_cannot_load_is_error_and_its_bundled_triton_is_stopped(
    tiny_model: Callable[[str], Path], repository: Callable[..., Path], work_dir: Path
) -> None:
    """The model loads beside the bundled Triton's start; when it cannot, nothing is left running."""
    settings = Settings(
        model_id=str(tiny_model("sd")),
        model_repository=repository("sd"),
        state_dir=work_dir / "state-unloadable",
        scheduler="NoSuchScheduler",
        lora_preload=True,
        memory_release_s=0.5,
    )
    with running_service(settings, wait_for="ERROR") as running:
        supervisor, backend = running.app.state.supervisor, running.app.state.backend
        assert supervisor.error.startswith(f"cannot load model '{settings.model_id}'")
        assert "unknown diffusers scheduler 'NoSuchScheduler'" in supervisor.error
        assert backend.triton is not None  # it was started beside the model's loading
        # LORA_PRELOAD: the models a LoRA can change open their variant session at start
        assert backend.triton.config.environment["T2I_LORA_PRELOAD"] == "unet,text_encoder"
        # MEMORY_RELEASE_S: the python-onnx workers read it from tritonserver's environment
        assert backend.triton.config.environment["T2I_MEMORY_RELEASE_S"] == "0.5"
        wait_until(lambda: not backend.triton.is_running(), 60, "the bundled Triton to stop")
        response = httpx.post(f"{running.url}/text-to-image", json={"prompt": "x", **SMALL}, timeout=30)
        assert response.status_code == 500
        assert health(running.url) == "ERROR"


def test_hub_model_id_is_served_from_the_model_dir_cache(
    tmp_path: Path, tiny_model: Callable[[str], Path], triton: Callable[[str], BundledTriton]
) -> None:
    """MODEL_ID as a Hub id: the configs come from the Hugging Face cache in MODEL_DIR (no network here)."""
    revision = "0" * 40
    repo = tmp_path / "models--someone--tiny-sd"
    shutil.copytree(tiny_model("sd"), repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    settings = Settings(model_id="someone/tiny-sd", triton_url=triton("sd").http_url, model_dir=tmp_path)
    with running_service(settings) as running:
        (image,) = generate(running.url, prompt="x", **SMALL, seed=3)
        assert running.app.state.supervisor.description.model.source.path == repo / "snapshots" / revision
    with running_service(Settings(model_id=str(tiny_model("sd")), triton_url=triton("sd").http_url)) as local:
        (same,) = generate(local.url, prompt="x", **SMALL, seed=3)
    assert image["url"] == same["url"]


ARENAS_SCRIPT = """
import ctypes, sys, threading
import torch
from export.models.heap import limit_arenas
if sys.argv[1] != "unlimited":
    assert limit_arenas(int(sys.argv[1]))
def work():
    for _ in range(300):
        (torch.ones(256, 1024) * 2).sum()  # allocates without the GIL: threads contend for the heap
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
path = sys.argv[2]
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc arenas")
def test_malloc_arenas_are_limited_so_memory_freed_on_many_threads_is_not_kept(tmp_path: Path) -> None:
    """Threads that contend for the heap get arenas of their own, each keeping what it freed (the
    service's RSS crept with distinct LoRA sets); ``limit_arenas`` caps them."""

    def arenas(limit: str) -> int:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("MALLOC_ARENA_MAX", None)
        report = tmp_path / f"malloc-{limit}.xml"
        out = subprocess.run(
            [sys.executable, "-c", ARENAS_SCRIPT, limit, str(report)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    assert arenas("unlimited") > 2  # the threads do contend here
    assert arenas("2") <= 2


def test_the_service_applies_its_malloc_arena_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import server.app

    applied: list[int] = []
    monkeypatch.setattr(server.app, "limit_arenas", applied.append)
    settings = Settings(model_id=str(tmp_path / "no-model"), model_repository=tmp_path / "no-repository")
    assert settings.malloc_arena_max == 2
    with running_service(settings.with_overrides(malloc_arena_max="3"), wait_for="ERROR"):
        assert applied == [3]
    with pytest.raises(ValueError, match="malloc_arena_max must be at least 1"):
        Settings(model_id="x", malloc_arena_max=0)
