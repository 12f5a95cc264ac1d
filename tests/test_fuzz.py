"""Fuzz the API from its served OpenAPI document: no 5xx, every 4xx has the reference's body
(``detail.msg``; for 422 FastAPI's list of problems).

The fuzzed service runs with small limits (pixels, steps, images) so the valid cases stay cheap; the
invalid ones are the point.  Cases come from schemathesis' positive and negative strategies, and the
positive run starts with every hostile body of ``tests.support.hostile.HOSTILE`` as an explicit example.
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
from hypothesis import HealthCheck, example, given, settings

from server.settings import Settings
from tests.support.hostile import HOSTILE, assert_error_body
from tests.support.service import metric, running_service

FUZZ_LIMITS = {"max_pixels": 128 * 128, "max_steps": 2, "max_images": 2}
CASES_PER_MODE = 300  # positive + negative: 600 cases in all


def _fuzz(
    url: str,
    count: int,
    mode: schemathesis.GenerationMode,
    headers: dict[str, str],
    check: Callable[[Any, Any], None],
    hostile: bool = False,
) -> int:
    """Run ``count`` generated cases (plus, with ``hostile``, every body of ``HOSTILE``); the number run."""
    schema = schemathesis.openapi.from_url(f"{url}/schema/openapi.json")
    operation = schema["/text-to-image"]["POST"]
    session = requests.Session()
    seen = {"n": 0}
    # Raw bytes go out as they are, under the content type each one names.
    examples = [
        operation.Case(body=h.body, media_type="application/json", headers={"Content-Type": h.content_type})
        for h in (HOSTILE if hostile else [])
    ]

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

    for case in examples:
        run = example(case=case)(run)
    run()
    session.close()
    return seen["n"]


# The status each explicit example must get, as tests.test_api asserts it.
EXPECTED_STATUS = {(h.body, h.content_type): h.status for h in HOSTILE}


def _no_server_error(response: Any, case: Any) -> None:
    # an explicit example: its exact status (generated cases may send bytes too, with other headers)
    if isinstance(case.body, bytes):
        expected = EXPECTED_STATUS.get((case.body, (case.headers or {}).get("Content-Type")))
    else:
        expected = None
    if expected is not None:
        assert response.status_code == expected, f"{response.status_code} for {case.body!r:.300}"
    assert response.status_code < 500, f"{response.status_code} for {case.body!r:.300}: {response.text[:300]}"
    if response.status_code >= 400:
        assert_error_body(response)
    else:
        assert response.status_code == 200
        assert response.json()["images"]


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_fuzzed_requests_never_get_5xx_and_service_still_serves(
    mode: schemathesis.GenerationMode, service: Callable[..., str]
) -> None:
    url = service("sd", **FUZZ_LIMITS)
    hostile = mode == schemathesis.GenerationMode.POSITIVE
    ran = _fuzz(url, CASES_PER_MODE, mode, {}, _no_server_error, hostile)
    assert ran >= CASES_PER_MODE + (len(HOSTILE) if hostile else 0)
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
        triton_url=triton("sd").http_url,
        auth_token="fuzz-token",
        **FUZZ_LIMITS,
    )  # type: ignore[arg-type]
    with running_service(config) as running:
        url = running.url
        before = metric(url, "t2i_generations_total")

        def unauthorized(response: Any, case: Any) -> None:
            # the reference's order: an empty prompt is a 400 before the token is looked at
            if not str(case.body.get("prompt", "")).strip():
                assert response.status_code == 400, f"{response.status_code} for {case.body!r}"
                assert response.json() == {"detail": {"msg": "Prompt must be provided."}}
                return
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
