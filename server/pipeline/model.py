"""The served diffusion model as the service sees it: configs, tokenizers, scheduler; no weights."""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import tokenizers

from export.contract.specs import serving_tokenizer_file
from export.models.source import ModelSource
from server.errors import BadRequest
from server.pipeline.rules import DEFAULT_RULE, ModelRule

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompts:
    """One prompt per text encoder (SDXL and FLUX: prompt, prompt_2; SD3: also prompt_3), or None for a
    part that was not given."""

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


class PromptTokenizer:
    """One of the model's tokenizers as a ``tokenizers.Tokenizer`` that pads and truncates to
    ``max_length``: ``encode(text)`` gives what ``tokenizer(text, padding="max_length",
    max_length=max_length, truncation=True)`` gives, without transformers."""

    def __init__(self, backend: tokenizers.Tokenizer, max_length: int | None = None) -> None:
        """``backend`` is set to pad and truncate (as :func:`export.models.tokenizer.padded_backend` sets
        it); only the length changes, to ``max_length`` when given."""
        truncation, padding = backend.truncation, backend.padding
        if truncation is None or padding is None:
            raise ValueError("the tokenizer is not set to pad and truncate")
        max_length = max_length or int(truncation["max_length"])
        backend.enable_truncation(
            max_length,
            stride=truncation["stride"],
            strategy=truncation["strategy"],
            direction=truncation["direction"],
        )
        backend.enable_padding(
            direction=padding["direction"],
            pad_id=padding["pad_id"],
            pad_type_id=padding["pad_type_id"],
            pad_token=padding["pad_token"],
            length=max_length,
        )
        self.backend = backend
        self.max_length = max_length

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        """The ids, ``max_length`` of them, and how many are the text's (not padding)."""
        encoding = self.backend.encode(text)
        return np.asarray(encoding.ids, dtype=np.int64), sum(encoding.attention_mask)


def prompt_tokenizers(source: ModelSource, t5_length: int, repository: Path | None) -> list[PromptTokenizer]:
    """The model's tokenizers: from the repository's serving files (:func:`export.models.tokenizer.
    write_serving_tokenizers`) when it has them all, else from the model's folders with transformers
    (seconds of imports).  CLIP keeps its own length; T5 takes ``t5_length``."""
    files = [repository / serving_tokenizer_file(name) for name in source.tokenizers] if repository else []
    if files and all(f.is_file() for f in files):
        return [
            PromptTokenizer(
                tokenizers.Tokenizer.from_file(str(f)), t5_length if name in source.t5_tokenizers else None
            )
            for name, f in zip(source.tokenizers, files, strict=True)
        ]
    logger.info("the repository has no serving tokenizers (export it again for a faster start)")
    from export.models.tokenizer import padded_tokenizer

    return [PromptTokenizer(padded_tokenizer(source, name, t5_length)) for name in source.tokenizers]


def tokenize_truncated(tokenizer: PromptTokenizer, text: str) -> np.ndarray:
    """``tokenizer.encode(text)``'s ids, without letting the tokenizer read more of a long text than
    the ids it keeps.

    The text is cut at a word break, so the prefix's tokens are the text's first tokens; when the
    prefix alone fills ``max_length`` (no padding), the truncated ids are the text's.  A prefix with no
    word break (a 1 MB "word", or words joined by commas) is cut where it is: a cut inside a word
    changes only the tokens next to it, so once doubling the prefix no longer changes the kept ids,
    they are the text's (tokenizing a 1 MB word whole takes seconds).
    """
    max_length = tokenizer.max_length
    chars = PREFIX_CHARS_PER_TOKEN * max_length
    while chars < len(text):
        cut = max(text.rfind(c, 0, chars) for c in WORD_BREAKS)
        if cut > 0:
            ids, tokens = tokenizer.encode(text[:cut])
            if tokens >= max_length:
                return ids
        elif 2 * chars < len(text):
            ids, tokens = tokenizer.encode(text[:chars])
            if tokens >= max_length and np.array_equal(ids, tokenizer.encode(text[: 2 * chars])[0]):
                return ids
        chars *= 2
    return tokenizer.encode(text)[0]


