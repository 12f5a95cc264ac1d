"""LoRA variants without Triton: source rules, key normalisation, the disk cache, residency races,
the ONNX initializer reader, the pure build, and the python-onnx model's variant sessions."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from export.fixtures.tiny_lora import build_tiny_lora
from export.models.lora import ONNX_PREFIXES, load_graph, onnx_state
from export.models.onnx_weights import initializer_index, read_initializer
from export.models.variant_build import BaseIndex, LoraInput, VariantPlan, plan_variant, write_variant
from export.triton_models.onnx_model import VariantOverrides, requested_variant
from server.errors import BadRequest, InferenceFailed, OutOfMemory, ServiceUnavailable
from server.metrics import Metrics
from server.triton.client import classify
from server.variants.cache import DiskCache, download_entry, variant_entry
from server.variants.residency import ModelPerVariant, ParameterServing, VariantManager
from server.variants.sources import HubPolicy, LoraSources, shown

HUB_OFF = HubPolicy(enabled=False, timeout_s=1, max_bytes=2**20, endpoint="")
MB = 2**20


# --------------------------------------------------------------------------------------------
# sources: only names under the allowed folders


@pytest.fixture
def lora_root(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    (root / "folder").mkdir(parents=True)
    (root / "one.safetensors").write_bytes(b"x")
    (root / "folder" / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (root / "two").mkdir()
    (root / "two" / "a.safetensors").write_bytes(b"x")
    (root / "two" / "b.safetensors").write_bytes(b"x")
    (root / "notes.txt").write_bytes(b"x")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"x")
    (root / "link-out.safetensors").symlink_to(outside)
    (root / "dir-out").symlink_to(tmp_path)
    (root / "link-in.safetensors").symlink_to(root / "one.safetensors")
    return root


def test_only_names_inside_the_folder_resolve(lora_root: Path, tmp_path: Path) -> None:
    sources = LoraSources((lora_root,), HUB_OFF, tmp_path / "downloads")
    one = (lora_root / "one.safetensors").resolve()
    for name in ("one", "one.safetensors", "link-in", "link-in.safetensors"):
        found = sources.local(name)
        assert found is not None and found.file == one, name
    # one file named four ways is one identity
    assert len({sources.local(n).identity for n in ("one", "one.safetensors", "link-in")}) == 1  # type: ignore[union-attr]
    assert sources.local("folder") is not None
    for name in (
        str(lora_root / "one.safetensors"),  # absolute
        "/etc/passwd",
        "../secret",
        "folder/../one",
        "~/one",
        "~root/x",
        "link-out",  # symlink out of the folder
        "dir-out/secret",
        "two",  # several files: not one LoRA
        "notes.txt",
        "notes",
        "missing",
        "",
        " one",
        "a\x00b",
        "x" * 300,
        "./one",
    ):
        assert sources.local(name) is None, name


def test_not_found_message_is_the_contract_one_and_short() -> None:
    from server.variants.sources import not_found

    assert not_found("nope").message == "LoRa repository 'nope' not found"
    long = not_found("/etc/" + "a" * 10_000).message
    assert long.startswith("LoRa repository '/etc/aaa") and len(long) < 120
    assert shown("a\nb") == "a?b"


def test_hub_off_answers_like_a_missing_lora(tmp_path: Path) -> None:
    sources = LoraSources((), HUB_OFF, tmp_path / "downloads")
    with pytest.raises(BadRequest, match=r"^LoRa repository 'someone/lora' not found$"):
        asyncio.run(sources.fetch("someone/lora", lambda n: None))


# --------------------------------------------------------------------------------------------
# the disk cache


def _variant(cache: DiskCache, key: str, nbytes: int) -> None:
    cache.reserve(variant_entry(key), nbytes)
    file = cache.repository / "unet" / "variants" / f"{key}.safetensors"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(b"\0" * nbytes)
    cache.commit_variant(key, {"unet": file}, [])


def _key(i: int) -> str:
    return f"{i:016x}"


def test_cache_deletes_least_recently_used_idle_entries_first(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, tmp_path / "dl", ("unet",), 3 * MB)
    for i in range(3):
        _variant(cache, _key(i), MB)
    cache.touch(variant_entry(_key(0)))  # 1 is now the least recently used
    cache.pin(variant_entry(_key(1)))  # ...but in use
    _variant(cache, _key(3), MB)
    assert cache.names() == [variant_entry(_key(k)) for k in (1, 0, 3)] or set(cache.names()) == {
        variant_entry(_key(k)) for k in (0, 1, 3)
    }
    assert not cache.has(variant_entry(_key(2)))
    assert not (tmp_path / "unet" / "variants" / f"{_key(2)}.safetensors").exists()
    assert cache.used_bytes <= cache.limit_bytes
    # everything pinned: no room (refused: lora_cache_full), nothing deleted
    for name in cache.names():
        cache.pin(name)
    with pytest.raises(ServiceUnavailable) as full:
        cache.reserve(variant_entry(_key(9)), MB)
    assert full.value.reason == "lora_cache_full"
    assert len(cache.names()) == 3
    with pytest.raises(ServiceUnavailable, match="does not fit"):
        cache.reserve(variant_entry(_key(9)), 4 * MB)


def test_a_restart_finds_the_cache_within_its_bound(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, tmp_path / "dl", ("unet",), 10 * MB)
    for i in range(6):
        _variant(cache, _key(i), MB)
        os.utime(tmp_path / "unet" / "lora" / "records" / f"{_key(i)}.json", (1000 + i, 1000 + i))
    (tmp_path / "unet" / "variants" / ".stale.partial").write_bytes(b"x")
    (tmp_path / "unet" / "variants" / f"{_key(99)}.safetensors").write_bytes(b"x")  # no record
    (tmp_path / "dl" / "owner--name").mkdir(parents=True)
    (tmp_path / "dl" / "owner--name" / "w.safetensors").write_bytes(b"\0" * MB)
    (tmp_path / "dl" / ".owner--x.partial").mkdir()
    restarted = DiskCache(tmp_path, tmp_path / "dl", ("unet",), int(3.5 * MB))
    restarted.scan()
    assert restarted.used_bytes <= restarted.limit_bytes
    # the oldest variants went first; the download (newest) stayed
    assert restarted.names() == [
        variant_entry(_key(4)),
        variant_entry(_key(5)),
        download_entry("owner--name"),
    ]
    left = sorted(p.name for p in (tmp_path / "unet" / "variants").iterdir())
    assert left == [f"{_key(4)}.safetensors", f"{_key(5)}.safetensors"]
    assert not (tmp_path / "dl" / ".owner--x.partial").exists()
    assert restarted.variant(_key(5)) is not None and restarted.variant(_key(0)) is None


# --------------------------------------------------------------------------------------------
# residency: in use before any eviction can see it; the resident bound


class FakeTriton:
    """Records loads and unloads; a load can be held open to force an interleaving."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.hold: dict[str, asyncio.Event] = {}
        self.events: list[str] = []

    async def load_model(self, name: str) -> None:
        self.events.append(f"load {name}")
        if name in self.hold:
            await self.hold[name].wait()
        self.loaded.add(name)

    async def unload_model(self, name: str) -> None:
        self.events.append(f"unload {name}")
        self.loaded.discard(name)


