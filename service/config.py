"""LineWatch configuration: one YAML file -> pydantic models (``extra="forbid"``).

Public API::

    from service.config import load_config, check_config, default_config_text

    config = load_config(Path("linewatch.yaml"))   # None: the embedded default
    report = check_config(Path("linewatch.yaml"))  # never raises: .config, .issues

Every error names where it came from: the file and line of the YAML key (or of
the list item / mapping that lacks a required key), or the environment variable
that set the value, then the dotted location and the message::

    config.yaml:7: cameras[1].source: Field required
    environment variable LINEWATCH_API__PORT: api.port: Input should be a valid integer

Environment variables ``LINEWATCH_<SECTION>__<KEY>...`` override the file (keys
nested with ``__``, list items by index: ``LINEWATCH_CAMERAS__0__SOURCE``).
Relative model paths resolve against the config file's directory (the repository
root for the embedded default), so ``models/zoo/...`` works from any directory.
The reference is ``docs/configuration.md``.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.errors import ConfigError
from service.geometry.calibration import CalibrationConfig
from service.geometry.pose_filter import PoseFilterConfig
from service.inference.adapter_config import AdapterSpec, AutoSpec, tag_adapter
from service.inference.config import GpuConfig, OpenVinoConfig
from service.rules.config import LineConfig
from service.tracking.config import TrackerConfig

Loc = tuple[str | int, ...]

ENV_PREFIX = "LINEWATCH_"
DEFAULT_ORIGIN = "<embedded default>"
ID_PATTERN = r"^[a-z0-9_-]+$"
_ID_RE = re.compile(ID_PATTERN)

SOURCE_SCHEMES = frozenset({"sim", "file", "rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp"})
"""URL schemes a camera source may use (anything without ``://`` is a file or device path)."""

BUS_SCHEMES = frozenset({"memory", "mqtt", "mqtts"})
"""Bus URL schemes: ``memory://`` (the in-process hub), ``mqtt(s)://host[:port]`` (docs/mqtt.md)."""
MQTT_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

ORT_PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINO",  # OpenVINO's own CPU runtime (service/inference/openvino.py)
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
"""Config provider names -> ONNX Runtime execution provider names (openvino: LineWatch's
OpenVINO runtime, which replaces ONNX Runtime for the model)."""

ProviderName = Literal[
    "tensorrt", "cuda", "rocm", "migraphx", "openvino", "directml", "coreml", "cpu"
]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


# --- validators (pure functions) ----------------------------------------------


def _check_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid id: use lowercase letters, digits, '-' and '_' "
            f"(pattern {ID_PATTERN})"
        )
    return value


