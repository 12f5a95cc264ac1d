"""CLIP tokenizer files built offline from the BPE vocabulary that ``open_clip_torch`` ships.

OpenAI CLIP (and open_clip's ``SimpleTokenizer``) build their 49408-entry vocabulary from
``bpe_simple_vocab_16e6.txt.gz``: the 256 byte-level characters, the same with ``</w>``, one entry
per merge (48894 merges), then ``<|startoftext|>`` / ``<|endoftext|>``. Doing the same here and
writing ``vocab.json`` + ``merges.txt`` gives files that ``transformers.CLIPTokenizer`` loads with
the real CLIP ids (e.g. "a photo of a cat" -> 49406 320 1125 539 320 2368 49407), without
downloading anything from the Hugging Face Hub.

``open_clip`` itself is never imported (it imports torchvision); the data file is located through
the installed distribution's metadata. Install it with ``pip install --no-deps open_clip_torch==3.3.0``
(without ``--no-deps`` it pulls in a CUDA torch).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from export.contract.specs import T5_TOKEN_RANGE_MAX, serving_tokenizer_file

if TYPE_CHECKING:
    import tokenizers

    from export.models.source import ModelSource

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MODEL_MAX_LENGTH",
    "VOCAB_SIZE",
    "bpe_vocab_path",
    "build_vocab_and_merges",
    "padded_backend",
    "padded_tokenizer",
    "transformers_tokenizer",
    "write_clip_tokenizer",
    "write_serving_tokenizers",
    "write_t5_tokenizer",
]

logger = logging.getLogger(__name__)

OPEN_CLIP_DIST: Final = "open_clip_torch"
OPEN_CLIP_VERSION: Final = "3.3.0"
BPE_FILE: Final = "open_clip/bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN: Final = "<|startoftext|>"
EOS_TOKEN: Final = "<|endoftext|>"
MODEL_MAX_LENGTH: Final = 77
VOCAB_SIZE: Final = 49408
# merges = lines[1 : 49152 - 256 - 2 + 1], exactly as OpenAI CLIP's SimpleTokenizer slices them
_N_MERGES: Final = 49152 - 256 - 2
_INSTALL_HINT: Final = f"pip install --no-deps {OPEN_CLIP_DIST}=={OPEN_CLIP_VERSION}"


def bpe_vocab_path() -> Path:
    """Path of ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip_torch`` wheel."""
    try:
        dist = importlib.metadata.distribution(OPEN_CLIP_DIST)
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"the CLIP BPE vocabulary comes from the {OPEN_CLIP_DIST} wheel, which is not installed; "
            f"run `{_INSTALL_HINT}` (--no-deps matters: its dependencies pull in a CUDA torch and "
            "torchvision)"
        ) from exc
    path = Path(str(dist.locate_file(BPE_FILE)))
    if not path.is_file():
        raise RuntimeError(
            f"{OPEN_CLIP_DIST} {dist.version} is installed but {BPE_FILE} is missing ({path}); "
            f"reinstall with `{_INSTALL_HINT}`"
        )
    return path


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP reversible byte -> printable unicode mapping (same order as OpenAI's code)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return CLIP's ``token -> id`` vocabulary and its ranked merge list, built like SimpleTokenizer."""
    path = bpe_path if bpe_path is not None else bpe_vocab_path()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines[1 : _N_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != _N_MERGES:
        raise ValueError(f"{path}: expected {_N_MERGES} merges, found {len(merges)}")

    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens.extend(a + b for a, b in merges)
    tokens.extend([BOS_TOKEN, EOS_TOKEN])
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} distinct tokens, got {len(vocab)} of {len(tokens)}")
    return vocab, merges