class OutOfMemoryTriton(FakeTriton):
    """Loads fail as Triton's TensorRT backend fails them when the GPU is full (its execution contexts
    are allocated at load): at most ``capacity`` variant models fit at once."""

    LOAD_FAILURE = (
        "load failed for model '{name}': version 1 is at UNAVAILABLE state: Internal: unable to "
        "create TensorRT context: [executionContext.cpp::initializeExecutionContext::...] Error Code 1: "
        "Cuda Runtime (out of memory)"
    )

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    async def load_model(self, name: str) -> None:
        self.events.append(f"load {name}")
        if len(self.loaded) >= self.capacity:
            # What TritonClient.load_model raises for Triton's 400 answer with that text.
            raise classify(name, 400, self.LOAD_FAILURE.format(name=name), 30)
        self.loaded.add(name)


def _fake_repository(root: Path, loras: int) -> tuple[Path, Path]:
    repo = root / "repo"
    for model in ("unet", "text_encoder"):
        (repo / model).mkdir(parents=True)
        (repo / model / ".export.json").write_text("{}")
    lora_dir = root / "loras"
    lora_dir.mkdir()
    for i in range(loras):
        (lora_dir / f"l{i}.safetensors").write_bytes(b"x")
    return repo, lora_dir


def _manager(
    tmp_path: Path, serving: object, max_resident: int, cache_bytes: int = 100 * MB
) -> tuple[VariantManager, DiskCache]:
    repo, lora_dir = _fake_repository(tmp_path, 8)
    cache = DiskCache(repo, repo / "dl", ("unet", "text_encoder"), cache_bytes)
    manager = VariantManager(
        repo,
        ("text_encoder",),
        LoraSources((lora_dir,), HUB_OFF, repo / "dl"),
        cache,
        serving,  # type: ignore[arg-type]
        Metrics().model("m"),
        max_resident,
        1,
    )

    async def fake_build(lora_set: object) -> object:  # no real merge: residency is under test
        key = lora_set.key  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
        file = repo / "unet" / "variants" / f"{key}.safetensors"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(b"\0" * 10)
        cache.reserve(variant_entry(key), 10)
        return cache.commit_variant(key, {"unet": file}, [])

    manager._build = fake_build  # type: ignore[method-assign]
    return manager, cache


