"""LoRA requests against the real bundled Triton: sources that must not reach the host, the Hub
timeout, admission before builds, and many distinct LoRA sets within the disk and resident bounds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from export.fixtures.service import SERVING
from server.settings import Settings
from server.triton.launcher import BundledTriton
from tests.support.images import assert_close, decode
from tests.support.lora import BODY, post, reference_pipeline
from tests.support.service import metric, running_service


def _settings(
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
    lora_dir: Path,
    **overrides: object,
) -> Settings:
    return Settings(
        model_id=str(tiny_model("sd")),
        triton_url=triton("sd").http_url,
        model_repository=repository("sd"),
        lora_dir=lora_dir,
        **overrides,  # type: ignore[arg-type]
    )


def test_host_paths_answer_exactly_like_a_missing_lora(
    tmp_path: Path,
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
) -> None:
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((next((lora_dir / "sd-diffusers-a").glob("*.safetensors"))).read_bytes())
    link = lora_dir / "escape.safetensors"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)  # a real LoRA, but outside LORA_DIR
    base_unet = repository("sd") / "unet"
    ids = [
        "/etc/shadow",
        "/etc/passwd",
        "/nonexistent",
        str(outside),
        str(lora_dir / "sd-diffusers-a"),  # even the allowed folder, by absolute path
        "../loras/sd-diffusers-a",
        "sd-diffusers-a/..",
        "~/x",
        "~root/x",
        "escape",
        str(base_unet),
        "models/tiny-sd/unet",
        str(tmp_path),  # a folder: its files are never listed
    ]  # (an id over 200 bytes is refused when loras is parsed: tests/test_api.py)
    settings = _settings(tiny_model, triton, repository, lora_dir, lora_hub=False)
    with running_service(settings) as running:
        for lora_id in ids:
            response = post(running.url, json.dumps({lora_id: 1.0}))
            assert response.status_code == 400, (lora_id, response.text)
            msg = response.json()["detail"]["msg"]
            shown = lora_id if len(lora_id) <= 64 else lora_id[:61] + "..."
            assert msg == f"LoRa repository '{shown}' not found", (lora_id, msg)
            assert len(response.text) < 300
        assert post(running.url, json.dumps({"sd-diffusers-a": 1.0})).status_code == 200


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """A loopback HTTP endpoint that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_hub_that_never_answers_is_refused_saying_so_and_freezes_nothing(
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
) -> None:
    with silent_listener() as endpoint:
        settings = _settings(
            tiny_model, triton, repository, lora_dir, hf_endpoint=endpoint, lora_hub_timeout_s=2.0
        )
        with running_service(settings) as running:

            async def scenario() -> tuple[httpx.Response, list[float], float]:
                async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
                    body = {**BODY, "loras": json.dumps({"someone/some-lora": 1.0})}
                    started = time.perf_counter()
                    lookup = asyncio.create_task(client.post("/text-to-image", json=body))
                    health = []
                    while not lookup.done():
                        t = time.perf_counter()
                        assert (await client.get("/health")).json()["status"] in SERVING
                        health.append(time.perf_counter() - t)
                        await asyncio.sleep(0.1)
                    return await lookup, health, time.perf_counter() - started

            response, health, elapsed = asyncio.run(scenario())
            assert response.status_code == 500, response.text
            assert "could not be fetched from the Hub within 2 s" in response.json()["detail"]["msg"]
            assert metric(running.url, "t2i_requests_refused_total", '{reason="hub_timeout"}') == 1
            assert elapsed < 10
            assert len(health) >= 5 and max(health) < 1.0  # the event loop stayed free
            assert post(running.url, "").status_code == 200
    # LORA_HUB=off: a Hub id is a missing LoRA at once, no connection made
    off = _settings(
        tiny_model, triton, repository, lora_dir, lora_hub=False, hf_endpoint="http://127.0.0.1:9"
    )
    with running_service(off) as running:
        started = time.perf_counter()
        response = post(running.url, json.dumps({"someone/some-lora": 1.0}))
        assert response.status_code == 400
        assert response.json()["detail"]["msg"] == "LoRa repository 'someone/some-lora' not found"
        assert time.perf_counter() - started < 5


def test_a_full_service_refuses_before_building_anything(
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
) -> None:
    settings = _settings(
        tiny_model,
        triton,
        repository,
        lora_dir,
        lora_hub=False,
        max_in_flight=1,
        max_queue=0,
        max_lora_variants=2,
    )
    with running_service(settings) as running:
        variants = running.app.state.supervisor.registry.default.variants
        files_before = set((repository("sd") / "unet" / "variants").glob("*"))

        async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
            async with httpx.AsyncClient(base_url=running.url, timeout=300) as client:
                slow = asyncio.create_task(
                    client.post("/text-to-image", json={**BODY, "num_inference_steps": 60})
                )
                while metric(running.url, "t2i_generations_in_flight") < 1:
                    await asyncio.sleep(0.02)
                bodies = [
                    {**BODY, "loras": json.dumps({"sd-diffusers-b": 0.1 + i / 100, "sd-kohya-b": 0.5})}
                    for i in range(16)
                ]
                refused = await asyncio.gather(*(client.post("/text-to-image", json=b) for b in bodies))
                return await slow, list(refused)

        slow, refused = asyncio.run(scenario())
        assert slow.status_code == 200
        assert [r.status_code for r in refused] == [500] * 16
        assert all("busy" in r.json()["detail"]["msg"] for r in refused)
        assert metric(running.url, "t2i_lora_variant_builds_total") == 0
        assert set((repository("sd") / "unet" / "variants").glob("*")) == files_before
        assert variants.loaded() == []


@pytest.mark.slow
def test_many_distinct_lora_sets_stay_within_the_disk_and_resident_bounds(
    lora_dir: Path,
    tiny_model: Callable[[str], Path],
    triton: Callable[[str], BundledTriton],
    repository: Callable[[str], Path],
) -> None:
    """Distinct weights in a row (the 200-set soak is bench/variant_soak.py): disk under
    LORA_CACHE_GB, resident under MAX_LORA_VARIANTS, images equal diffusers' for a sample."""
    cache_gb = 0.0017  # about 1.8 MB: room for two tiny UNet variants (~0.7 MB each), not all ten
    settings = _settings(
        tiny_model, triton, repository, lora_dir, lora_hub=False, max_lora_variants=2, lora_cache_gb=cache_gb
    )
    a_dir, b_dir = lora_dir / "sd-diffusers-c", lora_dir / "sd-diffusers-d"
    with running_service(settings) as running:
        variants = running.app.state.supervisor.registry.default.variants
        for i in range(10):
            loras = {"sd-diffusers-c": round(0.3 + 0.07 * i, 3), "sd-diffusers-d": 0.5}
            response = post(running.url, json.dumps(loras), seed=11)
            assert response.status_code == 200, response.text
            assert variants.cache.used_bytes <= cache_gb * 2**30
            assert len(variants.loaded()) <= 2
            if i in (0, 9):
                reference = reference_pipeline(
                    str(tiny_model("sd")), ((str(a_dir), loras["sd-diffusers-c"]), (str(b_dir), 0.5))
                )
                import torch

                out = reference(**BODY, generator=torch.Generator("cpu").manual_seed(11), output_type="np")
                expected = np.asarray((out.images[0] * 255).round().astype(np.uint8))
                assert_close(decode(response.json()["images"][0]["url"]), expected)
        on_disk = sum(f.stat().st_size for f in (repository("sd")).rglob("variants/*.safetensors"))
        assert on_disk <= cache_gb * 2**30
        assert metric(running.url, "t2i_lora_variant_builds_total") == 10
