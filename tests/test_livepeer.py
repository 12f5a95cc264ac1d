"""The service as Livepeer's own clients see it.

``livepeer-ai`` (the official Python SDK, generated from the reference runner's OpenAPI document) drives
the running service: every answer must parse into its ``ImageResponse``, ``errors.HTTPError`` (400, 401,
500) or ``errors.HTTPValidationError`` (422); an ``SDKError`` means the SDK could not parse the answer.
go-livepeer's generated runner client (``ai/worker/runner.gen.go``) cannot run here: its parsing is
mirrored below (``go_parse``: the statuses it reads, the content type it needs, and Go's strict
``json.Unmarshal`` into its structs), and every answer goes through it too.  ``/schema`` is checked
against the reference document's shapes for the operations the service shares with it.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from livepeer_ai import Livepeer
from livepeer_ai.models import components, errors

from export.fixtures.service import free_port, wait_until
from server.settings import Settings
from server.triton.launcher import BundledTriton, TritonLaunchConfig
from tests.support.service import metric, running_service

# What go-livepeer's Worker.TextToImage and the SDK handle: any other status crashes a remote AI worker.
LIVEPEER_STATUSES = {200, 400, 401, 422, 500}
SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}
LONG = {"prompt": "long", "height": 256, "width": 256, "num_inference_steps": 60}
INT64_MAX = 2**63 - 1


# -- go-livepeer's client, mirrored: its structs (runner.gen.go) and ParseGenTextToImageResponse --------
class GoAPIError(msgspec.Struct):
    msg: str


class GoHTTPError(msgspec.Struct):
    detail: GoAPIError


class GoValidationError(msgspec.Struct):
    loc: list[str | int]
    msg: str
    type: str


class GoHTTPValidationError(msgspec.Struct):
    detail: list[GoValidationError] | None = None


class GoMedia(msgspec.Struct):
    url: str
    seed: int
    nsfw: bool


class GoImageResponse(msgspec.Struct):
    images: list[GoMedia]


GO_TYPES: dict[int, type[msgspec.Struct]] = {
    200: GoImageResponse,
    400: GoHTTPError,
    401: GoHTTPError,
    422: GoHTTPValidationError,
    500: GoHTTPError,
}


def go_parse(response: httpx.Response) -> msgspec.Struct:
    """What ``Worker.TextToImage`` gets: one of its structs, or the failure it would hit (a status
    it does not read leaves every field nil: the crash the service must never cause)."""
    assert response.status_code in GO_TYPES, f"go-livepeer reads nothing from a {response.status_code}"
    assert "json" in response.headers.get("content-type", ""), "go-livepeer reads only a JSON answer"
    value = msgspec.json.decode(response.content, type=GO_TYPES[response.status_code])
    if isinstance(value, GoImageResponse):
        assert all(0 <= m.seed <= INT64_MAX for m in value.images)  # Go's int
    if isinstance(value, GoHTTPValidationError):
        assert value.detail, "go-livepeer logs the 422's problems; an empty list says nothing"
    return value


# -- the SDK, with a body of our choosing where the SDK would not send it ------------------------------
class Rewrite(httpx.BaseTransport):
    """Sends the SDK's request with ``body`` instead of the one it built; records every answer."""

    def __init__(self, body: bytes | None = None) -> None:
        self.inner = httpx.HTTPTransport()
        self.body = body
        self.answers: list[httpx.Response] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.body is not None:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
            request = httpx.Request(request.method, request.url, headers=headers, content=self.body)
        response = self.inner.handle_request(request)
        response.read()
        self.answers.append(response)
        return response


SEEN_STATUSES: set[int] = set()


