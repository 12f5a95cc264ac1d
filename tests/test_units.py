"""Unit tests of the pieces with no server: prompt splitting, LoRA field parsing, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import BadRequest
from server.loras import parse_loras
from server.pipeline.model import split_prompt
from server.settings import Settings, SettingsError


@pytest.mark.parametrize(
    ("text", "encoders", "parts"),
    [
        ("a cat", 1, ("a cat",)),
        ("a | b", 1, ("a | b",)),
        ("a | b", 2, ("a", "b")),
        ("a|b|c", 2, ("a", "b|c")),
        ("a|", 2, ("a",)),
        ("|b", 2, ("b",)),
        ("|", 2, ()),
        ("  ", 1, ()),
        ("", 2, ()),
    ],
)
def test_split_prompt(text: str, encoders: int, parts: tuple[str, ...]) -> None:
    assert split_prompt(text, encoders) == parts


def test_parse_loras() -> None:
    assert parse_loras("", 4) == {}
    assert parse_loras("  ", 4) == {}
    assert parse_loras('{"a/b": 0.5, "c": 1}', 4) == {"a/b": 0.5, "c": 1.0}
    assert parse_loras('{"a": 0}', 4) == {"a": 0.0}


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("{", "Unable to parse '{' as JSON."),
        ('"a"', "Unable to parse '\"a\"' as JSON."),
        ('{"a": -0.1}', "All strengths must be numbers greater than or equal to 0.0."),
        ('{"a": true}', "All strengths must be numbers greater than or equal to 0.0."),
        ('{"a": null}', "All strengths must be numbers greater than or equal to 0.0."),
        ('{"a": 1, "b": 1, "c": 1}', "Too many LoRas provided. Maximum is 2."),
    ],
)
def test_parse_loras_errors(text: str, msg: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_loras(text, 2)
    assert info.value.message == msg


def test_settings_precedence_and_conversion() -> None:
    env = {"MODEL_ID": "m", "PORT": "9000", "WARMUP": "false", "MAX_PIXELS": "4096", "MODEL_DIR": "/x"}
    s = Settings.from_env(env)
    assert (s.model_id, s.port, s.warmup, s.max_pixels, s.model_dir) == ("m", 9000, False, 4096, Path("/x"))
    assert Settings.from_env(env, port="9100", model_id=None).port == 9100
    assert Settings.from_env({"MODEL_ID": "m"}).auth_token is None


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"MODEL_ID": "m", "PORT": "eighty"},
        {"MODEL_ID": "m", "WARMUP": "perhaps"},
        {"MODEL_ID": "m", "PIPELINE": "image-to-image"},
        {"MODEL_ID": "m", "MAX_IMAGES": "0"},
        {"MODEL_ID": "m", "MEMORY_RELEASE_S": "-1"},
        {"MODEL_ID": "m", "MEMORY_RELEASE_S": "soon"},
    ],
)
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env(env)
