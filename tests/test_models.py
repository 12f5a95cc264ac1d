"""Several models behind one service (MODEL_IDS): routing, byte-identical images, residency.

The tiny SD, SDXL and FLUX models, each exported to its own repository (the session's), served by one
bundled Triton from the folder of links the service composes.  What each costs: the three-model
service ~20 s (two cold loads), the budget test ~30 s (four loads), the others a few seconds.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from export.fixtures.service import wait_until
from server.registry import SERVED_DIR
from server.settings import ServedModel, Settings, SettingsError
from server.triton.scoped import compose_repository, drop_config_name, triton_name
from tests.support.service import metric, needs_triton, running_service

SMALL = {"height": 64, "width": 64, "num_inference_steps": 2}
FAMILIES = ("sd", "sdxl", "flux")


def post(url: str, path: str = "/text-to-image", **body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json={"prompt": "a red cube", "seed": 7, **SMALL, **body}, timeout=120)


@pytest.fixture(scope="module")
def models(tiny_model: Callable[[str], Path], repository: Callable[..., Path]) -> dict[str, str]:
    """family -> ``MODEL_IDS`` entry (``id=repository``) of the session's tiny models."""
    return {f: f"{tiny_model(f)}={repository(f)}" for f in FAMILIES}


def multi_settings(tmp_path: Path, entries: list[str], **overrides: object) -> Settings:
    return Settings(
        model_ids=",".join(entries),
        model_repository=tmp_path / "repository",
        state_dir=tmp_path / "state",
        **overrides,  # type: ignore[arg-type]
    )


def resident(url: str, model_id: str) -> bool:
    return metric(url, "t2i_model_resident", f'{{model="{model_id}"}}') == 1


def resident_bytes(url: str, ids: list[str]) -> float:
    return sum(metric(url, "t2i_model_memory_bytes", f'{{model="{m}"}}') for m in ids)


# -- settings and the composed repository (no Triton) -------------------------------------------------


