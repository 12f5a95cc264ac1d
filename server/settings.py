"""The service's settings: one frozen msgspec Struct built once at start, defaults < environment < CLI.

Each field carries its constraints and its one description (``msgspec.Meta``); msgspec checks them
and converts environment and command-line strings.  A field's environment variable is its name in
capitals (``Meta(extra={"env": ...})`` would name another; the names follow Livepeer's ai-runner where
it has one) and its flag ``--name-with-dashes``.  The README's settings table is generated from the
fields: ``python -m server.settings --markdown`` prints it, ``--update README.md`` rewrites it, and
tests/test_settings.py fails while the README's differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

from server.served import ServedModel, SettingsError, served_models


def triton_address(url: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` of Triton's HTTP endpoint -> (host, port)."""
    parsed = urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/") or parsed.query:
        raise SettingsError(
            f"TRITON_URL must be Triton's HTTP address as host:port or http://host:port, got {url!r}"
        )
    try:
        port = parsed.port or 8000  # Triton's own default
    except ValueError as e:
        raise SettingsError(f"TRITON_URL has a bad port: {url!r}") from e
    return parsed.hostname, port


NOTES = "docs/settings.md"  # the longer notes some descriptions point to
MODELS_NOTES = "docs/models.md"
AT_LEAST_1 = Meta(ge=1)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What the service reads; the README's settings table lists the fields in this order."""

    model_id: Annotated[
        str,
        Meta(
            description="Hub id or local diffusers folder; distilled ids (`lightning`, `turbo`) switch on "
            "the model rules (`server/pipeline/rules.py`); required unless MODEL_IDS is set",
        ),
    ] = ""
    model_ids: Annotated[
        str,
        Meta(
            description="several models behind one service, instead of MODEL_ID: comma-separated "
            "`id=repository` (`id` alone: the repository MODEL_REPOSITORY/<id's last path part>); a "
            f"request's `model_id` picks one, empty the first ({MODELS_NOTES})"
        ),
    ] = ""
    pinned_model_ids: Annotated[
        str,
        Meta(
            description="models loaded at start and never unloaded, comma-separated ids; empty: the first "
            "model; `none`: none (each model loads at its first request)"
        ),
    ] = ""
    model_memory_gb: Annotated[
        float,
        Meta(
            ge=0,
            description="memory the resident models may hold together (GPU memory on a GPU, else the "
            "bundled Triton's resident memory), each measured once it loads, LoRA variants included; "
            "the least recently used idle model is unloaded to make room; 0: no bound",
        ),
    ] = 0.0
    model_dir: Annotated[Path, Meta(description="Hugging Face cache for Hub ids")] = Path("/models")
    model_repository: Annotated[Path, Meta(description="Triton repository the bundled Triton serves")] = Path(
        "model_repository/default"
    )
    triton_url: Annotated[
        str,
        Meta(
            description="HTTP `host:port` (or `http://host:port`; port 8000 when left out) of a running "
            "Triton, spoken to over HTTP/REST with binary tensors, not gRPC; empty: start the bundled "
            "one (and restart it if it dies)"
        ),
    ] = ""
    state_dir: Annotated[
        Path,
        Meta(
            description="the bundled Triton's backend folder, log (`triton.log`) and pid file "
            f"(`tritonserver.json`); one per service ({NOTES})"
        ),
    ] = Path("state")
    host: Annotated[str, Meta(description="address the service listens on")] = "0.0.0.0"
    port: Annotated[int, Meta(ge=1, le=65535, description="port the service listens on")] = 8000
    auth_token: Annotated[
        str | None,
        Meta(description="bearer token required on `/text-to-image` (compared in constant time)"),
    ] = None
    version: Annotated[str, Meta(description="reported by `/version`")] = "0.1.0"
    scheduler: Annotated[
        str,
        Meta(
            description="a diffusers scheduler class name replacing the model's own, built from the "
            "model's scheduler config; empty: the model's own"
        ),
    ] = ""
    max_pixels: Annotated[int, AT_LEAST_1, Meta(description="height x width per image; above: 400")] = (
        1024 * 1024
    )
    max_images: Annotated[int, AT_LEAST_1, Meta(description="`num_images_per_prompt`; above: 400")] = 4
    max_batch_pixels: Annotated[
        int,
        AT_LEAST_1,
        Meta(
            description="image pixels (rows x height x width, guidance rows included) one UNet / VAE "
            "batch of the bundled Triton's python-onnx models runs at once; a request whose own rows "
            f"exceed it: 400 ({NOTES})"
        ),
    ] = 8 * 1024 * 1024
    max_loras: Annotated[int, AT_LEAST_1, Meta(description="LoRAs per request; above: 400")] = 4
    lora_dir: Annotated[
        Path | None,
        Meta(
            description="folder where LoRA names are looked up (the only local source, with LORA_EXTRA_DIRS)"
        ),
    ] = None
    lora_extra_dirs: Annotated[
        str, Meta(description="more allowed LoRA folders, `:`-separated, looked up after LORA_DIR")
    ] = ""
    lora_hub: Annotated[
        bool,
        Meta(
            description="whether LoRA ids may name Hugging Face Hub repositories; false: only LORA_DIR "
            "and LORA_EXTRA_DIRS"
        ),
    ] = True
    lora_hub_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            description="longest wait for the Hub per lookup and per download; past it the request is "
            "refused (500 naming the LoRA)",
        ),
    ] = 20.0
    hf_endpoint: Annotated[
        str, Meta(description="the Hub's address; empty: huggingface_hub's default, https://huggingface.co")
    ] = ""
    lora_max_mb: Annotated[
        float,
        Meta(gt=0, description="largest LoRA file downloaded from the Hub (safetensors only); above: 400"),
    ] = 512.0
    lora_cache_gb: Annotated[
        float,
        Meta(
            gt=0,
            description="disk for LoRA variants' overrides and downloaded LoRAs; the least recently used "
            "idle entries are deleted first",
        ),
    ] = 20.0
    lora_build_concurrency: Annotated[int, AT_LEAST_1, Meta(description="variant builds running at once")] = 1
    lora_preload: Annotated[
        bool,
        Meta(
            description="python-onnx on the bundled Triton: the models a LoRA can change open their "
            "LoRA-variant session at start, so the first LoRA request waits only for its build; it "
            f"delays `/health` OK ({NOTES})"
        ),
    ] = False
    max_lora_variants: Annotated[
        int,
        AT_LEAST_1,
        Meta(
            description="LoRA variants in use / resident at once, the least recently used idle one "
            "leaving first (python-onnx: override sets held per model; the model reads it too)"
        ),
    ] = 4
    max_steps: Annotated[int, AT_LEAST_1, Meta(description="`num_inference_steps`; above: 400")] = 200
    max_in_flight: Annotated[
        int,
        AT_LEAST_1,
        Meta(description="generations running at once (their UNet steps batch together in Triton)"),
    ] = 8
    max_queue: Annotated[
        int,
        Meta(
            ge=0,
            description="requests waiting (for the model to load, or for a slot) beyond MAX_IN_FLIGHT; "
            'the next one is refused at once: 500 "The service is busy ..."',
        ),
    ] = 32
    request_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            description="per request, from arrival, waiting for the model to load and for a slot "
            'included; past it: 500 "The request did not finish within N s (REQUEST_TIMEOUT_S): <what '
            'it waited for>" (503 with HTTP_RETRY_STATUSES)',
        ),
    ] = 600.0
    safety_checker: Annotated[
        Literal["auto", "off"],
        Meta(
            description="`auto`: run Triton's `safety_checker` model when the repository has one; "
            "`off`: never"
        ),
    ] = "auto"
    health_interval_s: Annotated[float, Meta(gt=0, description="how often the service checks Triton")] = 1.0
    triton_timeout_s: Annotated[float, Meta(description="per Triton call")] = 300.0
    triton_shared_memory: Annotated[
        bool,
        Meta(
            description="a request's text embeddings go to Triton once, in a `/dev/shm` region it reads "
            f"at each step, when Triton shares this host's `/dev/shm`; else inline ({NOTES})"
        ),
    ] = True
    startup_timeout_s: Annotated[float, Meta(description="longest wait for the bundled Triton to start")] = (
        300.0
    )
    warmup: Annotated[bool, Meta(description="run one small generation before reporting OK")] = True
    torch_threads: Annotated[
        int, AT_LEAST_1, Meta(description="threads for the scheduler math on the service")
    ] = 1
    malloc_arena_max: Annotated[
        int,
        AT_LEAST_1,
        Meta(
            description="glibc malloc arenas of the service process (glibc reads the same variable); more "
            "let its RSS creep with memory freed on many threads (export/models/heap.py)"
        ),
    ] = 2
    memory_release_s: Annotated[
        float,
        Meta(
            ge=0,
            description="idle seconds after which the bundled Triton's python-onnx models give back the "
            f"memory a batch freed (kept for the next batch until then); 0: after every batch ({NOTES})",
        ),
    ] = 2.0
    max_body_bytes: Annotated[
        int,
        AT_LEAST_1,
        Meta(
            description="request body size; above: 400 (413 with HTTP_RETRY_STATUSES), refused before the "
            "body is read in full (docs/api.md, Request limits)"
        ),
    ] = 1024 * 1024
    http_retry_statuses: Annotated[
        bool,
        Meta(
            description="true: a request the service cannot serve now is 503 with `Retry-After: 5`, a body "
            f"over MAX_BODY_BYTES 413, for a generic load balancer; never behind go-livepeer ({NOTES})"
        ),
    ] = False
    tritonserver: Annotated[
        str,
        Meta(
            description="`tritonserver` binary started when TRITON_URL is empty; empty: `tritonserver` on "
            "PATH (the Docker image's, with the TensorRT backend), else the nvidia-pytriton wheel's"
        ),
    ] = ""
    pipeline: Annotated[Literal["text-to-image"], Meta(description="the only pipeline served")] = (
        "text-to-image"
    )

    def __post_init__(self) -> None:
        for field in FIELDS.values():
            field.check(getattr(self, field.name))
        if self.triton_url:
            triton_address(self.triton_url)
        self.served_models()  # raises on a bad MODEL_ID / MODEL_IDS / PINNED_MODEL_IDS

    def served_models(self) -> tuple[ServedModel, ...]:
        """The models this service serves, the default (first) first: MODEL_ID alone, or MODEL_IDS."""
        return served_models(self.model_id, self.model_ids, self.pinned_model_ids, self.model_repository)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then ``overrides`` (the CLI; None: not given)."""
        env = os.environ if env is None else env
        values = {f.name: env[f.env] for f in FIELDS.values() if env.get(f.env, "") != ""}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**{k: _field(k).convert(v) for k, v in values.items()})

    def with_overrides(self, **overrides: Any) -> Settings:
        return msgspec.structs.replace(self, **{k: _field(k).convert(v) for k, v in overrides.items()})


# Boolean words beyond msgspec's own (true/false, 1/0, any case).
_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}
# msgspec.Meta's bounds: (attribute, in words, as a symbol)
_BOUNDS = (
    ("ge", "at least", ">="),
    ("gt", "greater than", ">"),
    ("le", "at most", "<="),
    ("lt", "less than", "<"),
)


def _dec_hook(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str | os.PathLike):
        return Path(value)
    raise NotImplementedError


class Setting(NamedTuple):
    """One setting as msgspec sees it: the annotated type it checks values against and its constraints."""

    name: str
    env: str
    annotation: Any
    info: mi.Type  # constraints and kind, from msgspec.inspect
    description: str
    default: Any

    @property
    def flag(self) -> str:
        return f"--{self.name.replace('_', '-')}"

    def convert(self, value: Any) -> Any:
        """A string from the environment or the CLI (or a value as is) -> this setting's type."""
        if not isinstance(value, str):
            return value
        if isinstance(self.info, mi.IntType | mi.FloatType | mi.BoolType):
            value = value.strip()
        if isinstance(self.info, mi.BoolType):
            value = _BOOL_WORDS.get(value.lower(), value)
        return self.check(value, strict=False)

    def check(self, value: Any, strict: bool = True) -> Any:
        try:
            return msgspec.convert(value, self.annotation, strict=strict, dec_hook=_dec_hook)
        except msgspec.ValidationError:
            raise SettingsError(self.refusal(value, strict)) from None

    def refusal(self, value: Any, strict: bool) -> str:
        """Why ``value`` is refused, naming the setting, its variable and what it accepts."""
        where = f"(env {self.env}, flag {self.flag})"
        if value == "" and isinstance(self.info, mi.StrType) and self.info.min_length:
            return f"{self.env} is required: {self.description}"
        try:  # of the right kind: a constraint refused it
            msgspec.convert(value, _bare(self.annotation), strict=strict, dec_hook=_dec_hook)
        except msgspec.ValidationError:
            return f"{self.name} must be {kind_of(self.info, prose=True)}, got {value!r} {where}"
        return f"{self.name} must be {' and '.join(bounds_of(self.info))}, got {value!r} {where}"


