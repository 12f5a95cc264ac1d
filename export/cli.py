"""``t2i-export MODEL --target TARGET --out DIR``: a diffusers model -> a Triton model repository."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.onnx_export import OnnxMismatchError
from export.repository import TARGETS, RepositoryOptions, export_repository
from export.source import ModelSourceError
from export.torch_model import COMPILE_MODES, TorchModelError, TorchOptions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="t2i-export", description=__doc__)
    parser.add_argument("model", help="Hugging Face model id or local diffusers folder")
    parser.add_argument("--target", choices=TARGETS, default="python-onnx", help="what Triton runs")
    parser.add_argument("--out", type=Path, required=True, help="Triton model repository to write")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX-vs-torch numerical check")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher queue delay")
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
    args = parser.parse_args(argv)
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
    options = RepositoryOptions(
        target=args.target,
        check=not args.no_check,
        max_queue_delay_us=args.max_queue_delay_us,
        torch=torch_options,
    )
    try:
        export_repository(args.model, args.out, options, safety_checker=args.safety_checker)
    except (ModelSourceError, OnnxMismatchError, TorchModelError) as e:
        logging.getLogger("t2i-export").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
