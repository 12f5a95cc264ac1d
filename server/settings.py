"""The service's settings: one object built once at start, defaults < environment < CLI."""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Environment variable -> settings field.  Names follow Livepeer's ai-runner where it has one.
ENV_NAMES: dict[str, str] = {
    "PIPELINE": "pipeline",
    "MODEL_ID": "model_id",
    "MODEL_DIR": "model_dir",
    "AUTH_TOKEN": "auth_token",
    "TRITON_URL": "triton_url",
    "MODEL_REPOSITORY": "model_repository",
    "STATE_DIR": "state_dir",
    "HOST": "host",
    "PORT": "port",
    "VERSION": "version",
    "SCHEDULER": "scheduler",
    "MAX_LORAS": "max_loras",
    "MAX_IMAGES": "max_images",
    "MAX_PIXELS": "max_pixels",
    "MAX_BATCH_PIXELS": "max_batch_pixels",
    "TRITON_TIMEOUT_S": "triton_timeout_s",
    "TRITON_SHARED_MEMORY": "triton_shared_memory",
    "STARTUP_TIMEOUT_S": "startup_timeout_s",
    "MAX_STEPS": "max_steps",
    "MAX_IN_FLIGHT": "max_in_flight",
    "MAX_QUEUE": "max_queue",
    "REQUEST_TIMEOUT_S": "request_timeout_s",
    "HEALTH_INTERVAL_S": "health_interval_s",
    "SAFETY_CHECKER": "safety_checker",
    "LORA_DIR": "lora_dir",
    "MAX_LORA_VARIANTS": "max_lora_variants",
    "LORA_EXTRA_DIRS": "lora_extra_dirs",
    "LORA_HUB": "lora_hub",
    "LORA_HUB_TIMEOUT_S": "lora_hub_timeout_s",
    "HF_ENDPOINT": "hf_endpoint",
    "LORA_MAX_MB": "lora_max_mb",
    "LORA_CACHE_GB": "lora_cache_gb",
    "LORA_BUILD_CONCURRENCY": "lora_build_concurrency",
    "LORA_PRELOAD": "lora_preload",
    "WARMUP": "warmup",
    "TORCH_THREADS": "torch_threads",
    "MALLOC_ARENA_MAX": "malloc_arena_max",
    "MEMORY_RELEASE_S": "memory_release_s",
    "MAX_BODY_BYTES": "max_body_bytes",
    "HTTP_RETRY_STATUSES": "http_retry_statuses",
    "TRITONSERVER": "tritonserver",
}


class SettingsError(ValueError):
    pass