def sdk_call(
    url: str, params: dict[str, Any], token: str = "unused", body: bytes | None = None
) -> tuple[components.ImageResponse | Exception, httpx.Response]:
    """``generate.text_to_image`` as a Livepeer client calls it: the parsed result or the SDK's error,
    and the raw answer (also parsed as go-livepeer would)."""
    transport = Rewrite(body)
    sdk = Livepeer(http_bearer=token, server_url=url, client=httpx.Client(transport=transport, timeout=120))
    result: components.ImageResponse | Exception
    try:
        answer = sdk.generate.text_to_image(request=params)
        assert answer.image_response is not None
        result = answer.image_response
    except (errors.HTTPError, errors.HTTPValidationError) as e:
        result = e
    except errors.SDKError as e:  # the SDK could not parse the answer
        raise AssertionError(f"SDKError: {e}") from e
    (response,) = transport.answers
    SEEN_STATUSES.add(response.status_code)
    assert response.status_code in LIVEPEER_STATUSES, response.text[:300]
    go_parse(response)
    return result, response


def sdk_error(url: str, params: dict[str, Any], status: int, msg: str, **kwargs: Any) -> None:
    """The call fails with ``status`` as the SDK's error class for it, carrying ``msg``."""
    result, response = sdk_call(url, params, **kwargs)
    assert response.status_code == status, response.text[:300]
    if status == 422:
        assert isinstance(result, errors.HTTPValidationError), result
        assert result.data.detail and any(msg in p.msg for p in result.data.detail), result.data
    else:
        assert isinstance(result, errors.HTTPError), result
        assert msg in result.data.detail.msg, result.data.detail.msg


@pytest.fixture(scope="module")
def url(service: Callable[..., str]) -> str:
    return service("sd")


def test_a_valid_request_parses_into_the_sdks_image_response(url: str) -> None:
    result, _ = sdk_call(url, {"prompt": "a cat", **SMALL, "seed": 7, "num_images_per_prompt": 2})
    assert isinstance(result, components.ImageResponse)
    assert [m.seed for m in result.images] == [7, 8]
    assert all(m.url.startswith("data:image/png;base64,") and m.nsfw in (True, False) for m in result.images)


@pytest.mark.parametrize(
    ("params", "body", "status", "msg"),
    [
        ({"prompt": ""}, None, 400, "Prompt must be provided."),
        ({"prompt": "x", "loras": "{"}, None, 400, "Unable to parse '{' as JSON."),
        ({"prompt": "x", "height": 60, "width": 64}, None, 400, "height must be a multiple of 8"),
        ({"prompt": "x", "model_id": "someone/else"}, None, 400, "is not served here"),
        ({"prompt": "x"}, b'{"height": 64}', 422, "Field required"),
        ({"prompt": "x"}, b'{"prompt": "x", "height": "tall"}', 422, "Input should be a valid integer"),
        ({"prompt": "x"}, b'{"prompt": 5}', 422, "Input should be a valid string"),
        ({"prompt": "x"}, b'{"prompt": "x"', 422, "JSON decode error: Input data was truncated"),
        (
            {"prompt": "x"},
            b"[1, 2]",
            422,
            "Input should be a valid dictionary or object to extract fields from",
        ),
        ({"prompt": "x"}, b"", 422, "Field required"),
    ],
    ids=lambda v: repr(v)[:40] if not isinstance(v, int) else str(v),
)
def test_bad_bodies_arrive_as_the_sdks_error_classes(
    url: str, params: dict[str, Any], body: bytes | None, status: int, msg: str
) -> None:
    sdk_error(url, {**SMALL, **params}, status, msg, body=body)


def test_a_wrong_token_is_the_sdks_http_error(service: Callable[..., str]) -> None:
    url = service("sd", auth_token="s3cret")
    sdk_error(url, {"prompt": "x", **SMALL}, 401, "Invalid bearer token.", token="wrong")
    result, _ = sdk_call(url, {"prompt": "x", **SMALL}, token="s3cret")
    assert isinstance(result, components.ImageResponse)


def test_a_body_over_the_limit_is_the_sdks_http_error(service: Callable[..., str]) -> None:
    url = service("sd", max_body_bytes=200)
    msg = "Request body is larger than this service's limit of 200 bytes (MAX_BODY_BYTES)."
    sdk_error(url, {"prompt": "x" * 300, **SMALL}, 400, msg)


