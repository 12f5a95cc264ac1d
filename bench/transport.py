"""A UNet call's transport: the request's constant inputs inline with every call, or named in a
system shared-memory region (``TritonClient.shared``), through the service's engine client.

The bundled Triton serves a python model with a UNet's inputs and output and almost no compute (the
output is the sample plus one number of the embeddings), so what is timed is the exchange: the
client's request, Triton's HTTP handling, the python backend's copies, the answer.  Shapes per
family with guidance (2 rows): the text embeddings and the latents at the family's usual size.
Calls alternate inline / shared, one at a time; figures are medians.  Apart: what a region costs a
request (create, register, unregister, unlink), the fixed price ``SHARED_MIN_BYTES`` weighs
(the client here shares every size).

``python -m bench.transport --calls 200``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from bench import log_to_stderr, machine
from server.triton.client import TritonClient
from server.triton.launcher import BundledTriton, TritonLaunchConfig

logger = logging.getLogger("bench.transport")


@dataclass(frozen=True)
class Shapes:
    name: str
    embeddings: tuple[int, ...]
    latents: tuple[int, ...]


# (text embeddings, latents) per guided call: 2 rows
FAMILIES: Final = (
    Shapes("tiny SD, 256x256", (2, 77, 32), (2, 4, 32, 32)),
    Shapes("SD 1.5, 512x512", (2, 77, 768), (2, 4, 64, 64)),
    Shapes("SDXL, 1024x1024", (2, 77, 2048), (2, 4, 128, 128)),
)

_CONFIG = """\
name: "{name}"
backend: "python"
max_batch_size: 8
input [ {{ name: "embeddings" data_type: TYPE_FP32 dims: [ {tokens}, {width} ] }},
        {{ name: "sample" data_type: TYPE_FP32 dims: [ 4, -1, -1 ] }} ]
output [ {{ name: "noise_pred" data_type: TYPE_FP32 dims: [ 4, -1, -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

_MODEL = textwrap.dedent(
    """\
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            answers = []
            for request in requests:
                sample = pb_utils.get_input_tensor_by_name(request, "sample").as_numpy()
                embeddings = pb_utils.get_input_tensor_by_name(request, "embeddings").as_numpy()
                out = pb_utils.Tensor("noise_pred", sample + embeddings[0, 0, 0])
                answers.append(pb_utils.InferenceResponse(output_tensors=[out]))
            return answers
    """
)


@dataclass
class Row:
    shapes: Shapes
    inline_s: float
    shared_s: float
    region_s: float  # a request's region: create + register, then unregister + unlink


def _repository(root: Path) -> Path:
    for i, shapes in enumerate(FAMILIES):
        folder = root / f"m{i}"
        (folder / "1").mkdir(parents=True)
        _, tokens, width = shapes.embeddings
        (folder / "config.pbtxt").write_text(_CONFIG.format(name=f"m{i}", tokens=tokens, width=width))
        (folder / "1" / "model.py").write_text(_MODEL)
    return root


async def _measure(url: str, calls: int) -> list[Row]:
    client = TritonClient(url, timeout_s=300, shared_min_bytes=0)  # every shape shared: measured
    rows = []
    try:
        for i, shapes in enumerate(FAMILIES):
            rng = np.random.default_rng(i)
            cond = {"embeddings": rng.standard_normal(shapes.embeddings, dtype=np.float32)}
            sample = rng.standard_normal(shapes.latents, dtype=np.float32)
            model = f"m{i}"
            times: dict[str, list[float]] = {"inline": [], "shared": [], "region": []}
            t0 = time.perf_counter()
            async with client.shared(cond, 2 * calls + 2) as shared:
                times["region"].append(time.perf_counter() - t0)
                inline = await client.infer(model, {"sample": sample, **cond}, ["noise_pred"])
                named = await client.infer(model, {"sample": sample, **shared}, ["noise_pred"])
                np.testing.assert_array_equal(inline["noise_pred"], named["noise_pred"])
                for call in range(2 * calls):
                    kind, inputs = ("inline", cond) if call % 2 == 0 else ("shared", shared)
                    t0 = time.perf_counter()
                    await client.infer(model, {"sample": sample, **inputs}, ["noise_pred"])
                    times[kind].append(time.perf_counter() - t0)
            for _ in range(20):
                t0 = time.perf_counter()
                async with client.shared(cond, 2):
                    pass
                times["region"].append(time.perf_counter() - t0)
            rows.append(
                Row(
                    shapes,
                    statistics.median(times["inline"]),
                    statistics.median(times["shared"]),
                    statistics.median(times["region"]),
                )
            )
    finally:
        await client.close()
    return rows


def report(rows: list[Row], calls: int) -> str:
    lines = [
        f"{calls} calls each way, alternating, one at a time; medians. Per call: embeddings inline, or",
        "named in a region (TritonClient.shared); region: what one request's region costs.",
        "",
        "| shapes | embeddings KiB | latents KiB | inline ms | shared ms | shared / inline | saved ms "
        "| region ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        emb = int(np.prod(r.shapes.embeddings)) * 4 // 1024
        lat = int(np.prod(r.shapes.latents)) * 4 // 1024
        lines.append(
            f"| {r.shapes.name} | {emb} | {lat} | {r.inline_s * 1e3:.3f} | {r.shared_s * 1e3:.3f} "
            f"| {r.shared_s / r.inline_s:.2f} | {(r.inline_s - r.shared_s) * 1e3:.3f} "
            f"| {r.region_s * 1e3:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transport",
        description="A UNet call's constant inputs inline or in shared memory, through the engine client.",
    )
    parser.add_argument("--calls", type=int, default=200, help="calls each way per shape (default 200)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    log_to_stderr(args.verbose, logger)
    with tempfile.TemporaryDirectory(prefix="t2i-bench-transport-") as tmp:
        root = Path(tmp)
        repository = _repository(root / "repository")
        config = TritonLaunchConfig(model_repository=repository, state_dir=root / "state")
        with BundledTriton(config) as server:
            rows = asyncio.run(_measure(server.http_url, args.calls))
    print("\n".join([f"python -m bench.transport --calls {args.calls}", *machine(("nvidia-pytriton",)), ""]))
    print(report(rows, args.calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
