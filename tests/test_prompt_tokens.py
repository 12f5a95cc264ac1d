"""Prompt tokens: the service's tokenizers (the repository's serving files, no transformers) give
exactly transformers' ids, and a long prompt is read only as far as the ids it keeps."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from export.contract.specs import serving_tokenizer_file
from export.models.source import ModelSource
from export.models.tokenizer import transformers_tokenizer, write_serving_tokenizers
from server.pipeline.model import (
    PREFIX_CHARS_PER_TOKEN,
    PromptTokenizer,
    prompt_tokenizers,
    tokenize_truncated,
)

# Words, spaces of every kind, accents and combining marks, CJK, emoji, contractions, special tokens
# of both tokenizers, control characters: the pieces where a cut in the wrong place would change the
# tokens, or where a tokenizer's call could do more than its backend.
PIECES = [
    "cat", "dog's", "a", "\u0301", "é", "castle", "油画", "!!", "...", " ", "  ", "\t", "\n", "\r\n",
    "\x0b", "\u3000", "\u00a0", "x" * 50, "Hello", "🐱", "'s", "don't", "<|endoftext|>", "1234", "\x00",
    "\x1c", "</s>", "<pad>", "<extra_id_3>", "<|startoftext|>", "!", "ÅNGSTRÖM", "ﬁ",
]  # fmt: skip

T5_LENGTH = 256
# SD3's tiny model has all three kinds: CLIP padded with <|endoftext|>, CLIP padded with "!" (SDXL's
# second tokenizer), and T5.
ENCODERS = {"tokenizer": 77, "tokenizer_2": 77, "tokenizer_3": T5_LENGTH}


@pytest.fixture(scope="module")
def sd3(
    tiny_model: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ModelSource, Path]:
    """The tiny SD3 model and a folder holding its serving tokenizers (as an export writes them)."""
    source = ModelSource(tiny_model("sd3"))
    repository = tmp_path_factory.mktemp("repository")
    assert [p.name for p in write_serving_tokenizers(source, repository)] == [
        serving_tokenizer_file(name) for name in ENCODERS
    ]
    return source, repository


@pytest.fixture(scope="module", params=list(ENCODERS))
def pair(request: pytest.FixtureRequest, sd3: tuple[ModelSource, Path]) -> tuple[PromptTokenizer, Any]:
    """(the service's tokenizer from the serving file, transformers' tokenizer) of one encoder."""
    source, repository = sd3
    index = list(ENCODERS).index(request.param)
    served = prompt_tokenizers(source, T5_LENGTH, repository)[index]
    return served, transformers_tokenizer(source.path / request.param, t5=request.param == "tokenizer_3")


def reference(tokenizer: Any, text: str, max_length: int) -> np.ndarray:
    encoded = tokenizer(
        text, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    return np.asarray(encoded.input_ids[0])


# Prompts of this many characters were the old length bound; the tests' texts stay within it.
TEXT_CHARS = 8192


def random_texts(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        text = "".join(rng.choice(PIECES) for _ in range(rng.choice([0, 1, 3, 40, 300, 1000, 3000])))
        texts.append(text[:TEXT_CHARS])
    return texts


def test_serving_tokenizers_give_transformers_ids_for_any_prompt(pair: tuple[PromptTokenizer, Any]) -> None:
    served, tokenizer = pair
    assert served.max_length in (77, T5_LENGTH)
    for text in random_texts(150):
        expected = reference(tokenizer, text, served.max_length)
        ids, count = served.encode(text)
        np.testing.assert_array_equal(ids, expected)
        assert count == int(
            tokenizer(
                text, padding="max_length", max_length=served.max_length, truncation=True
            ).attention_mask.count(1)
        )
        np.testing.assert_array_equal(tokenize_truncated(served, text), expected)


def test_without_serving_files_the_tokenizers_come_from_transformers_alike(
    sd3: tuple[ModelSource, Path], tmp_path: Path
) -> None:
    source, repository = sd3
    served = prompt_tokenizers(source, T5_LENGTH, repository)
    loaded = prompt_tokenizers(source, T5_LENGTH, tmp_path)  # an older export: no serving files
    assert [t.max_length for t in loaded] == [t.max_length for t in served] == list(ENCODERS.values())
    for text in random_texts(20, seed=3):
        for a, b in zip(served, loaded, strict=True):
            np.testing.assert_array_equal(a.encode(text)[0], b.encode(text)[0])


def test_the_serving_tokenizers_load_without_transformers(sd3: tuple[ModelSource, Path]) -> None:
    source, repository = sd3
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from export.models.source import ModelSource\n"
        "from server.pipeline.model import DiffusionModel\n"
        f"source = ModelSource(Path({str(source.path)!r}))\n"
        f"model = DiffusionModel(source, repository=Path({str(repository)!r}))\n"
        "assert model.tokenize(2, ['a cat']).shape == (1, 256)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent, timeout=120)


class Recording(PromptTokenizer):
    """Records the length of each text it encodes."""

    def __init__(self, inner: PromptTokenizer) -> None:
        super().__init__(inner.backend, inner.max_length)
        self.seen: list[int] = []

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        self.seen.append(len(text))
        return super().encode(text)


def test_a_long_prompt_is_read_only_as_far_as_its_kept_tokens(pair: tuple[PromptTokenizer, Any]) -> None:
    served, tokenizer = pair
    recording = Recording(served)
    length = served.max_length
    words = ("a castle on a hill, oil painting " * 300)[:TEXT_CHARS]
    np.testing.assert_array_equal(tokenize_truncated(recording, words), reference(tokenizer, words, length))
    assert recording.seen and max(recording.seen) <= PREFIX_CHARS_PER_TOKEN * length < len(words)

    # Few tokens in many characters: the prefix doubles until it holds enough, or is the whole text.
    sparse = ("cat" + " " * 47) * 400
    recording.seen.clear()
    np.testing.assert_array_equal(tokenize_truncated(recording, sparse), reference(tokenizer, sparse, length))
    assert recording.seen[-1] < len(sparse)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("x" * 200_000, id="one word of 200000 letters"),
        pytest.param("cat," * 50_000, id="words joined by commas"),
        pytest.param("ab.cd-" * 30_000 + " tail", id="a word break only at the end"),
    ],
)
def test_a_long_prompt_without_word_breaks_is_read_only_as_far_as_its_kept_tokens(
    pair: tuple[PromptTokenizer, Any], text: str
) -> None:
    """No word break to cut at: the prefix is cut inside a word and checked against its double."""
    served, _ = pair
    recording = Recording(served)
    np.testing.assert_array_equal(tokenize_truncated(recording, text), served.encode(text)[0])
    assert max(recording.seen) <= 2 * PREFIX_CHARS_PER_TOKEN * served.max_length < len(text)