def _while_one_runs(url: str, call: Callable[[], Any]) -> Any:
    """``call()`` while one long generation holds the service's only slot."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/text-to-image", json=LONG, timeout=300)
        wait_until(lambda: metric(url, "t2i_generations_in_flight") >= 1, 60, "the long generation")
        try:
            return call()
        finally:
            assert first.result().status_code == 200


def test_overload_is_the_sdks_http_error_naming_it(service: Callable[..., str]) -> None:
    url = service("sd", max_in_flight=1, max_queue=0)
    _while_one_runs(url, lambda: sdk_error(url, {"prompt": "x", **SMALL}, 500, "The service is busy"))
    assert metric(url, "t2i_requests_refused_total", '{reason="queue_full"}') >= 1


def test_the_queue_bound_holds_and_nothing_waits_past_its_deadline(service: Callable[..., str]) -> None:
    """One slot, two places in the queue, a 3 s deadline: of six requests beside a long one, two wait
    (and end within the deadline: served, or a 500 that says they waited), four are refused at once."""
    url = service("sd", max_in_flight=1, max_queue=2, request_timeout_s=3.0)

    def burst() -> list[httpx.Response]:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            body = {"prompt": "x", **SMALL}
            futures = [
                pool.submit(httpx.post, f"{url}/text-to-image", json=body, timeout=30) for _ in range(6)
            ]
            wait_until(lambda: all(f.done() for f in futures), 3.0 + 5, "every request to end")
            return [f.result() for f in futures]

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(
            httpx.post, f"{url}/text-to-image", json={**LONG, "num_inference_steps": 200}, timeout=300
        )
        wait_until(lambda: metric(url, "t2i_generations_in_flight") >= 1, 60, "the long generation")
        answers = burst()
        assert metric(url, "t2i_queue_depth") == 0
        first.result()
    refused = [r for r in answers if "The service is busy" in r.text]
    assert len(refused) == 4, [r.text[:120] for r in answers]
    waited = [r for r in answers if r not in refused]
    for r in waited:
        assert r.status_code in (200, 500), r.text
        if r.status_code == 500:
            assert "did not finish within 3 s (REQUEST_TIMEOUT_S): it was waiting for a free slot" in r.text
    assert {r.status_code for r in answers} <= LIVEPEER_STATUSES


def test_a_request_during_loading_waits_then_is_the_sdks_http_error(
    tiny_model: Callable[[str], Path],
) -> None:
    """No Triton yet: LOADING; a request waits for it within its deadline, then says so."""
    settings = Settings(
        model_id=str(tiny_model("sd")), triton_url=f"127.0.0.1:{free_port()}", request_timeout_s=1.5
    )
    with running_service(settings, wait_for="LOADING") as running:
        msg = "did not finish within 1.5 s (REQUEST_TIMEOUT_S): the service was still loading the model"
        sdk_error(running.url, {"prompt": "x", **SMALL}, 500, msg)
        assert metric(running.url, "t2i_requests_refused_total", '{reason="loading"}') == 1
        assert httpx.get(f"{running.url}/health").json() == {"status": "LOADING"}


@pytest.mark.slow
def test_triton_killed_is_the_sdks_http_error(
    tiny_model: Callable[[str], Path], repository: Callable[[str], Path], work_dir: Path
) -> None:
    """~20 s (its own Triton): Triton gone under a serving service is a 500 that says so."""
    config = TritonLaunchConfig(model_repository=repository("sd"), state_dir=work_dir / "state-livepeer")
    triton = BundledTriton(config)
    triton.start()
    try:
        settings = Settings(model_id=str(tiny_model("sd")), triton_url=triton.http_url, health_interval_s=0.2)
        with running_service(settings) as running:
            result, _ = sdk_call(running.url, {"prompt": "x", **SMALL})
            assert isinstance(result, components.ImageResponse)
            triton.stop()
            wait_until(lambda: httpx.get(f"{running.url}/health").json()["status"] == "ERROR", 30, "ERROR")
            sdk_error(running.url, {"prompt": "x", **SMALL}, 500, "The inference server is unavailable")
    finally:
        triton.stop()


def test_http_retry_statuses_gives_503_and_413_which_the_sdk_cannot_parse(
    service: Callable[..., str],
) -> None:
    """The opt-in, for a generic load balancer: what go-livepeer and the SDK do not handle."""
    url = service("sd", max_in_flight=1, max_queue=0, max_body_bytes=200, http_retry_statuses=True)
    big = httpx.post(f"{url}/text-to-image", json={"prompt": "x" * 300, **SMALL}, timeout=30)
    assert big.status_code == 413 and "MAX_BODY_BYTES" in big.json()["detail"]["msg"]
    busy = _while_one_runs(url, lambda: httpx.post(f"{url}/text-to-image", json={"prompt": "x", **SMALL}))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
    with pytest.raises(errors.SDKError):  # why it is off by default
        sdk = Livepeer(http_bearer="x", server_url=url, client=httpx.Client(timeout=60))
        sdk.generate.text_to_image(request={"prompt": "x" * 300, **SMALL})


def test_every_status_seen_is_one_livepeer_handles() -> None:
    """Runs last in this file: the statuses of every answer above (default settings)."""
    if not SEEN_STATUSES:
        pytest.skip("run with the tests above")
    assert SEEN_STATUSES <= LIVEPEER_STATUSES, SEEN_STATUSES
    assert {200, 400, 401, 422, 500} & SEEN_STATUSES == SEEN_STATUSES


# -- /schema against the reference's document (livepeer/ai-runner runner/openapi.yaml, v0.14.1) ---------
# The reference's operation ids, summaries and documented statuses for the operations this service has.
REFERENCE_OPERATIONS = {
    ("/text-to-image", "post"): ("genTextToImage", "Text To Image", {"200", "400", "401", "422", "500"}),
    ("/health", "get"): ("health", "Health", {"200"}),
    ("/version", "get"): ("version", "Version", {"200"}),
    ("/hardware/info", "get"): ("hardware_info", "Hardware Info", {"200"}),
    ("/hardware/stats", "get"): ("hardware_stats", "Hardware Stats", {"200"}),
}
REFERENCE_RESPONSE_SCHEMAS = {
    ("/text-to-image", "200"): "ImageResponse",
    ("/text-to-image", "400"): "HTTPError",
    ("/text-to-image", "401"): "HTTPError",
    ("/text-to-image", "422"): "HTTPValidationError",
    ("/text-to-image", "500"): "HTTPError",
    ("/health", "200"): "HealthCheck",
    ("/version", "200"): "Version",
    ("/hardware/info", "200"): "HardwareInformation",
    ("/hardware/stats", "200"): "HardwareStats",
}
# component -> (required fields, {field: JSON type}) as the reference has them
REFERENCE_COMPONENTS = {
    "HTTPError": ({"detail"}, {"detail": "APIError"}),
    "APIError": ({"msg"}, {"msg": "string"}),
    "HTTPValidationError": (set(), {"detail": "array"}),
    "ValidationError": ({"loc", "msg", "type"}, {"loc": "array", "msg": "string", "type": "string"}),
    "ImageResponse": ({"images"}, {"images": "array"}),
    "Media": ({"url", "seed", "nsfw"}, {"url": "string", "seed": "integer", "nsfw": "boolean"}),
    "HealthCheck": ({"status"}, {"status": "string"}),
    "Version": (
        {"pipeline", "model_id", "version"},
        {"pipeline": "string", "model_id": "string", "version": "string"},
    ),
    "HardwareInformation": ({"pipeline", "model_id", "gpu_info"}, {"gpu_info": "object"}),
    "HardwareStats": ({"pipeline", "model_id", "gpu_stats"}, {"gpu_stats": "object"}),
    "TextToImageParams": (
        {"prompt"},
        {
            "model_id": "string",
            "loras": "string",
            "prompt": "string",
            "height": "integer",
            "width": "integer",
            "guidance_scale": "number",
            "negative_prompt": "string",
            "safety_check": "boolean",
            "seed": "integer",
            "num_inference_steps": "integer",
            "num_images_per_prompt": "integer",
        },
    ),
}
REFERENCE_DEFAULTS = {
    "model_id": "",
    "loras": "",
    "height": 576,
    "width": 1024,
    "guidance_scale": 7.5,
    "negative_prompt": "",
    "safety_check": True,
    "num_inference_steps": 50,
    "num_images_per_prompt": 1,
}


def _types(field: dict[str, Any]) -> set[str]:
    """The JSON types (or the component) a field's schema allows."""
    if "$ref" in field:
        return {field["$ref"].rsplit("/", 1)[-1]}
    options = field.get("oneOf") or field.get("anyOf") or [field]
    found = set()
    for option in options:
        if "$ref" in option:
            found.add(option["$ref"].rsplit("/", 1)[-1])
        elif "type" in option:
            found |= set(option["type"]) if isinstance(option["type"], list) else {option["type"]}
    return found