def triton_address(url: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` of Triton's HTTP endpoint -> (host, port)."""
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/") or parsed.query:
        raise SettingsError(
            f"TRITON_URL must be Triton's HTTP address as host:port or http://host:port, got {url!r}"
        )
    try:
        port = parsed.port or 8000  # Triton's own default
    except ValueError as e:
        raise SettingsError(f"TRITON_URL has a bad port: {url!r}") from e
    return parsed.hostname, port


@dataclass(frozen=True)
class Settings:
    pipeline: str = "text-to-image"
    model_id: str = ""
    model_dir: Path = Path("/models")
    auth_token: str | None = None
    # Triton's HTTP endpoint (host:port); empty: start the bundled tritonserver on ``model_repository``.
    triton_url: str = ""
    model_repository: Path = Path("model_repository/default")
    state_dir: Path = Path("state")
    host: str = "0.0.0.0"
    port: int = 8000
    version: str = "0.1.0"
    # A diffusers scheduler class name replacing the model's own (its config is kept).
    scheduler: str = ""
    max_loras: int = 4
    max_images: int = 4
    max_pixels: int = 1024 * 1024
    # Image pixels (rows x height x width, CFG rows included) one UNet / VAE batch of the bundled
    # Triton's python-onnx models runs at once; a bigger dynamic batch runs in chunks, and a request
    # whose own rows exceed it is a 400.  The default admits MAX_IMAGES images of MAX_PIXELS with CFG.
    max_batch_pixels: int = 8 * 1024 * 1024
    max_steps: int = 200
    # Generations running at once (their UNet steps batch together in Triton), and waiting beyond them.
    max_in_flight: int = 8
    max_queue: int = 32
    # Per request, from arrival to answer (waiting for the model to load and for a slot included);
    # past it: 500 (503 with HTTP_RETRY_STATUSES) naming what it waited for.
    request_timeout_s: float = 600.0
    health_interval_s: float = 1.0
    # Where LoRA names are looked up (besides local paths and Hub ids).
    lora_dir: Path | None = None
    # LoRA variants in use / resident at once; the least recently used idle one goes first.
    max_lora_variants: int = 4
    # More folders LoRA names are looked up in, after LORA_DIR (separated by ':').
    lora_extra_dirs: str = ""
    # Whether LoRA ids may name Hugging Face Hub repositories; off: only the folders above.
    lora_hub: bool = True
    # Longest wait for the Hub per lookup and per download; past it the request is refused (500).
    lora_hub_timeout_s: float = 20.0
    # The Hub's address ("" = huggingface_hub's default, https://huggingface.co).
    hf_endpoint: str = ""
    # Largest LoRA file fetched from the Hub (safetensors only).
    lora_max_mb: float = 512.0
    # Disk for LoRA variants and downloaded LoRAs; least recently used idle entries are deleted first.
    lora_cache_gb: float = 20.0
    # Variant builds running at once.
    lora_build_concurrency: int = 1
    # python-onnx on the bundled Triton: the models a LoRA can change open their LoRA-variant session
    # in the background at start (a second copy of their weights in memory), so the service's first
    # LoRA request waits only for its build; off: opened on that request (22.6 s on the mid model).
    # Off by default: it holds the stubs' GIL while the service warms up (cold start +3-4 s, tiny).
    lora_preload: bool = False
    # "auto": use Triton's safety_checker model when the repository has one; "off": never.
    safety_checker: str = "auto"
    triton_timeout_s: float = 300.0
    # A request's text embeddings go to Triton once, in a /dev/shm region it reads at every step, when
    # Triton runs on this host (found out at the first request; each region lives for its request).
    triton_shared_memory: bool = True
    startup_timeout_s: float = 300.0
    warmup: bool = True
    torch_threads: int = 1
    # glibc malloc arenas of the service process (glibc's own variable): more let the RSS creep with
    # memory freed on many threads (export/models/heap.py).
    malloc_arena_max: int = 2
    # The bundled Triton's python-onnx models keep the memory a batch freed for the next one (a fresh
    # page per allocation cost 40% of a tiny UNet step) and give it back after this many idle
    # seconds; 0: after every batch.
    memory_release_s: float = 2.0
    # Request body size; a larger body is a 400 (413 with HTTP_RETRY_STATUSES) before it is read in full.
    max_body_bytes: int = 1024 * 1024
    # Answer a request the service cannot serve now with 503 + Retry-After, and a body over
    # MAX_BODY_BYTES with 413, for a generic load balancer that retries on them.  Off: 500 and 400, the
    # only statuses besides 200, 401 and 422 that go-livepeer and the livepeer-ai SDK parse.
    http_retry_statuses: bool = False
    # The tritonserver binary to start when TRITON_URL is empty: this path; empty: `tritonserver` on
    # PATH (the Docker image's), else the one bundled in the nvidia-pytriton wheel.
    tritonserver: str = ""
    extra: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.pipeline != "text-to-image":
            raise SettingsError(f"PIPELINE '{self.pipeline}' is not served here (only text-to-image)")
        if not self.model_id:
            raise SettingsError("MODEL_ID is required: a Hugging Face model id or a local diffusers folder")
        for name in (
            "max_loras",
            "max_images",
            "max_pixels",
            "max_batch_pixels",
            "max_steps",
            "max_in_flight",
            "max_lora_variants",
            "lora_build_concurrency",
            "torch_threads",
            "malloc_arena_max",
            "max_body_bytes",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        if self.max_queue < 0 or self.request_timeout_s <= 0 or self.health_interval_s <= 0:
            raise SettingsError("max_queue must be >= 0; request_timeout_s and health_interval_s > 0")
        if self.memory_release_s < 0:
            raise SettingsError("memory_release_s must be >= 0")
        if self.lora_hub_timeout_s <= 0 or self.lora_max_mb <= 0 or self.lora_cache_gb <= 0:
            raise SettingsError("lora_hub_timeout_s, lora_max_mb and lora_cache_gb must be > 0")
        if self.safety_checker not in ("auto", "off"):
            raise SettingsError(f"safety_checker must be 'auto' or 'off', got '{self.safety_checker}'")
        if self.triton_url:
            triton_address(self.triton_url)
        if not 0 < self.port < 65536:
            raise SettingsError(f"port {self.port} is out of range")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then ``overrides`` (the CLI); values are converted by type."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for env_name, attr in ENV_NAMES.items():
            if env.get(env_name, "") != "":
                values[attr] = env[env_name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: _convert(k, v) for k, v in values.items()})

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: _convert(k, v) for k, v in overrides.items()})


_TYPES = {f.name: f.type for f in fields(Settings)}


def _convert(name: str, value: Any) -> Any:
    if name not in _TYPES:
        raise SettingsError(f"unknown setting '{name}'")
    if not isinstance(value, str):
        return value
    kind = str(_TYPES[name])
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            if value.lower() not in {"1", "true", "yes", "on", "0", "false", "no", "off"}:
                raise ValueError(value)
            return value.lower() in {"1", "true", "yes", "on"}
        if kind in ("Path", "Path | None"):
            return Path(value)
    except ValueError as e:
        raise SettingsError(f"setting {name}={value!r} is not a valid {kind}") from e
    return value


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting; each overrides its environment variable."""
    for env_name, attr in ENV_NAMES.items():
        parser.add_argument(f"--{attr.replace('_', '-')}", dest=attr, default=None, help=f"(env {env_name})")
