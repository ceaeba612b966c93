"""The composition root: cameras, models, inference loops and the hub, from a Config.

``Runtime.build(config, hub)`` parses every camera source and loads every model
(ONNX Runtime session, warm-up) before anything starts, so a bad config or a bad
model fails at once with its own message.  ``start()`` starts the capture threads
and one inference loop per model; ``stop()`` drains gracefully: it stops the
cameras, lets each loop publish its in-flight batch, then closes the hub.

The API sees the runtime only through :class:`RuntimeStatus` (read-only
snapshots, see ``service.api.views.RuntimeView``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from service.api.schemas import (
    CameraSnapshot,
    ClassSnapshot,
    ModelSnapshot,
    Readiness,
    TensorSnapshot,
)
from service.api.views import LatestSnapshot
from service.config import CameraConfig, Config, ModelConfig
from service.domain import ClassInfo, Frame
from service.errors import ConfigError, ModelError
from service.geometry import Homography, PoseEstimator
from service.inference import InferenceConfig
from service.inference.runner import Predictor
from service.pipeline import (
    CameraFeed,
    CameraStages,
    EventRecorder,
    InferenceLoop,
    LatestFrames,
    LatestStates,
    LineTicker,
    Message,
    iso_utc,
)
from service.rules import RuleEngine
from service.sources import Backoff, Camera, SourceOptions, mask_credentials
from service.sources.replay import ReplaySource
from service.sources.spec import open_source
from service.store import EventStore
from service.telemetry.memory import keep_frames_out_of_the_heap
from service.tracking import Tracker

if TYPE_CHECKING:
    from service.api.factory import ApiSettings

log = logging.getLogger(__name__)


class Hub(Protocol):
    """What the runtime needs of the bus: a non-blocking publish, and close."""

    def publish(self, msg: Message) -> Any: ...

    def close(self) -> Any: ...


@runtime_checkable
class SimTimed(Protocol):
    """A camera that knows the simulated time of each frame (sim:// sources)."""

    def sim_time(self, seq: int) -> float | None: ...


# --- config -> parts (pure) ----------------------------------------------------------


def source_options(cam: CameraConfig) -> SourceOptions:
    return SourceOptions(
        fps=cam.fps,
        loop=cam.loop,
        realtime=cam.realtime,
        open_timeout_s=cam.open_timeout_s,
        read_timeout_s=cam.read_timeout_s,
        backoff_initial_s=cam.backoff.initial_s,
        backoff_max_s=cam.backoff.max_s,
        width=cam.width,
        height=cam.height,
    )


def inference_config(mod: ModelConfig) -> InferenceConfig:
    """How ONNX Runtime runs one configured model (what ``open_session`` and ``OrtModel`` read).

    The GPU and OpenVINO sections pass through, except that their uint8-input graphs are
    off when the model's ``adapter.input`` overrides the input conversion (as ``OrtModel``
    decides), so a bare session built from this config (the bench's) takes the same feeds.
    """
    from service.config import ORT_PROVIDERS
    from service.inference.session import device_input_allowed

    providers: str | list[str] = (
        "auto" if mod.providers == "auto" else [ORT_PROVIDERS[p] for p in mod.providers]
    )
    gpu, openvino = mod.gpu, mod.openvino
    if not device_input_allowed(mod.adapter.resolved().input):
        gpu = gpu.model_copy(update={"uint8_input": False})
        openvino = openvino.model_copy(update={"uint8_input": False})
    return InferenceConfig(
        providers=providers,
        intra_op_threads=mod.intra_op_threads,
        inter_op_threads=mod.inter_op_threads,
        instances=mod.instances,
        cpu_rewrites=mod.cpu_rewrites,
        warmup_runs=mod.warmup_runs,
        score_threshold=mod.score_threshold,
        max_detections=mod.max_detections,
        max_batch=mod.max_batch,
        gpu=gpu,
        openvino=openvino,
    )


def _log_fixed_batch(mod: ModelConfig, fixed: int, cameras: int) -> None:
    """Say that a fixed-batch model cannot batch its cameras up to ``max_batch``."""
    (log.warning if "max_batch" in mod.model_fields_set else log.info)(
        "model %s: its file has a fixed batch of %d, so its %d cameras run in batches of "
        "%d, not up to max_batch %d; export it with a dynamic batch (Ultralytics: "
        "export(format='onnx', dynamic=True)) to batch them", mod.id, fixed, cameras, fixed,
        mod.max_batch,
    )


def load_predictors(config: Config, ids: Sequence[str] | None = None) -> dict[str, Predictor]:
    """Load the models ``ids`` (default: all) with their adapters, and the detectors their
    ROIs name (each model once; a detector before the models that use it).

    Raises :class:`ModelError` when a file cannot be loaded or does not fit its forced
    adapter (the message names the model id).
    """
    loaded: dict[str, Predictor] = {}

    def load(model_id: str, chain: tuple[str, ...]) -> Predictor:
        if model_id in loaded:
            return loaded[model_id]
        if model_id in chain:
            raise ConfigError(f"model detectors form a cycle: {' -> '.join([*chain, model_id])}")
        mod = config.model(model_id)
        settings = mod.adapter.resolved()
        detector = (
            load(settings.roi.detector, (*chain, model_id))
            if settings.roi.detector is not None else None
        )
        try:
            predictor = Predictor(mod.path, inference_config(mod), settings, detector,
                                  name=mod.id)
        except ModelError as exc:
            raise ModelError(f"Model {model_id!r}: {exc}") from exc
        loaded[model_id] = predictor
        return predictor

    for model_id in ids if ids is not None else [m.id for m in config.models]:
        load(model_id, ())
    return loaded


def masked_config(config: Config) -> dict[str, Any]:
    """The effective config as JSON data, with tokens and source credentials masked."""
    data = config.model_dump(mode="json", by_alias=True)
    for cam in data.get("cameras", []):
        cam["source"] = mask_credentials(str(cam["source"]))
    for token in data.get("api", {}).get("auth", {}).get("tokens", []):
        token["token"] = "***"
    return data


def part_templates(
    classes: Sequence[ClassInfo], metadata: Mapping[str, str] | None = None
) -> dict[int, np.ndarray]:
    """Rigid keypoint templates (mm, part coordinates) by class id, for part poses.

    From the model's ``templates_mm`` metadata (a JSON object: class name -> list of
    [x, y] per keypoint) when it has one; else, for a class whose name and keypoint
    names are those of a synthetic-line class (the shipped model), the sim's
    template.  Articulated classes (an arm, a hand) get none.
    """
    from service.sim import CLASSES as SIM_CLASSES

    given: dict[str, Any] = {}
    raw = (metadata or {}).get("templates_mm")
    if raw:
        try:
            given = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model metadata templates_mm is not JSON: {exc}") from exc
    sim = {c.name: c for c in SIM_CLASSES}
    out: dict[int, np.ndarray] = {}
    for cid, info in enumerate(classes):
        if info.name in given and given[info.name] is not None:
            out[cid] = np.asarray(given[info.name], np.float64).reshape(-1, 2)
            continue
        ref = sim.get(info.name)
        if (
            ref is not None
            and ref.template_mm is not None
            and tuple(info.keypoint_names[: len(ref.keypoint_names)]) == ref.keypoint_names
        ):
            out[cid] = np.asarray(ref.template_mm, np.float64)
    return out


def build_engines(config: Config, classes_of: Callable[[str], Sequence[ClassInfo]]
                  ) -> dict[str, RuleEngine]:
    """One rule engine per configured line, with the classes of its cameras' model."""
    engines: dict[str, RuleEngine] = {}
    for line in config.lines:
        cams = config.line_cameras(line.id)
        tables = {tuple(c.name for c in classes_of(cam)) for cam in cams}
        if len(tables) > 1:
            raise ConfigError(
                f"line {line.id!r}: its cameras ({', '.join(cams)}) run models with different "
                f"classes ({'; '.join(', '.join(t) for t in sorted(tables))}); a line's rules "
                "name classes, so give its cameras models with the same classes"
            )
        classes = classes_of(cams[0]) if cams else ()
        engines[line.id] = RuleEngine(line, classes=classes)
    return engines


def camera_stages(
    cam: CameraConfig, classes: Sequence[ClassInfo], metadata: Mapping[str, str],
    engine: RuleEngine | None,
) -> CameraStages:
    """Tracker, pose estimator (when calibrated) and line engine of one camera."""
    homography = Homography.from_config(cam.calibration) if cam.calibration else None
    pose = (
        PoseEstimator(part_templates(classes, metadata), cam.tracker.keypoint_thresh,
                      smoothing=cam.pose_filter)
        if homography is not None
        else None
    )
    return CameraStages(Tracker(cam.tracker), pose, homography, engine)


def _engine_of(engines: Mapping[str, RuleEngine], camera: str, line: str) -> RuleEngine | None:
    """The engine that judges ``camera``: its line's, if the line takes it (a line that
    lists its cameras judges only those)."""
    engine = engines.get(line)
    if engine is None or (engine.line.cameras and camera not in engine.line.cameras):
        return None
    return engine


def _sim_time_of(camera: Camera) -> Callable[[Frame], float | None] | None:
    if not isinstance(camera, SimTimed) or not str(camera.spec).startswith("sim://"):
        return None
    lookup = camera.sim_time
    return lambda frame: lookup(frame.seq)


# --- the runtime -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedModel:
    config: ModelConfig
    model: Predictor
    cameras: tuple[str, ...]
    max_batch: int


class Runtime:
    """Owns the cameras, models and loops built from one Config."""

    def __init__(
        self,
        config: Config,
        cameras: Mapping[str, Camera],
        models: Mapping[str, LoadedModel],
        loops: list[InferenceLoop],
        hub: Hub,
        latest: LatestFrames,
        *,
        engines: Mapping[str, RuleEngine] | None = None,
        store: EventStore | None = None,
        states: LatestStates | None = None,
        ticker: LineTicker | None = None,
    ) -> None:
        self.config = config
        self.cameras = dict(cameras)
        self.models = dict(models)
        self.loops = list(loops)
        self.hub = hub
        self.latest = latest
        self.engines = dict(engines or {})
        self.store = store
        self.states = states or LatestStates()
        self.ticker = ticker
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self.status = RuntimeStatus(self)

    @classmethod
    def build(cls, config: Config, hub: Hub, *, replay_frames: int = 0) -> Runtime:
        """Parse every source and load every model; nothing runs yet.

        ``replay_frames`` > 0 (benchmarks): each camera reads that many frames of its
        source once, then replays them from memory (:class:`ReplaySource`).
        """
        enabled = [c for c in config.cameras if c.enabled]
        cameras = {}
        for c in enabled:
            options = source_options(c)
            replay = (
                ReplaySource(open_source(c.source, options), replay_frames)
                if replay_frames > 0
                else None
            )
            cameras[c.id] = Camera(
                c.id, c.source, options,
                backoff=Backoff(
                    c.backoff.initial_s, c.backoff.max_s, factor=c.backoff.factor,
                    jitter=c.backoff.jitter,
                ),
                source=replay,
            )
        models: dict[str, LoadedModel] = {}
        predictors = load_predictors(config)
        for mod in config.models:
            model = predictors[mod.id]
            info = model.info
            # A top-down model runs every frame's crops in chunks of its batch size itself.
            batches_frames = info.dynamic_batch or model.top_down
            max_batch = mod.max_batch if batches_frames else (info.fixed_batch or 1)
            fed = tuple(c.id for c in enabled if c.model == mod.id)
            if max_batch < min(len(fed), mod.max_batch):
                _log_fixed_batch(mod, max_batch, len(fed))
            models[mod.id] = LoadedModel(mod, model, fed, max_batch)
        latest = LatestFrames()

        def classes_of(cam_id: str) -> Sequence[ClassInfo]:
            return models[config.model_for(cam_id).id].model.classes

        engines = build_engines(config, classes_of)
        store = (
            EventStore(config.store.url, config.store.retention_days) if config.lines else None
        )
        states = LatestStates()
        recorder = EventRecorder(store, hub, states) if store is not None else None
        loops = []
        for loaded in models.values():
            if not loaded.cameras:
                continue
            info, classes = loaded.model.info, loaded.model.classes
            feeds = [
                CameraFeed(
                    cam_id, cameras[cam_id], line=config.camera(cam_id).line,
                    sim_time=_sim_time_of(cameras[cam_id]),
                    stages=camera_stages(
                        config.camera(cam_id), classes, info.metadata,
                        _engine_of(engines, cam_id, config.camera(cam_id).line),
                    ),
                )
                for cam_id in loaded.cameras
            ]
            loops.append(
                InferenceLoop(
                    loaded.config.id, loaded.model, classes, feeds, hub,
                    max_batch=loaded.max_batch,
                    batch_window_s=loaded.config.batch_window_ms / 1000.0, latest=latest,
                    recorder=recorder,
                )
            )
        ticker = (
            LineTicker(list(engines.values()), recorder, pruner=store)
            if recorder is not None
            else None
        )
        return cls(
            config, cameras, models, loops, hub, latest,
            engines=engines, store=store, states=states, ticker=ticker,
        )

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        for loop in self.loops:
            loop.start()
        for camera in self.cameras.values():
            camera.start()
        if self.ticker is not None:
            self.ticker.start()
        log.info(
            "runtime started: %d camera(s), %d model(s): %s",
            len(self.cameras), len(self.models),
            ", ".join(f"{m.config.id} on {m.model.provider}" for m in self.models.values()),
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the cameras, publish the in-flight batches, close the hub (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        if self.cameras:  # in parallel: a camera blocked in a read delays only itself
            with ThreadPoolExecutor(len(self.cameras), thread_name_prefix="stop") as pool:
                list(pool.map(lambda camera: camera.stop(timeout), self.cameras.values()))
        for loop in self.loops:
            loop.stop(timeout)
        if self.ticker is not None:
            self.ticker.stop(timeout)
        self.hub.close()
        if self.store is not None:
            self.store.close()
        log.info("runtime stopped")

    @property
    def stopping(self) -> bool:
        return self._stopped

    def processed(self, camera_id: str) -> int:
        return sum(loop.processed(camera_id) for loop in self.loops)


class RuntimeStatus:
    """Read-only snapshots of a :class:`Runtime` for the API (a ``RuntimeView``)."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def cameras(self) -> list[CameraSnapshot]:
        return [self._camera(cam_id) for cam_id in self._rt.cameras]

    def camera(self, camera_id: str) -> CameraSnapshot | None:
        return self._camera(camera_id) if camera_id in self._rt.cameras else None

    def _camera(self, camera_id: str) -> CameraSnapshot:
        st = self._rt.cameras[camera_id].status()
        cfg = self._rt.config.camera(camera_id)
        return CameraSnapshot(
            id=camera_id,
            source=st.source,
            state=st.state,
            reason=st.reason,
            fps=round(st.fps, 2),
            last_frame_time=iso_utc(st.last_frame_wall) if st.last_frame_wall else None,
            last_frame_ts=st.last_frame_wall,
            reconnects=st.reconnects,
            frames_captured=st.frames_captured,
            frames_processed=self._rt.processed(camera_id),
            frames_dropped=st.frames_dropped,
            model=cfg.model or "",
            line=cfg.line,
        )

    def models(self) -> list[ModelSnapshot]:
        out = []
        for loaded in self._rt.models.values():
            info = loaded.model.info
            out.append(
                ModelSnapshot(
                    id=loaded.config.id,
                    path=str(loaded.config.path),
                    provider=loaded.model.provider,
                    loaded=True,
                    classes=[
                        ClassSnapshot(
                            id=i, name=c.name, keypoints=list(c.keypoint_names),
                            skeleton=[(int(a), int(b)) for a, b in c.skeleton],
                        )
                        for i, c in enumerate(loaded.model.classes)
                    ],
                    keypoints=loaded.model.adapter.num_keypoints,
                    inputs=[
                        TensorSnapshot(name=t.name, shape=list(t.shape), dtype=t.dtype)
                        for t in info.inputs
                    ],
                    imgsz=list(info.imgsz),
                    dynamic_batch=info.dynamic_batch,
                    max_batch=loaded.max_batch,
                    cameras=list(loaded.cameras),
                    instances=loaded.model.instances,
                    threads=loaded.model.intra_op_threads,
                    acceleration=loaded.model.acceleration,
                )
            )
        return out

    def readiness(self) -> Readiness:
        reasons = []
        loops_ok = all(loop.running for loop in self._rt.loops)
        if self._rt.stopping:
            reasons.append("shutting down")
        elif not loops_ok:
            reasons.append("inference loops are not running")
        up = sum(1 for cam in self._rt.cameras.values() if cam.ready)
        if up == 0:
            reasons.append("no camera is up yet")
        models_loaded = loops_ok and not self._rt.stopping
        return Readiness(
            ready=models_loaded and up > 0, models_loaded=models_loaded, cameras_up=up,
            reasons=reasons,
        )

    def latest(self, camera_id: str) -> LatestSnapshot | None:
        latest = self._rt.latest.get(camera_id)
        return None if latest is None else LatestSnapshot(latest.frame.image, latest.message)

    def classes(self, camera_id: str) -> tuple[ClassInfo, ...]:
        model_id = self._rt.config.camera(camera_id).model
        loaded = self._rt.models.get(model_id or "")
        return loaded.model.classes if loaded else ()

    def effective_config(self) -> dict[str, Any]:
        return masked_config(self._rt.config)

    def lines(self) -> list[dict[str, Any]]:
        return [self._line(line.id) for line in self._rt.config.lines]

    def line(self, line_id: str) -> dict[str, Any] | None:
        if not any(line.id == line_id for line in self._rt.config.lines):
            return None
        return self._line(line_id)

    def _line(self, line_id: str) -> dict[str, Any]:
        """The newest ``state`` message of the line (its engine's snapshot before any)."""
        message = self._rt.states.get(line_id)
        if message is None:
            engine = self._rt.engines.get(line_id)
            snapshot: dict[str, Any] = dict(engine.snapshot()) if engine is not None else {
                "line": line_id, "state": "UNKNOWN", "since": None, "reasons": ["no frame yet"],
                "rules": [], "counters": {},
            }
            return snapshot
        return {k: v for k, v in message.items() if k not in ("v", "type")}


# --- linewatch serve ------------------------------------------------------------------


def api_settings(config: Config) -> ApiSettings:
    """The API's own settings (auth tokens, websocket queue size) from the config."""
    from service.api.auth import TokenAuth
    from service.api.factory import ApiSettings

    auth = config.api.auth
    tokens = TokenAuth.from_pairs((t.token, [t.scope]) for t in auth.tokens) if auth.enabled \
        else TokenAuth()
    return ApiSettings(
        auth=tokens, ws_queue=config.bus.frame_queue, cors_origins=tuple(config.api.cors_origins)
    )


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (``logging.json: true``), for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, as_json: bool = False) -> None:
    """Log to stderr at ``level``, as text or JSON lines (only if nothing set logging up)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            JsonLogFormatter() if as_json
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(level)


def serve(config_path: Path | None, host: str | None = None, port: int | None = None) -> None:
    """``linewatch serve``: build and start the runtime, serve the API until SIGTERM."""
    from service.api.factory import create_app
    from service.api.server import bind_socket, bound_port, run_server
    from service.api.ws import WebsocketClients
    from service.bus import create_bus
    from service.config import load_config

    config = load_config(config_path)
    setup_logging(config.logging.level, config.logging.json_)
    keep_frames_out_of_the_heap()
    host = host or config.api.host
    sock = bind_socket(host, config.api.port if port is None else port)
    runtime: Runtime | None = None
    try:
        hub = create_bus(
            config.bus.url, frame_queue=config.bus.frame_queue,
            event_limit=config.bus.event_queue_limit,
        )
        runtime = Runtime.build(config, hub)
        clients = WebsocketClients()
        app = create_app(
            runtime.status, hub, api_settings(config), clients=clients, events=runtime.store
        )
        runtime.start()
        base = f"http://{_url_host(host)}:{bound_port(sock)}"
        log.info(
            "LineWatch serving on %s  (API docs %s/docs, metrics %s/metrics, websocket "
            "%s/api/v1/ws/frames); models: %s",
            base, base, base, base.replace("http://", "ws://", 1),
            ", ".join(f"{m.config.id} on {m.model.provider}" for m in runtime.models.values()),
        )
        if not config.api.auth.enabled and not _is_loopback(host):
            log.warning(
                "listening on %s with auth off: anyone who can reach this port can read the "
                "cameras; set api.auth.enabled and a token (docs/api.md#auth)", host,
            )
        run_server(app, sock, drain=runtime.stop, clients=clients,
                   log_level=config.logging.level.lower())
    finally:
        if runtime is not None:
            runtime.stop()
        sock.close()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
