"""The served diffusion model as the service sees it: configs, tokenizers, scheduler; no weights."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
from transformers import CLIPTokenizer

from export.source import ModelSource
from server.errors import BadRequest
from server.pipeline.rules import DEFAULT_RULE, ModelRule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompts:
    """One prompt per text encoder (SDXL: prompt, prompt_2), or None for a part that was not given."""

    parts: tuple[str | None, ...]


def split_prompt(text: str, encoders: int) -> tuple[str, ...]:
    """``a|b`` -> ("a", "b") for a model with two or more text encoders.

    Parts are stripped and empty ones dropped.  A model with one encoder keeps the text whole, and the
    last encoder of a model gets the rest of the text, so ``|`` never makes a request fail.
    """
    if encoders == 1:
        return (text,) if text.strip() else ()
    return tuple(p.strip() for p in text.split("|", encoders - 1) if p.strip())


# A token covers at least one character: a prefix of this many characters per kept token usually
# holds enough of them; if not, the prefix doubles.
PREFIX_CHARS_PER_TOKEN = 16
# Whitespace that ends a word for every tokenizer (CLIP's BPE, T5's sentencepiece).
WORD_BREAKS = " \t\n\r"


def tokenize_truncated(tokenizer: Any, text: str, max_length: int) -> np.ndarray:
    """``tokenizer(text, padding="max_length", max_length, truncation=True).input_ids[0]``, without
    letting the tokenizer read more of a long text than the ids it keeps.

    The text is cut at a word break, so the prefix's tokens are the text's first tokens; when the
    prefix alone fills ``max_length`` (no padding), the truncated ids are the text's.
    """

    def encode(part: str) -> Any:
        return tokenizer(
            part, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
        )

    chars = PREFIX_CHARS_PER_TOKEN * max_length
    while chars < len(text):
        cut = max(text.rfind(c, 0, chars) for c in WORD_BREAKS)
        if cut > 0:
            encoded = encode(text[:cut])
            if int(encoded.attention_mask.sum()) >= max_length:
                return np.asarray(encoded.input_ids[0])
        chars *= 2
    return np.asarray(encode(text).input_ids[0])


class DiffusionModel:
    """Tokenizers and scheduler of the loaded model, built once at start."""

    def __init__(self, source: ModelSource, scheduler: str = "", rule: ModelRule = DEFAULT_RULE) -> None:
        """``scheduler`` names a diffusers scheduler class to use instead of the model's own; a model
        rule that requires its scheduler (SDXL-Lightning) takes precedence over both."""
        self.source = source
        self.rule = rule
        self.tokenizers = [CLIPTokenizer.from_pretrained(source.path / name) for name in source.tokenizers]
        config = source.config("scheduler")
        name = scheduler or str(config["_class_name"])
        if rule.scheduler is not None:
            name, overrides = rule.scheduler
            config = {**config, **overrides}
        cls = getattr(diffusers, name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
            raise ValueError(f"unknown diffusers scheduler '{name}'")
        self._scheduler_template = cls.from_config(config)
        unet = source.config("unet")
        self.guidance_allowed = unet.get("time_cond_proj_dim") is None
        logger.info("model %s: %s with %s", source.path, source.pipeline_class, name)

    @property
    def encoders(self) -> int:
        return len(self.tokenizers)

    @property
    def vae_scale_factor(self) -> int:
        return self.source.vae_scale_factor

    def new_scheduler(self) -> Any:
        """A fresh scheduler: they keep per-generation state (step index, multistep history)."""
        return copy.deepcopy(self._scheduler_template)

    def tokenize(self, encoder: int, texts: list[str]) -> np.ndarray:
        """Token ids [len(texts), max_length] as the tokenizer gives them for the whole texts (CPU
        work: callers on the event loop run it in a thread)."""
        tokenizer = self.tokenizers[encoder]
        rows = [tokenize_truncated(tokenizer, text, tokenizer.model_max_length) for text in texts]
        return np.stack(rows).astype(np.int32)

    def prompts(self, prompt: str, negative_prompt: str) -> tuple[Prompts, Prompts]:
        """Split the request's prompt and negative prompt per encoder, as diffusers fills them in:
        a missing later part repeats the first; an empty negative prompt is None (the model's default).
        """
        parts = split_prompt(prompt, self.encoders)
        if not parts:
            raise BadRequest("Prompt must be provided.")
        positive = tuple(parts[i] if i < len(parts) else parts[0] for i in range(self.encoders))
        negative_parts = split_prompt(negative_prompt, self.encoders)
        negative: tuple[str | None, ...] = tuple(
            (negative_parts[i] if i < len(negative_parts) else negative_parts[0]) if negative_parts else None
            for i in range(self.encoders)
        )
        return Prompts(positive), Prompts(negative)
