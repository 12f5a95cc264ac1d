"""The TensorRT path up to its first TensorRT call, on a host with no GPU and no tensorrt package:
profiles over every dynamic axis of every family, checked before any export; builder flags per model
(fp32 graphs without TF32) applied by the build to a fake ``tensorrt`` module that records each call;
``t2i-export --target tensorrt --plan`` for the tiny SD, SDXL, SD3 and FLUX models; and a build (fake
TensorRT) that consumes exactly the plan that ``--plan`` printed.
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from export.contract import engines, specs
from export.contract.specs import MANIFEST_FILE
from export.models.modules import components
from export.models.onnx_weights import initializer_index
from export.models.safety import model_safety_checker
from export.models.source import ModelSource
from export.toolchain import engine_memory, tensorrt, tensorrt_plan
from export.toolchain.cli import main as export_main
from export.toolchain.options import RepositoryOptions
from export.toolchain.repository import PLAN_FILE, engine_plan, export_repository

FAMILIES = ("sd", "sdxl", "sd3", "flux")


def _engine_parts(source: ModelSource, max_batch: int = 4) -> list[specs.ModelSpec]:
    parts = [c.spec for c in components(source)]
    checker = model_safety_checker(source.path)
    if checker is not None:
        parts.append(checker.component().spec)
    return [tensorrt_plan.engine_spec(s, max_batch) for s in parts]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_dynamic_axis_of_every_input_gets_min_opt_max(
    family: str, tiny_model: Callable[[str], Path]
) -> None:
    source = ModelSource(tiny_model(family))
    resolutions = (*engines.default_resolutions(source.default_size), engines.Resolution(512, 256))
    covered: set[str] = set()
    for spec in _engine_parts(source):
        profiles = tensorrt_plan.engine_profiles(spec, resolutions, source.vae_scale_factor)
        assert len(profiles) == (len(resolutions) if tensorrt_plan.has_resolution(spec) else 1)
        for profile in profiles:
            assert set(profile.shapes) == {t.name for t in spec.inputs}
            for t in spec.inputs:
                low, opt, high = profile.shapes[t.name]
                for position, axis in t.dynamic_axes().items():
                    covered.add(axis)
                    allowed = spec.axes[axis]
                    assert allowed.min <= low[position] <= opt[position] <= high[position] <= allowed.max
                    if axis not in specs.RESOLUTION_AXES:  # batch, sequence, text_length: the whole range
                        assert (low[position], opt[position], high[position]) == (
                            allowed.min,
                            allowed.opt,
                            allowed.max,
                        )
                    else:  # fixed by the profile's bucket
                        assert low[position] == opt[position] == high[position]
    expected = {"sd": {"batch", "height", "width"}, "sdxl": {"batch", "height", "width"}}
    expected["sd3"] = {"batch", "height", "width", "sequence", "text_length"}
    expected["flux"] = {"batch", "image_tokens", "sequence", "text_length"}
    assert expected[family] <= covered


def test_flux_image_tokens_follow_the_bucket(tiny_model: Callable[[str], Path]) -> None:
    source = ModelSource(tiny_model("flux"))
    (transformer,) = [s for s in _engine_parts(source) if s.name == specs.TRANSFORMER]
    (profile,) = tensorrt_plan.engine_profiles(
        transformer, [engines.Resolution(512, 256)], source.vae_scale_factor
    )
    tokens = (256 // source.vae_scale_factor // 2) * (512 // source.vae_scale_factor // 2)
    assert profile.shapes["hidden_states"][0][1] == tokens == profile.shapes["img_ids"][2][1]
    assert (
        profile.shapes["txt_ids"][0][1] == 1 and profile.shapes["txt_ids"][2][1] == specs.T5_TOKEN_RANGE_MAX
    )


def test_a_profile_outside_the_model_fails(tiny_model: Callable[[str], Path]) -> None:
    source = ModelSource(tiny_model("sd"))
    (unet,) = [s for s in _engine_parts(source) if s.name == specs.UNET]
    with pytest.raises(tensorrt_plan.ProfileError, match="height"):
        tensorrt_plan.engine_profiles(unet, [engines.Resolution(4096, 4096)], source.vae_scale_factor)
    good = tensorrt_plan.engine_profiles(unet, [engines.Resolution(512, 512)], source.vae_scale_factor)[0]
    broken = replace(good, shapes={k: v for k, v in good.shapes.items() if k != "timestep"})
    with pytest.raises(tensorrt_plan.ProfileError, match="timestep"):
        tensorrt_plan.check_profiles(unet, [broken])
    sample = good.shapes["sample"]
    reversed_batch = replace(good, shapes={**good.shapes, "sample": (sample[2], sample[1], sample[0])})
    with pytest.raises(tensorrt_plan.ProfileError, match="not ascending"):
        tensorrt_plan.check_profiles(unet, [reversed_batch])


@pytest.mark.parametrize("plan_only", [True, False])
def test_profiles_are_checked_before_any_model_is_exported(
    plan_only: bool, tmp_path: Path, tiny_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    exported: list[str] = []
    monkeypatch.setattr(
        "export.toolchain.repository.export_onnx", lambda module, spec, *a: exported.append(spec.name)
    )
    monkeypatch.setattr(tensorrt, "current_host", lambda gpus=(): engines.EngineHost("Fake GPU", "9.0", "10"))
    options = RepositoryOptions(
        target="tensorrt",
        plan_only=plan_only,
        engine=tensorrt_plan.EngineOptions(resolutions=(engines.Resolution(4096, 4096),)),
    )
    with pytest.raises(tensorrt_plan.ProfileError):
        export_repository(str(tiny_model("sd")), tmp_path / "repo", options)
    assert exported == []


# --------------------------------------------------------------------------------------------------
# A fake tensorrt module: the TensorRT 10 Python API calls the build makes, recorded
# --------------------------------------------------------------------------------------------------


@dataclass
class FakeTensorRT:
    network_flags: list[int] = field(default_factory=list)
    set_flags: list[str] = field(default_factory=list)
    cleared_flags: list[str] = field(default_factory=list)
    profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = field(default_factory=list)
    workspace: list[int] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        record = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = "10.13.2.6"  # type: ignore[attr-defined]

        class Enum:
            def __init__(self, name: str, members: dict[str, int]) -> None:
                self.__name__ = name
                for key, value in members.items():
                    setattr(self, key, _Flag(key, value))

        trt.NetworkDefinitionCreationFlag = Enum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 5})  # type: ignore[attr-defined]
        trt.BuilderFlag = Enum("BuilderFlag", {"FP16": 0, "REFIT": 4, "TF32": 6, "BF16": 17})  # type: ignore[attr-defined]
        trt.MemoryPoolType = Enum("MemoryPoolType", {"WORKSPACE": 0})  # type: ignore[attr-defined]

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                pass

        class IProgressMonitor:
            def __init__(self) -> None:
                pass

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

            def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
                self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

        class TimingCache:
            def serialize(self) -> bytes:
                return b"cache"

        class Config:
            progress_monitor = None

            def set_memory_pool_limit(self, pool: Any, size: int) -> None:
                record.workspace.append(size)

            def set_flag(self, flag: _Flag) -> None:
                record.set_flags.append(flag.name)

            def clear_flag(self, flag: _Flag) -> None:
                record.cleared_flags.append(flag.name)

            def add_optimization_profile(self, profile: Profile) -> None:
                record.profiles.append(profile.shapes)

            def create_timing_cache(self, data: bytes) -> TimingCache:
                return TimingCache()

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> TimingCache:
                return TimingCache()

        class Builder:
            def __init__(self, logger: Logger) -> None:
                pass

            def create_network(self, flags: int) -> object:
                record.network_flags.append(flags)
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: Config) -> bytes:
                return b"fake engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network: object, logger: Logger) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                return Path(path).is_file()

        for name, value in dict(locals()).items():
            if isinstance(value, type) and name not in {"Enum", "Profile", "TimingCache", "Config"}:
                setattr(trt, name, value)
        return trt


@dataclass(frozen=True)
class _Flag:
    name: str
    value: int

    def __int__(self) -> int:
        return self.value


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTensorRT]:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module())
    yield fake


def _fake_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"onnx")
    return path


@pytest.mark.parametrize(
    ("precision", "refittable", "set_flags", "cleared"),
    [("fp16", True, ["REFIT"], []), ("fp16", False, [], []), ("fp32", False, [], ["TF32"])],
)
def test_build_applies_the_plans_flags(
    fake_trt: FakeTensorRT,
    tmp_path: Path,
    precision: str,
    refittable: bool,
    set_flags: list[str],
    cleared: list[str],
) -> None:
    unet = tensorrt_plan.engine_spec(
        specs.unet_spec(
            in_channels=4, out_channels=4, cross_attention_dim=64, latent_range=specs.AxisRange(8, 32, 128)
        ),
        max_batch=4,
    )
    profiles = tuple(tensorrt_plan.engine_profiles(unet, [engines.Resolution(512, 512)], 8))
    plan = tensorrt_plan.EnginePlan(
        name="unet",
        precision=precision,
        precision_reason="test",
        flags=tensorrt_plan.build_flags(precision, refittable),  # type: ignore[arg-type]
        profiles=profiles,
        config="",
        workspace_bytes=1 << 30,
    )
    tensorrt.build_engine(
        _fake_onnx(tmp_path), tmp_path / "model.plan", plan, timing_cache=tmp_path / "cache"
    )
    assert fake_trt.network_flags == [1 << 5]  # strongly typed
    assert fake_trt.set_flags == set_flags and fake_trt.cleared_flags == cleared
    assert "FP16" not in fake_trt.set_flags  # strongly typed networks take the graph's types
    assert fake_trt.profiles == [dict(p.shapes) for p in profiles]
    assert fake_trt.workspace == [1 << 30]
    assert (tmp_path / "model.plan").read_bytes() == b"fake engine"


def test_fp32_parts_are_built_without_tf32(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    """The SDXL VAE with force_upcast and the safety checker are fp32 graphs: TF32 cleared; the fp16
    models keep TensorRT's default (their graphs have no fp32 math to round)."""
    folder = tmp_path / "sdxl-upcast"
    import shutil

    shutil.copytree(tiny_model("sdxl"), folder)
    vae_config = folder / "vae" / "config.json"
    vae_config.write_text(json.dumps({**json.loads(vae_config.read_text()), "force_upcast": True}))
    source = ModelSource(folder)
    options = RepositoryOptions(target="tensorrt", precision="fp16", engine=tensorrt_plan.EngineOptions(
        resolutions=engines.default_resolutions(source.default_size)
    ))  # fmt: skip
    flags = {}
    for component in components(source):
        part = replace(component, spec=tensorrt_plan.engine_spec(component.spec, 4))
        plan = engine_plan(part, source, source.vae_scale_factor, options)
        flags[plan.name] = (plan.precision, plan.flags)
    checker = model_safety_checker(tiny_model("sd"))
    assert checker is not None
    plan = engine_plan(checker.component(), None, 8, options)
    flags[plan.name] = (plan.precision, plan.flags)
    assert flags[specs.VAE_DECODER][0] == "fp32" and flags[specs.VAE_DECODER][1].cleared == ("TF32",)
    assert flags[specs.SAFETY_CHECKER][0] == "fp32" and flags[specs.SAFETY_CHECKER][1].cleared == ("TF32",)
    assert flags[specs.UNET] == ("fp16", tensorrt_plan.BuildFlags(("STRONGLY_TYPED",), ("REFIT",), ()))
    assert flags[specs.TEXT_ENCODER_2][1].set == ("REFIT",)