def _bare(annotation: Any) -> Any:
    """The type without its ``Annotated`` constraints."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is Annotated else annotation


def _unwrap(info: mi.Type) -> mi.Type:
    info = info.type if isinstance(info, mi.Metadata) else info
    if isinstance(info, mi.UnionType):  # X | None: None is the default, unset
        (info,) = [t for t in info.types if not isinstance(t, mi.NoneType)]
    return info


def bounds_of(info: mi.Type, prose: bool = True) -> list[str]:
    """A number's bounds: ``["at least 1", "at most 65535"]``, or not ``prose``: ``[">= 1", "<= 65535"]``."""
    bounds = [(word if prose else symbol, getattr(info, attr, None)) for attr, word, symbol in _BOUNDS]
    return [f"{word} {value:g}" for word, value in bounds if value is not None]


_KINDS = {mi.IntType: "integer", mi.FloatType: "number", mi.BoolType: "boolean", mi.CustomType: "path"}
_KINDS_IN_PROSE = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true/false, 1/0, yes/no, on/off)",
    "path": "a path",
}


def kind_of(info: mi.Type, prose: bool = False) -> str:
    """What a setting accepts, as the settings table (or, ``prose``, an error message) says it."""
    if isinstance(info, mi.LiteralType):
        return " or ".join(repr(v) if prose else f"`{v}`" for v in info.values)
    kind = _KINDS.get(type(info), "text")
    if prose:
        return _KINDS_IN_PROSE.get(kind, kind)
    return " ".join([kind, ", ".join(bounds_of(info, prose=False))]).strip()


