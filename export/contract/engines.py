"""Resolution buckets and engine hosts: what the exporter writes into a repository and the service checks.

A TensorRT repository serves the resolution buckets its engines were built for (one optimisation profile
per bucket, recorded in the manifest), and runs only on the GPU model and TensorRT version that built it
(the :class:`EngineHost` recorded per model and hashed into its fingerprint).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The API's default size (width x height); with the model's native square size, the default buckets.
API_DEFAULT_RESOLUTION = (1024, 576)
# The smallest latent side the service and the engines accept (height and width / the VAE scale).
MIN_LATENT_SIDE = 8

_RESOLUTION = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class ResolutionError(ValueError):
    """A resolution bucket the model cannot serve (not a multiple of the VAE scale, too small)."""


@dataclass(frozen=True, order=True)
class Resolution:
    """An image size in pixels, written ``WIDTHxHEIGHT`` like the API's width and height fields."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: str) -> Resolution:
        match = _RESOLUTION.match(text)
        if match is None:
            raise ValueError(f"'{text}' is not a resolution WIDTHxHEIGHT such as 1024x576")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def parse_resolutions(text: str) -> tuple[Resolution, ...]:
    """``"1024x576,512x512"`` -> the buckets, in the given order, without repeats."""
    parsed = [Resolution.parse(part) for part in text.split(",") if part.strip()]
    if not parsed:
        raise ValueError("no resolution given: expected WIDTHxHEIGHT[,WIDTHxHEIGHT...]")
    return tuple(dict.fromkeys(parsed))


def default_resolutions(native_size: int) -> tuple[Resolution, ...]:
    """The model's native square size and the API's default size."""
    return tuple(dict.fromkeys((Resolution(native_size, native_size), Resolution(*API_DEFAULT_RESOLUTION))))


def check_resolutions(resolutions: Sequence[Resolution], vae_scale: int) -> None:
    """Raise :class:`ResolutionError` unless every side is a multiple of the VAE scale of at least 8
    latents (the service's own rule for height and width)."""
    minimum = MIN_LATENT_SIDE * vae_scale
    for r in resolutions:
        for side in (r.width, r.height):
            if side < minimum or side % vae_scale:
                raise ResolutionError(
                    f"resolution {r}: each side must be a multiple of {vae_scale} of at least {minimum}"
                )


@dataclass(frozen=True)
class EngineHost:
    """What an engine is tied to: the GPU model and the TensorRT version that built it."""

    gpu: str
    compute_capability: str
    tensorrt: str
    # The CUDA device index it was built on (recorded; engines run on any GPU of the same model).
    device: int = field(default=0, compare=False)

    def as_dict(self) -> dict[str, str | int]:
        return {
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            "tensorrt": self.tensorrt,
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EngineHost:
        return cls(
            str(data["gpu"]),
            str(data.get("compute_capability", "")),
            str(data["tensorrt"]),
            int(data.get("device", 0)),
        )

    def __str__(self) -> str:
        return f"{self.gpu} (sm {self.compute_capability}) with TensorRT {self.tensorrt}"


def engine_fingerprint(graph_fingerprint: str, host: EngineHost) -> str:
    """The fingerprint of an engine: its graph's and build options' fingerprint plus the host."""
    h = hashlib.sha256(graph_fingerprint.encode())
    h.update(f"|gpu={host.gpu}|sm={host.compute_capability}|tensorrt={host.tensorrt}".encode())
    return h.hexdigest()


def host_mismatch(built: EngineHost, running: EngineHost) -> str | None:
    """Why engines built on ``built`` cannot run on ``running`` (None if they can). A running
    TensorRT version that is unknown ("") is not compared."""
    reasons = []
    if built.gpu != running.gpu:
        reasons.append(f"GPU {built.gpu} != this host's {running.gpu}")
    if running.tensorrt and built.tensorrt != running.tensorrt:
        reasons.append(f"TensorRT {built.tensorrt} != this host's {running.tensorrt}")
    return "; ".join(reasons) or None
