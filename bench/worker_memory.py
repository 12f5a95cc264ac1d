"""Memory of the UNet's python-backend stub around one large batch (issue 7, item 1).

``python -m bench worker_memory [--rows 2] [--side 128] [--cap-pixels N] [--model-py PATH]``

Exports the tiny SD model's UNet into a temporary repository (with ``--model-py`` instead of the
project's ``model.py``, e.g. an older one from git, to compare), starts the bundled Triton with only
``unet`` loaded and ``T2I_MAX_BATCH_LATENT_PIXELS`` = ``--cap-pixels`` (0: no cap), and prints the
stub's resident memory before, its peak during, and its resident memory after a UNet call of
``--rows`` rows at ``--side`` x ``--side`` latents (128: a 1024x1024 image; 2 rows: one image with
classifier-free guidance), then after a small call.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

import numpy as np

from export.fixtures.tiny import build_tiny_model
from export.toolchain.repository import export_repository
from server.triton.client import TritonClient
from server.triton.launcher import BundledTriton, TritonLaunchConfig, stub_model, stub_processes


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def _unet_stub(server: BundledTriton) -> int:
    for pid, args in stub_processes(server.backend_directory).items():
        if stub_model(args) == "unet":
            return pid
    raise RuntimeError("no stub for unet")


def _inputs(rows: int, side: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((rows, 4, side, side), dtype=np.float32),
        "timestep": np.full(rows, 500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, 77, 32), dtype=np.float32),
    }


async def _measure(server: BundledTriton, rows: int, side: int) -> None:
    pid = _unet_stub(server)
    client = TritonClient(server.http_url, timeout_s=600)
    try:
        await client.infer("unet", _inputs(1, 8), ["noise_pred"])
        before = memory_mb(pid)["VmRSS"]
        await client.infer("unet", _inputs(rows, side), ["noise_pred"])
        after = memory_mb(pid)
        await client.infer("unet", _inputs(1, 8), ["noise_pred"])
        later = memory_mb(pid)["VmRSS"]
    finally:
        await client.close()
    print(
        f"unet stub: before {before:.0f} MB, peak {after['VmHWM']:.0f} MB, after {after['VmRSS']:.0f} MB, "
        f"after a small call {later:.0f} MB ({rows} rows at {side}x{side} latents)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench worker_memory")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--cap-pixels", type=int, default=0, help="T2I_MAX_BATCH_LATENT_PIXELS (0: none)")
    parser.add_argument("--model-py", type=Path, default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t2i-worker-memory-") as tmp:
        work = Path(tmp)
        repository = export_repository(str(build_tiny_model("sd", work / "tiny-sd")), work / "repository")
        if args.model_py is not None:
            shutil.copyfile(args.model_py, repository / "unet" / "1" / "model.py")
        config = TritonLaunchConfig(
            model_repository=repository,
            state_dir=work / "state",
            explicit_model_control=True,
            load_models=("unet",),
            environment={"T2I_MAX_BATCH_LATENT_PIXELS": str(args.cap_pixels)},
        )
        with BundledTriton(config) as server:
            asyncio.run(_measure(server, args.rows, args.side))
    return 0
