"""Fuzz the API from its served OpenAPI document: no 5xx, every 4xx carries ``detail.msg``.

The fuzzed service runs with small limits (pixels, steps, images) so the valid cases stay cheap; the
invalid ones are the point.  Cases come from schemathesis' positive and negative strategies.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from server.settings import Settings
from tests.conftest import running_service
from tests.test_operations import metric

FUZZ_LIMITS = {"max_pixels": 128 * 128, "max_steps": 2, "max_images": 2}
CASES_PER_MODE = 300  # positive + negative: 600 cases in all


def _fuzz(
    url: str,
    count: int,
    mode: schemathesis.GenerationMode,
    headers: dict[str, str],
    check: Callable[[Any, Any], None],
) -> int:
    schema = schemathesis.openapi.from_url(f"{url}/schema/openapi.json")
    operation = schema["/text-to-image"]["POST"]
    session = requests.Session()
    seen = {"n": 0}

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        seen["n"] += 1
        response = case.call(base_url=url, session=session, headers=headers, timeout=60)
        check(response, case)

    run()
    session.close()
    return seen["n"]


def _no_server_error(response: Any, case: Any) -> None:
    assert response.status_code < 500, f"{response.status_code} for {case.body!r}: {response.text[:300]}"
    if response.status_code >= 400:
        msg = response.json()["detail"]["msg"]
        assert isinstance(msg, str) and msg, case.body
    else:
        assert response.status_code == 200
        assert response.json()["images"]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_never_get_5xx_and_service_still_serves(
    mode: schemathesis.GenerationMode, service: Callable[..., str]
) -> None:
    url = service("sd", **FUZZ_LIMITS)
    assert _fuzz(url, CASES_PER_MODE, mode, {}, _no_server_error) >= CASES_PER_MODE
    response = httpx.post(
        f"{url}/text-to-image",
        json={"prompt": "after fuzz", "height": 64, "width": 64, "num_inference_steps": 2},
        timeout=60,
    )
    assert response.status_code == 200


def test_without_the_token_nothing_reaches_the_pipeline(
    tiny_model: Callable[[str], Path], triton: Callable[..., Any]
) -> None:
    config = Settings(
        model_id=str(tiny_model("sd")),
        triton_url=triton("sd").grpc_url,
        auth_token="fuzz-token",
        **FUZZ_LIMITS,
    )  # type: ignore[arg-type]
    with running_service(config) as running:
        url = running.url
        before = metric(url, "t2i_generations_total")

        def unauthorized(response: Any, case: Any) -> None:
            assert response.status_code == 401, f"{response.status_code} for {case.body!r}"
            assert response.json() == {"detail": {"msg": "Invalid bearer token."}}
            assert response.headers["www-authenticate"] in ("Bearer", ["Bearer"])

        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            _fuzz(url, 60, schemathesis.GenerationMode.POSITIVE, headers, unauthorized)
        assert metric(url, "t2i_generations_total") == before
        ok = httpx.post(
            f"{url}/text-to-image",
            headers={"Authorization": "Bearer fuzz-token"},
            json={"prompt": "x", "height": 64, "width": 64, "num_inference_steps": 2},
            timeout=60,
        )
        assert ok.status_code == 200
        assert metric(url, "t2i_generations_total") == before + 1


def test_token_comparison_is_constant_time() -> None:
    from server.api import routes

    assert "hmac.compare_digest" in inspect.getsource(routes.require_bearer_token)