def _added_token(content: str, *, normalized: bool = True) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(out_dir: Path, *, pad_token: str = EOS_TOKEN) -> None:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    ``CLIPTokenizer.from_pretrained(out_dir)`` then has ``model_max_length`` 77, bos
    ``<|startoftext|>`` (49406), eos/unk ``<|endoftext|>`` (49407) and ``pad_token`` as the padding
    token: SD 1.5 and SDXL's first tokenizer use ``<|endoftext|>``, SDXL's ``tokenizer_2`` uses ``!``
    (id 0). ``pad_token`` must be a vocabulary entry.
    """
    vocab, merges = build_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _write_json(out_dir / "vocab.json", vocab)
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(merges_text, encoding="utf-8")

    # Same layout as the published SD 1.5 / SDXL tokenizer configs. SDXL's tokenizer_2 registers its
    # pad token "!" (id 0) as a special added token, so a "!" in a prompt encodes as 0 rather than
    # BPE's "!</w>" (256); transformers 5 does that for any pad token anyway, listed here or not.
    added = {str(vocab[t]): _added_token(t) for t in (BOS_TOKEN, EOS_TOKEN)}
    if pad_token not in (BOS_TOKEN, EOS_TOKEN):
        added[str(vocab[pad_token])] = _added_token(pad_token, normalized=False)
    added = dict(sorted(added.items(), key=lambda kv: int(kv[0])))
    config: dict[str, Any] = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        # The published configs say True; transformers 5 ignores that for BPE tokenizers and logs a
        # warning on every load, so write False (same decoded text).
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": pad_token, "unk_token": EOS_TOKEN},
    )
    logger.debug("wrote CLIP tokenizer (%d tokens, pad %r) to %s", len(vocab), pad_token, out_dir)


# The tiny T5 tokenizer (SD3's tokenizer_3, FLUX's tokenizer_2): a SentencePiece unigram model trained
# here, in code, on words of the CLIP vocabulary, with T5's special ids (pad 0, eos 1, unk 2) and its
# 100 sentinel tokens. Real T5 has 32100 entries; this one is small so the tiny T5 embedding is too.
T5_PIECES: Final = 1000
T5_EXTRA_IDS: Final = 100
T5_VOCAB_SIZE: Final = T5_PIECES + T5_EXTRA_IDS


def _t5_corpus(lines: int = 4000, words_per_line: int = 12) -> list[str]:
    """Deterministic English-like text: whole words of the CLIP vocabulary, in vocabulary order."""
    vocab, _ = build_vocab_and_merges()
    words = [t[: -len("</w>")] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and len(t) > 6]
    return [" ".join(words[i * words_per_line : (i + 1) * words_per_line]) for i in range(lines)]


def write_t5_tokenizer(out_dir: Path, *, model_max_length: int = 512) -> None:
    """Train a SentencePiece unigram model in code and save it as a T5 tokenizer in ``out_dir``.

    ``T5TokenizerFast.from_pretrained(out_dir)`` reads it (``tokenizer.json``; in transformers 5
    ``T5TokenizerFast`` is ``T5Tokenizer``, backed by the tokenizers library);
    "a photo of a cat" encodes to a few pieces followed by ``</s>`` (1), padding is ``<pad>`` (0).
    Training needs the ``sentencepiece`` package (the export extra); reading does not.
    """
    import io

    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_t5_corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=T5_PIECES,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
        normalization_rule_name="identity",  # no precompiled normaliser to carry over
    )
    # The pieces and scores go straight into the tokenizers-backed T5 tokenizer (transformers'
    # spiece.model conversion needs sentencepiece's protobuf module, which pins another protobuf).
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=model_max_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    if len(tokenizer) != T5_VOCAB_SIZE:
        raise ValueError(f"T5 tokenizer has {len(tokenizer)} entries, expected {T5_VOCAB_SIZE}")
    logger.debug("wrote T5 tokenizer (%d entries) to %s", len(tokenizer), out_dir)


def transformers_tokenizer(folder: Path, *, t5: bool) -> Any:
    """The model's tokenizer in ``folder`` as diffusers' pipelines load it (``T5Tokenizer`` for a T5
    encoder, ``CLIPTokenizer`` otherwise)."""
    from transformers import CLIPTokenizer, T5Tokenizer

    return (T5Tokenizer if t5 else CLIPTokenizer).from_pretrained(folder)


def padded_backend(tokenizer: Any, max_length: int) -> tokenizers.Tokenizer:
    """A copy of the ``tokenizers.Tokenizer`` behind a transformers tokenizer, set as
    ``tokenizer(text, padding="max_length", max_length=max_length, truncation=True)`` sets it, so
    its ``encode(text)`` gives that call's ids and attention mask.

    Raises ``ValueError`` for a tokenizer whose call does more than its backend (no backend, or
    ``split_special_tokens``, which the backend's JSON does not keep).
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        raise ValueError(f"{type(tokenizer).__name__} is not served by its tokenizers backend alone")
    tokenizer("", padding="max_length", max_length=max_length, truncation=True)  # sets the backend
    return Tokenizer.from_str(backend.to_str())


def padded_tokenizer(source: ModelSource, name: str, t5_length: int) -> tokenizers.Tokenizer:
    """The model's tokenizer folder ``name`` loaded with transformers, as :func:`padded_backend`
    gives it: CLIP at its own length, T5 at ``t5_length``."""
    t5 = name in source.t5_tokenizers
    tokenizer = transformers_tokenizer(source.path / name, t5=t5)
    return padded_backend(tokenizer, t5_length if t5 else int(tokenizer.model_max_length))


def write_serving_tokenizers(source: ModelSource, out: Path) -> list[Path]:
    """Write each tokenizer of the model into the repository ``out`` as a ``tokenizers`` JSON set to
    pad and truncate (T5 at the longest length the export takes: the service sets the length of the
    model's rule), so the service tokenizes without importing transformers.  Returns the files
    written; none when one of the tokenizers cannot be served that way (the service then loads them
    with transformers)."""
    for name in source.tokenizers:  # a former export's, which the service must not take for these
        (out / serving_tokenizer_file(name)).unlink(missing_ok=True)
    backends = {}
    for name in source.tokenizers:
        try:
            backends[name] = padded_tokenizer(source, name, T5_TOKEN_RANGE_MAX)
        except ValueError as e:
            logger.warning("%s: %s; the service will load the tokenizers with transformers", name, e)
            return []
    written = []
    for name, backend in backends.items():
        path = out / serving_tokenizer_file(name)
        partial = path.with_name(f".{path.name}.partial")
        backend.save(str(partial))
        partial.replace(path)
        written.append(path)
    return written