def _fields() -> dict[str, Setting]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    info = mi.type_info(Settings)
    assert isinstance(info, mi.StructType)
    found = {}
    for f in info.fields:
        meta = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Meta)]
        description = next(m.description for m in meta if m.description)
        env = next((m.extra["env"] for m in meta if m.extra and "env" in m.extra), f.name.upper())
        found[f.name] = Setting(f.name, env, hints[f.name], _unwrap(f.type), description, f.default)
    return found


FIELDS: dict[str, Setting] = _fields()
# Environment variable -> settings field.
ENV_NAMES: dict[str, str] = {f.env: f.name for f in FIELDS.values()}


def _field(name: str) -> Setting:
    if name not in FIELDS:
        raise SettingsError(f"unknown setting '{name}'")
    return FIELDS[name]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per setting; each overrides its environment variable."""
    for f in FIELDS.values():
        help_text = f"{f.description} (env {f.env}; {kind_of(f.info)})".replace("%", "%%")
        parser.add_argument(f.flag, dest=f.name, default=None, help=help_text)


# The README's settings table lies between these lines.
TABLE_BEGIN = "<!-- settings table: generated by `python -m server.settings --markdown`, do not edit -->"
TABLE_END = "<!-- end of the settings table -->"


def _default_text(f: Setting) -> str:
    if isinstance(f.info, mi.StrType) and f.info.min_length:
        return "required"
    if f.default is None:
        return "unset"
    if isinstance(f.default, bool):
        return str(f.default).lower()
    if isinstance(f.default, float):
        return f"{f.default:g}"
    return str(f.default) if f.default != "" else '""'


def markdown_table() -> str:
    """The README's settings table: one row per setting, in the fields' order."""
    rows = ["| env | default | accepts | meaning |", "|---|---|---|---|"]
    for f in FIELDS.values():
        cells = (f.env, _default_text(f), kind_of(f.info), f.description)
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def replace_table(text: str) -> str:
    """``text`` (the README) with the generated table between its markers."""
    head, begin, rest = text.partition(TABLE_BEGIN + "\n")
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise SettingsError(f"the markers of the settings table are missing: {TABLE_BEGIN} ... {TABLE_END}")
    return head + begin + markdown_table() + end + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.settings", description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the README's settings table")
    group.add_argument("--update", type=Path, metavar="README", help="rewrite the table in this file")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
    else:
        args.update.write_text(replace_table(args.update.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
