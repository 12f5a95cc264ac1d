"""Prompt tokenizing reads a bounded prefix of a long prompt and gives exactly the tokenizer's ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import CLIPTokenizer

from export.tokenizer import EOS_TOKEN, write_clip_tokenizer
from server.api.schemas import MAX_PROMPT_CHARS
from server.pipeline.model import PREFIX_CHARS_PER_TOKEN, tokenize_truncated

# Words, spaces of every kind, accents and combining marks, CJK, emoji, contractions, a special token,
# control characters: the pieces where a cut in the wrong place would change the tokens.
PIECES = [
    "cat", "dog's", "a", "\u0301", "é", "castle", "油画", "!!", "...", " ", "  ", "\t", "\n", "\r\n",
    "\x0b", "\u3000", "\u00a0", "x" * 50, "Hello", "🐱", "'s", "don't", "<|endoftext|>", "1234", "\x00",
    "\x1c",
]  # fmt: skip


@pytest.fixture(scope="module", params=[EOS_TOKEN, "!"], ids=["pad-eos", "pad-bang"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SD's tokenizer (padding with <|endoftext|>) and SDXL's second one (padding with "!")."""
    folder: Path = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(folder, pad_token=request.param)
    return CLIPTokenizer.from_pretrained(folder)


def reference(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(
        tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids[
            0
        ]
    )


def test_ids_are_the_tokenizers_for_any_prompt_within_the_limit(tokenizer: Any) -> None:
    rng = random.Random(7)
    for _ in range(150):
        text = "".join(rng.choice(PIECES) for _ in range(rng.choice([0, 3, 40, 300, 1000, 3000])))
        text = text[:MAX_PROMPT_CHARS]
        np.testing.assert_array_equal(tokenize_truncated(tokenizer, text, 77), reference(tokenizer, text))


def test_a_long_prompt_is_read_only_as_far_as_its_kept_tokens(tokenizer: Any) -> None:
    seen: list[int] = []

    def recording(text: str, **kwargs: Any) -> Any:
        seen.append(len(text))
        return tokenizer(text, **kwargs)

    words = ("a castle on a hill, oil painting " * 300)[:MAX_PROMPT_CHARS]
    np.testing.assert_array_equal(tokenize_truncated(recording, words, 77), reference(tokenizer, words))
    assert seen and max(seen) <= PREFIX_CHARS_PER_TOKEN * 77 < len(words)

    # Few tokens in many characters: the prefix doubles until it holds enough, or is the whole text.
    sparse = ("cat" + " " * 97) * 200
    seen.clear()
    np.testing.assert_array_equal(tokenize_truncated(recording, sparse, 77), reference(tokenizer, sparse))
    assert seen[-1] < len(sparse)
