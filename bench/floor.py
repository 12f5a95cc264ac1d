"""The floor of :mod:`bench.overhead`: the exported ONNX graphs in a process of their own, with the
session options the Triton model uses, under the service's own pipeline code (``python -m
bench.overhead --floor-worker MODEL_DIR REPOSITORY``, driven by :class:`FloorProcess` over JSON lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import Prepared
from export.fixtures.service import REPO_ROOT


class LocalOnnxClient:
    """The pipeline's ``InferenceClient`` over onnxruntime sessions in this process.

    Each model's session is built with :mod:`export.triton_models.onnx_model`'s own
    ``session_options`` and malloc keeps freed memory between runs as that model's ``FreedMemory``
    has it, as in Triton, so the floor differs from the service only by the serving path.
    """

    def __init__(self, repository: Path, names: Sequence[str]) -> None:
        import onnxruntime as ort
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        from export.models.heap import FreedMemory
        from export.triton_models.onnx_model import session_options
        from server.settings import Settings

        # the service's MEMORY_RELEASE_S (this process's environment, as the service it is compared to)
        release_s = Settings.from_env(model_id=str(repository)).memory_release_s
        self.freed_memory = FreedMemory(release_s)
        self.sessions: dict[str, Any] = {}
        self.batch: dict[str, int] = {}
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}
        for name in names:
            config = text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())
            params = {k: v.string_value for k, v in config.parameters.items()}
            path = repository / name / "1" / params.get("onnx_file", "model.onnx")
            self.sessions[name] = ort.InferenceSession(
                str(path), session_options(params), providers=["CPUExecutionProvider"]
            )
            self.batch[name] = int(config.max_batch_size)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Base models only: the floor serves no LoRA variants (``parameters`` unused)."""
        if model in self.calls:
            self.calls[model].append(dict(inputs))
        results = self.sessions[model].run(list(outputs), dict(inputs))
        self.freed_memory.batch_done()
        return dict(zip(outputs, results, strict=True))

    async def max_batch_size(self, name: str) -> int:
        return self.batch[name]

    def shared(
        self, arrays: Mapping[str, np.ndarray], uses: int
    ) -> contextlib.nullcontext[Mapping[str, np.ndarray]]:
        """In-process: the arrays themselves."""
        return contextlib.nullcontext(arrays)


class Floor:
    """What ``--floor-worker`` runs: the service's pipeline code over :class:`LocalOnnxClient`."""

    def __init__(self, model_dir: Path, repository: Path) -> None:
        import torch

        from export.contract import specs
        from export.models.source import ModelSource
        from server.pipeline.model import DiffusionModel
        from server.pipeline.safety import SafetyChecker
        from server.settings import Settings

        torch.set_num_threads(
            Settings(model_id=str(model_dir)).torch_threads
        )  # as the service's scheduler math runs
        source = ModelSource(model_dir)
        names = [specs.UNET, specs.VAE_DECODER, *source.text_encoders]
        if (repository / specs.SAFETY_CHECKER).is_dir():
            names.append(specs.SAFETY_CHECKER)
        self.client = LocalOnnxClient(repository, names)
        self.model = DiffusionModel(source)
        from server.pipeline.generate import TextToImagePipeline

        self.pipeline = TextToImagePipeline(self.model, self.client)
        self.safety = (
            SafetyChecker.from_folders(
                self.client,
                model_dir / "feature_extractor",
                repository / specs.SAFETY_CHECKER / "feature_extractor",
            )
            if specs.SAFETY_CHECKER in names
            else None
        )
        self.unet_inputs: dict[str, np.ndarray] | None = None

    async def generate(self, body: dict[str, Any]) -> dict[str, float]:
        """One request as the service runs it after admission: pipeline, safety check, PNG."""
        from server.pipeline.images import png_data_url
        from server.pipeline.request import GenerationRequest

        stages: dict[str, float] = {"unet_step": 0.0}
        steps = 0

        def observe(stage: str, seconds: float, rows: int) -> None:
            nonlocal steps
            stages[stage] = stages.get(stage, 0.0) + seconds
            steps += stage == "unet_step"

        request = GenerationRequest(
            prompt=body["prompt"],
            negative_prompt="",
            height=body["height"],
            width=body["width"],
            guidance_scale=body["guidance_scale"],
            num_inference_steps=body["num_inference_steps"],
            num_images=1,
            seed=body["seed"],
        )
        started = time.perf_counter()
        result = await self.pipeline(request, None, observe)
        if self.safety is not None and body.get("safety_check", True):
            t0 = time.perf_counter()
            await self.safety.check(result.images)
            stages["safety_check"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        await asyncio.to_thread(lambda: [png_data_url(image) for image in result.images])
        stages["png_encode"] = time.perf_counter() - t0
        stages["latency"] = time.perf_counter() - started
        stages["step"] = stages["unet_step"] / max(steps, 1)
        return stages

    async def record_unet_inputs(self, body: dict[str, Any]) -> None:
        """The inputs of one UNet call of a real generation at this body's size and guidance."""
        from export.contract import specs

        self.client.calls[specs.UNET] = []
        await self.generate({**body, "num_inference_steps": 2})
        self.unet_inputs = self.client.calls.pop(specs.UNET)[-1]

    def graph(self, rows: int, calls: int) -> list[float]:
        """Seconds per call of the UNet graph alone on ``rows`` rows (the recorded rows, tiled)."""
        from export.contract import specs

        assert self.unet_inputs is not None
        base = len(next(iter(self.unet_inputs.values())))
        reps = -(-rows // base)
        feeds = {k: np.concatenate([v] * reps)[:rows] for k, v in self.unet_inputs.items()}
        session = self.client.sessions[specs.UNET]
        session.run(None, feeds)  # warm: first run at a new shape allocates
        seconds = []
        for _ in range(calls):
            t0 = time.perf_counter()
            session.run(None, feeds)
            seconds.append(time.perf_counter() - t0)
        return seconds


def floor_worker(model_dir: Path, repository: Path) -> int:
    """JSON lines on stdin -> JSON lines on stdout; the parent keeps this process for a whole run."""
    floor = Floor(model_dir, repository)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "record":
            asyncio.run(floor.record_unet_inputs(command["body"]))
            answer: dict[str, Any] = {"ok": True}
        elif op == "e2e":
            answer = {"requests": [asyncio.run(floor.generate(b)) for b in command["bodies"]]}
        elif op == "graph":
            answer = {"seconds": floor.graph(int(command["rows"]), int(command["calls"]))}
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(json.dumps(answer), flush=True)
    return 0


class FloorProcess:
    """The parent's handle on a ``--floor-worker`` subprocess."""

    def __init__(self, prepared: Prepared) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.overhead",
                "--floor-worker",
                str(prepared.model_dir),
                str(prepared.repository),
            ],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()

    def ask(self, **command: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor worker exited with {self.process.wait()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
