"""``linewatch bench``: the pipeline flat out, against a bare ONNX Runtime loop.

The configured cameras (sim or file sources) run in non-realtime mode (paced by
the model: nothing dropped); by default each renders or decodes its first frames
once and replays them from memory, so that the sim renderer or the video decoder
does not compete with the pipeline for the CPU (``capture_ms_per_frame`` says what
a frame costs to produce).  The real runtime (cameras, inference
loop, message building) runs for ``seconds`` after a warm-up.  Every published
message's capture-to-publish age is recorded.  Then, in the same process, the
same model file with the same providers, threads and batch size runs in a bare
loop of ``session.run`` on frames of the run, preprocessed once: ``raw_model_fps``
(with replayed sources, half of it before the pipeline runs and half after, and
the mean reported, so that a load that changes during the run weighs on both).
``overhead_ratio = raw_model_fps / fps`` is what the pipeline costs on top of the
model (1.0 = nothing).  A model with several instances (``instances``) loops as that
many sessions side by side; ``single_session_fps`` is then also timed: one session
with every core on the file as it is (no CPU graph rewrites), the plain loop a user would
write.  A model on OpenVINO
(``providers: [openvino, ...]``) is also looped on ONNX Runtime's CPU provider with the
same instances and threads: ``onnxruntime_raw_fps``, and ``fps_vs_onnxruntime_raw``.
``--compare ultralytics`` times Ultralytics' predict loop on the same file and clip, also
half before the pipeline and half after (``ultralytics_fps_runs``; ``ultralytics_fps`` is
all its frames over all its seconds).

Also reported: ``batch`` (the bare loop's batch: min(cameras, max_batch)),
``pipeline_batch_mean`` (frames over batches the pipeline's loop actually ran during the
run), ``instances_per_frame`` (what decoding, tracking and messages had to carry),
``acceleration`` (the GPU fast path's settings, OpenVINO's precision or the CPU graph
rewrites, as ``GET /api/v1/models`` shows them) and ``machine`` (CPU, GPUs, versions).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np

from service.app import LoadedModel, Runtime, inference_config
from service.config import Config, load_config
from service.domain import ImageArray
from service.errors import ConfigError, LineWatchError
from service.inference.openvino import OPENVINO
from service.inference.session import CPU, usable_cores
from service.overrides import NO_OVERRIDE, RuntimeOverride
from service.pipeline import Message
from service.sources.replay import ReplaySource

if TYPE_CHECKING:
    from service.inference.ultralytics import UltralyticsTiming


class LatencyRecorder:
    """A publisher that records capture-to-publish ages while ``recording``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._recording = False
        self.ages_ms: list[float] = []
        self.frames = 0
        self.instances = 0

    def begin(self) -> None:
        with self._lock:
            self.ages_ms.clear()
            self.frames = self.instances = 0
            self._recording = True

    def end(self) -> None:
        with self._lock:
            self._recording = False

    def publish(self, msg: Message) -> None:
        if self._recording and msg.get("type") == "frame":  # not event/state messages
            with self._lock:
                self.ages_ms.append(float(msg["age_ms"]))
                self.frames += 1
                self.instances += len(msg.get("instances") or ())

    def close(self) -> None:
        self.end()


# --- the bench config (pure) ------------------------------------------------------------


