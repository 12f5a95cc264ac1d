"""Everything about a TensorRT engine decided before TensorRT runs: profiles, builder flags, config, plan.

Plain Python, tested on any host (no ``tensorrt``, no GPU); :mod:`export.toolchain.tensorrt` makes the
TensorRT calls that build and check an engine from the plan.

- One optimisation profile per resolution bucket the operator names (``--resolutions``): the latent
  sides are fixed per profile, the batch goes from 1 to ``--max-batch`` with its optimum at the
  spec's (2 for the UNet and text encoders: a guided image is two rows; 1 for the VAE). Models
  without a resolution axis (text encoders) get one profile. Triton picks the profile that fits
  each batch; a size outside every bucket is refused by the service with a 400 before it reaches
  Triton (the buckets are recorded in the repository manifest, ``t2i-repository.json``).
- Everything decided before TensorRT runs is one :class:`EnginePlan` per model (precision, builder
  flags, profiles, config, memory), computed for every model before any export, printed by
  ``t2i-export --plan`` on any host, and consumed as it is by
  :func:`export.toolchain.tensorrt.build_engine`.
- The network is strongly typed (TensorRT 9.1 and later; the image has 10.13): each layer runs in the
  type the ONNX graph gives it, so an fp16 graph runs in fp16 and the SDXL VAE kept fp32 stays fp32;
  TF32 is cleared for fp32 graphs (:func:`build_flags`).
- The UNet and text encoders are built refittable (``BuilderFlag.REFIT``, not ``REFIT_IDENTICAL``:
  LoRA variants change the weights), so a variant is the base engine refitted (export/models/refit.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tritonclient.grpc import model_config_pb2 as mc

from export.contract import specs
from export.contract.engines import Resolution

if TYPE_CHECKING:
    from export.models.precision import Precision

PLAN_FILE = "model.plan"
DEFAULT_MAX_BATCH = 8
# Models whose weights LoRA variants change: built refittable.
REFITTABLE_MODELS = frozenset({specs.UNET, specs.TEXT_ENCODER, specs.TEXT_ENCODER_2})


@dataclass(frozen=True)
class EngineOptions:
    """How engines are built. ``resolutions`` empty: the model's default buckets."""

    resolutions: tuple[Resolution, ...] = ()
    max_batch: int = DEFAULT_MAX_BATCH
    # GPU indices Triton places each model's instances on; empty: every GPU.
    gpus: tuple[int, ...] = ()
    # TensorRT's workspace pool limit; None: TensorRT's default (the GPU's memory).
    workspace_gib: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if any(g < 0 for g in self.gpus):
            raise ValueError("GPU indices must be >= 0")
        if self.workspace_gib is not None and self.workspace_gib <= 0:
            raise ValueError("the workspace limit must be positive")


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: (min, opt, max) shape per input, and the axis sizes at opt."""

    resolution: Resolution | None
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    opt_sizes: Mapping[str, int] = field(default_factory=dict)


def engine_spec(spec: specs.ModelSpec, max_batch: int) -> specs.ModelSpec:
    """``spec`` with its batch axis going to ``max_batch`` (opt clipped into range)."""
    batch = spec.axes["batch"]
    axes = dict(spec.axes)
    axes["batch"] = specs.AxisRange(1, min(batch.opt, max_batch), max_batch)
    return replace(spec, axes=axes)


class ProfileError(ValueError):
    """An optimisation profile that leaves a dynamic axis without a size or outside the spec's range."""


def has_resolution(spec: specs.ModelSpec) -> bool:
    """Whether an image size fixes some of the spec's axes (latent sides, image sides, FLUX tokens)."""
    return any(axis in spec.axes for axis in specs.RESOLUTION_AXES)


_LEVELS = ("min", "opt", "max")