def test_weights_and_ids_are_normalised_in_the_key(tmp_path: Path) -> None:
    manager, _ = _manager(tmp_path, ParameterServing(), 4)
    lora_dir = tmp_path / "loras"
    (lora_dir / "alias.safetensors").symlink_to(lora_dir / "l0.safetensors")

    async def key(loras: dict[str, float]) -> str:
        async with manager.use(loras) as models:
            return models.key

    async def run() -> None:
        assert await key({"l0": 0.5}) == await key({"l0": 0.5000000000000001})
        names = ("l0", "l0.safetensors", "alias", "alias.safetensors")
        assert len({await key({n: 0.5}) for n in names}) == 1
        # the same file twice adds up, as diffusers' two adapters would
        assert await key({"l0": 0.25, "alias": 0.25}) == await key({"l0": 0.5})
        assert await key({"l0": 0.5}) != await key({"l0": 0.6})
        async with manager.use({"l0": 1e-9}) as models:  # rounds to 0: the base model
            assert models.key == "" and models.parameters == {}

    asyncio.run(run())


def test_a_variant_in_use_is_never_evicted_between_its_load_and_its_use(tmp_path: Path) -> None:
    triton = FakeTriton()
    prepared: list[str] = []

    async def prepare(model: str, key: str, overrides: Path) -> None:
        prepared.append(f"{model}__{key}")

    manager, _ = _manager(tmp_path, ModelPerVariant(lambda: triton, prepare), max_resident=2)
    violations: list[str] = []
    resident_max = 0

    async def request(i: int, hold_s: float) -> None:
        nonlocal resident_max
        async with manager.use({f"l{i % 5}": 1.0}) as models:
            # the load finished and the model is there for the whole use
            for _ in range(3):
                if models.denoiser not in triton.loaded:
                    violations.append(f"{models.denoiser} not loaded while in use")
                resident_max = max(resident_max, len(triton.loaded), len(manager.loaded()))
                await asyncio.sleep(hold_s)

    async def run() -> None:
        # the interleaving: variant A's load is held open while B and C arrive; A is marked in use
        # before its load, so neither B's nor C's eviction can take it
        first = manager.use({"l0": 1.0})
        a_key_task = asyncio.create_task(request(0, 0.01))
        await asyncio.sleep(0.05)
        others = [asyncio.create_task(request(i, 0.002 * (i % 3))) for i in range(1, 30)]
        await asyncio.gather(a_key_task, *others)
        del first

    asyncio.run(run())
    assert not violations, violations[:3]
    assert resident_max <= 2
    # every unload was of a variant nobody used at that moment (checked above); some happened
    assert any(e.startswith("unload") for e in triton.events)
    assert manager.in_use() == {}


def test_held_load_does_not_let_others_evict_it(tmp_path: Path) -> None:
    """The exact interleaving of the old LRU race: A loads, B (bound 1) arrives while A's load is
    under way; B must wait for A's use to end instead of unloading A before A runs."""
    triton = FakeTriton()

    async def prepare(model: str, key: str, overrides: Path) -> None:
        return None

    manager, _ = _manager(tmp_path, ModelPerVariant(lambda: triton, prepare), max_resident=1)
    order: list[str] = []

    async def use(name: str, started: asyncio.Event | None = None) -> None:
        async with manager.use({name: 1.0}) as models:
            order.append(f"use {name} loaded={models.denoiser in triton.loaded}")
            if started is not None:
                started.set()
            await asyncio.sleep(0.02)
            order.append(f"end {name} loaded={models.denoiser in triton.loaded}")

    async def run() -> None:
        a = asyncio.create_task(use("l0"))
        while not any(e.startswith("load") for e in triton.events):
            await asyncio.sleep(0.001)
        b = asyncio.create_task(use("l1"))
        await asyncio.gather(a, b)

    asyncio.run(run())
    assert order == ["use l0 loaded=True", "end l0 loaded=True", "use l1 loaded=True", "end l1 loaded=True"]


