"""Hostile request bodies (each with the status and message it must get) and the reference's error
body, for the API tests and the fuzzing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from server.loras import MAX_LORA_ID_BYTES

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}
JSON = "application/json"
DEEP = 100_000
# The length bound fields had before the reference's (none: MAX_BODY_BYTES bounds them all).
OLD_FIELD_CHARS = 8192
OVER_BODY_LIMIT = "Request body is larger than this service's limit of 1048576 bytes (MAX_BODY_BYTES)."


@dataclass(frozen=True)
class Hostile:
    """A body a hostile client sends, the status it must get, and the message it must get if known."""

    name: str
    body: bytes
    status: int
    msg: str | None = None
    content_type: str = JSON


def json_body(**fields: Any) -> bytes:
    return json.dumps({**SMALL, **fields}).encode()


def _raw(text: str) -> bytes:
    return text.encode()


def hostile_loras(loras: str, status: int = 400, msg: str | None = None, name: str = "") -> Hostile:
    return Hostile(name or f"loras={loras[:20]!r}", json_body(prompt="x", loras=loras), status, msg)


STRENGTHS = "All strengths must be numbers greater than or equal to 0.0."
DIGITS_400, DIGITS_5000 = "9" * 400, "9" * 5000

# Issue 7 item 4 (each was a 500 with a traceback), item 5 (sizes), and what else a hostile client
# sends: wrong types, huge numbers, non-finite numbers, nulls, duplicate keys, non-object JSON, an
# empty body, other content types.  None of them may reach the pipeline.
HOSTILE: list[Hostile] = [
    hostile_loras('{"a": ' + DIGITS_400 + "}", msg=STRENGTHS, name="loras weight of 400 digits"),
    hostile_loras('{"a": -' + DIGITS_400 + "}", msg=STRENGTHS, name="loras weight of -400 digits"),
    hostile_loras('{"a": ' + DIGITS_5000 + "}", name="loras weight of 5000 digits"),
    hostile_loras('{"a": 1e999}', name="loras weight 1e999"),
    hostile_loras('{"a": NaN}', name="loras weight NaN"),
    hostile_loras("[" * (OLD_FIELD_CHARS - 1), name="loras of unclosed brackets"),
    hostile_loras("[" * 4000 + "]" * 4000, name="loras of deeply nested arrays"),
    hostile_loras('{"a": ' + "[" * 4000 + "]" * 4000 + "}", name="loras weight deeply nested"),
    hostile_loras("[" * DEEP, name="loras of 100000 brackets"),
    hostile_loras(json.dumps({"x" * 300: 1}), name="LoRA id of 300 characters"),
    hostile_loras(json.dumps({"é" * (MAX_LORA_ID_BYTES // 2 + 1): 1}), name="LoRA id over the byte bound"),
    hostile_loras(
        '{"~nosuchuser/x": 1}', msg="LoRa repository '~nosuchuser/x' not found", name="LoRA id ~user"
    ),
    hostile_loras(json.dumps({"a\x00b": 1}), name="LoRA id with a NUL"),
    hostile_loras(json.dumps({"a\nb": 1}), name="LoRA id with a newline"),
    hostile_loras('{"a": "1"}', msg=STRENGTHS, name="loras weight as a string"),
    hostile_loras('{"a": null}', msg=STRENGTHS, name="loras weight null"),
    hostile_loras('{"a": [1]}', msg=STRENGTHS, name="loras weight a list"),
    hostile_loras('"a"', name="loras a JSON string"),
    hostile_loras("{" + "x" * (OLD_FIELD_CHARS - 1), name="loras of 8 KB junk"),
    hostile_loras("x" * 1_000_000, name="loras of 1 MB"),
    Hostile("prompt with invalid UTF-8", b'{"prompt": "a \xff\xfe cat"}', 422),
    Hostile("prompt with a lone surrogate", b'{"prompt": "\\ud800"}', 422),
    Hostile("body nested 100000 deep", _raw('{"prompt": "x", "a": ' + "[" * DEEP + "]" * DEEP + "}"), 422),
    Hostile("body of 100000 brackets", _raw("[" * DEEP), 422),
    Hostile("body of 100000 objects", _raw('{"a": ' * DEEP), 422),
    Hostile("prompt of 5 MB", json_body(prompt="cat " * 1_250_000), 400, OVER_BODY_LIMIT),
    Hostile(
        "negative prompt of 5 MB",
        json_body(prompt="x", negative_prompt="cat " * 1_250_000),
        400,
        OVER_BODY_LIMIT,
    ),
    Hostile("model_id of 100000 characters", json_body(prompt="x", model_id="m" * 100_000), 400),
    Hostile("seed of 5000 digits", _raw('{"prompt": "x", "seed": ' + DIGITS_5000 + "}"), 422),
    Hostile("seed of 400 digits", _raw('{"prompt": "x", "seed": ' + DIGITS_400 + "}"), 400),
    Hostile("negative seed", json_body(prompt="x", seed=-(2**63)), 400),
    Hostile("height of 400 digits", _raw('{"prompt": "x", "width": 64, "height": ' + DIGITS_400 + "}"), 400),
    Hostile("width of 30 digits", json_body(prompt="x", width=10**30), 400),
    Hostile("steps of 30 digits", json_body(prompt="x", num_inference_steps=10**30), 400),
    Hostile("images of 30 digits", json_body(prompt="x", num_images_per_prompt=10**30), 400),
    Hostile("negative images", json_body(prompt="x", num_images_per_prompt=-1), 400),
    Hostile("guidance NaN", _raw('{"prompt": "x", "guidance_scale": NaN}'), 422),
    Hostile("guidance Infinity", _raw('{"prompt": "x", "guidance_scale": Infinity}'), 422),
    Hostile("guidance 1e999", _raw('{"prompt": "x", "guidance_scale": 1e999}'), 422),
    Hostile("guidance -1e999", _raw('{"prompt": "x", "guidance_scale": -1e999}'), 422),
    *(
        Hostile(f"guidance {v!r}", json_body(prompt="x", guidance_scale=v), 400)
        for v in ("nan", "inf", "-Infinity")
    ),
    Hostile("negative seed as a string", json_body(prompt="x", seed="-5"), 400),
    Hostile("float height", json_body(prompt="x", height=64.5), 422),
    Hostile("float steps", json_body(prompt="x", num_inference_steps=2.5), 422),
    Hostile("float seed", json_body(prompt="x", seed=1.5), 422),
    Hostile("bool steps", json_body(prompt="x", num_inference_steps=True), 422),
    Hostile("null prompt", json_body(prompt=None), 422),
    Hostile("null height", json_body(prompt="x", height=None), 422),
    Hostile("null loras", json_body(prompt="x", loras=None), 422),
    Hostile("null safety_check", json_body(prompt="x", safety_check=None), 422),
    Hostile(
        "null seed (an integer without a default in the reference)", json_body(prompt="x", seed=None), 422
    ),
    Hostile(
        "duplicate keys, last empty",
        _raw('{"prompt": "x", "prompt": "", "height": 64}'),
        400,
        "Prompt must be provided.",
    ),
    Hostile("duplicate keys, last wrong type", _raw('{"prompt": "x", "prompt": 1}'), 422),
    *(
        Hostile(f"JSON {raw}", _raw(raw), 422)
        for raw in ("null", "1", '"prompt"', "true", "[]", '[{"prompt": "x"}]')
    ),
    Hostile("empty body", b"", 422),
    Hostile("whitespace body", b"  \n ", 422),
    Hostile("truncated JSON", b'{"prompt": "x"', 422),
    Hostile("trailing garbage", b'{"prompt": "x"} x', 422),
    Hostile("form body", b"prompt=x&height=64", 422, content_type="application/x-www-form-urlencoded"),
    Hostile("binary body", bytes(range(256)), 422, content_type="application/octet-stream"),
    Hostile("XML body", b"<prompt>x</prompt>", 422, content_type="application/xml"),
]
# Wrong types in every field.
for _field, _wrong in (
    ("prompt", [5, ["x"], {"a": 1}, True]),
    ("model_id", [5, ["x"]]),
    ("loras", [{"a": 1}, ["a"], 1]),
    ("height", ["tall", [64], {"a": 1}]),
    ("width", ["wide", [64]]),
    ("guidance_scale", ["lots", [7.5]]),
    ("negative_prompt", [5, ["x"]]),
    ("safety_check", ["maybe", [True]]),
    ("seed", ["one", [1]]),
    ("num_inference_steps", ["two", [2]]),
    ("num_images_per_prompt", ["one", [1]]),
):
    HOSTILE += [
        Hostile(f"{_field}={_value!r}", json_body(**{"prompt": "x", _field: _value}), 422)
        for _value in _wrong
    ]


def assert_error_body(response: httpx.Response) -> str:
    """The reference's error body for the response's status; its (first) message.  422 is FastAPI's
    ``HTTPValidationError`` (``loc`` from "body", ``msg``, ``type``), the rest ``{"detail": {"msg"}}``."""
    content_type = response.headers["content-type"]  # schemathesis' responses hold a list per header
    assert "".join(content_type).startswith("application/json"), response.headers
    detail = response.json()["detail"]
    assert "Traceback" not in response.text
    if response.status_code == 422:
        assert isinstance(detail, list) and detail, detail
        for problem in detail:
            assert set(problem) == {"loc", "msg", "type"}, problem
            assert problem["loc"][0] == "body" and all(isinstance(x, str | int) for x in problem["loc"])
            assert isinstance(problem["msg"], str) and problem["msg"] and isinstance(problem["type"], str)
        return str(detail[0]["msg"])
    assert set(detail) == {"msg"} and isinstance(detail["msg"], str) and detail["msg"], detail
    return str(detail["msg"])