class DiffusionModel:
    """Tokenizers and scheduler of the loaded model, built once at start."""

    def __init__(
        self,
        source: ModelSource,
        scheduler: str = "",
        rule: ModelRule = DEFAULT_RULE,
        repository: Path | None = None,
    ) -> None:
        """``scheduler`` names a diffusers scheduler class to use instead of the model's own; a model
        rule that requires its scheduler (SDXL-Lightning) takes precedence over both.  ``repository``
        is the exported repository, whose serving tokenizers spare the transformers import."""
        self.source = source
        self.family = family = source.family
        self.rule = rule
        # Tokens per prompt: CLIP's own length; for T5 the rule's (FLUX.1-schnell 256, dev 512), else
        # the pipeline's default.
        t5_length = rule.max_sequence_length or family.t5_length
        self.tokenizers = prompt_tokenizers(source, t5_length, repository)
        config = source.config("scheduler")
        name = scheduler or str(config["_class_name"])
        if rule.scheduler is not None:
            name, overrides = rule.scheduler
            config = {**config, **overrides}
        cls = getattr(diffusers, name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
            raise ValueError(f"unknown diffusers scheduler '{name}'")
        if family.flow_matching and not _flow_scheduler(cls, needs_sigmas=family.sets_sigmas):
            raise ValueError(f"{source.pipeline_class} needs a flow-matching scheduler, not '{name}'")
        self._scheduler_template = cls.from_config(config)
        denoiser = source.config(source.denoiser)
        self.guidance_allowed = denoiser.get("time_cond_proj_dim") is None
        logger.info("model %s: %s with %s", source.path, source.pipeline_class, name)

    @property
    def encoders(self) -> int:
        return len(self.tokenizers)

    @property
    def vae_scale_factor(self) -> int:
        return self.source.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (16 for SD3 and FLUX: 2x2 patches of the latents)."""
        return self.source.size_multiple

    @property
    def max_side(self) -> int | None:
        """The largest image side the denoiser takes, where it has one (SD3's position embedding)."""
        if not self.family.pos_embed_limit:
            return None
        size = self.source.config(self.source.denoiser).get("pos_embed_max_size")
        return None if size is None else int(size) * self.size_multiple

    def new_scheduler(self) -> Any:
        """A fresh scheduler: they keep per-generation state (step index, multistep history)."""
        return copy.deepcopy(self._scheduler_template)

    def tokenize(self, encoder: int, texts: list[str]) -> np.ndarray:
        """Token ids [len(texts), max_length] as the tokenizer gives them for the whole texts (CPU
        work: callers on the event loop run it in a thread)."""
        rows = [tokenize_truncated(self.tokenizers[encoder], text) for text in texts]
        return np.stack(rows).astype(np.int32)

    def prompts(self, prompt: str, negative_prompt: str) -> tuple[Prompts, Prompts]:
        """Split the request's prompt and negative prompt per encoder, as diffusers fills them in:
        a missing later part repeats the first; an empty negative prompt is None (the model's default).
        """
        parts = split_prompt(prompt, self.encoders)
        if not parts:
            raise BadRequest("Prompt must be provided.")
        if self.family.strict_prompt_parts:
            # More parts than encoders is a mistake here (a family without guidance ignores its
            # negative prompt: FLUX).
            checked = {
                "prompt": prompt,
                **({"negative_prompt": negative_prompt} if self.family.classifier_free_guidance else {}),
            }
            for field_name, text in checked.items():
                count = sum(1 for p in text.split("|") if p.strip())
                if count > self.encoders:
                    raise BadRequest(
                        f"{field_name} has {count} parts separated by '|'; this model takes at most "
                        f"{self.encoders}, one per text encoder."
                    )
        positive = tuple(parts[i] if i < len(parts) else parts[0] for i in range(self.encoders))
        negative_parts = split_prompt(negative_prompt, self.encoders)
        negative: tuple[str | None, ...] = tuple(
            (negative_parts[i] if i < len(negative_parts) else negative_parts[0]) if negative_parts else None
            for i in range(self.encoders)
        )
        return Prompts(positive), Prompts(negative)


def _flow_scheduler(cls: type, *, needs_sigmas: bool) -> bool:
    """A flow-matching scheduler the SD3 / FLUX loop can drive (FluxPipeline passes its own sigmas)."""
    accepts_sigmas = "sigmas" in inspect.signature(cls.set_timesteps).parameters  # type: ignore[attr-defined]
    return cls.__name__.startswith("FlowMatch") and (accepts_sigmas or not needs_sigmas)