def test_distinct_variants_in_use_stay_within_the_bound(tmp_path: Path) -> None:
    manager, _ = _manager(tmp_path, ParameterServing(), max_resident=3)
    peak = 0

    async def request(i: int) -> None:
        nonlocal peak
        async with manager.use({f"l{i % 7}": 1.0 + i % 2}):
            peak = max(peak, len(manager.in_use()), len(manager.loaded()))
            await asyncio.sleep(0.005)

    async def run() -> None:
        await asyncio.gather(*(request(i) for i in range(40)))

    asyncio.run(run())
    assert 1 < peak <= 3


# --------------------------------------------------------------------------------------------
# the ONNX reader and the pure build, on the tiny exported model


def test_initializer_index_reads_what_onnx_reads(repository: Callable[[str], Path]) -> None:
    path = repository("sd") / "unet" / "1" / "model.onnx"
    index = initializer_index(path)
    expected = onnx_state(load_graph(path), "")
    assert set(index) == set(expected)
    names = sorted(index)[:: max(1, len(index) // 25)]
    for name in names:
        np.testing.assert_array_equal(read_initializer(index[name]), expected[name].numpy())


@pytest.fixture
def sd_copy(tmp_path: Path, repository: Callable[[str], Path]) -> Path:
    """A copy of the session's tiny SD repository that a test may write variants into."""
    repo = tmp_path / "repo"
    shutil.copytree(repository("sd"), repo, symlinks=True)
    return repo


def _kohya_unet_plan(repo: Path, tmp_path: Path, tiny_model: Callable[[str], Path], seed: int) -> VariantPlan:
    """The plan of a kohya LoRA (strength 0.7) on the UNet of ``repo``."""
    lora = build_tiny_lora("sd", tmp_path / "lora.safetensors", "kohya", seed, model_dir=tiny_model("sd"))
    return plan_variant(BaseIndex(repo), ("unet",), [LoraInput(lora, "x", 0.7)])


def test_build_writes_only_the_touched_tensors(
    tmp_path: Path, sd_copy: Path, tiny_model: Callable[[str], Path]
) -> None:
    repo = sd_copy
    lora = build_tiny_lora(
        "sd", tmp_path / "lora", "diffusers", 3, model_dir=tiny_model("sd"), text_encoder=True
    )
    inputs = [LoraInput(lora / "pytorch_lora_weights.safetensors", "x", 0.7)]
    plan = plan_variant(BaseIndex(repo), ("unet", "text_encoder"), inputs)
    files = write_variant(repo, "0123456789abcdef", plan)
    assert set(files) == {"unet", "text_encoder"}
    size = sum(f.stat().st_size for f in files.values())
    assert plan.tensor_bytes() <= size <= min(1.2 * plan.tensor_bytes(), plan.file_bytes_bound())
    # the same merge as from the fully loaded graph
    full = onnx_state(repo / "unet" / "1" / "model.onnx", ONNX_PREFIXES["unet"])
    from export.models.lora import load_lora, merge_deltas

    expected = merge_deltas(full, [(load_lora(inputs[0].file), 0.7)], "unet")
    from safetensors.torch import load_file

    written = load_file(str(files["unet"]))
    assert set(written) == set(expected)
    for name, value in expected.items():
        assert written[name].equal(value)
    assert len(written) < len(full) / 3


def test_a_build_holds_a_few_weights_not_the_variant(
    tmp_path: Path, sd_copy: Path, tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed build's memory bound: when a weight is merged, at most ``threads`` merged weights
    are alive (those being written), however many the variant changes."""
    import threading
    import weakref

    import export.models.variant_build as variant_build

    plan = _kohya_unet_plan(sd_copy, tmp_path, tiny_model, 5)
    merged: list[weakref.ref] = []
    most_alive = 0
    lock = threading.Lock()
    real = variant_build.merged_weight

    def tracked(*args, **kwargs):
        nonlocal most_alive
        with lock:
            most_alive = max(most_alive, sum(ref() is not None for ref in merged))
        weight = real(*args, **kwargs)
        with lock:
            merged.append(weakref.ref(weight))
        return weight

    monkeypatch.setattr(variant_build, "merged_weight", tracked)
    write_variant(sd_copy, "fedcba9876543210", plan, threads=2)
    assert len(merged) == len(plan.terms["unet"]) > 50
    assert most_alive <= 2


def test_a_build_that_fails_midway_leaves_no_file(
    tmp_path: Path, sd_copy: Path, tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed build writes into a temporary file: a failure on one tensor (here the third)
    removes it, and no variant file appears."""
    import export.models.variant_build as variant_build

    repo = sd_copy
    plan = _kohya_unet_plan(repo, tmp_path, tiny_model, 4)
    assert len(plan.terms["unet"]) > 3
    calls = 0
    real = variant_build.merged_weight

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(variant_build, "merged_weight", failing)
    folder = repo / "unet" / "variants"  # the shared repository may hold other tests' variants
    before = set(folder.iterdir()) if folder.is_dir() else set()
    with pytest.raises(OSError, match="No space left"):
        write_variant(repo, "0123456789abcdef", plan)
    assert calls >= 3
    assert set(folder.iterdir()) == before


# --------------------------------------------------------------------------------------------
# the python-onnx model's variant sessions (model.py with a stand-in for Triton's utilities)


def test_model_serves_variants_from_one_overridable_session_within_the_bound(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from safetensors.numpy import save_file

    weight = np.eye(3, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "unet.lin.weight"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(weight, "unet.lin.weight")],
    )
    model_path = tmp_path / "1" / "model.onnx"
    model_path.parent.mkdir()
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(model_path))
    folder = tmp_path / "variants"
    folder.mkdir()
    for i in range(3):
        save_file(
            {"lin.weight": weight * (i + 2)},
            str(folder / f"{_key(i)}.safetensors"),
            metadata={"onnx_prefix": "unet."},
        )
    save_file(
        {"nope.weight": weight}, str(folder / f"{_key(5)}.safetensors"), metadata={"onnx_prefix": "unet."}
    )
    variants = VariantOverrides(folder, model_path, ort.SessionOptions, 2)
    base = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.ones((1, 3), dtype=np.float32)
    sessions = set()
    for i in (0, 1, 0, 2, 1):
        session, overrides = variants.get(_key(i))
        sessions.add(id(session))
        (y,) = session.run(["y"], {"x": x, **overrides})
        np.testing.assert_allclose(y, x * (i + 2))
        assert len(variants.open) <= 2
        (y,) = base.run(["y"], {"x": x})  # the base session is untouched
        np.testing.assert_allclose(y, x)
    assert len(sessions) == 1  # one session for every variant
    assert list(variants.open) == [_key(2), _key(1)]
    assert sorted(os.listdir(tmp_path / "1")) == ["model.onnx"]  # nothing written for inline weights
    with pytest.raises(FileNotFoundError):
        variants.get(_key(7))
    with pytest.raises(ValueError, match="not a weight of this model"):
        variants.get(_key(5))
    preloaded = VariantOverrides(folder, model_path, ort.SessionOptions, 2)
    preloaded.preload()  # LORA_PRELOAD: opened in the background at start, not on the first variant
    preloaded._opening.result(timeout=60)
    preloaded._overridable_session = lambda: pytest.fail("the preloaded session was opened again")
    session, overrides = preloaded.get(_key(1))
    (y,) = session.run(["y"], {"x": x, **overrides})
    np.testing.assert_allclose(y, x * 3)
    assert preloaded.overridable == variants.overridable
    assert requested_variant("{}") == ""
    assert requested_variant(json.dumps({"lora_variant": _key(1)})) == _key(1)
    for bad in ("../../etc", "ABCDEF0123456789", 5):
        with pytest.raises(ValueError):
            requested_variant(json.dumps({"lora_variant": bad}))


def test_hub_downloads_are_one_safetensors_file_within_the_size_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LORA_MAX_MB and safetensors-only, decided from the Hub's file list before any download."""
    from huggingface_hub import HfApi

    listings = {
        "o/big": [("pytorch_lora_weights.safetensors", 3 * MB)],
        "o/pickle": [("adapter_model.bin", 10)],
        "o/several": [("a.safetensors", 10), ("b.safetensors", 10)],
        "o/ok": [("pytorch_lora_weights.safetensors", 10), ("extra.safetensors", 10), ("x.bin", 10)],
    }

    def model_info(self: object, repo_id: str, **kwargs: object) -> object:
        if repo_id not in listings:
            raise OSError("404")
        siblings = [types.SimpleNamespace(rfilename=n, size=s) for n, s in listings[repo_id]]
        return types.SimpleNamespace(siblings=siblings)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    hub = HubPolicy(enabled=True, timeout_s=5, max_bytes=2 * MB, endpoint="http://127.0.0.1:9")
    sources = LoraSources((), hub, tmp_path / "downloads")
    assert sources._hub_file("o/ok") == (10, "pytorch_lora_weights.safetensors")
    with pytest.raises(BadRequest, match=r"larger than this service's limit of 2 MB"):
        sources._hub_file("o/big")
    for repo in ("o/pickle", "o/several"):
        with pytest.raises(BadRequest, match=r"holds no single \.safetensors"):
            sources._hub_file(repo)
    with pytest.raises(BadRequest, match=r"^LoRa repository 'o/missing' not found$"):
        sources._hub_file("o/missing")
    reserved: list[int] = []
    with pytest.raises(BadRequest, match="larger than"):
        asyncio.run(sources.fetch("o/big", reserved.append))
    assert reserved == []  # refused before the disk cache was asked for room
    sources.close()


def test_load_failures_of_tensorrt_are_out_of_memory_only_where_they_are() -> None:
    assert isinstance(
        classify("unet__k", 400, OutOfMemoryTriton.LOAD_FAILURE.format(name="unet__k"), 30), OutOfMemory
    )
    # A context that could not be created: its creation is its allocation, whatever the last log line.
    assert isinstance(classify("unet__k", 400, "unable to create TensorRT context: ", 30), OutOfMemory)
    enqueue = classify("unet", 500, "unable to enqueue for inference unet", 30)
    assert isinstance(enqueue, InferenceFailed) and not isinstance(enqueue, OutOfMemory)
    assert str(enqueue) == "Inference failed in model 'unet'."


async def _noop_prepare(model: str, key: str, overrides: Path) -> None:
    return None


def test_out_of_memory_at_load_evicts_the_lru_idle_variant_and_retries_once(tmp_path: Path) -> None:
    triton = OutOfMemoryTriton(capacity=2)
    manager, _ = _manager(tmp_path, ModelPerVariant(lambda: triton, _noop_prepare), max_resident=3)

    async def use(name: str) -> str:
        async with manager.use({name: 1.0}) as models:
            assert models.denoiser in triton.loaded
            return models.denoiser

    async def run() -> list[str]:
        return [await use("l0"), await use("l1"), await use("l0"), await use("l2")]

    first, second, _, third = asyncio.run(run())
    # l1 is the least recently used idle variant when l2 does not fit: it goes, l2 loads on the retry
    assert triton.loaded == {first, third}
    assert triton.events[-3:] == [f"load {third}", f"unload {second}", f"load {third}"]
    assert [m.denoiser for m in manager.loaded()] == [first, third]


def test_out_of_memory_at_load_without_an_idle_variant_is_the_contract_500(tmp_path: Path) -> None:
    triton = OutOfMemoryTriton(capacity=1)
    manager, _ = _manager(tmp_path, ModelPerVariant(lambda: triton, _noop_prepare), max_resident=2)

    async def run() -> None:
        async with manager.use({"l0": 1.0}) as held:
            with pytest.raises(
                OutOfMemory, match=r"^Out of memory error\. Try reducing output image resolution\.$"
            ):
                async with manager.use({"l1": 1.0}):
                    pass
            assert triton.loaded == {held.denoiser}, "the variant in use stays; nothing of l1 is left loaded"
        assert [m.key for m in manager.loaded()] == [held.key]
        # l0 is idle now: l1 evicts it on its retry and loads
        async with manager.use({"l1": 1.0}) as models:
            assert triton.loaded == {models.denoiser}
        # a second failure after the eviction is the 500 too, and leaves nothing half loaded
        triton.capacity = 0
        with pytest.raises(OutOfMemory):
            async with manager.use({"l2": 1.0}):
                pass
        assert triton.loaded == set() and manager.loaded() == []

    asyncio.run(run())