def test_model_ids_name_each_model_its_repository_and_pins(tmp_path: Path) -> None:
    settings = Settings(model_ids=" a/sd-turbo = /r/sd , org/sdxl ", model_repository=tmp_path)
    first, second = settings.served_models()
    assert first == ServedModel("a/sd-turbo", Path("/r/sd"), "m0-sd", pinned=True)
    assert (second.model_id, second.repository, second.pinned) == ("org/sdxl", tmp_path / "sdxl", False)
    assert second.alias == "m1-sdxl"
    pins = Settings(model_ids="a,b,c", pinned_model_ids="b,c").served_models()
    assert [m.pinned for m in pins] == [False, True, True]
    assert not any(m.pinned for m in Settings(model_ids="a,b", pinned_model_ids="none").served_models())
    alone = Settings(model_id="x", model_repository=tmp_path).served_models()
    assert alone == (ServedModel("x", tmp_path, "", pinned=True),)  # bare Triton names, as before


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model_id": "a", "model_ids": "b"}, "not both"),
        ({}, "MODEL_ID is required"),
        ({"model_ids": "a,b,a"}, "the same model id twice: a"),
        ({"model_ids": "a=/r,b=/r"}, "the same repository twice: /r"),
        ({"model_ids": "a,=/r"}, "an entry without a model id"),
        ({"model_ids": "a,b", "pinned_model_ids": "c"}, "not in MODEL_IDS: c"),
        ({"model_ids": "a", "model_memory_gb": -1}, "model_memory_gb must be at least 0"),
    ],
)
def test_bad_model_settings_are_refused_naming_them(values: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_the_composed_repository_links_each_model_under_its_prefix(tmp_path: Path) -> None:
    for name in ("sd", "xl"):
        for part in ("unet", "vae_decoder"):
            (tmp_path / name / part / "1").mkdir(parents=True)
            (tmp_path / name / part / "config.pbtxt").write_text(
                f'name: "{part}"\nmax_batch_size: 8\ninput {{\n  name: "sample"\n}}\n'
            )
        (tmp_path / name / ".unet.partial-1").mkdir()  # an export under way: not a model
    served = tmp_path / SERVED_DIR
    (served).mkdir()
    (served / "m9-gone.unet").symlink_to(tmp_path)  # a model no longer served
    compose_repository(served, [("m0-sd", tmp_path / "sd"), ("m1-xl", tmp_path / "xl")])
    links = sorted(p.name for p in served.iterdir())
    assert links == ["m0-sd.unet", "m0-sd.vae_decoder", "m1-xl.unet", "m1-xl.vae_decoder"]
    assert (served / "m1-xl.unet").resolve() == (tmp_path / "xl" / "unet").resolve()
    # Triton names a model without a configured name after its folder: the link's name.
    config = (served / "m0-sd.unet" / "config.pbtxt").read_text()
    assert config == 'max_batch_size: 8\ninput {\n  name: "sample"\n}\n'
    drop_config_name(served / "m0-sd.unet")  # once is enough
    assert (served / "m0-sd.unet" / "config.pbtxt").read_text() == config
    assert triton_name("m0-sd", "unet") == "m0-sd.unet" and triton_name("", "unet") == "unet"


def test_pinned_models_over_the_budget_are_a_start_up_error_naming_them(
    tmp_path: Path, models: dict[str, str]
) -> None:
    settings = multi_settings(
        tmp_path, [models["sd"], models["sdxl"]], pinned_model_ids="", model_memory_gb=0.001
    )
    with running_service(settings, wait_for="ERROR") as running:
        error = running.app.state.supervisor.error
        sd_id = models["sd"].split("=")[0]
        assert "PINNED_MODEL_IDS" in error and "MODEL_MEMORY_GB=0.001" in error and sd_id in error
        answer = post(running.url)
        assert answer.status_code == 500 and sd_id in answer.json()["detail"]["msg"]


# -- one service, three models --------------------------------------------------------------------


@needs_triton
def test_three_models_behind_one_service_give_their_own_services_images(
    tmp_path: Path, models: dict[str, str], service: Callable[..., str]
) -> None:
    ids = [models[f].split("=")[0] for f in FAMILIES]
    with running_service(multi_settings(tmp_path, [models[f] for f in FAMILIES])) as running:
        url = running.url
        assert resident(url, ids[0]) and not resident(url, ids[1])  # the first is pinned, loaded at start
        # Interleaved, concurrent first requests: each cold model loads once, shared by its requests.
        bodies = [{"model_id": ids[i % 3], "seed": i} for i in range(9)]
        with concurrent.futures.ThreadPoolExecutor(9) as pool:
            answers = list(pool.map(lambda b: post(url, **b), bodies))
        assert [a.status_code for a in answers] == [200] * 9, [a.text[:200] for a in answers]
        for model_id in ids:
            assert metric(url, "t2i_model_loads_total", f'{{model="{model_id}"}}') == 1
            assert metric(url, "t2i_generations_total", f'{{model="{model_id}"}}') == 3
            assert metric(url, "t2i_requests_total", f'{{model="{model_id}",status="200"}}') == 3
        # Each model's image is byte-identical to its own single-model service's.
        for family, model_id in zip(FAMILIES, ids, strict=True):
            alone = post(service(family), seed=11).json()
            together = post(url, model_id=model_id, seed=11).json()
            assert together == alone, family
        assert post(url, seed=11).json() == post(url, model_id=ids[0], seed=11).json()  # empty: the first
        unknown = post(url, model_id="someone/else")
        assert unknown.status_code == 400 and "is not served here" in unknown.json()["detail"]["msg"]
        assert metric(url, "t2i_requests_total", '{model="",status="400"}') == 1
        # Each model's own path, as an aiModels.json entry's url: its /version and /hardware/info name
        # it (go-livepeer keeps a runner version per (pipeline, model_id) from /version's model_id).
        for model_id in ids:
            base = f"{url}/models/{model_id.strip('/')}"
            assert httpx.get(f"{base}/version").json()["model_id"] == model_id
            assert httpx.get(f"{base}/hardware/info").json()["model_id"] == model_id
            assert httpx.get(f"{base}/health").json()["status"] in ("OK", "IDLE")
            assert post(base, seed=11).json() == post(url, model_id=model_id, seed=11).json()
        assert httpx.get(f"{url}/version").json()["model_id"] == ids[0]
        other = post(f"{url}/models/{ids[1].strip('/')}", model_id=ids[2])
        assert other.status_code == 400 and "this path serves" in other.json()["detail"]["msg"]


@needs_triton
def test_the_budget_evicts_the_least_recently_used_idle_model_never_one_in_use(
    tmp_path: Path, models: dict[str, str]
) -> None:
    ids = [models[f].split("=")[0] for f in FAMILIES]
    sd, sdxl, flux = ids
    settings = multi_settings(tmp_path, [models[f] for f in FAMILIES], pinned_model_ids="none")
    with running_service(settings) as running:
        url, registry = running.url, running.app.state.supervisor.registry
        assert not any(resident(url, m) for m in ids)  # none pinned: nothing loads before its request
        assert post(url, model_id=sd).status_code == 200
        assert post(url, model_id=sdxl).status_code == 200
        held = {m: metric(url, "t2i_model_memory_bytes", f'{{model="{m}"}}') for m in (sd, sdxl)}
        assert all(held.values()), held
        # A budget that holds two of the three (what two measured, and half the smaller again).
        registry.budget = int(sum(held.values()) + min(held.values()) / 2)
        assert post(url, model_id=flux).status_code == 200
        assert not resident(url, sd) and resident(url, sdxl) and resident(url, flux)  # sd: least recent
        assert metric(url, "t2i_model_evictions_total", f'{{model="{sd}"}}') == 1
        assert resident_bytes(url, ids) <= registry.budget
        # sdxl is the least recently used now, but in use: sd's load must evict flux instead.
        results: list[httpx.Response] = []
        slow: dict[str, Any] = {"model_id": sdxl, "num_inference_steps": 150}
        long = threading.Thread(target=lambda: results.append(post(url, **slow)))
        long.start()
        wait_until(lambda: registry.entries[sdxl].in_use > 0, 30, "sdxl's long request to start")
        assert post(url, model_id=sd).status_code == 200
        long.join(120)
        assert results and results[0].status_code == 200
        assert resident(url, sdxl) and resident(url, sd) and not resident(url, flux)
        assert metric(url, "t2i_model_evictions_total", f'{{model="{sdxl}"}}') == 0
        assert resident_bytes(url, ids) <= registry.budget
        assert metric(url, "t2i_model_loads_total", f'{{model="{sd}"}}') == 2


@needs_triton
def test_a_request_that_outlives_its_models_load_is_the_reference_500_naming_it(
    tmp_path: Path, models: dict[str, str]
) -> None:
    settings = multi_settings(
        tmp_path, [models["sd"], models["sdxl"]], pinned_model_ids="none", request_timeout_s=0.3
    )
    sdxl = models["sdxl"].split("=")[0]
    with running_service(settings) as running:
        answer = post(running.url, model_id=sdxl)
        assert answer.status_code == 500
        message = answer.json()["detail"]["msg"]
        assert "REQUEST_TIMEOUT_S" in message and f"model '{sdxl}' was still loading" in message
        # The load goes on for the next request.
        wait_until(lambda: resident(running.url, sdxl), 60, "sdxl to load")


def test_gpu_memory_is_read_from_tritons_own_metric(tmp_path: Path) -> None:
    import http.server

    from server.triton.backend import gpu_memory_metric

    page = (
        "# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes\n# TYPE nv_gpu_memory_used_bytes gauge\n"
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 1.5e+09\n'
        'nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 5e+08\n'
        '# TYPE nv_gpu_utilization gauge\nnv_gpu_utilization{gpu_uuid="GPU-a"} 0.5\n'
    )

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = (page if self.path == "/metrics" else "").encode()
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert gpu_memory_metric(f"{url}/metrics") == 2_000_000_000  # summed over Triton's GPUs
        assert gpu_memory_metric(f"{url}/nothing") is None
    finally:
        server.shutdown()
        server.server_close()
