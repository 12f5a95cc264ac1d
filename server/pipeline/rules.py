"""Model rules like the reference runner's, in one table: distilled models force their settings.

A rule matches when every one of its substrings is in the lower-cased model id; the first match wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_STEPS = 50
# SDXL-Lightning is distilled for Euler with trailing timestep spacing.
_EULER_TRAILING = ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"})


@dataclass(frozen=True)
class ModelRule:
    match: tuple[str, ...]
    guidance_scale: float | None = None  # forced value, None keeps the request's
    steps: int | None = None  # forced value, None keeps the request's
    default_steps: int = DEFAULT_STEPS  # for num_inference_steps < 1
    scheduler: tuple[str, dict[str, Any]] | None = None  # class name and config overrides
    note: str = field(default="", compare=False)
    # T5 tokens per prompt (SD3, FLUX); None: the pipeline's default (SD3 256, FLUX 512).
    max_sequence_length: int | None = None


MODEL_RULES: tuple[ModelRule, ...] = (
    ModelRule(("lightning", "2step"), 0.0, 2, 2, _EULER_TRAILING, "SDXL-Lightning 2-step"),
    ModelRule(("lightning", "4step"), 0.0, 4, 4, _EULER_TRAILING, "SDXL-Lightning 4-step"),
    ModelRule(("lightning", "8step"), 0.0, 8, 8, _EULER_TRAILING, "SDXL-Lightning 8-step"),
    ModelRule(("lightning",), 0.0, 8, 8, _EULER_TRAILING, "SDXL-Lightning without a step count: 8"),
    # FLUX.1-schnell is timestep-distilled: no guidance of any kind, 4 steps, 256 T5 tokens.
    ModelRule(("flux", "schnell"), 0.0, None, 4, None, "FLUX.1-schnell", max_sequence_length=256),
    # FLUX.1-dev is guidance-distilled: the guidance scale goes into its guidance embedding (never CFG).
    ModelRule(("flux", "dev"), None, None, DEFAULT_STEPS, None, "FLUX.1-dev", max_sequence_length=512),
    ModelRule(("3.5", "turbo"), 0.0, None, 4, None, "SD3.5-Large-Turbo: no guidance, 4 steps"),
    ModelRule(("turbo",), 0.0, None, 1, None, "SD/SDXL-Turbo: no guidance"),
)
DEFAULT_RULE = ModelRule(())


def rule_for(model_id: str) -> ModelRule:
    model_id = model_id.lower()
    return next((r for r in MODEL_RULES if all(m in model_id for m in r.match)), DEFAULT_RULE)


def apply_rule(rule: ModelRule, guidance_scale: float, steps: int) -> tuple[float, int]:
    """The guidance scale and step count a request runs with under ``rule``."""
    if rule.guidance_scale is not None:
        guidance_scale = rule.guidance_scale
    if rule.steps is not None:
        steps = rule.steps
    elif steps < 1:
        steps = rule.default_steps
    return guidance_scale, steps
