"""``t2i-export MODEL --target python-onnx --out DIR``: a diffusers model -> a Triton model repository."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.onnx_export import OnnxMismatchError
from export.repository import TARGETS, RepositoryOptions, export_repository
from export.source import ModelSourceError


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = RepositoryOptions(
        target=args.target, check=not args.no_check, max_queue_delay_us=args.max_queue_delay_us
    )
    try:
        export_repository(args.model, args.out, options, safety_checker=args.safety_checker)
    except (ModelSourceError, OnnxMismatchError) as e:
        logging.getLogger("t2i-export").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