# --------------------------------------------------------------------------------------------------
# --plan on the tiny families, and the build consuming that plan
# --------------------------------------------------------------------------------------------------


def _run_plan(
    model: Path, out: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[dict[str, Any], str]:
    assert "tensorrt" not in sys.modules
    assert export_main([str(model), "--target", "tensorrt", "--plan", "--out", str(out), *args]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [PLAN_FILE], "--plan writes only the plan"
    return json.loads((out / PLAN_FILE).read_text()), printed


# SD3 has every kind of axis (batch, latent sides, T5's sequence, the joint text_length): in `make test`
# (~30 s here). The other three families cost 30-40 s each on this 2-core machine: slow.
@pytest.mark.parametrize(
    "family",
    [
        pytest.param("sd", marks=pytest.mark.slow),
        pytest.param("sdxl", marks=pytest.mark.slow),
        "sd3",
        pytest.param("flux", marks=pytest.mark.slow),
    ],
)
def test_plan_without_gpu_or_tensorrt(
    family: str, tmp_path: Path, tiny_model: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = ModelSource(tiny_model(family))
    plan, printed = _run_plan(source.path, tmp_path / "repo", capsys)
    names = [m["name"] for m in plan["models"]]
    assert names == [s.name for s in _engine_parts(source)]
    for model in plan["models"]:
        assert model["profiles"], model["name"]
        assert 'platform: "tensorrt_plan"' in model["config_pbtxt"]
        assert model["config_pbtxt"].count("profile:") == len(model["profiles"])
        memory = model["memory"]
        assert memory["weight_bytes"] > 0 and memory["activation_bytes_per_context_estimate"] > 0
        assert memory["execution_contexts"] == len(model["profiles"])
        assert memory["total_bytes_estimate"] == (
            memory["weight_bytes"]
            + memory["execution_contexts"] * memory["activation_bytes_per_context_estimate"]
        )
        assert model["builder_flags"]["network"] == ["STRONGLY_TYPED"]
        assert f"{model['name']}: {model['precision']}" in printed
    assert "(estimate)" in printed and "(exact)" in printed


def test_weight_bytes_are_the_graphs_initializers(tmp_path: Path, tiny_model: Callable[[str], Path]) -> None:
    """Read two ways: onnx's parser (the plan's) and the repository's own protobuf walker."""
    from export.models.precision import with_precision
    from export.toolchain.onnx_export import export_onnx

    source = ModelSource(tiny_model("sd"))
    (unet,) = [c for c in components(source) if c.spec.name == specs.UNET]
    path = tmp_path / "unet.onnx"
    export_onnx(with_precision(unet.load().eval(), "fp16"), unet.spec, unet.trace_sizes, path)
    index = initializer_index(path)
    assert engine_memory.weight_bytes(path) >= sum(ref.length for ref in index.values()) > 0
    parameters = sum(p.numel() for p in unet.load().parameters())
    assert sum(ref.length for ref in index.values()) == pytest.approx(2 * parameters, rel=0.05)  # fp16
    small = engine_memory.activation_estimate(path, _shapes(unet.spec, 1, 8))
    large = engine_memory.activation_estimate(path, _shapes(unet.spec, 4, 16))
    assert small.unknown_tensors == large.unknown_tensors == 0
    assert large.peak_bytes > 4 * small.peak_bytes  # 4x the rows, 4x the pixels, attention more


def _shapes(spec: specs.ModelSpec, batch: int, side: int) -> dict[str, tuple[int, ...]]:
    sizes = {"batch": batch, "height": side, "width": side}
    return {t.name: t.concrete(sizes) for t in spec.inputs}


@pytest.mark.slow  # two exports of the tiny SD model (~40 s)
def test_the_build_consumes_exactly_the_plan(
    fake_trt: FakeTensorRT,
    tmp_path: Path,
    tiny_model: Callable[[str], Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny_model("sd")
    monkeypatch.delitem(sys.modules, "tensorrt")
    planned, _ = _run_plan(model, tmp_path / "plan", capsys, "--gpus", "1")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.module())
    host = engines.EngineHost("Fake GPU", "9.0", "10.13.2.6", 1)
    monkeypatch.setattr(tensorrt, "current_host", lambda gpus=(): host)
    monkeypatch.setattr(tensorrt, "check_engine", lambda *a, **k: [])
    out = tmp_path / "repo"
    export_repository(
        str(model), out, RepositoryOptions(target="tensorrt", engine=tensorrt_plan.EngineOptions(gpus=(1,)))
    )
    built = json.loads((out / PLAN_FILE).read_text())
    assert [m["name"] for m in built["models"]] == [m["name"] for m in planned["models"]]
    for was, now in zip(planned["models"], built["models"], strict=True):
        assert now == was
        assert (out / now["name"] / "config.pbtxt").read_text() == was["config_pbtxt"]
    # What the (fake) TensorRT was given: each model's profiles, in order.
    assert fake_trt.profiles == [
        {name: tuple(tuple(s[level]) for level in ("min", "opt", "max")) for name, s in p["shapes"].items()}
        for m in planned["models"]
        for p in m["profiles"]
    ]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["engine"]["device"] == 1 and manifest["gpus"] == [1]


def test_flux_transformer_is_bf16_when_fp16_is_asked(tiny_model: Callable[[str], Path]) -> None:
    """FLUX.1 is trained and published in bf16; the tiny transformer in fp16 is past the fp16 tolerance
    in torch itself (0.069 off against 0.022 allowed at batch 3, 63 image tokens, 256 text tokens)."""
    from export.models.precision import component_precision

    flux = ModelSource(tiny_model("flux"))
    assert component_precision(flux, specs.TRANSFORMER, "fp16")[0] == "bf16"
    assert component_precision(flux, specs.TRANSFORMER, "fp32")[0] == "fp32"
    assert component_precision(flux, specs.VAE_DECODER, "fp16")[0] == "fp16"
    assert component_precision(ModelSource(tiny_model("sd3")), specs.TRANSFORMER, "fp16")[0] == "fp16"


def test_the_engine_checks_reference_is_named_by_what_its_session_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """onnxruntime-gpu lists CUDA as available even where its libraries or the driver cannot load; the
    session then runs on CPU, and the label says so (and asks CUDA for the device named by --gpus)."""
    import onnxruntime as ort

    from export.toolchain.onnx_export import onnx_runner

    asked: list[object] = []

    class Session:
        def __init__(self, path: str, options: object, providers: list[object]) -> None:
            asked.extend(providers)

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

        def run(self, names: list[str], feeds: dict[str, object]) -> list[object]:
            return []

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", Session)
    spec = specs.safety_checker_spec()
    _, label = onnx_runner(tmp_path / "model.onnx", spec, gpu=True, device=2)
    assert label == "onnxruntime (CPUExecutionProvider)"
    assert asked == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]


def test_the_images_bindings_only_tensorrt_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image installs only the bindings wheel (import name ``tensorrt_bindings``, which the
    ``tensorrt`` package re-exports): the export, the refit and the service's version check find it."""
    from export.models.refit import _tensorrt
    from server.engines import tensorrt_version

    bindings = FakeTensorRT().module()
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", bindings)
    assert tensorrt.require_tensorrt() is bindings and _tensorrt() is bindings
    assert tensorrt_version() == "10.13.2.6"
    monkeypatch.setitem(sys.modules, "tensorrt_bindings", None)
    with pytest.raises(tensorrt.TensorRTUnavailable):
        tensorrt.require_tensorrt()
