"""The python-torch target's export check: a freshly written model directory rebuilds and runs."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from export.toolchain.onnx_export import example_inputs
from export.triton_models.torch_model import TorchModel, TorchOptions
from export.triton_models.torch_source import TorchModelError, load_component

logger = logging.getLogger(__name__)


def check_torch_model(version_dir: Path) -> None:
    """Rebuild the module from ``version_dir`` alone and run it (CPU, float32) at the spec's check
    sizes: the folder is complete and the outputs have the spec's names, count and known axes.
    Raises :class:`TorchModelError` naming what does not fit."""
    model = TorchModel(load_component(version_dir), torch.device("cpu"), TorchOptions(), version_dir)
    spec = model.spec
    for i, sizes in enumerate(spec.check_sizes):
        feeds = {k: torch.from_numpy(v) for k, v in example_inputs(spec, sizes, seed=i + 1).items()}
        (outputs,) = model.run([feeds])
        for t in spec.outputs:
            got = tuple(outputs[t.name].shape)
            expected = tuple(sizes.get(a) if isinstance(a, str) else a for a in t.shape)
            if len(got) != len(expected) or any(
                e is not None and e != g for e, g in zip(expected, got, strict=True)
            ):
                raise TorchModelError(
                    f"{spec.name}.{t.name} at {sizes}: shape {got}, the spec says {t.shape}"
                )
            if not bool(torch.isfinite(outputs[t.name]).all()):
                raise TorchModelError(f"{spec.name}.{t.name} at {sizes}: non-finite values")
    logger.info("%s: torch module rebuilt from %s runs at %s", spec.name, version_dir, spec.check_sizes)
