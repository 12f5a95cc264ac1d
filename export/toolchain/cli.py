"""``t2i-export MODEL --target python-onnx|python-torch|tensorrt --out DIR``: a diffusers model -> a Triton
repository (``--target tensorrt --plan``: everything before TensorRT, on any host)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from export.contract import engines
from export.models.precision import PRECISIONS
from export.models.refit import TensorRTUnavailable
from export.models.source import ModelSourceError
from export.models.weights import AUTO
from export.toolchain import tensorrt, tensorrt_plan
from export.toolchain.onnx_export import OnnxMismatchError
from export.toolchain.options import TARGETS, RepositoryOptions
from export.toolchain.repository import export_repository
from export.triton_models.torch_model import COMPILE_MODES, TorchOptions
from export.triton_models.torch_source import TorchModelError


def _gpus(text: str) -> tuple[int, ...]:
    try:
        gpus = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of GPU indices such as 0,1") from None
    if not gpus or any(g < 0 for g in gpus):
        raise argparse.ArgumentTypeError(f"'{text}' is not a list of GPU indices such as 0,1")
    return gpus


def _resolutions(text: str) -> tuple[engines.Resolution, ...]:
    try:
        return engines.parse_resolutions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}' must be positive")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2i-export", description=__doc__)
    parser.add_argument("model", help="Hugging Face model id or local diffusers folder")
    parser.add_argument("--target", choices=TARGETS, default="python-onnx", help="what Triton runs")
    parser.add_argument("--out", type=Path, required=True, help="Triton model repository to write")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX-vs-torch numerical check")
    parser.add_argument(
        "--max-queue-delay-us", type=int, default=0, help="dynamic batcher queue delay (default 0)"
    )
    parser.add_argument(
        "--safety-checker",
        metavar="PATH",
        default=None,
        help="safety checker to export as the safety_checker model: a diffusers folder with safety_checker/ "
        "(and feature_extractor/), or the checker folder itself (default: the model's own, if it has one)",
    )
    torch_group = parser.add_argument_group("python-torch target (GPU switches; off on CPU)")
    torch_group.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    torch_group.add_argument(
        "--torch-compile", choices=[m for m in COMPILE_MODES if m], default="", help="torch.compile mode"
    )
    torch_group.add_argument("--cuda-graphs", action="store_true", help="CUDA graphs per shape bucket")
    torch_group.add_argument(
        "--max-lora-variants", type=int, default=TorchOptions.max_lora_variants, help="LoRA variants resident"
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="precision of the exported graphs (default: fp16 for GPU targets, fp32 for python-onnx); "
        "SDXL's VAE decoder stays fp32 unless its VAE is fp16-safe",
    )
    parser.add_argument(
        "--variant",
        default=AUTO,
        metavar="auto|none|NAME",
        help="which weight files to read: 'auto' (default: the precision's variant, e.g. *.fp16.safetensors "
        "for fp16, when the folder has it, else the full files, cast on load), 'none' (the full files "
        "only) or a variant name (e.g. fp16; the full files where a folder lacks it)",
    )
    trt_args = parser.add_argument_group("tensorrt target")
    trt_args.add_argument(
        "--resolutions",
        type=_resolutions,
        default=(),
        metavar="WxH[,WxH...]",
        help="image sizes the engines serve, one optimisation profile each (default: the model's native "
        f"square size and {engines.Resolution(*engines.API_DEFAULT_RESOLUTION)})",
    )
    trt_args.add_argument(
        "--max-batch",
        type=_positive(int),
        default=tensorrt_plan.DEFAULT_MAX_BATCH,
        help="largest batch (rows) of every engine; a request of n images with guidance is 2n UNet rows "
        f"(default {tensorrt_plan.DEFAULT_MAX_BATCH})",
    )
    trt_args.add_argument(
        "--gpus",
        type=_gpus,
        default=(),
        metavar="0,1",
        help="GPUs Triton places the models on (default: all)",
    )
    trt_args.add_argument(
        "--workspace-gib",
        type=_positive(float),
        default=None,
        help="TensorRT workspace limit (default: the GPU's)",
    )
    trt_args.add_argument(
        "--plan",
        action="store_true",
        help="stop before the first TensorRT call (no GPU or TensorRT needed): export and check each "
        "graph on CPU, then write OUT/plan.json and print every model's profiles, builder flags, config "
        "and GPU memory (weights exact, activations an estimate); the build consumes this same plan",
    )
    args = parser.parse_args(argv)
    if args.plan and args.target != "tensorrt":
        parser.error("--plan is for --target tensorrt")
    try:
        torch_options = TorchOptions(
            channels_last=args.channels_last,
            compile_mode=args.torch_compile,
            cuda_graphs=args.cuda_graphs,
            max_lora_variants=args.max_lora_variants,
        )
    except ValueError as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = RepositoryOptions(
            target=args.target,
            check=not args.no_check,
            max_queue_delay_us=args.max_queue_delay_us,
            torch=torch_options,
            precision=args.precision,
            variant=args.variant,
            engine=tensorrt_plan.EngineOptions(
                resolutions=args.resolutions,
                max_batch=args.max_batch,
                gpus=args.gpus,
                workspace_gib=args.workspace_gib,
            ),
            plan_only=args.plan,
        )
        export_repository(args.model, args.out, options, safety_checker=args.safety_checker)
    except TensorRTUnavailable as e:
        # One line, no traceback: what is missing and where it exists.
        print(f"t2i-export: {e}", file=sys.stderr)
        return 2
    except ModelSourceError as e:
        # One line, no traceback: the folder and the file (pattern) it lacks.
        print(f"t2i-export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except (
        OnnxMismatchError,
        TorchModelError,
        tensorrt.EngineBuildError,
        tensorrt.EngineMismatchError,
        engines.ResolutionError,
        tensorrt_plan.ProfileError,
        tensorrt.GpuSelectionError,
    ) as e:
        logging.getLogger("t2i-export").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
