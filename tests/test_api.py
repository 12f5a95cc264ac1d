"""The API contract over HTTP against a real Triton: errors, auth, health, concurrency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}


def post(
    url: str, body: Any, headers: dict[str, str] | None = None, path: str = "/text-to-image"
) -> httpx.Response:
    kwargs: dict[str, Any] = {"content": body} if isinstance(body, str | bytes) else {"json": body}
    return httpx.post(f"{url}{path}", headers=headers, timeout=120, **kwargs)


def assert_error(response: httpx.Response, status: int, msg: str | None = None) -> None:
    assert response.status_code == status, response.text[:300]
    detail = response.json()["detail"]
    assert isinstance(detail["msg"], str) and detail["msg"]
    if msg is not None:
        assert detail["msg"] == msg
    assert "Traceback" not in response.text


@pytest.fixture(scope="module")
def url(service: Callable[..., str]) -> str:
    return service("sd", max_images=3, max_pixels=256 * 256)


def test_trailing_slash_and_response_shape(url: str) -> None:
    response = post(url, {"prompt": "a cat", **SMALL, "seed": 5}, path="/text-to-image/")
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    assert set(image) == {"url", "seed", "nsfw"}
    assert image["url"].startswith("data:image/png;base64,")


@pytest.mark.parametrize(
    ("body", "msg"),
    [
        ({"prompt": "", **SMALL}, "Prompt must be provided."),
        ({"prompt": "   ", **SMALL}, "Prompt must be provided."),
        ({"prompt": "x", "model_id": "someone/else", **SMALL}, None),
        ({"prompt": "x", "loras": "{not json", **SMALL}, "Unable to parse '{not json' as JSON."),
        ({"prompt": "x", "loras": "[1, 2]", **SMALL}, "Unable to parse '[1, 2]' as JSON."),
        (
            {"prompt": "x", "loras": '{"a/b": -1}', **SMALL},
            "All strengths must be numbers greater than or equal to 0.0.",
        ),
        (
            {"prompt": "x", "loras": '{"a/b": "high"}', **SMALL},
            "All strengths must be numbers greater than or equal to 0.0.",
        ),
        (
            {"prompt": "x", "loras": '{"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}', **SMALL},
            "Too many LoRas provided. Maximum is 4.",
        ),
        ({"prompt": "x", "height": 60, "width": 64}, None),
        ({"prompt": "x", "height": 0, "width": 64}, None),
        ({"prompt": "x", "height": -64, "width": 64}, None),
        ({"prompt": "x", "height": 512, "width": 512}, None),
        ({"prompt": "x", "num_images_per_prompt": 4, **SMALL}, None),
        ({"prompt": "x", "num_images_per_prompt": 0, **SMALL}, None),
        ({"prompt": "x", "seed": -1, **SMALL}, None),
        ({"prompt": "x", "seed": 2**70, **SMALL}, None),
    ],
)
def test_bad_input_is_400(url: str, body: dict[str, Any], msg: str | None) -> None:
    assert_error(post(url, body), 400, msg)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"height": 64}, "prompt"),
        ({"prompt": "x", "height": "tall"}, "height"),
        ({"prompt": "x", "guidance_scale": "lots"}, "guidance_scale"),
        ({"prompt": "x", "safety_check": "maybe"}, "safety_check"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
    ],
)
def test_body_that_fails_validation_is_422_naming_the_field(
    url: str, body: dict[str, Any], field: str
) -> None:
    response = post(url, body)
    assert_error(response, 422)
    assert field in response.json()["detail"]["msg"]


@pytest.mark.parametrize("raw", ["{bad json", "[1, 2]", "", "null"])
def test_malformed_body_is_4xx_with_detail(url: str, raw: str) -> None:
    response = post(url, raw, headers={"content-type": "application/json"})
    assert response.status_code in (400, 422), response.text
    assert_error(response, response.status_code)


def test_unknown_route_and_method_have_detail(url: str) -> None:
    assert_error(httpx.get(f"{url}/nope"), 404)
    assert_error(httpx.get(f"{url}/text-to-image"), 405)


def test_out_of_range_number_is_400(url: str) -> None:
    assert_error(
        post(
            url,
            '{"prompt": "x", "guidance_scale": 1e999, "height": 64, "width": 64}',
            headers={"content-type": "application/json"},
        ),
        400,
    )


def test_service_keeps_serving_after_errors(url: str) -> None:
    for body in ({"prompt": ""}, {"height": 1}, {"prompt": "x", "loras": "{"}):
        assert post(url, body).status_code in (400, 422)
    assert post(url, {"prompt": "still here", **SMALL}).status_code == 200


def test_model_id_of_the_loaded_model_is_accepted(url: str, tiny_model: Callable[[str], Path]) -> None:
    assert post(url, {"prompt": "x", "model_id": str(tiny_model("sd")), **SMALL}).status_code == 200


def test_steps_below_one_fall_back_to_the_default(url: str) -> None:
    body = {"prompt": "x", "height": 64, "width": 64, "seed": 9}
    fallback = post(url, {**body, "num_inference_steps": 0}).json()["images"][0]["url"]
    default = post(url, {**body, "num_inference_steps": 50}).json()["images"][0]["url"]
    assert fallback == default


def test_bearer_token(service: Callable[..., str]) -> None:
    url = service("sd", auth_token="s3cret")
    body = {"prompt": "x", **SMALL}
    for headers in (
        None,
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
        {"Authorization": "Bearer"},
    ):
        response = post(url, body, headers)
        assert_error(response, 401, "Invalid bearer token.")
        assert response.headers["www-authenticate"] == "Bearer"
    assert post(url, body, {"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_health_answers_fast_while_generating_and_requests_overlap(service: Callable[..., str]) -> None:
    url = service("sd")
    long_body = {"prompt": "long", "height": 256, "width": 256, "num_inference_steps": 50, "seed": 1}
    short_body = {"prompt": "short", **SMALL, "seed": 2}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            started = time.perf_counter()
            long_task = asyncio.create_task(client.post("/text-to-image", json=long_body))
            await asyncio.sleep(0.5)
            assert not long_task.done(), "the long request finished too early to test overlap"
            latencies = []
            for _ in range(5):
                t0 = time.perf_counter()
                health = await client.get("/health")
                latencies.append(time.perf_counter() - t0)
                assert health.json() == {"status": "OK"}
                await asyncio.sleep(0.05)
            short = await client.post("/text-to-image", json=short_body)
            short_done = time.perf_counter() - started
            long = await long_task
            long_done = time.perf_counter() - started
            assert short.status_code == 200 and long.status_code == 200
            assert max(latencies) < 0.2, latencies
            assert short_done < long_done, "the second request waited for the first"

    asyncio.run(scenario())