def engine_profiles(
    spec: specs.ModelSpec, resolutions: Sequence[Resolution], vae_scale: int
) -> list[Profile]:
    """The optimisation profiles of ``spec`` (its batch axis already the engine's, see
    :func:`engine_spec`), checked with :func:`check_profiles`.

    One per resolution for a model with axes an image size fixes (:data:`specs.RESOLUTION_AXES`: those
    are fixed in the profile), else one. Every other dynamic axis (batch, T5's ``sequence``, SD3's and
    FLUX's ``text_length``) spans its range in the spec, min to max with the spec's opt.
    """
    fixed: list[tuple[Resolution | None, dict[str, int]]]
    if has_resolution(spec):
        if not resolutions:
            raise ValueError(f"{spec.name}: an engine with latent sides needs at least one resolution")
        fixed = [
            (r, specs.resolution_sizes(r.height // vae_scale, r.width // vae_scale, vae_scale))
            for r in resolutions
        ]
    else:
        fixed = [(None, {})]
    profiles = []
    for resolution, bound in fixed:
        sizes = [
            {
                axis: bound[axis] if axis in bound else getattr(axis_range, level)
                for axis, axis_range in spec.axes.items()
            }
            for level in _LEVELS
        ]
        shapes = {
            t.name: (t.concrete(sizes[0]), t.concrete(sizes[1]), t.concrete(sizes[2])) for t in spec.inputs
        }
        profiles.append(Profile(resolution, shapes, sizes[1]))
    check_profiles(spec, profiles)
    return profiles


def check_profiles(spec: specs.ModelSpec, profiles: Sequence[Profile]) -> None:
    """Raise :class:`ProfileError` unless every profile gives every input a (min, opt, max) shape with
    min <= opt <= max on each axis and each dynamic axis within the spec's range."""
    if not profiles:
        raise ProfileError(f"{spec.name}: no optimisation profile")
    for index, profile in enumerate(profiles):
        where = f"{spec.name} profile {index} ({profile.resolution or 'any size'})"
        missing = {t.name for t in spec.inputs} - set(profile.shapes)
        if missing:
            raise ProfileError(f"{where}: no shapes for inputs {sorted(missing)}")
        for t in spec.inputs:
            triple = profile.shapes[t.name]
            for level, shape in zip(_LEVELS, triple, strict=True):
                if len(shape) != len(t.shape):
                    raise ProfileError(f"{where}: {t.name} {level} shape {shape} is not rank {len(t.shape)}")
            for position, axis in enumerate(t.shape):
                low, opt, high = (shape[position] for shape in triple)
                if not 1 <= low <= opt <= high:
                    raise ProfileError(
                        f"{where}: {t.name} axis {axis}: {low}/{opt}/{high} not ascending (min, opt, max)"
                    )
                if isinstance(axis, str):
                    allowed = spec.axes[axis]
                    if low < allowed.min or high > allowed.max:
                        raise ProfileError(
                            f"{where}: {t.name} axis {axis} {low}..{high} is outside the model's "
                            f"{allowed.min}..{allowed.max}"
                        )
                elif low != axis or high != axis:
                    raise ProfileError(f"{where}: {t.name} axis {position} is {low}..{high}, not {axis}")


@dataclass(frozen=True)
class BuildFlags:
    """The TensorRT flags of one engine's build, by their TensorRT 10 Python names.

    ``network``: ``NetworkDefinitionCreationFlag`` members; ``set`` / ``cleared``: ``BuilderFlag``
    members set on, or cleared from, the builder config (TensorRT enables TF32 by default).
    """

    network: tuple[str, ...]
    set: tuple[str, ...] = ()
    cleared: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {"network": list(self.network), "set": list(self.set), "cleared": list(self.cleared)}


def build_flags(precision: Precision, refittable: bool) -> BuildFlags:
    """Strongly typed (each layer runs in the ONNX graph's type: fp16 graphs in fp16, the SDXL VAE and
    the safety checker kept fp32 in fp32); refittable for the models LoRA variants change; TF32 cleared
    for fp32 graphs: they are fp32 because precision matters there (the SDXL VAE overflows fp16, the
    safety checker's verdict is a threshold), and TF32 rounds matmul and convolution inputs to 10-bit
    mantissas, which the fp32 engine check (1e-4 + 1e-3 x max) is not expected to meet."""
    return BuildFlags(
        network=("STRONGLY_TYPED",),
        set=("REFIT",) if refittable else (),
        cleared=("TF32",) if precision == "fp32" else (),
    )


@dataclass(frozen=True)
class EnginePlan:
    """Everything about one engine that is decided before TensorRT runs; the build consumes exactly this.

    ``weight_bytes`` (exact) and ``activation_bytes`` (an estimate per execution context, see
    :mod:`export.toolchain.engine_memory`) are filled in once the ONNX graph exists.
    """

    name: str
    precision: str
    precision_reason: str
    flags: BuildFlags
    profiles: tuple[Profile, ...]
    config: str  # the model's config.pbtxt (platform tensorrt_plan)
    workspace_bytes: int | None = None
    weight_bytes: int | None = None
    activation_bytes: int | None = None
    unknown_shapes: int = 0

    @property
    def contexts(self) -> int:
        """Execution contexts Triton's TensorRT backend creates per instance: one per listed profile."""
        return len(self.profiles)

    @property
    def memory_estimate_bytes(self) -> int | None:
        if self.weight_bytes is None or self.activation_bytes is None:
            return None
        return self.weight_bytes + self.contexts * self.activation_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "builder_flags": self.flags.as_dict(),
            "workspace_bytes": self.workspace_bytes,
            "profiles": [
                {
                    "resolution": str(p.resolution) if p.resolution else None,
                    "shapes": {
                        name: {level: list(shape) for level, shape in zip(_LEVELS, triple, strict=True)}
                        for name, triple in p.shapes.items()
                    },
                }
                for p in self.profiles
            ],
            "config_pbtxt": self.config,
            "memory": {
                "weight_bytes": self.weight_bytes,
                "activation_bytes_per_context_estimate": self.activation_bytes,
                "activation_tensors_of_unknown_shape": self.unknown_shapes,
                "execution_contexts": self.contexts,
                "total_bytes_estimate": self.memory_estimate_bytes,
            },
        }

    def summary(self) -> str:
        """A few lines for the console: profiles, flags, memory."""
        mib = 1 << 20

        def size(n: int | None) -> str:
            return "?" if n is None else f"{n / mib:.1f} MiB"

        flags = ", ".join(
            [*(f"network {f}" for f in self.flags.network), *(f"+{f}" for f in self.flags.set)]
            + [f"-{f}" for f in self.flags.cleared]
        )
        lines = [f"{self.name}: {self.precision} ({self.precision_reason}); flags {flags}"]
        for i, p in enumerate(self.profiles):
            shapes = "; ".join(
                f"{name} {'/'.join('x'.join(map(str, s)) for s in triple)}"
                for name, triple in p.shapes.items()
            )
            lines.append(f"  profile {i} ({p.resolution or 'any size'}): {shapes}")
        lines.append(
            f"  memory: weights {size(self.weight_bytes)} (exact) + {self.contexts} context(s) x activations "
            f"{size(self.activation_bytes)} (estimate"
            + (f", {self.unknown_shapes} tensors of unknown shape" if self.unknown_shapes else "")
            + f") = {size(self.memory_estimate_bytes)} per instance (estimate)"
        )
        return "\n".join(lines)


def engine_config(
    config: mc.ModelConfig, spec: specs.ModelSpec, profiles: int, options: EngineOptions
) -> mc.ModelConfig:
    """Make ``config`` (I/O and batching already set from the spec) a ``tensorrt_plan`` model on GPUs."""
    config.platform = "tensorrt_plan"
    config.default_model_filename = PLAN_FILE
    group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    group.gpus.extend(options.gpus)
    # Without a list Triton gives every instance the first profile only; with it, Triton picks the
    # profile that fits each batch's shapes.
    group.profile.extend(str(i) for i in range(profiles))
    return config
