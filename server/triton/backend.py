"""Triton as the back end sees it: a client, and the bundled tritonserver when no ``TRITON_URL`` is set.

:class:`TritonBackend` connects (starting the bundled server, and starting it again when it died),
answers whether the server is live and which models do not serve (:meth:`TritonBackend.check_health`),
and loads models again through the repository API (:meth:`TritonBackend.reload`).  It knows nothing of
the service's status: the supervisor (``server/supervisor.py``) decides what a failure means.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server import hardware
from server.errors import ServiceError, ServiceUnavailable, TritonUnavailable
from server.settings import Settings, triton_address
from server.triton.client import TritonClient
from server.triton.launcher import BundledTriton, TritonLaunchConfig, system_tritonserver

logger = logging.getLogger(__name__)


def tritonserver_environment(
    settings: Settings, vae_scale_factor: int, lora_models: Sequence[str]
) -> dict[str, str]:
    """What the bundled tritonserver's python models read from its environment."""
    return {
        # model.py runs a bigger dynamic batch in chunks (it sees latents, not images).
        "T2I_MAX_BATCH_LATENT_PIXELS": str(max(1, settings.max_batch_pixels // vae_scale_factor**2)),
        "T2I_LORA_PRELOAD": ",".join(lora_models) if settings.lora_preload else "",
        "T2I_MEMORY_RELEASE_S": str(settings.memory_release_s),
    }


TRITON_METRICS_PORT = 8002  # Triton's default, where a remote Triton serves its metrics
_METRICS_TIMEOUT_S = 5.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def gpu_memory_metric(url: str) -> int | None:
    """The sum of ``nv_gpu_memory_used_bytes`` on Triton's metrics page ``url`` (None: none there)."""
    try:
        with _NO_PROXY.open(url, timeout=_METRICS_TIMEOUT_S) as response:
            text = response.read().decode()
    except (OSError, ValueError) as e:
        logger.info("no GPU memory metric from %s: %s", url, e)
        return None
    samples = [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "nv_gpu_memory_used_bytes"
        for sample in family.samples
    ]
    return int(sum(samples)) if samples else None


class TritonBackend:
    """The Triton server the service calls: remote (``TRITON_URL``) or bundled (started here)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: TritonClient | None = None
        self.triton: BundledTriton | None = None
        self._no_gpu_metric: TritonClient | None = None  # the client whose server has no GPU metric

    @property
    def url(self) -> str:
        return self.client.url if self.client is not None else self.settings.triton_url

    def require_client(self) -> TritonClient:
        """The client now (it changes when the bundled Triton starts again)."""
        if self.client is None:
            raise ServiceUnavailable("The inference server is unavailable; try again shortly.")
        return self.client

    @property
    def connected(self) -> bool:
        """A client to a server that runs: remote, once made; bundled, while its process runs."""
        if self.settings.triton_url:
            return self.client is not None
        return self.triton is not None and self.triton.is_running()

    async def connect(
        self,
        environment: Mapping[str, str],
        load_models: Sequence[str],
        repository: Path | None = None,
        load_all: bool = True,
    ) -> None:
        """Have a client, unless :attr:`connected` already; start the bundled Triton (serving
        ``repository``, MODEL_REPOSITORY by default, with ``environment``, loading ``load_models``:
        everything when empty and ``load_all``) when none runs, or again when it exited.  A server
        started here holds only those models."""
        if self.connected:
            return
        if self.settings.triton_url:
            self.client = self._client(self.settings.triton_url)
            return
        if self.triton is not None:
            logger.warning("the bundled Triton exited; starting it again (log: %s)", self.triton.log_path)
            await asyncio.to_thread(self.triton.stop)
        if self.client is not None:
            await self.client.close()
            self.client = None
        config = TritonLaunchConfig(
            model_repository=(repository or self.settings.model_repository).resolve(),
            state_dir=self.settings.state_dir.resolve(),
            startup_timeout_s=self.settings.startup_timeout_s,
            # Explicit control: the base models load at start; LoRA variants load and unload on demand.
            explicit_model_control=True,
            load_models=tuple(load_models),
            load_all=load_all,
            # Triton's GPU memory metric measures each model's load (server/registry.py).
            metrics=bool(hardware.gpu_devices(stats=False)),
            binary=system_tritonserver(self.settings.tritonserver),
            environment=dict(environment),
        )
        self.triton = BundledTriton(config)
        await asyncio.to_thread(self.triton.start)
        self.client = self._client(self.triton.http_url)

    def _client(self, url: str) -> TritonClient:
        return TritonClient(
            url, self.settings.triton_timeout_s, share_inputs=self.settings.triton_shared_memory
        )

    async def check_health(self, models: Sequence[str], suspects: Collection[str] = ()) -> list[str]:
        """Raise :class:`TritonUnavailable` unless the server is live; return the ``models`` that do
        not serve: not ready, found broken by a request (``suspects``), or (bundled Triton) a
        python-backend model without a live stub, which Triton itself does not notice."""
        client = self.require_client()
        reason = await client.not_live()
        if reason:
            raise TritonUnavailable(f"Triton at {client.url} is not reachable: {reason}")
        stubs = await asyncio.to_thread(self.triton.model_stubs) if self.triton is not None else None
        broken = []
        for name in models:
            ready = await client.model_ready(name)
            if ready and stubs is None:
                ready = name not in suspects  # a remote Triton: what a request found is all we know
            elif ready and stubs is not None and not stubs.get(name):  # the bundled one: its stubs tell
                ready = await client.backend(name) != "python"
            if not ready:
                broken.append(name)
        return broken

    async def reload(self, names: Sequence[str]) -> None:
        """Load the models ``names`` again through the repository API; raise if they do not come back
        (a bundled Triton that cannot load one is stopped, so the next check starts it again)."""
        client = self.require_client()
        for name in names:
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.settings.startup_timeout_s):
                    # Loading a model whose files did not change is a no-op for Triton (its dead stub
                    # stays): unload it first, so it really loads again.
                    await client.unload_model(name)
                    await client.load_model(name)
            except (ServiceError, TimeoutError) as e:
                reason = e.message if isinstance(e, ServiceError) else "timed out"
                if self.triton is not None:
                    logger.error("model %s could not be loaded again (%s): restarting Triton", name, reason)
                    await asyncio.to_thread(self.triton.stop)
                raise ServiceUnavailable(f"model '{name}' could not be loaded again: {reason}") from e
            logger.warning("model %s loaded again in %.1f s", name, time.perf_counter() - started)
        missing = [n for n in names if not await client.model_ready(n)]
        if missing:
            raise ServiceUnavailable(f"Triton at {client.url} has not loaded: {', '.join(missing)}")

    async def stub_memory(self, models: Collection[str]) -> int | None:
        """Resident memory of the bundled Triton's python-backend stubs serving ``models`` (where a
        python-backend model holds its weights); None for a remote Triton."""
        if self.triton is None:
            return None
        return await asyncio.to_thread(self.triton.stub_memory, models)

    async def gpu_memory_used(self) -> int | None:
        """GPU memory in use on Triton's GPUs, from Triton's own metric (``nv_gpu_memory_used_bytes``,
        summed over its GPUs); None where Triton reports none (no GPU, or its metrics off: then not
        asked again until the next server)."""
        url = self.triton.metrics_url if self.triton is not None else None
        if url is None and self.settings.triton_url:
            host, _ = triton_address(self.settings.triton_url)
            url = f"http://{host}:{TRITON_METRICS_PORT}/metrics"
        if url is None or self.client is None or self._no_gpu_metric is self.client:
            return None
        used = await asyncio.to_thread(gpu_memory_metric, url)
        if used is None:
            self._no_gpu_metric = self.client
        return used

    async def remove_orphaned_regions(self) -> None:
        """The shared-memory regions of the bundled Triton's stubs that were killed."""
        if self.triton is not None:
            await asyncio.to_thread(self.triton.remove_orphaned_regions)

    async def stop(self) -> None:
        """Stop the bundled Triton (nothing when remote); the next :meth:`connect` starts it again."""
        if self.triton is not None:
            await asyncio.to_thread(self.triton.stop)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        await self.stop()
