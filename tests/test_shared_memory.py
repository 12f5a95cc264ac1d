"""A request's constant inputs in system shared memory (server/triton/shared.py): Triton reads them in
place and answers as it does inline; regions live as long as their request; a Triton that cannot
map them turns the sharing off; a crashed process's regions go at the next start."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export.models.source import ModelSource
from server.pipeline.flow import pipeline_for
from server.pipeline.model import DiffusionModel
from server.pipeline.request import GenerationRequest
from server.triton import client as client_module
from server.triton.client import TritonClient, inference_body
from server.triton.launcher import BundledTriton
from server.triton.shared import SHM_DIR, STEM, Region, SharedArray, remove_stale_regions
from tests.support.service import needs_triton
from tests.support.triton import FakeTriton, answer, read_request, unet_inputs


def own_regions() -> list[Path]:
    return sorted(SHM_DIR.glob(f"{STEM}{os.getpid()}_*"))


def test_a_shared_array_is_named_with_its_rows_offset_and_its_bytes_stay_out() -> None:
    shared = SharedArray("r", 128, (4, 77, 32), np.dtype(np.float32))
    rows = shared[2:4]
    assert (rows.offset, rows.shape, rows.nbytes, len(rows)) == (128 + 2 * 77 * 32 * 4, (2, 77, 32), 19712, 2)
    body, _ = inference_body({"sample": np.zeros((2, 4), np.float32), "cond": rows}, ["y"], None)
    header = json.loads(bytes(body[0]))
    assert header["inputs"][1] == {
        "name": "cond",
        "shape": [2, 77, 32],
        "datatype": "FP32",
        "parameters": {
            "shared_memory_region": "r",
            "shared_memory_byte_size": 19712,
            "shared_memory_offset": rows.offset,
        },
    }
    assert len(body) == 2, "only the inline input's bytes follow the header"
    with pytest.raises(ValueError):
        shared[::2]


def test_a_region_holds_the_arrays_and_is_unlinked_at_close() -> None:
    arrays = {"a": np.arange(10, dtype=np.float32).reshape(2, 5), "b": np.ones((3, 7), np.int64)}
    region = Region(arrays)
    try:
        path = SHM_DIR / region.name
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        data = path.read_bytes()
        for name, array in arrays.items():
            ref = region.arrays[name]
            assert ref.offset % 64 == 0
            got = np.frombuffer(data, array.dtype, count=array.size, offset=ref.offset).reshape(array.shape)
            np.testing.assert_array_equal(got, array)
    finally:
        region.close()
    assert not path.exists()


def test_a_region_that_would_leave_less_than_half_of_dev_shm_free_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = os.statvfs(SHM_DIR)
    nearly_half = real.f_blocks // 2 + 1  # blocks free: one more than half
    monkeypatch.setattr(os, "statvfs", lambda path: type(real)((*real[:4], nearly_half, *real[5:])))
    with pytest.raises(OSError, match="less than half"):
        Region({"a": np.zeros((64, 1024), np.float32)})
    assert not own_regions()


def test_regions_of_a_process_that_is_gone_are_removed() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = SHM_DIR / f"{STEM}{int(dead.stdout)}_0123456789abcdef"
    stale.write_bytes(b"x")
    live = Region({"a": np.zeros((1, 4), np.float32)})
    try:
        assert stale in remove_stale_regions()
        assert not stale.exists() and (SHM_DIR / live.name).exists()
    finally:
        live.close()
        stale.unlink(missing_ok=True)


def test_a_triton_that_cannot_map_a_region_gets_the_arrays_inline_from_then_on() -> None:
    registers = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            registers.append(line)
            if len(registers) == 1:  # unavailable says nothing about shared memory: try again
                writer.write(answer(503, b'{"error": "Server not ready"}'))
                continue
            # what Triton on another host answers (it has no such /dev/shm file)
            error = json.dumps({"error": "Unable to open shared memory region: '/x'"}).encode()
            writer.write(answer(500, error))

    async def scenario() -> None:
        async with FakeTriton(handler) as fake:
            client = TritonClient(fake.url, timeout_s=10, shared_min_bytes=0)
            cond = {"encoder_hidden_states": np.ones((2, 77, 32), np.float32)}
            for _ in range(3):
                async with client.shared(cond, 20) as shared:
                    assert shared["encoder_hidden_states"] is cond["encoder_hidden_states"]
            await client.close()

    asyncio.run(scenario())
    assert len(registers) == 2 and all("/v2/systemsharedmemory/region/" in r for r in registers)
    assert not own_regions()


def test_a_request_cancelled_while_its_region_registers_leaves_no_file() -> None:
    registering = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        registering.set()
        await asyncio.sleep(60)  # no answer

    async def scenario() -> None:
        async with FakeTriton(handler) as fake:
            client = TritonClient(fake.url, timeout_s=30, shared_min_bytes=0)

            async def request() -> None:
                async with client.shared({"e": np.ones((2, 77, 32), np.float32)}, 20):
                    raise AssertionError("not reached")

            task = asyncio.create_task(request())
            await registering.wait()
            assert len(own_regions()) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await client.close()

    asyncio.run(scenario())
    assert not own_regions()


@needs_triton
def test_triton_reads_shared_inputs_as_it_reads_them_inline_and_keeps_no_region(
    triton: Callable[..., BundledTriton],
) -> None:
    server = triton("sd")

    async def scenario() -> None:
        client = TritonClient(server.http_url, timeout_s=300, shared_min_bytes=0)
        try:
            x = unet_inputs(3, 16, 0)
            inline = (await client.infer("unet", x, ["noise_pred"]))["noise_pred"]
            async with client.shared(x, 1) as once:  # one call: a region would cost more than it saves
                assert once is x and not own_regions()
            async with client.shared({"encoder_hidden_states": x["encoder_hidden_states"]}, 3) as cond:
                assert isinstance(cond["encoder_hidden_states"], SharedArray)
                assert len(own_regions()) == 1
                inputs = {**x, **cond}
                shared = (await client.infer("unet", inputs, ["noise_pred"]))["noise_pred"]
                rows = {k: v[1:3] for k, v in inputs.items()}  # a chunk: rows at an offset
                tail = (await client.infer("unet", rows, ["noise_pred"]))["noise_pred"]

            async def cancelled_request() -> None:
                async with client.shared({"encoder_hidden_states": x["encoder_hidden_states"]}, 20):
                    await asyncio.sleep(60)

            task = asyncio.create_task(cancelled_request())
            await asyncio.sleep(0.5)
            assert len(own_regions()) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.5)  # the shielded unregister
            status = await client._call("GET", "/v2/systemsharedmemory/status", 30)
        finally:
            await client.close()
        np.testing.assert_array_equal(shared, inline)
        np.testing.assert_allclose(tail, inline[1:3], rtol=1e-5, atol=1e-6)
        assert json.loads(status.body) == [], (
            "each region is unregistered when its block ends or is cancelled"
        )
        assert not own_regions(), "and its file is gone"

    asyncio.run(scenario())


# sd3, flux: slow (their own bundled Triton)
FAMILIES = ("sd", "sdxl", *(pytest.param(f, marks=pytest.mark.slow) for f in ("sd3", "flux")))


@needs_triton
@pytest.mark.parametrize("family", FAMILIES)
def test_a_generation_with_shared_conditioning_is_the_same_image(
    family: str,
    triton: Callable[..., BundledTriton],
    tiny_model: Callable[[str], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each loop (SD/SDXL's, SD3/FLUX's) with its conditioning shared: the same images, bit for bit,
    and the same within rounding when concurrent requests' steps batch together in Triton, each
    batch's rows from several regions.  (sd3, flux: ~30 s each, mostly a bundled Triton of their own.)"""
    regions: list[str] = []

    class Counted(Region):
        def __init__(self, arrays: dict[str, np.ndarray]) -> None:
            super().__init__(arrays)
            regions.append(self.name)

    monkeypatch.setattr(client_module, "Region", Counted)
    server = triton(family)
    request = GenerationRequest(
        prompt="a cat",
        negative_prompt="",
        height=64,
        width=64,
        guidance_scale=3.5,
        num_inference_steps=3,
        num_images=2,
        seed=7,
    )

    seeds = (7, 8, 9)

    async def generate(share: bool, together: bool) -> list[list[np.ndarray]]:
        client = TritonClient(server.http_url, timeout_s=300, share_inputs=share, shared_min_bytes=0)
        try:
            pipeline = pipeline_for(DiffusionModel(ModelSource(tiny_model(family))), client)
            requests = [dataclasses.replace(request, seed=seed) for seed in seeds]
            if together:  # their steps meet in Triton's dynamic batches, each from its own region
                generations = await asyncio.gather(*(pipeline(r) for r in requests))
            else:
                generations = [await pipeline(r) for r in requests]
            return [g.images for g in generations]
        finally:
            await client.close()

    inline = asyncio.run(generate(share=False, together=False))
    assert not regions
    shared = asyncio.run(generate(share=True, together=False))
    assert len(regions) == len(seeds), "one region per request, for all its steps"
    for a, b in zip(inline, shared, strict=True):
        np.testing.assert_array_equal(np.stack(a), np.stack(b))
    batched = asyncio.run(generate(share=True, together=True))
    assert len(regions) == 2 * len(seeds)
    for a, b in zip(inline, batched, strict=True):  # batched rows may round differently
        diff = np.abs(np.stack(a).astype(int) - np.stack(b).astype(int))
        assert diff.max() <= 2, diff.max()
    assert not own_regions()
