"""The ``python-onnx`` target: an ONNX graph run by onnxruntime, as a Triton python-backend model runs it.

``model_repository/python_onnx/model.py`` (copied by the exporter into ``<repository>/<model>/1/``
beside ``model.onnx``) binds :class:`OnnxModel` to Triton; everything here imports and runs without
Triton.  Requests whose variant and non-batch shapes agree are concatenated along the batch axis and
run as one onnxruntime call, then split back per request.

LoRA variants: a request may carry the parameter ``lora_variant`` = K (16-64 hex digits; absent or
empty: the base model).  Variant K's overrides are ``<model>/variants/K.safetensors`` (merged tensors
keyed by parameter name, the initializer prefix in the header's ``onnx_prefix``).  They run on one
second session of the base graph whose weight initializers are overridable (also graph inputs), so
a variant's batch is that session fed with its override tensors: no session, process or file per
variant, and a new variant costs reading its overrides.  At most ``max_lora_variants`` (config
parameter; env ``MAX_LORA_VARIANTS`` overrides) variants' overrides stay in memory, least recently
used dropped first; each batch runs grouped by variant and shape.  When ``T2I_LORA_PRELOAD``
(environment of tritonserver, set from the service's ``LORA_PRELOAD``: the models a LoRA can change,
comma-separated) names this model, its overridable session opens in a background thread at start,
so the first variant request does not wait for it.

Memory: onnxruntime's CPU arena is off, so what a large batch allocated goes back to the system
afterwards (with it on, one 1024x1024 request left the process at 2.3 GB for good).  Between
batches malloc keeps what a batch freed and a thread gives it back once the model has run nothing
for ``T2I_MEMORY_RELEASE_S`` seconds (:class:`export.models.heap.FreedMemory`).  A batch whose latent
input holds more than ``T2I_MAX_BATCH_LATENT_PIXELS`` (rows x height x width, from the service's
``MAX_BATCH_PIXELS``; environment of tritonserver) runs in chunks of rows under that cap.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from export.contract.specs import VARIANT_KEY, VARIANT_PARAMETER
from export.models.heap import FreedMemory

# Inputs whose rows x height x width the batch cap counts (UNet ``sample``, SD3 transformer
# ``hidden_states``, VAE decoder ``latent``).
_LATENT_INPUTS = ("sample", "hidden_states", "latent")


def session_options(params: Mapping[str, str]) -> ort.SessionOptions:
    """A fresh onnxruntime ``SessionOptions`` for this model (one per session: variants add to it)."""
    options = ort.SessionOptions()
    threads = int(params.get("intra_op_threads", "0") or 0) or int(os.environ.get("T2I_ORT_THREADS", "0"))
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = False  # give a large batch's memory back when it is done
    # Idle intra-op threads spin by default; beside the other models' workers, Triton and the
    # service on a few cores that spinning takes the CPU the next step's work needs.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", params.get("allow_spinning", "0") or "0"
    )
    return options


class OnnxModel:
    """One Triton model's graph: the base session, its LoRA variants' overrides, the batch cap.

    :meth:`run` takes the inputs of several requests that share their variant and non-batch shapes,
    runs them as one onnxruntime call (in chunks under the cap) and returns each request's outputs."""

    def __init__(
        self,
        session: Any,
        variants: VariantOverrides,
        input_names: list[str],
        output_names: list[str],
        max_batch_pixels: int,
        freed_memory: FreedMemory,
    ) -> None:
        self.session = session
        self.variants = variants
        self.input_names = input_names
        self.output_names = output_names
        self.max_batch_pixels = max_batch_pixels
        self.freed_memory = freed_memory

    @classmethod
    def load(cls, model_dir: Path, version: str, name: str, config: Mapping[str, Any]) -> OnnxModel:
        """The model of Triton model directory ``model_dir`` (its ``config.pbtxt`` as JSON: ``config``);
        the tritonserver environment's ``MAX_LORA_VARIANTS``, ``T2I_LORA_PRELOAD``,
        ``T2I_MAX_BATCH_LATENT_PIXELS`` and ``T2I_MEMORY_RELEASE_S`` apply."""
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = model_dir / version / params.get("onnx_file", "model.onnx")
        session = ort.InferenceSession(str(path), session_options(params), providers=["CPUExecutionProvider"])
        limit = int(os.environ.get("MAX_LORA_VARIANTS") or params.get("max_lora_variants") or 4)
        variants = VariantOverrides(model_dir / "variants", path, lambda: session_options(params), limit)
        if name in os.environ.get("T2I_LORA_PRELOAD", "").split(","):
            variants.preload()
        return cls(
            session,
            variants,
            [i["name"] for i in config["input"]],
            [o["name"] for o in config["output"]],
            int(os.environ.get("T2I_MAX_BATCH_LATENT_PIXELS", "0") or 0),
            FreedMemory(float(os.environ.get("T2I_MEMORY_RELEASE_S", "2") or 0)),
        )

    def run(self, batch: list[dict[str, np.ndarray]], variant: str = "") -> list[dict[str, np.ndarray]]:
        """Each request's outputs for ``batch`` (requests of one ``variant``, '' for the base model)."""
        if variant:
            session, overrides = self.variants.get(variant)
            return self._run(session, batch, overrides)
        return self._run(self.session, batch)

    def batch_done(self) -> None:
        """Called once per Triton ``execute``: freed memory goes back once the model idles."""
        self.freed_memory.batch_done()

    def _run(
        self, session: Any, batch: list[dict[str, np.ndarray]], overrides: dict[str, np.ndarray] | None = None
    ) -> list[dict[str, np.ndarray]]:
        if len(batch) == 1:  # one request (concurrency 1): nothing to join or split
            outputs = self._run_chunked(session, batch[0], overrides or {})
            return [dict(zip(self.output_names, outputs, strict=True))]
        sizes = [len(feeds[self.input_names[0]]) for feeds in batch]
        joined = {n: np.concatenate([feeds[n] for feeds in batch]) for n in self.input_names}
        outputs = self._run_chunked(session, joined, overrides or {})
        bounds = np.cumsum(sizes)[:-1]
        per_output = [np.split(out, bounds) for out in outputs]
        return [dict(zip(self.output_names, parts, strict=True)) for parts in zip(*per_output, strict=True)]

    def _run_chunked(
        self, session: Any, feeds: dict[str, np.ndarray], weights: dict[str, np.ndarray]
    ) -> list[np.ndarray]:
        """``session.run`` on the batched ``feeds`` (with a variant's override ``weights``), in chunks
        of rows when the latent pixels exceed the cap."""
        latent = next((feeds[n] for n in _LATENT_INPUTS if n in feeds and feeds[n].ndim == 4), None)
        if latent is None or not self.max_batch_pixels:
            return session.run(self.output_names, {**feeds, **weights})
        rows = len(latent)
        step = max(1, self.max_batch_pixels // (latent.shape[2] * latent.shape[3]))
        if step >= rows:
            return session.run(self.output_names, {**feeds, **weights})
        parts = [
            session.run(self.output_names, {**{n: a[i : i + step] for n, a in feeds.items()}, **weights})
            for i in range(0, rows, step)
        ]
        return [np.concatenate([part[k] for part in parts]) for k in range(len(self.output_names))]


def requested_variant(parameters: str | dict) -> str:
    """The request's ``lora_variant`` ('' for the base model); a malformed value is an error."""
    values = json.loads(parameters) if isinstance(parameters, str) else parameters
    variant = (values or {}).get(VARIANT_PARAMETER, "")
    if not isinstance(variant, str) or (variant and not VARIANT_KEY.match(variant)):
        raise ValueError(f"{VARIANT_PARAMETER} must be 16-64 lowercase hex digits")
    return variant


class VariantOverrides:
    """The overridable session (opened on the first variant request) and the override tensors of at
    most ``limit`` variants, least recently used first."""

    def __init__(self, folder: Path, onnx_path: Path, options: Callable[[], Any], limit: int) -> None:
        self.folder = folder
        self.onnx_path = onnx_path
        self.options = options
        self.limit = max(1, limit)
        self.session: Any = None
        self.overridable: frozenset[str] = frozenset()
        self.open: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._opening: Future[Any] | None = None

    def preload(self) -> None:
        """Open the overridable session in a background thread; the first variant waits for it."""
        self._opening = ThreadPoolExecutor(1, thread_name_prefix="t2i-variant-session").submit(
            self._overridable_session
        )

    def get(self, key: str) -> tuple[Any, dict[str, np.ndarray]]:
        if key in self.open:
            self.open.move_to_end(key)
            return self.session, self.open[key]
        overrides = self._read(key)  # before opening the session: a missing variant costs nothing
        if self.session is None:
            opening, self._opening = self._opening, None  # a failed preload: the next try opens it here
            self.session = opening.result() if opening is not None else self._overridable_session()
        unknown = sorted(set(overrides) - self.overridable)
        if unknown:
            raise ValueError(
                f"LoRA variant {key} overrides '{unknown[0]}', which is not a weight of this model"
            )
        while len(self.open) >= self.limit:
            self.open.popitem(last=False)
        self.open[key] = overrides
        return self.session, overrides

    def _read(self, key: str) -> dict[str, np.ndarray]:
        from safetensors import safe_open

        file = self.folder / f"{key}.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"LoRA variant {key} has no overrides for this model")
        with safe_open(str(file), framework="np") as handle:
            prefix = (handle.metadata() or {}).get("onnx_prefix", "")
            return {prefix + name: np.ascontiguousarray(handle.get_tensor(name)) for name in handle.keys()}  # noqa: SIM118

    def _overridable_session(self) -> Any:
        """The base graph with every weight initializer (a ``.weight`` of 2 or more dimensions, all a
        LoRA can change) also listed as a graph input, which onnxruntime lets a run feed."""
        import onnx
        from onnx import external_data_helper, helper

        model = onnx.load(str(self.onnx_path), load_external_data=False)
        listed = {i.name for i in model.graph.input}
        names = []
        for init in model.graph.initializer:
            if init.name.endswith(".weight") and len(init.dims) >= 2 and init.name not in listed:
                model.graph.input.append(
                    helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                )
                names.append(init.name)
        self.overridable = frozenset(names)
        external = any(external_data_helper.uses_external_data(t) for t in model.graph.initializer)
        if external:
            # weights stay in the base's data file; only this small graph is written, once, beside it
            graph = self.onnx_path.with_name(f"{self.onnx_path.stem}.overridable.onnx")
            partial = graph.with_name(f".{graph.name}.{os.getpid()}.partial")
            onnx.save(model, str(partial))
            partial.rename(graph)
            source: Any = str(graph)
        else:
            onnx.load_external_data_for_model(model, str(self.onnx_path.parent))
            source = model.SerializeToString()
        del model
        options = self.options()
        options.log_severity_level = 3  # one warning per overridable weight otherwise
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
