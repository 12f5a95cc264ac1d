"""The engine client: Triton's HTTP/REST protocol over persistent asyncio connections; errors translated
at this edge.

Inference uses the KServe v2 protocol with Triton's binary tensor extension: a JSON header, then each
input's raw bytes; the answer is a JSON header, then each output's raw bytes.  One request at a time
per connection (HTTP/1.1), a pool of idle connections reused; at most ``connections`` calls are on the
wire at once, the others wait for a free one.

Why not tritonclient's clients: a UNet step over this exchange spends less time outside the model than
over tritonclient's gRPC aio client (whose completions reach the event loop through a poller thread)
or its aiohttp-based HTTP client (bench/RESULTS.md, "HTTP to Triton instead of gRPC").

Why the bodies are made and read here (:func:`inference_body`, :func:`inference_outputs`) and not by
tritonclient's ``InferenceServerClient.generate_request_body`` and ``parse_response_body``: those
copy each input twice (``tobytes``, then one joined body) before the transport copies it, where this
module hands the arrays' own buffers to the transport, and they read each output through two more
copies.  Measured through ``bench/transport.py``, an inline SD 1.5 or SDXL call was slower with them
by far more than the run-to-run spread (bench/RESULTS.md, "Request bodies: tritonclient's helpers or
the client's own"); and importing them needs tritonclient's ``http`` extra (gevent,
geventhttpclient, aiohttp), which the service does not otherwise use.  Only tritonclient's dtype
tables are used here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from server.errors import (
    InferenceFailed,
    ModelUnavailable,
    OutOfMemory,
    ServiceError,
    ServiceUnavailable,
    TritonUnavailable,
)
from server.settings import triton_address
from server.triton.oom import is_out_of_memory
from server.triton.shared import Region, SharedArray, remove_stale_regions

logger = logging.getLogger(__name__)

# What a call that got no HTTP answer reports instead of a status code.
NO_ANSWER = 0  # the connection failed, or closed before a whole response came
DEADLINE = -1  # no whole answer within the call's timeout
# Triton's HTTP status codes for its error kinds.
NOT_FOUND = 404  # "Request for unknown model": not loaded, or no ready version
UNAVAILABLE = 503  # the model or the server does not serve now
INTERNAL = 500  # the backend failed the request (the python backend's model raised, a dead stub)
# The python backend's answer (INTERNAL) once the model's stub process has died; Triton still calls
# the model ready, and it stays broken until it is loaded again.
_DEAD_STUB = re.compile(r"Stub process '[^']*' is not healthy")

DEFAULT_CONNECTIONS = 64
# Constant inputs below this many bytes go inline: a region's register and unregister calls cost more
# than they save at the tiny model's size (bench/RESULTS.md, the transport figures).
SHARED_MIN_BYTES = 64 * 1024
# What a server that is not Triton's HTTP endpoint (most likely its gRPC port, HTTP/2 only) gets told.
NOT_HTTP = (
    "it does not answer HTTP/1.1: TRITON_URL must be Triton's HTTP port (8000 by default), "
    "not its gRPC port (8001)"
)
# A response's status line and headers; Triton's are a few hundred bytes.
_HEAD_LIMIT = 64 * 1024
_JSON_HEADER = "Inference-Header-Content-Length"


class TritonCallError(Exception):
    """A call Triton failed (``status``: its HTTP status) or did not answer (``NO_ANSWER``, ``DEADLINE``)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text}")
        self.status = status
        self.text = text


@dataclass(frozen=True)
class _Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def error_text(self) -> str:
        """Triton's error message (``{"error": ...}``), else the body as text."""
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return str(json.loads(self.body)["error"])
        return self.body[:4096].decode("utf-8", "replace") or f"HTTP {self.status}"


