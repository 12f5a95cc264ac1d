"""The ``loras`` request field: a JSON object of LoRA source -> strength.

Checked as the reference runner checks it, with its messages.
"""

from __future__ import annotations

import json
import math

from server.errors import BadRequest


def parse_loras(text: str, max_loras: int) -> dict[str, float]:
    """``'{"repo/lora": 0.8}'`` -> ``{"repo/lora": 0.8}``; empty text means no LoRA."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise BadRequest(f"Unable to parse '{text}' as JSON.") from None
    if not isinstance(value, dict):
        raise BadRequest(f"Unable to parse '{text}' as JSON.")
    loras: dict[str, float] = {}
    for name, weight in value.items():
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise BadRequest("All strengths must be numbers greater than or equal to 0.0.")
        if not name.strip():
            raise BadRequest("LoRa repository '' not found")
        loras[name] = float(weight)
    if len(loras) > max_loras:
        raise BadRequest(f"Too many LoRas provided. Maximum is {max_loras}.")
    return loras
