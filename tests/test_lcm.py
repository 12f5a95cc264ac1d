"""A guidance-distilled UNet (``time_cond_proj_dim``, e.g. LCM) is refused at export with a clear message."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from export.models.source import ModelSourceError
from export.toolchain.cli import main as export_main
from export.toolchain.repository import export_repository


@pytest.fixture
def lcm_like_model(tmp_path: Path, tiny_model: Callable[[str], Path]) -> Path:
    model = tmp_path / "tiny-lcm"
    shutil.copytree(tiny_model("sd"), model)
    config_path = model / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["time_cond_proj_dim"] = 32
    config_path.write_text(json.dumps(config))
    return model


def test_unet_with_time_cond_proj_dim_is_refused_before_anything_is_written(
    lcm_like_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "repository"
    with pytest.raises(ModelSourceError, match=r"time_cond_proj_dim=32.*timestep_cond"):
        export_repository(str(lcm_like_model), out)
    assert not out.exists() or not any(out.iterdir())


def test_cli_reports_the_refusal_and_fails(
    lcm_like_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert export_main([str(lcm_like_model), "--out", str(tmp_path / "repository")]) == 1
    err = capsys.readouterr().err
    # One line on stderr (t2i-export's errors), naming the refusal.
    assert err.count("\n") == 1 and err.startswith("t2i-export: error: ")
    assert "time_cond_proj_dim=32" in err
