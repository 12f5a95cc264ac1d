"""The HTTP engine client against fake Triton servers: the binary tensor exchange, kept-alive and
replaced connections, odd answers, deadlines and the connection bound.  (Against the real Triton:
tests/test_faults.py::test_errors_are_classified_on_real_exceptions and every service test.)"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from server.errors import (
    InferenceFailed,
    ModelUnavailable,
    OutOfMemory,
    ServiceUnavailable,
    TritonUnavailable,
)
from server.settings import Settings, SettingsError, triton_address
from server.triton.client import TritonClient
from tests.support.triton import FakeTriton, answer, read_request


def infer_answer(arrays: dict[str, np.ndarray]) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "outputs": [
                {
                    "name": n,
                    "datatype": "FP32",
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for n, a in arrays.items()
            ]
        }
    ).encode()
    body = header + b"".join(a.tobytes() for a in arrays.values())
    return body, f"Inference-Header-Content-Length: {len(header)}\r\n"


def bytes_answer() -> tuple[bytes, str]:
    header = b'{"outputs":[{"name":"y","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":4}}]}'
    return header + b"1234", f"Inference-Header-Content-Length: {len(header)}\r\n"


def test_inference_sends_binary_tensors_and_reads_them_back_over_one_connection() -> None:
    seen: list[tuple[str, dict, dict[str, np.ndarray]]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers, body = await read_request(reader)
            length = int(headers["inference-header-content-length"])
            request = json.loads(body[:length])
            arrays, offset = {}, length
            for i in request["inputs"]:
                size = i["parameters"]["binary_data_size"]
                arrays[i["name"]] = np.frombuffer(body[offset : offset + size], np.float32).reshape(
                    i["shape"]
                )
                offset += size
            seen.append((line, request, arrays))
            data, extra = infer_answer({"twice": arrays["sample"] * 2, "other": np.zeros(3, np.float32)})
            writer.write(answer(200, data, extra))

    async def scenario() -> None:
        async with FakeTriton(handler) as fake:
            client = TritonClient(fake.url, timeout_s=10)
            sample = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
            for i in range(3):
                out = await client.infer(
                    "unet__0123456789abcdef",
                    {"sample": sample + i, "timestep": np.array([1.0, 2.0], np.float32)},
                    ["twice"],
                    {"lora_variant": "0123456789abcdef"},
                )
                assert set(out) == {"twice"}
                np.testing.assert_array_equal(out["twice"], (sample + i) * 2)
                out["twice"][0] = 0  # the caller owns it
            await client.close()
            assert fake.connections == 1, "one kept-alive connection carries every call"

    asyncio.run(scenario())
    line, request, arrays = seen[0]
    assert line == "POST /v2/models/unet__0123456789abcdef/infer HTTP/1.1"
    assert request["parameters"] == {"lora_variant": "0123456789abcdef"}
    assert [o["name"] for o in request["outputs"]] == ["twice"]
    assert arrays["timestep"].shape == (2, 1), "per-row scalars go as [batch, 1]"


def test_a_connection_closed_while_idle_is_replaced_and_a_chunked_answer_is_read() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)  # one request per connection, then closed without saying so
        data, extra = infer_answer({"y": np.ones((1, 2), np.float32)})
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(data[i : i + 7]), data[i : i + 7]) for i in range(0, len(data), 7)
        )
        writer.write(
            f"HTTP/1.1 200 OK\r\n{extra}Transfer-Encoding: chunked\r\n\r\n".encode() + chunks + b"0\r\n\r\n"
        )
        await writer.drain()

    async def scenario() -> None:
        async with FakeTriton(handler) as fake:
            client = TritonClient(fake.url, timeout_s=10)
            for _ in range(3):
                out = await client.infer("m", {"x": np.zeros((1, 2), np.float32)}, ["y"])
                np.testing.assert_array_equal(out["y"], np.ones((1, 2), np.float32))
                await asyncio.sleep(0.05)  # the server closes the idle connection meanwhile
            assert fake.connections == 3
            await client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (
            answer(404, b'{"error":"Request for unknown model: \'m\' is not found"}'),
            ModelUnavailable,
            "not loaded",
        ),
        (answer(503, b'{"error":"model is not ready"}'), ModelUnavailable, "not loaded"),
        (
            answer(500, b'{"error":"Stub process \'m_0_0\' is not healthy."}'),
            ModelUnavailable,
            "worker process",
        ),
        (answer(500, b'{"error":"CUDA out of memory. Tried to allocate"}'), OutOfMemory, "Out of memory"),
        (answer(400, b"plain words, not JSON"), InferenceFailed, "Inference failed"),
        (answer(400, b'["a list"]'), InferenceFailed, "Inference failed"),
        (answer(200, b"{}"), InferenceFailed, "Inference failed"),  # no binary outputs
        (answer(200, *bytes_answer()), InferenceFailed, "Inference failed"),  # strings: not tensors here
        (b"SSH-2.0-OpenSSH\r\n\r\n", ModelUnavailable, "not loaded"),  # not HTTP: no answer, server live
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", ModelUnavailable, "not loaded"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, ModelUnavailable, "not loaded"),  # headers without end
    ],
)
def test_odd_answers_become_the_services_errors(reply: bytes, error: type, text: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            writer.write(answer(200, b"") if "/health/live" in line else reply)
            await writer.drain()
            if "/health/live" not in line:
                return  # closes

    async def scenario() -> None:
        async with FakeTriton(handler) as fake:
            client = TritonClient(fake.url, timeout_s=10)
            with pytest.raises(error) as raised:
                await client.infer("m", {"x": np.zeros((1, 2), np.float32)}, ["y"])
            assert type(raised.value) is error and text in str(raised.value)
            await client.close()

    asyncio.run(scenario())


def test_no_server_is_triton_unavailable_and_a_silent_one_a_deadline_that_drops_the_connection() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # never answers; returns when the client closes

    async def scenario() -> None:
        async with FakeTriton(silent) as fake:
            url = fake.url
            client = TritonClient(url, timeout_s=0.3)
            with pytest.raises(ServiceUnavailable) as late:
                await client.infer("m", {"x": np.zeros((1, 2), np.float32)}, ["y"])
            assert (
                type(late.value) is ServiceUnavailable and "did not answer within 0.3 s" in late.value.message
            )
            for _ in range(50):
                if fake.open == 0:
                    break
                await asyncio.sleep(0.02)
            assert fake.open == 0, "a call that timed out closes its connection"
            await client.close()
        gone = TritonClient(url, timeout_s=5)
        with pytest.raises(TritonUnavailable):
            await gone.infer("m", {"x": np.zeros((1, 2), np.float32)}, ["y"])
        with pytest.raises(TritonUnavailable):
            await gone.load_model("m")
        assert not await gone.model_ready("m")
        await gone.close()

    asyncio.run(scenario())


def test_calls_beyond_the_connection_bound_wait_for_a_free_connection() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            await asyncio.sleep(0.05)
            data, extra = infer_answer({"y": np.ones(1, np.float32)})
            writer.write(answer(200, data, extra))

    async def scenario() -> None:
        async with FakeTriton(slow) as fake:
            client = TritonClient(fake.url, timeout_s=10, connections=2)
            outs = await asyncio.gather(
                *(client.infer("m", {"x": np.zeros(1, np.float32)}, ["y"]) for _ in range(7))
            )
            assert len(outs) == 7 and fake.most_open == 2 and fake.connections == 2
            await client.close()

    asyncio.run(scenario())


def test_control_calls_and_the_model_config() -> None:
    calls: list[str] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            calls.append(line.split(" ")[1])
            if line.endswith("/config HTTP/1.1"):
                writer.write(answer(200, b'{"name":"m","max_batch_size":8,"backend":"python"}'))
            elif "/bad/" in line:
                writer.write(answer(400, b'{"error":"Model version not ready"}'))
            elif "/load" in line and "/nope/" in line:
                writer.write(answer(500, b'{"error":"failed to load \'nope\'"}'))
            else:
                writer.write(answer(200, b""))

    async def scenario() -> None:
        async with FakeTriton(handler) as fake:
            client = TritonClient(f"http://{fake.url}", timeout_s=10)
            assert await client.is_live() and await client.model_ready("m")
            assert not await client.model_ready("bad")
            assert await client.max_batch_size("m") == 8 and await client.backend("m") == "python"
            assert await client.max_batch_size("m") == 8  # read once
            await client.load_model("m")
            await client.unload_model("m")
            with pytest.raises(InferenceFailed):
                await client.load_model("nope")
            await client.close()

    asyncio.run(scenario())
    assert calls.count("/v2/models/m/config") == 1
    assert "/v2/repository/models/m/load" in calls and "/v2/repository/models/m/unload" in calls


def test_a_server_that_is_not_http_1_1_is_named_as_the_wrong_port() -> None:
    async def http2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + bytes(18))  # an HTTP/2 SETTINGS frame
        await writer.drain()

    async def scenario() -> str:
        async with FakeTriton(http2) as fake:
            client = TritonClient(fake.url, timeout_s=5)
            reason = await client.not_live()
            await client.close()
            return reason

    assert "not its gRPC port" in asyncio.run(scenario())


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("triton:8000", ("triton", 8000)),
        ("http://127.0.0.1:9", ("127.0.0.1", 9)),
        ("triton", ("triton", 8000)),
    ],
)
def test_triton_url_is_an_http_address(url: str, address: tuple[str, int]) -> None:
    assert triton_address(url) == address
    assert Settings(model_id="m", triton_url=url).triton_url == url


@pytest.mark.parametrize(
    "url",
    [
        "https://triton:8000",
        "grpc://triton:8001",
        "triton:8000/v2",
        "triton:99999",
        "triton:x",
        "http://:8000",
    ],
)
def test_a_triton_url_the_client_cannot_speak_to_is_refused_at_start(url: str) -> None:
    with pytest.raises(SettingsError, match="TRITON_URL"):
        Settings(model_id="m", triton_url=url)
