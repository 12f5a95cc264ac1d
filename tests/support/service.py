"""The service on uvicorn in this process, for tests that need its app (``running.app.state``);
its ``/metrics``; the marker of tests that need the bundled tritonserver."""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from litestar import Litestar
from prometheus_client.parser import text_string_to_metric_families

from export.fixtures.service import LOOPBACK, free_port, serving_in_thread, wait_for_health
from server.app import create_app
from server.settings import Settings

DEFAULT_TARGET = "python-onnx"

# For tests that only need the bundled tritonserver; the project always installs it.
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("pytriton") is None,
    reason="nvidia-pytriton (the bundled tritonserver) is not installed",
)


@dataclass(frozen=True)
class RunningService:
    url: str
    app: Litestar


@contextlib.contextmanager
def running_service(
    settings: Settings, wait_for: str | None = "OK", timeout_s: float = 120
) -> Iterator[RunningService]:
    """Run ``create_app(settings)`` on uvicorn in a thread until it reports ``wait_for``; always stop it."""
    port = free_port()
    app = create_app(settings.with_overrides(host=LOOPBACK, port=port))
    with serving_in_thread(app, port) as url:
        wait_for_health(url, wait_for, timeout_s)
        yield RunningService(url, app)


def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of the samples ``name`` on ``/metrics`` whose labels include ``labels`` (written as in
    the exposition: ``'{stage="safety_check"}'``; other labels, such as ``model``, are summed over);
    0 when there is none."""
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == name and wanted.items() <= sample.labels.items():
                total += sample.value
    return total
