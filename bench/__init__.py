"""Benchmarks of the text-to-image service (docs/ARCHITECTURE.md section 7).

Figures live in ``bench/RESULTS.md``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
from pathlib import Path


def machine(packages: tuple[str, ...]) -> list[str]:
    """Lines describing where a benchmark ran: CPU model, cores, torch threads, package versions."""
    import torch

    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = ", ".join(f"{d} {importlib.metadata.version(d)}" for d in packages)
    return [
        f"CPU: {cpu}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}",
        f"Python {sys.version.split()[0]}; {versions}",
    ]


def log_to_stderr(verbose: bool, logger: logging.Logger) -> None:
    """The benchmarks' logging: every library at INFO with ``-v`` (else WARNING), ``logger`` at INFO."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logger.setLevel(logging.INFO)
