"""The settings as msgspec declares them: names, conversion, refusals, flags, and the README's table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from server.settings import (
    ENV_NAMES,
    FIELDS,
    TABLE_BEGIN,
    TABLE_END,
    Settings,
    SettingsError,
    add_cli_arguments,
    markdown_table,
    replace_table,
)

ROOT = Path(__file__).resolve().parents[1]
# The environment the service has read since before the settings were declared with msgspec; several
# are Livepeer's ai-runner's (PIPELINE, MODEL_ID, MODEL_DIR, ...), so none may change.
ENV_NAMES_READ = {
    *("PIPELINE", "MODEL_ID", "MODEL_DIR", "AUTH_TOKEN", "TRITON_URL", "MODEL_REPOSITORY", "STATE_DIR"),
    *("HOST", "PORT", "VERSION", "SCHEDULER", "MAX_LORAS", "MAX_IMAGES", "MAX_PIXELS", "MAX_BATCH_PIXELS"),
    *("TRITON_TIMEOUT_S", "TRITON_SHARED_MEMORY", "STARTUP_TIMEOUT_S", "MAX_STEPS", "MAX_IN_FLIGHT"),
    *("MAX_QUEUE", "REQUEST_TIMEOUT_S", "HEALTH_INTERVAL_S", "SAFETY_CHECKER", "LORA_DIR"),
    *("MAX_LORA_VARIANTS", "LORA_EXTRA_DIRS", "LORA_HUB", "LORA_HUB_TIMEOUT_S", "HF_ENDPOINT"),
    *("LORA_MAX_MB", "LORA_CACHE_GB", "LORA_BUILD_CONCURRENCY", "LORA_PRELOAD", "WARMUP", "TORCH_THREADS"),
    *("MALLOC_ARENA_MAX", "MEMORY_RELEASE_S", "MAX_BODY_BYTES", "HTTP_RETRY_STATUSES", "TRITONSERVER"),
    *("MODEL_IDS", "PINNED_MODEL_IDS", "MODEL_MEMORY_GB"),  # several models (docs/models.md)
}


def test_the_readme_settings_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(TABLE_BEGIN) == 1 and readme.count(TABLE_END) == 1
    assert replace_table(readme) == readme, "run `python -m server.settings --update README.md`"
    table = markdown_table()
    assert len(table.splitlines()) == len(FIELDS) + 2
    assert max(len(row) for row in table.splitlines()) < 300, "long prose belongs in docs/settings.md"


def test_every_setting_has_its_variable_a_description_and_a_flag() -> None:
    assert set(ENV_NAMES) == ENV_NAMES_READ
    assert all(ENV_NAMES[f.env] == name and f.env == name.upper() for name, f in FIELDS.items())
    assert all(f.description and not f.description.endswith(".") for f in FIELDS.values())
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    help_text = " ".join(parser.format_help().split())
    assert "--port PORT port the service listens on (env PORT; integer >= 1, <= 65535)" in help_text
    flags = vars(parser.parse_args(["--max-queue", "3", "--lora-hub", "off"]))
    settings = Settings.from_env({"MODEL_ID": "m", "MAX_QUEUE": "5", "MAX_STEPS": "7"}, **flags)
    assert (settings.max_queue, settings.max_steps, settings.lora_hub) == (3, 7, False)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        *[(t, True) for t in ("true", "TRUE", "1", "yes", "On", " true ")],
        *[(t, False) for t in ("false", "False", "0", "no", "OFF")],
    ],
)
def test_booleans_are_read_as_before(text: str, value: bool) -> None:
    assert Settings.from_env({"MODEL_ID": "m", "WARMUP": text}).warmup is value


def test_values_are_converted_by_type() -> None:
    env = {"MODEL_ID": "m", "LORA_DIR": "/l", "REQUEST_TIMEOUT_S": "5", "SAFETY_CHECKER": "off"}
    env["PORT"] = " 81"  # int() took surrounding blanks
    s = Settings.from_env(env)
    assert (s.lora_dir, s.request_timeout_s, s.safety_checker, s.port) == (Path("/l"), 5.0, "off", 81)
    assert isinstance(s.request_timeout_s, float)
    assert Settings.from_env({"MODEL_ID": "m", "AUTH_TOKEN": ""}).auth_token is None  # empty: unset
    assert s.with_overrides(port="82", lora_dir=None).port == 82
    assert s.with_overrides(lora_dir=None).lora_dir is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "MODEL_ID is required: Hub id or local diffusers folder"),
        ({"PORT": "eighty"}, "port must be an integer, got 'eighty' (env PORT, flag --port)"),
        ({"PORT": "70000"}, "port must be at least 1 and at most 65535, got '70000' (env PORT"),
        ({"WARMUP": "perhaps"}, "warmup must be a boolean (true/false, 1/0, yes/no, on/off), got 'perhaps'"),
        ({"MAX_IMAGES": "0"}, "max_images must be at least 1, got '0' (env MAX_IMAGES, flag --max-images)"),
        ({"MAX_QUEUE": "-1"}, "max_queue must be at least 0, got '-1'"),
        ({"LORA_CACHE_GB": "0"}, "lora_cache_gb must be greater than 0, got '0'"),
        ({"MEMORY_RELEASE_S": "soon"}, "memory_release_s must be a number, got 'soon'"),
        ({"SAFETY_CHECKER": "on"}, "safety_checker must be 'auto' or 'off', got 'on'"),
        ({"PIPELINE": "image-to-image"}, "pipeline must be 'text-to-image', got 'image-to-image'"),
        ({"TRITON_URL": "grpc://triton:8001"}, "TRITON_URL must be Triton's HTTP address"),
    ],
)
def test_a_refusal_names_the_setting_and_what_it_accepts(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"MODEL_ID": "m", **env} if env else env)
    assert message in str(info.value)


def test_settings_made_in_code_are_checked_too() -> None:
    with pytest.raises(SettingsError, match="torch_threads must be at least 1, got 0"):
        Settings(model_id="m", torch_threads=0)
    with pytest.raises(SettingsError, match="health_interval_s must be greater than 0"):
        Settings(model_id="m").with_overrides(health_interval_s="0")
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        Settings.from_env({"MODEL_ID": "m"}, colour="red")