def _with_seed(source: str, seed: int) -> str:
    parts = urlsplit(source)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "seed"]
    query.append(("seed", str(seed)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def bench_config(config: Config, cameras: int | None = None) -> Config:
    """The config to benchmark: enabled cameras, non-realtime; optionally N copies of the first.

    Copies of a ``sim://`` camera get seeds 1..N so they show different parts; when
    the first camera feeds a line, each copy gets its own copy of that line (same
    rules), so the bench runs the rules it would run in service.
    """
    data = config.model_dump(mode="python", by_alias=True)
    enabled = [c for c in data["cameras"] if c.get("enabled", True)]
    if not enabled:
        raise ConfigError("linewatch bench needs at least one enabled camera in the config.")
    if cameras is not None:
        first = enabled[0]
        copies = []
        for i in range(cameras):
            cam = {**first, "id": f"bench-{i + 1}"}
            if str(first["source"]).startswith("sim://"):
                cam["source"] = _with_seed(str(first["source"]), i + 1)
            copies.append(cam)
        enabled = copies
    for cam in enabled:
        cam["realtime"] = False
        cam["loop"] = True
    used = {c["model"] for c in enabled}
    data["store"] = {**(data.get("store") or {}), "url": "sqlite://"}  # events stay in memory
    if cameras is not None:
        first_line = next(
            (ln for ln in data.get("lines") or [] if ln["id"] == enabled[0].get("line")), None
        )
        data["lines"] = []
        if first_line is not None:
            for cam in enabled:
                cam["line"] = f"{first_line['id']}-{cam['id']}"
                data["lines"].append({**first_line, "id": cam["line"], "cameras": [cam["id"]]})
    data["cameras"] = enabled
    by_id = {m["id"]: m for m in data["models"]}
    for model_id in list(used):  # and the detectors of top-down models, transitively
        while (detector := _roi(by_id.get(model_id)).get("detector")) and detector not in used:
            used.add(detector)
            model_id = detector
    data["models"] = [m for m in data["models"] if m["id"] in used]
    if cameras is not None:  # the copies look where the first camera's fixed ROIs are
        for model in data["models"]:
            boxes = _roi(model).get("boxes")
            if isinstance(boxes, dict) and first["id"] in boxes:
                _roi(model)["boxes"] = {cam["id"]: boxes[first["id"]] for cam in enabled}
    return Config.model_validate(data, context={"cross_checked": True})


def _roi(model: dict[str, Any] | None) -> dict[str, Any]:
    """The ``adapter.roi`` mapping of a dumped model config (empty when it has none)."""
    adapter = (model or {}).get("adapter")
    roi = adapter.get("roi") if isinstance(adapter, dict) else None
    return roi if isinstance(roi, dict) else {}


# --- machine info ---------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import psutil

    from service.inference.gpu import gpu_models

    cpu = platform.processor() or platform.machine()
    text = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cores(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "openvino": _version("openvino"),
        "gpus": list(gpu_models()),
        "cpu_flags": _cpu_flags(text),
    }


def _version(package: str) -> str | None:
    """An installed package's version, without importing it (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _cpu_flags(cpuinfo: str) -> list[str]:
    """The CPU's vector and matrix extensions that decide CPU inference speed (AVX2,
    AVX-512, VNNI, BF16, AMX): one machine's bf16 figure means nothing on a CPU without
    them."""
    match = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(match.group(1).split()) if match else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
              "amx_bf16", "amx_int8", "amx_fp16")
    return [f for f in wanted if f in flags]


# --- the bare loop ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RawResult:
    fps: float
    runs: int
    batch: int


def raw_model_fps(
    loaded: LoadedModel,
    images: Sequence[ImageArray],
    seconds: float,
    *,
    instances: int | None = None,
    threads: dict[str, Any] | None = None,
    feeds: dict[str, np.ndarray] | None = None,
) -> RawResult:
    """Images/s of a bare ``session.run`` loop: same file, providers, threads and batch.

    A model with several instances runs as that many sessions, each looping in its own
    thread (its capacity without the pipeline); ``instances``/``threads`` override the
    model's own counts (``threads`` may also change the providers: then ``feeds`` are the
    feeds of that session's input, when they differ from the model's own).
    """
    from service.inference.gpu import DeviceRunner
    from service.inference.session import open_session, run_in_batches

    model = loaded.model
    if feeds is None:
        feeds, _ = model.adapter.preprocess(list(images))
    # the threads as the model runs them (``0`` = auto resolved)
    threads = threads or {"intra_op_threads": model.intra_op_threads,
                          "spin_wait": model.spin_wait}
    config = inference_config(loaded.config).model_copy(update=threads)
    setup = model.device_setup
    graphs = setup is not None and setup.cuda_graphs
    opened = [open_session(model.path, config, cuda_graphs=graphs)
              for _ in range(instances or model.instances)]
    sessions = [o.session for o in opened]
    outputs = [t.name for t in model.info.outputs]
    n = len(images)
    calls: list[Callable[[], object]]
    if setup is not None:  # on a GPU: the device runner the model runs (IO binding, graphs)
        runners = [
            DeviceRunner(o.session, model.name, (o.setup or setup).runner_mode,
                         model.info.fixed_batch, setup.profile_max_batch, setup.device,
                         setup.device_id)
            for o in opened
        ]
        calls = [functools.partial(runner.run, feeds, n) for runner in runners]
    else:  # session.run in the model's own chunks, as OrtModel runs it
        calls = [functools.partial(run_in_batches, session, outputs, feeds, n, model.info,
                                   model.name) for session in sessions]
    for call in calls:  # warm-up, as the service does
        call()
    counts = [0] * len(sessions)
    t0 = time.perf_counter()
    deadline = t0 + seconds

    def loop(i: int) -> None:
        while True:
            calls[i]()
            counts[i] += 1
            if time.perf_counter() >= deadline:
                return

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(1, len(sessions))]
    for worker in workers:
        worker.start()
    loop(0)
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - t0
    return RawResult(fps=sum(counts) * n / elapsed, runs=sum(counts), batch=n)


def _file_input_feeds(loaded: LoadedModel, images: Sequence[ImageArray]) -> dict[str, np.ndarray]:
    """The images preprocessed for the model file's own input (an OpenVINO model may run
    the uint8 input graph instead, whose feeds ONNX Runtime's session would refuse)."""
    from service.inference.adapters import build_adapter
    from service.inference.metadata import read_model_info

    model = loaded.model
    _, adapter, _ = build_adapter(read_model_info(model.path), model.settings,
                                  model.config.score_threshold, model.config.max_detections)
    return adapter.preprocess(list(images))[0]