class _Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, head: bytes, body: Sequence[bytes | memoryview]) -> tuple[_Response, bool]:
        """Send one request; the response and whether the connection may carry another."""
        self.writer.writelines([head, *body])
        await self.writer.drain()
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial and not e.partial.startswith(b"HTTP/"):
                raise ConnectionError(NOT_HTTP) from e
            raise
        lines = raw[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ConnectionError(NOT_HTTP)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            data = await self._chunked()
        elif "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        else:
            data = await self.reader.read()  # the body ends with the connection
            headers["connection"] = "close"
        keep = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
        return _Response(int(parts[1]), headers, data), keep

    async def _chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self._trailer()
                return b"".join(chunks)
            chunks.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def _trailer(self) -> None:
        while await self.reader.readuntil(b"\r\n") != b"\r\n":
            pass


class _Pool:
    """Keep-alive connections to one ``host:port``; at most ``size`` in use at once."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host = host
        self.port = port
        self._host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 in brackets
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)
        self._closed = False

    async def request(
        self, method: str, path: str, body: Sequence[bytes | memoryview] = (), headers: str = ""
    ) -> _Response:
        """One exchange.  A reused connection that fails before any answer (the server closed it while
        idle) is replaced once by a fresh one; any other failure is ``ConnectionError`` / ``OSError``."""
        length = sum(len(part) for part in body)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self._host_header}\r\n{headers}"
            f"Content-Length: {length}\r\n\r\n"
        ).encode("latin-1")
        async with self._slots:
            while True:
                connection = self._idle.pop() if self._idle else await self._open()
                reusable = False
                try:
                    response, reusable = await connection.exchange(head, body)
                except (ConnectionError, asyncio.IncompleteReadError) as e:
                    if connection.reused and not getattr(e, "partial", b""):
                        continue  # closed while idle: nothing was answered, ask a fresh connection
                    raise ConnectionError(str(e) or type(e).__name__) from e
                except (asyncio.LimitOverrunError, ValueError) as e:  # headers too long, bad lengths
                    raise ConnectionError(f"malformed HTTP answer: {e}") from e
                finally:
                    if reusable and not self._closed:
                        connection.reused = True
                        self._idle.append(connection)
                    else:  # failed, cancelled or timed out mid-exchange: its state is unknown
                        connection.close()
                return response

    async def _open(self) -> _Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=_HEAD_LIMIT)
        return _Connection(reader, writer)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def inference_body(
    inputs: Mapping[str, np.ndarray | SharedArray],
    outputs: Sequence[str],
    parameters: Mapping[str, str] | None,
) -> tuple[list[bytes | memoryview], str]:
    """The request body (JSON header, then each input's bytes) and its extra headers.  A 1-D array is
    sent as [batch, 1] (Triton's shape for per-row scalars; the model config reshapes it back); a
    :class:`SharedArray` is named, its bytes stay in its region."""
    described = []
    blobs: list[bytes | memoryview] = []
    for name, array in inputs.items():
        if isinstance(array, SharedArray):
            described.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": np_to_triton_dtype(array.dtype),
                    "parameters": {
                        "shared_memory_region": array.region,
                        "shared_memory_byte_size": array.nbytes,
                        "shared_memory_offset": array.offset,
                    },
                }
            )
            continue
        data = np.ascontiguousarray(array.reshape(-1, 1) if array.ndim == 1 else array)
        described.append(
            {
                "name": name,
                "shape": list(data.shape),
                "datatype": np_to_triton_dtype(data.dtype),
                "parameters": {"binary_data_size": data.nbytes},
            }
        )
        blobs.append(data.data.cast("B"))
    header: dict[str, Any] = {
        "inputs": described,
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs],
    }
    if parameters:
        header["parameters"] = dict(parameters)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    extra = f"Content-Type: application/octet-stream\r\n{_JSON_HEADER}: {len(encoded)}\r\n"
    return [encoded, *blobs], extra


def inference_outputs(response: _Response, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    """The named outputs of an inference response, as arrays the caller owns."""
    try:
        length = int(response.headers[_JSON_HEADER.lower()])
        header = json.loads(response.body[:length])
        arrays = {}
        offset = length
        for output in header["outputs"]:
            size = int(output["parameters"]["binary_data_size"])
            dtype = triton_to_np_dtype(output["datatype"])
            if dtype is None or dtype is np.object_ or offset + size > len(response.body):
                raise ValueError(f"output {output['name']!r} cannot be read")
            count = size // np.dtype(dtype).itemsize
            data = np.frombuffer(response.body, dtype=dtype, count=count, offset=offset)
            # a copy: writable, as callers hand it to torch
            arrays[output["name"]] = data.reshape(output["shape"]).copy()
            offset += size
        return {name: arrays[name] for name in outputs}
    except (KeyError, ValueError, TypeError) as e:
        raise TritonCallError(INTERNAL, f"unreadable inference response: {e}") from e


class TritonClient:
    """Async inference against one Triton server.  Arrays in, arrays out; batch axis first."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        connections: int = DEFAULT_CONNECTIONS,
        share_inputs: bool = True,
        shared_min_bytes: int = SHARED_MIN_BYTES,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        host, port = triton_address(url)
        self._pool = _Pool(host, port, connections)
        self._configs: dict[str, dict[str, Any]] = {}
        # Off once Triton refused a region: it does not share this host's /dev/shm.
        self._share_inputs = share_inputs
        self._shared_min_bytes = shared_min_bytes
        if share_inputs:
            remove_stale_regions()

    async def close(self) -> None:
        self._pool.close()

    async def _call(
        self,
        method: str,
        path: str,
        timeout_s: float,
        body: Sequence[bytes | memoryview] = (),
        headers: str = "",
    ) -> _Response:
        """One exchange; ``TritonCallError`` unless Triton answered 200."""
        try:
            async with asyncio.timeout(timeout_s):
                response = await self._pool.request(method, path, body, headers)
        except TimeoutError as e:
            raise TritonCallError(DEADLINE, f"no answer within {timeout_s:g} s") from e
        except OSError as e:  # refused, reset, closed mid-answer (ConnectionError is an OSError)
            raise TritonCallError(NO_ANSWER, str(e) or type(e).__name__) from e
        if response.status != 200:
            raise TritonCallError(response.status, response.error_text())
        return response

    async def is_live(self) -> bool:
        """Whether the server answers.  (Its *readiness* drops while any model loads, e.g. a LoRA
        variant, so the service checks the models it uses one by one instead.)"""
        return not await self.not_live()

    async def not_live(self) -> str:
        """Why the server is not live ("" when it is): no answer, a wrong port, a status."""
        try:
            await self._call("GET", "/v2/health/live", 5)
        except TritonCallError as e:
            return e.text if e.status in (NO_ANSWER, DEADLINE) else f"HTTP {e.status}: {e.text}"
        return ""

    async def model_ready(self, name: str) -> bool:
        try:
            await self._call("GET", f"/v2/models/{quote(name, safe='')}/ready", 5)
        except TritonCallError:
            return False
        return True

    async def load_model(self, name: str) -> None:
        """Load (or reload) ``name`` from the repository; needs Triton's explicit model control."""
        try:
            await self._call("POST", f"/v2/repository/models/{quote(name, safe='')}/load", self.timeout_s)
        except TritonCallError as e:
            raise await self._translate(name, e) from e

    async def unload_model(self, name: str) -> None:
        try:
            await self._call("POST", f"/v2/repository/models/{quote(name, safe='')}/unload", 30)
        except TritonCallError as e:
            raise await self._translate(name, e) from e
        self._configs.pop(name, None)

    async def max_batch_size(self, name: str) -> int:
        return int((await self._config(name)).get("max_batch_size", 0))

    async def backend(self, name: str) -> str:
        """The backend that runs ``name`` ("python" for the python-onnx / python-torch targets)."""
        config = await self._config(name)
        return str(config.get("backend") or config.get("platform") or "")

    async def _config(self, name: str) -> dict[str, Any]:
        """The model's configuration, read once while it stays loaded."""
        if name in self._configs:
            return self._configs[name]
        try:
            response = await self._call("GET", f"/v2/models/{quote(name, safe='')}/config", 10)
            config = json.loads(response.body)
        except ValueError:
            config = None
        except TritonCallError as e:
            raise await self._translate(name, e) from e
        if not isinstance(config, dict):
            raise InferenceFailed(f"Triton sent an unreadable configuration for model '{name}'.")
        self._configs[name] = config
        return config

    @contextlib.asynccontextmanager
    async def shared(self, arrays: Mapping[str, np.ndarray], uses: int) -> AsyncIterator[Mapping[str, Any]]:
        """``arrays`` as inputs of ``uses`` calls (a request's text embeddings across its steps): in a
        shared-memory region Triton reads in place, when Triton shares this host's ``/dev/shm``, they
        hold at least ``shared_min_bytes`` and serve more than one call (a region costs a request
        about what two calls save); else the arrays themselves.  The region is gone when the block
        ends."""
        # per-row scalars stay inline (they go as [batch, 1]; a few bytes)
        rows = {name: a for name, a in arrays.items() if a.ndim > 1}
        region = None
        if self._share_inputs and uses > 1 and sum(a.nbytes for a in rows.values()) >= self._shared_min_bytes:
            region = await self._register(rows)
        if region is None:
            yield arrays
            return
        try:
            yield {**arrays, **region.arrays}
        finally:
            try:  # shielded: a cancelled request still gives its region back to Triton
                await asyncio.shield(self._unregister(region.name))
            finally:
                region.close()

    async def _register(self, arrays: Mapping[str, np.ndarray]) -> Region | None:
        try:
            region = await asyncio.to_thread(Region, arrays)
        except OSError as e:  # no /dev/shm, or it is full: inline this time
            logger.warning("no shared memory for a request's inputs (%s): they go inline", e)
            return None
        body = json.dumps({"key": f"/{region.name}", "offset": 0, "byte_size": region.size}).encode()
        try:
            await self._call(
                "POST",
                f"/v2/systemsharedmemory/region/{region.name}/register",
                self.timeout_s,
                [body],
                "Content-Type: application/json\r\n",
            )
        except TritonCallError as e:
            region.close()
            # Triton answered (500 "Unable to open shared memory region" from another host): it
            # cannot map this host's regions.  Not answering or unavailable: it says nothing of that.
            if e.status not in (NO_ANSWER, DEADLINE, UNAVAILABLE):
                self._share_inputs = False
                logger.warning(
                    "Triton at %s cannot read this host's shared memory (%s %s): constant inputs go "
                    "inline from now on",
                    self.url,
                    e.status,
                    e.text,
                )
            return None
        except BaseException:  # cancelled mid-registration: the file goes now
            region.close()
            raise
        return region

    async def _unregister(self, name: str) -> None:
        try:
            await self._call("POST", f"/v2/systemsharedmemory/region/{name}/unregister", self.timeout_s)
        except TritonCallError as e:
            logger.warning("Triton did not unregister shared-memory region %s: %s %s", name, e.status, e.text)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray | SharedArray],
        outputs: Sequence[str],
        parameters: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One request: ``inputs`` share their batch axis (sent as :func:`inference_body` makes them).
        ``parameters`` are the request's parameters (e.g. ``lora_variant``)."""
        body, headers = inference_body(inputs, outputs, parameters)
        try:
            response = await self._call(
                "POST", f"/v2/models/{quote(model, safe='')}/infer", self.timeout_s, body, headers
            )
            return inference_outputs(response, outputs)
        except TritonCallError as e:
            raise await self._translate(model, e) from e

    async def _translate(self, model: str, e: TritonCallError) -> ServiceError:
        """The service's error for a failed call on ``model``.

        No answer is the server gone only when the server is not live any more; a live server that
        does not answer (or answers UNAVAILABLE) does not serve the model now.  Only
        ``TritonUnavailable`` means Triton is gone; ``ModelUnavailable`` names the model; deadlines
        concern one call.
        """
        logger.warning("Triton %s failed: %s %s", model, e.status or "(no answer)", e.text)
        if e.status in (NO_ANSWER, UNAVAILABLE) and not await self.is_live():
            return TritonUnavailable(
                f"Triton Inference Server at {self.url} is unavailable; try again shortly."
            )
        return classify(model, e.status, e.text, self.timeout_s)


def classify(model: str, status: int, text: str, timeout_s: float) -> ServiceError:
    """The service's error for a call on ``model`` that a live server failed with ``status``."""
    if status in (NO_ANSWER, UNAVAILABLE, NOT_FOUND):
        return ModelUnavailable(f"Model '{model}' is not loaded in Triton; try again shortly.", model)
    if status == DEADLINE:
        return ServiceUnavailable(
            f"Model '{model}' did not answer within {timeout_s:g} s; try again shortly.", reason="deadline"
        )
    if status == INTERNAL and _DEAD_STUB.search(text):
        return ModelUnavailable(
            f"Model '{model}' lost its worker process and is being reloaded; try again shortly.",
            model,
            worker_dead=True,
        )
    if is_out_of_memory(text):
        return OutOfMemory()
    return InferenceFailed(f"Inference failed in model '{model}'.")
