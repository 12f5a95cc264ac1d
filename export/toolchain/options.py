"""What an export is asked for: the target and :class:`RepositoryOptions` (``t2i-export``'s options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from export.models.precision import Precision, default_precision
from export.models.weights import AUTO
from export.toolchain.tensorrt_plan import EngineOptions
from export.triton_models.torch_model import TorchOptions

Target = Literal["python-onnx", "python-torch", "tensorrt"]
TARGETS: tuple[Target, ...] = ("python-onnx", "python-torch", "tensorrt")


@dataclass(frozen=True)
class RepositoryOptions:
    target: Target = "python-onnx"
    check: bool = True
    # Zero: a batch forms from what is queued when the model is free, so a lone request never waits
    # and concurrent ones still meet while the model is busy (bench/RESULTS.md, overhead).
    max_queue_delay_us: int = 0
    # python-torch only: how the module runs (GPU speed switches, resident LoRA variants).
    torch: TorchOptions = field(default_factory=TorchOptions)
    # None: the target's default (fp16 for GPU targets, fp32 for python-onnx).
    precision: Precision | None = None
    # The tensorrt target's buckets, batch range, GPUs and workspace.
    engine: EngineOptions = field(default_factory=EngineOptions)
    # Which weight files to read (export/models/weights.py): "auto" (the precision's variant when present),
    # "none" (the full files only) or a variant name such as "fp16".
    variant: str = AUTO
    # tensorrt only: stop before the first TensorRT call and write the plan (no GPU, no TensorRT needed).
    plan_only: bool = False

    @property
    def resolved_precision(self) -> Precision:
        return self.precision or default_precision(self.target)
