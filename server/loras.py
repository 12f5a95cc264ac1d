"""The ``loras`` request field: a JSON object of LoRA source -> strength.

Checked as the reference runner checks it, with its messages.  Decoded with the same decoder as the
request body (msgspec), so a value nested too deeply, a number too large for a float or text that
is not JSON is a 400 here, never an exception further down.
"""

from __future__ import annotations

import math
import re

import msgspec

from server.errors import BadRequest, brief

# A LoRA id names a file or folder under LORA_DIR or a Hub repository: one path component of it,
# with ``.safetensors`` appended, must stay below the file system's 255-byte name limit.
MAX_LORA_ID_BYTES = 200
# Never part of a name a LoRA source can have: control characters, and ``~`` (a home folder).
_NOT_AN_ID = re.compile(r"[\x00-\x1f\x7f]|^~")

_decoder = msgspec.json.Decoder()


def parse_loras(text: str, max_loras: int) -> dict[str, float]:
    """``'{"repo/lora": 0.8}'`` -> ``{"repo/lora": 0.8}``; empty text means no LoRA."""
    if not text.strip():
        return {}
    try:
        value = _decoder.decode(text)
    except (msgspec.DecodeError, RecursionError, ValueError):
        raise BadRequest(f"Unable to parse '{brief(text)}' as JSON.") from None
    if not isinstance(value, dict):
        raise BadRequest(f"Unable to parse '{brief(text)}' as JSON.")
    loras: dict[str, float] = {}
    for name, weight in value.items():
        loras[_lora_id(name)] = _strength(weight)
    if len(loras) > max_loras:
        raise BadRequest(f"Too many LoRas provided. Maximum is {max_loras}.")
    return loras


def _lora_id(name: str) -> str:
    if len(name.encode()) > MAX_LORA_ID_BYTES:
        raise BadRequest(f"LoRa id '{brief(name)}' is longer than {MAX_LORA_ID_BYTES} bytes.")
    if not name.strip() or _NOT_AN_ID.search(name):
        raise BadRequest(f"LoRa repository '{name}' not found")
    return name


def _strength(weight: object) -> float:
    try:
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(weight)
        strength = float(weight)  # OverflowError for an integer beyond the float range
        if not math.isfinite(strength) or strength < 0:
            raise ValueError(weight)
    except (ValueError, OverflowError):
        raise BadRequest("All strengths must be numbers greater than or equal to 0.0.") from None
    return strength