def _check_source(value: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(
            "source is empty: give sim://..., rtsp://..., http(s)://..., a file or /dev/videoN"
        )
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in SOURCE_SCHEMES:
            raise ValueError(
                f"unsupported source scheme {scheme!r}: supported are "
                f"{', '.join(s + '://' for s in sorted(SOURCE_SCHEMES))}, "
                "a file path or /dev/videoN"
            )
    return value


def normalize_providers(value: Any) -> Any:
    """``auto`` | ``"cuda,cpu"`` | ``[tensorrt, cuda, cpu]`` -> ``"auto"`` or a checked list."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        value = [part for part in (p.strip() for p in text.split(",")) if part]
    if not isinstance(value, list):
        raise ValueError("providers must be 'auto' or a list such as [tensorrt, cuda, cpu]")
    names = [str(v).strip().lower() for v in value]
    if not names:
        raise ValueError("providers is empty: use 'auto' or list at least one provider")
    unknown = [n for n in names if n not in ORT_PROVIDERS]
    if unknown:
        hint = " ('auto' cannot be mixed with explicit providers)" if "auto" in unknown else ""
        raise ValueError(
            f"unknown provider(s) {', '.join(map(repr, unknown))}{hint}: "
            f"use 'auto' or a list of {', '.join(ORT_PROVIDERS)}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"providers lists a provider twice: {names}")
    if "openvino" in names[1:]:
        raise ValueError(
            "openvino replaces ONNX Runtime for the model, so it can only come first "
            f"(e.g. [openvino, cpu]: ONNX Runtime's CPU if OpenVINO cannot run it); got {names}"
        )
    return names


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _url_with_scheme(value: str, what: str) -> str:
    if "://" not in value:
        raise ValueError(f"{what} {value!r} is not a URL (expected scheme://...)")
    return value


def resolve_model_path(raw: str | Path, base_dir: Path | None) -> Path:
    """A model path as LineWatch opens it: ``~`` expanded, relative to ``base_dir``."""
    path = Path(raw).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return Path(os.path.normpath(path)) if path.is_absolute() else path


# --- models ----------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)


class BackoffConfig(_Section):
    """Reconnect delays after a source failure: exponential with jitter."""

    initial_s: float = Field(default=0.5, gt=0, description="first reconnect delay")
    max_s: float = Field(default=30.0, gt=0, description="longest reconnect delay")
    factor: float = Field(default=2.0, ge=1.0, description="delay multiplier per failed attempt")
    jitter: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="fraction of each delay drawn at random: uniform in [(1 - jitter) d, d]; "
        "1 = full jitter",
    )

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> BackoffConfig:
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s ({self.max_s}) is below initial_s ({self.initial_s})")
        return self


class CameraConfig(_Section):
    """One camera (or video file, or sim stream) and the model that watches it."""

    id: str
    source: str
    model: str | None = None
    line: str = "line-1"
    enabled: bool = True
    fps: float | None = Field(default=None, gt=0, description="pace; None: the source's own rate")
    realtime: bool = True
    loop: bool = True
    width: int | None = Field(default=None, gt=0, le=16384)
    height: int | None = Field(default=None, gt=0, le=16384)
    open_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)
    backoff: BackoffConfig = BackoffConfig()
    calibration: CalibrationConfig | None = Field(
        default=None, description="px -> work-plane mm (docs/calibration.md); None: pixels only"
    )
    tracker: TrackerConfig = Field(
        default_factory=TrackerConfig, description="the camera's multi-object tracker"
    )
    pose_filter: PoseFilterConfig = Field(
        default_factory=PoseFilterConfig,
        description="per-track orientation filter of rigid part poses (calibrated cameras)",
    )

    @field_validator("calibration")
    @classmethod
    def _calibration(cls, value: CalibrationConfig | None) -> CalibrationConfig | None:
        if value is not None and value.points is None and value.homography is None:
            raise ValueError("calibration needs 'points' (>= 4 pairs) or a 'homography'")
        return value

    @field_validator("id", "line")
    @classmethod
    def _ids(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        return _check_source(value)


class ModelConfig(_Section):
    """One ONNX model and how ONNX Runtime runs it."""

    id: str
    path: Path
    providers: Annotated[
        Literal["auto"] | list[ProviderName], BeforeValidator(normalize_providers)
    ] = "auto"
    intra_op_threads: int = Field(
        default=0, ge=0, description="0: auto, every usable core but one (at least one)"
    )
    inter_op_threads: int = Field(default=0, ge=0, description="0: ONNX Runtime's default")
    instances: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="sessions running consecutive batches side by side; auto: 2 for a heavy "
        "model on the CPU, else 1",
    )
    cpu_rewrites: bool = Field(
        default=True, description="on ONNX Runtime's CPU, run a rewritten copy of the graph "
        "(Conv+Split, inner-axis Softmax; docs/models.md, CPU graph rewrites)",
    )
    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_detections: int | None = Field(
        default=None, ge=1, description="keep at most this many instances per frame"
    )
    max_batch: int = Field(default=8, ge=1, le=256)
    batch_window_ms: float = Field(default=0.0, ge=0.0, le=1000.0)
    warmup_runs: int = Field(default=3, ge=0, le=1000)
    adapter: Annotated[AdapterSpec, BeforeValidator(tag_adapter)] = Field(
        default_factory=AutoSpec,
        description="auto (from the file) or a forced adapter with its settings (docs/models.md)",
    )
    gpu: GpuConfig = Field(
        default_factory=GpuConfig,
        description="the GPU fast path on TensorRT/CUDA: fp16, engine cache, IO binding, "
        "CUDA graphs (docs/models.md, GPU)",
    )
    openvino: OpenVinoConfig = Field(
        default_factory=OpenVinoConfig,
        description="OpenVINO's CPU runtime (providers: [openvino, cpu]): precision f32 or "
        "bf16 (docs/models.md, OpenVINO)",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("gpu", mode="after")
    @classmethod
    def _resolve_engine_cache(cls, value: GpuConfig, info: ValidationInfo) -> GpuConfig:
        """A relative engine_cache_dir resolves against the config file's directory."""
        if value.engine_cache_dir is None:
            return value
        base = (info.context or {}).get("base_dir")
        return value.model_copy(
            update={"engine_cache_dir": resolve_model_path(value.engine_cache_dir, base)}
        )

    @field_validator("path", mode="after")
    @classmethod
    def _resolve(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return resolve_model_path(value, base)

    def ort_providers(self, available: list[str]) -> list[str]:
        """ONNX Runtime provider names to request, in order, among ``available``.

        ``auto`` is TensorRT, then CUDA, when available, then CPU.
        """
        wanted = ["tensorrt", "cuda", "cpu"] if self.providers == "auto" else self.providers
        names = [ORT_PROVIDERS[p] for p in wanted]
        return [n for n in names if n in available]


class TokenConfig(_Section):
    """A bearer token and what it may do (``read``: GET and websockets; ``admin``: all)."""

    token: str = Field(min_length=1, pattern=r"^\S+$", repr=False)
    scope: Literal["read", "admin"] = "read"
    name: str | None = None


class AuthConfig(_Section):
    enabled: bool = False
    tokens: list[TokenConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tokens_when_enabled(self) -> AuthConfig:
        if self.enabled and not self.tokens:
            raise ValueError(
                "auth is enabled but no tokens are configured: add api.auth.tokens "
                "(e.g. LINEWATCH_API__AUTH__TOKENS__0__TOKEN=...)"
            )
        return self


class ApiConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0: any free port")
    cors_origins: list[str] = Field(default_factory=list)
    auth: AuthConfig = AuthConfig()


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host[:port]`` / ``mqtts://...`` -> (host, port, tls); ValueError when bad."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in MQTT_DEFAULT_PORTS:
        raise ValueError(f"{url!r} is not an mqtt:// or mqtts:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "put no credentials in the bus url (it is logged and shown): set "
            "bus.mqtt.username and bus.mqtt.password, e.g. LINEWATCH_BUS__MQTT__PASSWORD"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bus url {url!r}: expected {scheme}://host[:port] with no path")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bus url {url!r}: the port is not a number in 1-65535") from None
    if not parts.hostname:
        raise ValueError(f"bus url {url!r} names no broker host: use {scheme}://host[:port]")
    return parts.hostname, port or MQTT_DEFAULT_PORTS[scheme], scheme == "mqtts"


def _check_topic_prefix(value: str) -> str:
    levels = value.split("/")
    if not value or any(not lvl for lvl in levels) or value.startswith("$"):
        raise ValueError(
            f"topic prefix {value!r}: use levels separated by '/', with no empty level, "
            "no leading or trailing '/' and no leading '$' (e.g. linewatch/v1)"
        )
    if any(c in value for c in "+#\x00"):
        raise ValueError(f"topic prefix {value!r} may not contain the wildcards '+' or '#'")
    return value


class MqttConfig(_Section):
    """MQTT client settings, used when ``bus.url`` is ``mqtt://`` or ``mqtts://``."""

    topic_prefix: str = Field(default="linewatch/v1", description="topics start with this")
    client_id: str | None = Field(
        default=None, max_length=128,
        description="None: linewatch-worker-<worker_id> or linewatch-api-<host>-<random>",
    )
    worker_id: str | None = Field(
        default=None, description="names the worker's LWT topic; None: the host name"
    )
    username: str | None = None
    password: SecretStr | None = Field(default=None, description="set it from the environment")
    ca_file: Path | None = Field(default=None, description="mqtts: CA bundle; None: system CAs")
    qos: Literal[1, 2] = Field(default=1, description="QoS of state, event and status messages")
    keepalive_s: int = Field(default=15, ge=5, le=3600)
    reconnect_max_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    outgoing_frames: int = Field(
        default=32, ge=1, le=100_000, description="frame messages queued for the broker"
    )
    outgoing_limit: int = Field(
        default=10_000, ge=10, le=10_000_000,
        description="state/event messages queued while the broker is unreachable",
    )
    status_interval_s: float = Field(
        default=2.0, gt=0, le=3600, description="how often a worker republishes camera status"
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return _check_topic_prefix(value)

    @field_validator("worker_id")
    @classmethod
    def _worker(cls, value: str | None) -> str | None:
        return None if value is None else _check_id(value)


class BusConfig(_Section):
    url: str = Field(default="memory://", description="memory:// | mqtt://host[:1883] | mqtts://")
    frame_queue: int = Field(
        default=64, ge=1, le=100_000, description="frame messages kept per subscriber"
    )
    event_queue_limit: int = Field(
        default=1024,
        ge=1,
        le=1_000_000,
        description="undelivered state/event messages before a subscriber is cut off",
    )
    mqtt: MqttConfig = MqttConfig()

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        scheme = _url_with_scheme(value, "bus url").split("://", 1)[0].lower()
        if scheme not in BUS_SCHEMES:
            raise ValueError(
                f"unsupported bus scheme {scheme!r}: this build supports "
                f"{', '.join(s + '://' for s in sorted(BUS_SCHEMES))}"
            )
        if scheme in MQTT_DEFAULT_PORTS:
            parse_mqtt_url(value)
        return value


class StoreConfig(_Section):
    url: str = "sqlite:///linewatch.db"
    retention_days: float = Field(default=30.0, ge=0.0, description="0: keep forever")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _url_with_scheme(value, "store url")


class LoggingConfig(_Section):
    level: Annotated[LogLevel, BeforeValidator(_upper)] = "INFO"
    json_: bool = Field(default=False, alias="json")

    model_config = ConfigDict(validate_by_name=True, validate_by_alias=True)


class Config(_Section):
    """The whole LineWatch configuration."""

    cameras: list[CameraConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    api: ApiConfig = ApiConfig()
    bus: BusConfig = BusConfig()
    store: StoreConfig = StoreConfig()
    logging: LoggingConfig = LoggingConfig()
    lines: list[LineConfig] = Field(
        default_factory=list, description="production lines and their rules (docs/rules.md)"
    )

    @model_validator(mode="before")
    @classmethod
    def _single_model_default(cls, data: Any) -> Any:
        """A camera that names no model uses the only model there is."""
        if not isinstance(data, Mapping):
            return data
        models, cameras = data.get("models"), data.get("cameras")
        if not (isinstance(models, list) and len(models) == 1 and isinstance(cameras, list)):
            return data
        only = models[0]
        mid = only.get("id") if isinstance(only, Mapping) else getattr(only, "id", None)
        if not isinstance(mid, str):
            return data
        filled = [
            {**cam, "model": mid} if isinstance(cam, Mapping) and cam.get("model") is None else cam
            for cam in cameras
        ]
        return {**data, "cameras": filled}

    @model_validator(mode="after")
    def _cross_references(self, info: ValidationInfo) -> Config:
        if (info.context or {}).get("cross_checked"):
            return self  # load_config checked the raw data, with line numbers
        problems = cross_check(
            self.model_dump(mode="python", by_alias=True), None, check_files=False
        )
        if problems:
            raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    def camera(self, camera_id: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.id == camera_id:
                return cam
        raise KeyError(camera_id)

    def model(self, model_id: str) -> ModelConfig:
        for mod in self.models:
            if mod.id == model_id:
                return mod
        raise KeyError(model_id)

    def line(self, line_id: str) -> LineConfig:
        for line in self.lines:
            if line.id == line_id:
                return line
        raise KeyError(line_id)

    def line_cameras(self, line_id: str) -> list[str]:
        """Enabled cameras whose frames feed ``line_id`` (their ``line`` names it)."""
        return [c.id for c in self.cameras if c.enabled and c.line == line_id]

    def model_for(self, camera: CameraConfig | str) -> ModelConfig:
        """The model that runs on ``camera`` (always set after validation)."""
        cam = self.camera(camera) if isinstance(camera, str) else camera
        if cam.model is None:  # only possible without any model
            raise KeyError(f"camera {cam.id!r} has no model")
        return self.model(cam.model)


# --- cross checks on raw data (so that they run even when other keys are bad) -----


def cross_check(data: Any, base_dir: Path | None, *, check_files: bool) -> list[tuple[Loc, str]]:
    """Unique ids, camera -> model references and model files, on raw (dict) data."""
    if not isinstance(data, Mapping):
        return []
    problems: list[tuple[Loc, str]] = []
    models = data.get("models")
    models = models if isinstance(models, list) else []
    cameras = data.get("cameras")
    cameras = cameras if isinstance(cameras, list) else []

    def unique_ids(section: str, items: list[Any]) -> list[str]:
        first: dict[str, int] = {}
        for i, item in enumerate(items):
            ident = item.get("id") if isinstance(item, Mapping) else None
            if isinstance(ident, str | int) and not isinstance(ident, bool):
                key = str(ident)
                if key in first:
                    problems.append(
                        ((section, i, "id"), f"duplicate id {key!r} (also {section}[{first[key]}])")
                    )
                else:
                    first[key] = i
        return list(first)

    model_ids = unique_ids("models", models)
    unique_ids("cameras", cameras)

    for i, cam in enumerate(cameras):
        if not isinstance(cam, Mapping):
            continue
        ref = cam.get("model")
        if ref is None:
            if len(models) > 1:
                problems.append(
                    (
                        ("cameras", i, "model"),
                        f"required when more than one model is configured (models: "
                        f"{', '.join(model_ids)})",
                    )
                )
            elif not models:
                problems.append(
                    (("cameras", i, "model"), "no models are configured: add one under 'models'")
                )
        elif str(ref) not in model_ids:
            known = ", ".join(model_ids) or "none"
            problems.append((("cameras", i, "model"), f"unknown model {ref!r} (models: {known})"))

    problems.extend(_check_lines(data, cameras, unique_ids))
    problems.extend(_check_adapters(models, cameras, model_ids))

    if check_files:
        for i, mod in enumerate(models):
            raw = mod.get("path") if isinstance(mod, Mapping) else None
            if isinstance(raw, str | Path) and str(raw):
                path = resolve_model_path(raw, base_dir)
                if not path.is_file():
                    what = "is not a file" if path.exists() else "not found"
                    problems.append((("models", i, "path"), f"model file {what}: {path}"))
                else:
                    problems.extend(_check_adapter_fits(("models", i, "adapter"), mod, path))
                    problems.extend(_check_cuda_graphs(("models", i, "gpu", "cuda_graphs"),
                                                       mod, path))
    return problems


def _adapter_section(mod: Any) -> Mapping[str, Any]:
    raw = tag_adapter(mod.get("adapter")) if isinstance(mod, Mapping) else None
    return raw if isinstance(raw, Mapping) else {}


def _check_adapters(
    models: list[Any], cameras: list[Any], model_ids: list[str]
) -> list[tuple[Loc, str]]:
    """ROIs: a detector is another configured model (no cycles); per-camera boxes name
    cameras that run the model, and every camera that runs it has boxes."""
    problems: list[tuple[Loc, str]] = []
    detector_of: dict[str, str] = {}
    for i, mod in enumerate(models):
        roi = _adapter_section(mod).get("roi")
        if not isinstance(roi, Mapping) or not isinstance(mod, Mapping):
            continue
        mid = str(mod.get("id"))
        det = roi.get("detector")
        if isinstance(det, str):
            loc: Loc = ("models", i, "adapter", "roi", "detector")
            if det == mid:
                problems.append((loc, f"model {mid!r} cannot be its own detector"))
            elif det not in model_ids:
                problems.append((loc, f"unknown model {det!r} (models: {', '.join(model_ids)})"))
            else:
                detector_of[mid] = det
        boxes = roi.get("boxes")
        if not isinstance(boxes, Mapping):
            continue
        users = [
            (j, str(cam.get("id"))) for j, cam in enumerate(cameras)
            if isinstance(cam, Mapping) and cam.get("enabled", True) is not False
            and str(cam.get("model") or (model_ids[0] if len(model_ids) == 1 else "")) == mid
        ]
        user_ids = {cam for _, cam in users}
        for cam in boxes if cameras else ():  # a models-only file (linewatch predict) names any
            if cam != "*" and str(cam) not in user_ids:
                problems.append((
                    ("models", i, "adapter", "roi", "boxes", str(cam)),
                    f"camera {cam!r} does not run model {mid!r} (its cameras: "
                    f"{', '.join(sorted(user_ids)) or 'none'}); use a camera id or '*'",
                ))
        if "*" not in boxes:
            for j, cam in users:
                if cam not in boxes:
                    problems.append((
                        ("cameras", j, "model"),
                        f"model {mid!r} has fixed ROIs per camera (adapter.roi.boxes) but none "
                        f"for {cam!r}: add adapter.roi.boxes.{cam} (or '*' for every camera)",
                    ))
    for i, mod in enumerate(models):
        mid = str(mod.get("id")) if isinstance(mod, Mapping) else ""
        seen = [mid]
        while seen[-1] in detector_of:
            nxt = detector_of[seen[-1]]
            if nxt in seen:
                problems.append((
                    ("models", i, "adapter", "roi", "detector"),
                    f"detectors form a cycle: {' -> '.join([*seen, nxt])}",
                ))
                break
            seen.append(nxt)
    return problems


def _check_adapter_fits(loc: Loc, mod: Mapping[str, Any], path: Path) -> list[tuple[Loc, str]]:
    """The model file must fit its adapter settings (read with onnx, no session): a forced
    adapter, input overrides, or (auto) some adapter at all."""
    from pydantic import ValidationError as _Invalid

    from service.errors import ModelError
    from service.inference.adapter_config import parse_adapter_spec
    from service.inference.adapters import check_adapter_fits

    try:
        spec = parse_adapter_spec(mod.get("adapter"))
    except _Invalid:
        return []  # reported by the validation of the section itself
    try:
        check_adapter_fits(path, spec.resolved())
    except ModelError as exc:
        return [(loc, str(exc))]
    return []


def _check_cuda_graphs(loc: Loc, mod: Mapping[str, Any], path: Path) -> list[tuple[Loc, str]]:
    """``gpu.cuda_graphs`` needs a model with a fixed batch (read with onnx, no session)."""
    gpu = mod.get("gpu")
    if not (isinstance(gpu, Mapping) and gpu.get("cuda_graphs") is True):
        return []
    from service.errors import ModelError
    from service.inference.config import GpuConfig
    from service.inference.metadata import read_model_info
    from service.inference.session import check_cuda_graphs

    try:
        check_cuda_graphs(read_model_info(path), GpuConfig(cuda_graphs=True),
                          str(mod.get("id", path.stem)))
    except ModelError as exc:
        return [(loc, str(exc))]
    return []


def _check_lines(
    data: Mapping[str, Any], cameras: list[Any], unique_ids: Any
) -> list[tuple[Loc, str]]:
    """Lines: unique ids; every camera a line or rule names exists and feeds that line."""
    lines = data.get("lines")
    lines = lines if isinstance(lines, list) else []
    problems: list[tuple[Loc, str]] = []
    unique_ids("lines", lines)
    camera_line: dict[str, str] = {}
    for cam in cameras:
        if isinstance(cam, Mapping) and isinstance(cam.get("id"), str):
            line_ref = cam.get("line", "line-1")
            camera_line[cam["id"]] = str(line_ref)
    known = ", ".join(camera_line) or "none"

    def check(loc: Loc, camera: Any, line_id: str) -> None:
        if not isinstance(camera, str):
            return
        if camera not in camera_line:
            problems.append((loc, f"unknown camera {camera!r} (cameras: {known})"))
        elif camera_line[camera] != line_id:
            problems.append(
                (
                    loc,
                    f"camera {camera!r} feeds line {camera_line[camera]!r}, not {line_id!r}: "
                    f"set its 'line: {line_id}' or move the rule to line "
                    f"{camera_line[camera]!r}",
                )
            )

    for i, line in enumerate(lines):
        if not isinstance(line, Mapping):
            continue
        line_id = str(line.get("id", ""))
        line_cams = line.get("cameras")
        for j, camera in enumerate(line_cams if isinstance(line_cams, list) else []):
            check(("lines", i, "cameras", j), camera, line_id)
        rules = line.get("rules")
        for j, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, Mapping):
                continue
            if "camera" in rule:
                check(("lines", i, "rules", j, "camera"), rule["camera"], line_id)
            named = rule.get("cameras")
            for k, camera in enumerate(named if isinstance(named, list) else []):
                check(("lines", i, "rules", j, "cameras", k), camera, line_id)
    return problems


# --- YAML with line numbers -------------------------------------------------------


def format_loc(loc: Loc) -> str:
    """``("cameras", 1, "source")`` -> ``cameras[1].source``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


@dataclass(frozen=True)
class ConfigIssue:
    """One configuration error: where it came from, where in the tree, what is wrong."""

    origin: str  # the file, "<embedded default>" or "environment variable NAME"
    line: int | None
    location: str  # cameras[1].source
    message: str

    def __str__(self) -> str:
        where = f"{self.origin}:{self.line}" if self.line is not None else self.origin
        return (
            f"{where}: {self.location}: {self.message}"
            if self.location
            else f"{where}: {self.message}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "line": self.line,
            "location": self.location,
            "message": self.message,
        }


class ConfigInvalid(ConfigError):
    """A configuration with one or more errors; ``str()`` is one error per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))


def _node_line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


MAX_YAML_ENTRIES = 100_000
"""A config with more keys and items than this (e.g. an alias bomb) is refused."""


class _TooLarge(Exception):
    """The YAML document nests too deep or expands to too many entries."""


def _map_lines(
    node: yaml.Node,
    path: Loc,
    lines: dict[Loc, int],
    problems: list[tuple[Loc, int, str]],
    depth: int = 0,
    *,
    merged: bool = False,
) -> None:
    """Record the line of every mapping key and sequence item under ``path``."""
    if depth > 100 or len(lines) > MAX_YAML_ENTRIES:
        raise _TooLarge
    if isinstance(node, yaml.MappingNode):
        merges: list[yaml.Node] = []
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges.extend(
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = key_node.value, _node_line(key_node)
            child = (*path, key)
            if merged:
                if child in lines:  # an explicit key overrides a merged one
                    continue
            elif key in seen:
                problems.append((child, line, f"duplicate key (first defined at line {seen[key]})"))
            seen[key] = line
            lines[child] = line
            _map_lines(value_node, child, lines, problems, depth + 1)
        for merge in merges:
            _map_lines(merge, path, lines, problems, depth + 1, merged=True)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.setdefault((*path, i), _node_line(item))
            _map_lines(item, (*path, i), lines, problems, depth + 1)


@dataclass
class _Parsed:
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)


def parse_yaml(text: str, origin: str) -> _Parsed:
    """Parse YAML into plain data and a ``path -> line`` map; syntax errors become issues."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return _Parsed(None)
        lines: dict[Loc, int] = {(): _node_line(node)}
        dupes: list[tuple[Loc, int, str]] = []
        _map_lines(node, (), lines, dupes)  # before construction, which flattens merges
        data = loader.construct_document(node)
    except _TooLarge:
        message = (
            f"the document nests deeper than 100 levels or expands (through aliases) to more "
            f"than {MAX_YAML_ENTRIES} keys and items"
        )
        return _Parsed(None, issues=[ConfigIssue(origin, None, "", message)])
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return _Parsed(
            None,
            issues=[
                ConfigIssue(
                    origin, mark.line + 1 if mark else None, "", f"YAML syntax error: {detail}"
                )
            ],
        )
    except yaml.YAMLError as exc:
        return _Parsed(None, issues=[ConfigIssue(origin, None, "", f"YAML error: {exc}")])
    finally:
        loader.dispose()
    issues = [ConfigIssue(origin, line, format_loc(loc), msg) for loc, line, msg in dupes]
    return _Parsed(data, lines, issues)


# --- environment overrides ---------------------------------------------------------


def _env_value(raw: str) -> Any:
    """Env values are strings (pydantic converts them), except YAML/JSON lists and mappings."""
    text = raw.strip()
    if text.startswith(("[", "{")):
        return yaml.safe_load(text)
    if text in ("null", "~"):
        return None
    return raw


def _env_sort_key(name: str) -> list[tuple[int, str]]:
    return [(int(p), "") if p.isdigit() else (-1, p) for p in name.split("__")]


def apply_env(
    data: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[Loc, str], list[ConfigIssue]]:
    """Apply ``LINEWATCH_...`` overrides to ``data`` in place.

    Returns the paths set (or created) by each variable, and the problems found.
    Variables whose first part names no config section and has no ``__`` (for
    example ``LINEWATCH_CONFIG``) are not config overrides and are ignored.
    """
    sections = set(Config.model_fields)
    origins: dict[Loc, str] = {}
    issues: list[ConfigIssue] = []
    names = sorted((n for n in env if n.startswith(ENV_PREFIX)), key=_env_sort_key)
    for name in names:
        origin = f"environment variable {name}"
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if parts[0] not in sections:
            if len(parts) > 1:
                close = difflib.get_close_matches(parts[0], sections, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                issues.append(
                    ConfigIssue(
                        origin,
                        None,
                        parts[0],
                        f"unknown config section{hint}; sections are {', '.join(sorted(sections))}",
                    )
                )
            continue
        if any(not p for p in parts):
            issues.append(ConfigIssue(origin, None, "", "empty key between '__' separators"))
            continue
        try:
            value = _env_value(env[name])
        except yaml.YAMLError as exc:
            issues.append(
                ConfigIssue(origin, None, ".".join(parts), f"value is not valid YAML/JSON: {exc}")
            )
            continue
        problem = _set_path(data, parts, value, name, origins)
        if problem:
            issues.append(ConfigIssue(origin, None, problem[0], problem[1]))
    return origins, issues


def _set_path(
    data: dict[str, Any], parts: list[str], value: Any, name: str, origins: dict[Loc, str]
) -> tuple[str, str] | None:
    container: Any = data
    path: Loc = ()
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(container, list):
            if not part.isdigit():
                return format_loc(path), f"is a list: use an index, not {part!r}"
            index = int(part)
            if index > len(container):
                return (
                    format_loc((*path, index)),
                    f"index out of range: {format_loc(path)} has {len(container)} items "
                    f"(use {len(container)} to add one)",
                )
            key: str | int = index
            if index == len(container):
                container.append(value if last else ([] if parts[i + 1].isdigit() else {}))
                origins.setdefault((*path, index), name)
        elif isinstance(container, dict):
            key = part
            if key not in container or (not last and container[key] is None):
                container[key] = value if last else ([] if parts[i + 1].isdigit() else {})
                origins.setdefault((*path, key), name)
        else:
            return format_loc(
                path
            ), f"cannot set {part!r} inside a {type(container).__name__} value"
        path = (*path, key)
        if last:
            container[key] = value
            origins[path] = name
        else:
            container = container[key]
    return None


# --- loading ---------------------------------------------------------------------


def _package_root() -> Path:
    """The directory that holds the ``service`` package (the repository root in a checkout)."""
    return Path(__file__).resolve().parent.parent


def default_config_text() -> str:
    """The embedded default configuration (``service/default.yaml``), with its comments."""
    return resources.files("service").joinpath("default.yaml").read_text(encoding="utf-8")


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class at ``loc``; a tagged union's member is picked by the tag in ``loc``."""
    cls: type[BaseModel] = Config
    members: list[type[BaseModel]] = []
    for part in loc:
        if isinstance(part, int):
            continue
        tagged = [m for m in members if part in _tags_of(m)]
        if tagged:
            cls, members = tagged[0], []
            continue
        info = cls.model_fields.get(part)
        if info is None:
            info = next((f for f in cls.model_fields.values() if f.alias == part), None)
        found = _find_models(info.annotation) if info is not None else []
        if not found:
            return None
        cls, members = found[0], found if len(found) > 1 else []
    return cls


def _tags_of(model: type[BaseModel]) -> set[str]:
    """The discriminator values (``type``/``kind`` literals) a union member answers to."""
    tags: set[str] = set()
    for name in ("type", "kind"):
        info = model.model_fields.get(name)
        if info is not None:
            tags.update(str(a) for a in get_args(info.annotation))
    return tags


def _find_models(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    found: list[type[BaseModel]] = []
    for arg in get_args(tp):
        found.extend(m for m in _find_models(arg) if m not in found)
    return found


def _message(err: Mapping[str, Any]) -> str:
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; valid keys: {', '.join(valid)}" if valid else "unknown key"
    if kind == "missing":
        return "Field required"
    ctx = err.get("ctx") or {}
    msg = (
        str(ctx["error"])
        if kind in ("value_error", "assertion_error") and "error" in ctx
        else str(err["msg"])
    )
    value = err.get("input")
    if (
        kind not in ("value_error",)
        and isinstance(value, str | int | float | bool)
        and "token" not in loc
    ):
        shown = repr(value)
        msg += f" (got {shown[:60] + '...' if len(shown) > 60 else shown})"
    return msg


def _origin_of(
    loc: Loc, lines: Mapping[Loc, int], env: Mapping[Loc, str], file_origin: str
) -> tuple[str, int | None]:
    for n in range(len(loc), -1, -1):
        prefix = loc[:n]
        if prefix in env:
            return f"environment variable {env[prefix]}", None
        if prefix in lines:
            return file_origin, lines[prefix]
    return file_origin, None


def _untagged(loc: Loc, data: Any) -> Loc:
    """``loc`` without the tags pydantic adds for a tagged union member (``...adapter.simcc.nms``
    -> ``...adapter.nms``), so that it names keys of the YAML document."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part not in node and (
            part in (node.get("type"), node.get("kind")) or part == "auto"
        ):
            continue
        if isinstance(node, str) and part == node.strip().lower():  # adapter: regression
            continue
        out.append(part)
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


@dataclass
class ConfigReport:
    """What :func:`check_config` found: the config (when valid) and every issue."""

    origin: str
    config: Config | None
    issues: list[ConfigIssue]

    @property
    def ok(self) -> bool:
        return not self.issues


def check_config(
    path: Path | None, *, env: Mapping[str, str] | None = None, check_files: bool = True
) -> ConfigReport:
    """Load and validate a config file (None: the embedded default); never raises.

    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    """
    environ = os.environ if env is None else env
    if path is None:
        origin, base_dir, text = DEFAULT_ORIGIN, _package_root(), default_config_text()
    else:
        origin, base_dir = str(path), Path(path).resolve().parent
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return ConfigReport(
                origin, None, [ConfigIssue(origin, None, "", "config file not found")]
            )
        except (OSError, UnicodeDecodeError) as exc:
            return ConfigReport(
                origin, None, [ConfigIssue(origin, None, "", f"cannot read config file: {exc}")]
            )
    parsed = parse_yaml(text, origin)
    if parsed.issues and parsed.data is None:
        return ConfigReport(origin, None, parsed.issues)
    data = {} if parsed.data is None else parsed.data
    if not isinstance(data, dict):
        return ConfigReport(
            origin,
            None,
            [
                *parsed.issues,
                ConfigIssue(
                    origin,
                    parsed.lines.get(()),
                    "",
                    f"the top level must be a mapping of sections, got a {type(data).__name__}",
                ),
            ],
        )
    env_paths, issues = apply_env(data, environ)
    issues = [*parsed.issues, *issues]

    def locate(loc: Loc, message: str) -> ConfigIssue:
        where, line = _origin_of(_untagged(loc, data), parsed.lines, env_paths, origin)
        return ConfigIssue(where, line, format_loc(loc), message)

    issues += [
        locate(loc, msg) for loc, msg in cross_check(data, base_dir, check_files=check_files)
    ]
    config: Config | None = None
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir, "cross_checked": True})
    except ValidationError as exc:
        issues += [locate(tuple(err["loc"]), _message(err)) for err in exc.errors()]
    issues.sort(key=lambda i: (i.origin != origin, i.line if i.line is not None else 1 << 30))
    return ConfigReport(origin, config if not issues else None, issues)


def load_config(
    path: Path | None, *, env: Mapping[str, str] | None = None, check_files: bool = True
) -> Config:
    """Load, override from the environment and validate; raise :class:`ConfigInvalid`.

    ``path`` None loads the embedded default.  The error lists every problem, one
    per line, each naming its file and line (or environment variable).
    """
    report = check_config(path, env=env, check_files=check_files)
    if report.config is None:
        raise ConfigInvalid(report.issues)
    return report.config


def dump_config(config: Config) -> str:
    """The effective configuration as YAML (model paths absolute, tokens included)."""
    data = config.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