@pytest.fixture(scope="module")
def schema(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/schema/openapi.json").json())


def test_schema_has_the_reference_operations(schema: dict[str, Any]) -> None:
    for (path, method), (operation_id, summary, statuses) in REFERENCE_OPERATIONS.items():
        operation = schema["paths"][path][method]
        assert operation["operationId"] == operation_id, path
        assert operation["summary"] == summary, path
        assert set(operation["responses"]) == statuses, path
    assert schema["paths"]["/text-to-image"]["post"]["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/text-to-image"]["post"]["tags"] == ["generate"]
    assert schema["components"]["securitySchemes"] == {"HTTPBearer": {"type": "http", "scheme": "bearer"}}
    body = schema["paths"]["/text-to-image"]["post"]["requestBody"]
    assert body["required"] is True
    assert _types(body["content"]["application/json"]["schema"]) == {"TextToImageParams"}
    for (path, status), component in REFERENCE_RESPONSE_SCHEMAS.items():
        (operation,) = schema["paths"][path].values()
        assert _types(operation["responses"][status]["content"]["application/json"]["schema"]) == {component}


def test_schema_has_the_reference_components(schema: dict[str, Any]) -> None:
    components_ = schema["components"]["schemas"]
    for name, (required, fields) in REFERENCE_COMPONENTS.items():
        component = components_[name]
        assert set(component.get("required", [])) == required, name
        for field, kind in fields.items():
            assert kind in _types(component["properties"][field]), (name, field)
    items = components_["ValidationError"]["properties"]["loc"]["items"]
    assert _types(items) == {"string", "integer"}
    assert _types(components_["HTTPValidationError"]["properties"]["detail"]["items"]) == {"ValidationError"}
    assert _types(components_["ImageResponse"]["properties"]["images"]["items"]) == {"Media"}
    assert set(components_["HealthCheck"]["properties"]["status"]["enum"]) == {
        "LOADING",
        "OK",
        "ERROR",
        "IDLE",
    }
    params = components_["TextToImageParams"]["properties"]
    assert {k: params[k].get("default") for k in REFERENCE_DEFAULTS} == REFERENCE_DEFAULTS
    assert not any("maxLength" in field for field in params.values())


def test_the_opt_in_documents_503_and_413(service: Callable[..., str]) -> None:
    url = service("sd", max_in_flight=1, max_queue=0, max_body_bytes=200, http_retry_statuses=True)
    responses = httpx.get(f"{url}/schema/openapi.json").json()["paths"]["/text-to-image"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "413", "422", "500", "503"}


def test_go_parse_rejects_what_crashed_go_livepeer() -> None:
    """The mirror can fail: the old 422 body and a 503 are what go-livepeer could not use."""
    old_422 = httpx.Response(422, json={"detail": {"msg": "Invalid request body"}})
    with pytest.raises(msgspec.ValidationError):
        go_parse(old_422)
    with pytest.raises(AssertionError, match="reads nothing from a 503"):
        go_parse(httpx.Response(503, json={"detail": {"msg": "busy"}}))
    assert isinstance(
        go_parse(
            httpx.Response(
                422, json=json.loads('{"detail": [{"loc": ["body", 1], "msg": "m", "type": "t"}]}')
            )
        ),
        GoHTTPValidationError,
    )
