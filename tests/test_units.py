"""Unit tests of the pieces with no server: prompt splitting, LoRA field parsing, settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.api.errors import body_problem, status_of
from server.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    ModelUnavailable,
    OutOfMemory,
    ServiceError,
    ServiceUnavailable,
    TritonUnavailable,
    Unauthorized,
    UnprocessableBody,
)
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


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_all_subclasses(sub)]
    return found


def _instance(cls: type[ServiceError]) -> ServiceError:
    if issubclass(cls, ModelUnavailable):
        return cls("m", model="unet")
    return cls() if cls in (Unauthorized, OutOfMemory) else cls("m")


def test_every_service_error_is_a_status_livepeer_handles_unless_opted_out() -> None:
    """server/api/errors.py maps the whole hierarchy: by default only 400, 401, 422, 500 (and 499 for a
    client that has gone, which nobody reads); HTTP_RETRY_STATUSES gives 503 and 413 back."""
    classes = _all_subclasses(ServiceError)
    assert {ServiceUnavailable, TritonUnavailable, BodyTooLarge, UnprocessableBody} <= set(classes)
    for cls in classes:
        error = _instance(cls)
        default = status_of(error, retry_statuses=False)
        assert default in ({499} if cls is ClientGone else {400, 401, 422, 500}), cls
        opted = status_of(error, retry_statuses=True)
        if issubclass(cls, ServiceUnavailable):
            assert (default, opted) == (500, 503), cls
        elif cls is BodyTooLarge:
            assert (default, opted) == (400, 413)
        else:
            assert opted == default, cls


@pytest.mark.parametrize(
    ("key", "message", "loc", "error_type"),
    [
        ("data", "Object missing required field `prompt`", ["body", "prompt"], "missing"),
        ("data", "'data'", ["body"], "missing"),
        ("data", "Expected `object`, got `array`", ["body"], "model_attributes_type"),
        ("height", "Expected `int`, got `str`", ["body", "height"], "int_parsing"),
        ("height", "Expected `int`, got `float`", ["body", "height"], "int_from_float"),
        ("height", "Expected `int`, got `null`", ["body", "height"], "int_type"),
        ("guidance_scale", "Expected `float`, got `str`", ["body", "guidance_scale"], "float_parsing"),
        ("safety_check", "Expected `bool`, got `null`", ["body", "safety_check"], "bool_type"),
        ("prompt", "Expected `str`, got `int`", ["body", "prompt"], "string_type"),
    ],
)
def test_litestars_problems_become_fastapis(key: str, message: str, loc: list[str], error_type: str) -> None:
    problem = body_problem(key, message)
    assert (problem.loc, problem.type) == (loc, error_type)
    assert problem.msg and "`" not in problem.msg  # pydantic's wording, not msgspec's