# --- the bench ------------------------------------------------------------------------


def _batched(runtime: Runtime, cameras: Sequence[str]) -> tuple[int, int]:
    """(frames inferred, batches run) so far by the runtime's inference loops."""
    return (sum(runtime.processed(c) for c in cameras),
            sum(loop.batches for loop in runtime.loops))


def _wait_until_up(runtime: Runtime, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(cam.ready for cam in runtime.cameras.values()):
            return
        time.sleep(0.05)
    down = [f"{c.camera_id}: {c.status().state} {c.status().reason or ''}".strip()
            for c in runtime.cameras.values() if not c.ready]
    raise LineWatchError(
        f"linewatch bench: camera(s) did not deliver frames within {timeout:.0f} s "
        f"({'; '.join(down)}). Check the sources with linewatch serve first."
    )


def run_bench(
    config_path: Path | None,
    *,
    cameras: int | None = None,
    seconds: float = 10.0,
    warmup_s: float = 2.0,
    raw_seconds: float | None = None,
    compare: str | None = None,
    replay_frames: int = 90,
    override: RuntimeOverride = NO_OVERRIDE,
) -> dict[str, Any]:
    """Run the benchmark and return its one JSON object (see the module doc).

    ``replay_frames`` > 0: each camera renders or decodes that many frames once, then
    replays them from memory, so the numbers measure the pipeline rather than the
    renderer or decoder (whose cost per frame is reported as ``capture_ms_per_frame``);
    0 reads the sources live during the run.  ``override`` (``--providers``,
    ``--precision``) applies to the model the cameras run.

    ``compare="ultralytics"`` also times Ultralytics' ``predict(stream=True)`` loop on the
    same ONNX file and the first camera's clip: ``ultralytics_fps`` and
    ``speedup_vs_ultralytics`` (pipeline fps / Ultralytics fps).
    """
    if compare not in (None, "ultralytics"):
        raise ConfigError(f"bench --compare supports only 'ultralytics', got {compare!r}.")
    import psutil

    config = bench_config(load_config(config_path), cameras)
    camera_models = {c.model for c in config.cameras}
    config = config.model_copy(update={"models": [
        override.apply(m) if m.id in camera_models else m for m in config.models]})
    recorder = LatencyRecorder()
    runtime = Runtime.build(config, recorder, replay_frames=replay_frames)
    if len(runtime.models) != 1:
        raise ConfigError(
            "linewatch bench measures one model; the cameras use "
            f"{', '.join(runtime.models)}. Use --cameras N, or a config with one model."
        )
    loaded = next(iter(runtime.models.values()))
    raw_s = raw_seconds or min(10.0, max(2.0, seconds / 2))
    replays = [c.source for c in runtime.cameras.values() if isinstance(c.source, ReplaySource)]
    raw_runs: list[RawResult] = []
    if replays:  # frames known before the run: time the bare loop before and after it
        for replay in replays:
            replay.record()
        first = [r.images[0] for r in replays][: loaded.max_batch]
        raw_runs.append(raw_model_fps(loaded, first, raw_s / 2))
    # Ultralytics' loop too is timed half before the pipeline and half after it
    compared = [_compare_ultralytics(config, loaded, seconds / 2)] if compare else []
    proc = psutil.Process()
    try:
        runtime.start()
        _wait_until_up(runtime, timeout=60.0)
        time.sleep(warmup_s)
        dropped0 = sum(c.status().frames_dropped for c in runtime.cameras.values())
        batched0 = _batched(runtime, loaded.cameras)
        cpu0 = proc.cpu_times()
        recorder.begin()
        t0 = time.perf_counter()
        time.sleep(seconds)
        recorder.end()
        elapsed = time.perf_counter() - t0
        cpu1 = proc.cpu_times()
        batched1 = _batched(runtime, loaded.cameras)
        dropped = sum(c.status().frames_dropped for c in runtime.cameras.values()) - dropped0
    finally:
        runtime.stop()
    images = []
    for cam_id in loaded.cameras:
        latest = runtime.latest.get(cam_id)
        if latest is not None:
            images.append(latest.frame.image)
    if not images or recorder.frames == 0:
        raise LineWatchError(
            "linewatch bench: no frame went through the pipeline during the run; "
            "run linewatch serve with this config to see why."
        )
    images = images[: loaded.max_batch]
    raw_runs.append(raw_model_fps(loaded, images, raw_s / 2 if raw_runs else raw_s))
    raw = RawResult(
        fps=float(np.mean([r.fps for r in raw_runs])), runs=sum(r.runs for r in raw_runs),
        batch=raw_runs[-1].batch,
    )
    single: RawResult | None = None
    if loaded.model.instances > 1:  # the plain alternative: one session on every core,
        # on the file as it is (no CPU graph rewrites): what a user's own loop gets
        single = raw_model_fps(
            loaded, images, raw_s / 2, instances=1,
            threads={"intra_op_threads": usable_cores(), "spin_wait": True,
                     "cpu_rewrites": False},
        )
    on_ort: RawResult | None = None
    if loaded.model.provider == OPENVINO:  # the same loop on ONNX Runtime, to compare with
        on_ort = raw_model_fps(
            loaded, images, raw_s / 2,
            threads={"providers": [CPU], "intra_op_threads": loaded.model.intra_op_threads,
                     "spin_wait": loaded.model.spin_wait},
            feeds=_file_input_feeds(loaded, images),
        )
    capture_ms = [r.capture_ms_per_frame for r in replays if r.capture_ms_per_frame is not None]
    fps = recorder.frames / elapsed
    if compare:
        compared.append(_compare_ultralytics(config, loaded, seconds / 2))
    ultra_fps = (sum(t.frames for t in compared) / sum(t.seconds for t in compared)
                 if compared else 0.0)
    ages = np.asarray(recorder.ages_ms)
    cpu_s = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "fps": round(fps, 2),
        "latency_ms_p50": round(float(np.percentile(ages, 50)), 2),
        "latency_ms_p99": round(float(np.percentile(ages, 99)), 2),
        "raw_model_fps": round(raw.fps, 2),
        "raw_model_fps_runs": [round(r.fps, 2) for r in raw_runs],
        "overhead_ratio": round(raw.fps / fps, 3),
        "cpu_percent": round(100.0 * cpu_s / elapsed, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "provider": loaded.model.provider,
        "model": str(loaded.config.path),
        "cameras": len(loaded.cameras),
        "batch": raw.batch,
        "pipeline_batch_mean": round((batched1[0] - batched0[0]) / batches, 2)
        if (batches := batched1[1] - batched0[1]) else None,
        "instances": loaded.model.instances,
        "instances_per_frame": round(recorder.instances / recorder.frames, 2),
        "acceleration": loaded.model.acceleration,
        "cpu_rewrites": loaded.model.cpu_rewrites,
        **({"single_session_fps": round(single.fps, 2)} if single is not None else {}),
        **({"precision": (loaded.model.acceleration or {}).get("precision"),
            "onnxruntime_raw_fps": round(on_ort.fps, 2),
            "fps_vs_onnxruntime_raw": round(fps / on_ort.fps, 3)} if on_ort is not None else {}),
        "threads": {
            "intra_op": loaded.model.intra_op_threads,
            "inter_op": loaded.config.inter_op_threads,
            "spin_wait": loaded.model.spin_wait,
        },
        "sources": f"replay of {replay_frames} frames" if replay_frames > 0 else "live",
        "capture_ms_per_frame": round(float(np.mean(capture_ms)), 2) if capture_ms else None,
        "seconds": round(elapsed, 2),
        "frames": recorder.frames,
        "frames_dropped": dropped,
        **({"ultralytics_fps": round(ultra_fps, 2),
            "ultralytics_fps_runs": [round(t.fps, 2) for t in compared],
            "speedup_vs_ultralytics": round(fps / ultra_fps, 3),
            "ultralytics_frames": sum(t.frames for t in compared)} if compared else {}),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }


def _compare_ultralytics(
    config: Config, loaded: LoadedModel, seconds: float
) -> UltralyticsTiming:
    """Ultralytics' predict loop on the same ONNX file and the first camera's clip."""
    from service.inference import repo_root
    from service.inference.ultralytics import time_ultralytics

    source = str(config.camera(loaded.cameras[0]).source)
    if "://" in source:
        raise ConfigError(
            f"bench --compare ultralytics needs a video file source; camera "
            f"{loaded.cameras[0]!r} reads {source!r}."
        )
    return time_ultralytics(
        Path(loaded.config.path), source, seconds, repo_root(),
        conf=loaded.config.score_threshold,
    )
