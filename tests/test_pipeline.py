"""The frame message builder (pure) and the inference loop on real cameras and ONNX models."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.bus import Hub
from service.domain import ClassInfo, Detections, Frame
from service.inference import InferenceConfig, OrtModel
from service.pipeline import (
    CameraFeed,
    ClassTable,
    InferenceLoop,
    LatestFrames,
    build_frame_message,
    iso_utc,
)
from service.sources import Camera, SourceOptions
from tests.inference.onnx_factory import build_model, make_row

CLASSES = (
    ClassInfo("bracket", ("a", "b", "c"), ((0, 1), (1, 2))),
    ClassInfo("flange", ("n", "e"), ((0, 1),)),
)


@pytest.fixture
def make_frame() -> Callable[..., Frame]:
    def make(camera: str = "cam-1", seq: int = 7, t_mono: float = 100.0,
             t_wall: float = 1_700_000_000.25) -> Frame:
        return Frame(camera, seq, t_mono, t_wall, np.zeros((48, 64, 3), np.uint8))

    return make


@pytest.fixture
def make_detections() -> Callable[..., Detections]:
    def make(n: int = 2, k: int = 3) -> Detections:
        rng = np.random.default_rng(n * 10 + k)
        kp = rng.uniform(0, 60, (n, k, 3)).astype(np.float32)
        kp[:, :, 2] = 0.9
        return Detections(
            boxes=np.tile(np.array([[1.234, 2.0, 30.5, 40.25]], np.float32), (n, 1)),
            scores=np.linspace(0.9, 0.6, n, dtype=np.float32),
            class_ids=np.arange(n, dtype=np.int32) % 2,
            keypoints=kp,
        )

    return make


def test_message_has_the_documented_fields(make_frame, make_detections) -> None:
    frame = make_frame()
    dets = make_detections(n=2, k=3)
    msg = build_frame_message(
        frame, dets, ClassTable.from_classes(CLASSES), model="parts", line="line-1",
        published_mono=100.0425, sim_t=1.5,
    )
    assert msg["v"] == 1 and msg["type"] == "frame"
    assert (msg["camera"], msg["line"], msg["seq"], msg["model"]) == ("cam-1", "line-1", 7, "parts")
    assert msg["capture_ts"] == pytest.approx(1_700_000_000.25)
    assert datetime.fromisoformat(msg["capture_time"]).timestamp() == pytest.approx(
        1_700_000_000.25
    )
    assert msg["capture_time"].endswith("Z")
    assert msg["age_ms"] == pytest.approx(42.5)
    assert msg["sim_t"] == 1.5
    first, second = msg["instances"]
    assert first["class"] == "bracket" and first["class_id"] == 0
    assert second["class"] == "flange" and second["class_id"] == 1
    assert first["score"] == pytest.approx(0.9, abs=1e-3)
    assert first["box"] == pytest.approx([1.23, 2.0, 30.5, 40.25])
    assert first["track_id"] is None
    # keypoints named per class; a class with fewer names than K uses only those
    assert list(first["keypoints"]) == ["a", "b", "c"]
    assert list(second["keypoints"]) == ["n", "e"]
    assert first["keypoints"]["b"]["x"] == pytest.approx(float(dets.keypoints[0, 1, 0]), abs=0.01)
    assert first["keypoints"]["b"]["y"] == pytest.approx(float(dets.keypoints[0, 1, 1]), abs=0.01)
    assert first["keypoints"]["b"]["score"] == pytest.approx(0.9)
    json.dumps(msg, allow_nan=False)  # plain JSON types only


def test_message_without_instances_or_sim_time(make_frame) -> None:
    msg = build_frame_message(
        make_frame(), Detections.empty(3), ClassTable.from_classes(CLASSES), model="m",
        line=None, published_mono=100.0,
    )
    assert msg["instances"] == []
    assert "sim_t" not in msg
    assert msg["age_ms"] == 0.0


def test_unknown_class_ids_and_unnamed_keypoints_get_fallback_names(make_frame) -> None:
    dets = Detections(
        boxes=np.zeros((1, 4), np.float32), scores=np.ones(1, np.float32),
        class_ids=np.array([5], np.int32), keypoints=np.ones((1, 2, 3), np.float32),
    )
    msg = build_frame_message(
        make_frame(), dets, ClassTable.from_classes(()), model="m", line=None,
        published_mono=100.0,
    )
    (inst,) = msg["instances"]
    assert inst["class"] == "class_5"
    assert list(inst["keypoints"]) == ["0", "1"]


def test_iso_utc_is_utc_with_milliseconds() -> None:
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1.2345) == "1970-01-01T00:00:01.234Z"


def test_building_a_message_is_cheap(make_frame, make_detections) -> None:
    frame, dets = make_frame(), make_detections(n=10, k=5)
    table = ClassTable.from_classes(CLASSES)
    t0 = time.perf_counter()
    for _ in range(200):
        build_frame_message(frame, dets, table, model="m", line=None, published_mono=100.0)
    per_message_ms = (time.perf_counter() - t0) / 200 * 1000
    assert per_message_ms < 2.0, f"{per_message_ms:.2f} ms per 10-instance message"


# --- the loop, on real sim cameras, a real ONNX model and the real hub ---------------------

ROW = make_row((10.0, 20.0, 110.0, 120.0), 0.9, 0, np.full((5, 2), 50.0))


@pytest.fixture
def onnx_model(tmp_path: Path) -> Callable[..., OrtModel]:
    def make(**options: Any) -> OrtModel:
        path = build_model(tmp_path / "tiny.onnx", ROW[None], echo=True, **options)
        return OrtModel(path, InferenceConfig(intra_op_threads=1, warmup_runs=1), name="tiny")

    return make


@pytest.fixture
def cameras() -> Iterator[Callable[..., Camera]]:
    started: list[Camera] = []

    def make(camera_id: str, seed: int = 1, fps: float = 30.0, realtime: bool = True) -> Camera:
        cam = Camera(
            camera_id,
            f"sim://conveyor?seed={seed}&fps={fps}&width=320&height=240",
            SourceOptions(realtime=realtime),
        )
        cam.start()
        started.append(cam)
        return cam

    yield make
    for cam in started:
        cam.stop()


def _wait_frames(*cams: Camera, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(c.ready for c in cams):
        assert time.monotonic() < deadline, [c.status() for c in cams]
        time.sleep(0.01)


class SlowModel:
    """The real model, made slower than the camera (a heavy model on a small CPU)."""

    def __init__(self, model: OrtModel, delay_s: float) -> None:
        self.model, self.delay_s, self.calls = model, delay_s, 0

    def predict(self, images: list[np.ndarray]) -> list[Detections]:
        self.calls += 1
        time.sleep(self.delay_s)
        return self.model.predict(images)


def test_frames_of_two_cameras_flow_to_the_hub(onnx_model, cameras) -> None:
    model = onnx_model()
    cam_a, cam_b = cameras("cam-a", seed=1), cameras("cam-b", seed=2)
    hub = Hub()
    sub = hub.subscribe(types={"frame"})
    latest = LatestFrames()
    loop = InferenceLoop(
        "tiny", model, model.info.classes,
        [CameraFeed("cam-a", cam_a, line="line-1"), CameraFeed("cam-b", cam_b)],
        hub, max_batch=8, latest=latest,
    )
    loop.start()
    try:
        seen: dict[str, list[int]] = {"cam-a": [], "cam-b": []}
        deadline = time.monotonic() + 10
        while min(len(v) for v in seen.values()) < 5:
            assert time.monotonic() < deadline, seen
            msg = sub.get_blocking(1.0)
            if msg is not None:
                seen[msg["camera"]].append(msg["seq"])
                last = msg
    finally:
        loop.stop()
    for seqs in seen.values():
        assert seqs == sorted(set(seqs)), "each camera's frames arrive once, in order"
    (inst,) = last["instances"]
    assert inst["class"] == "bracket" and set(inst["keypoints"]) == {
        "corner_a", "corner_b", "corner_c", "hole_1", "hole_2"
    }
    assert last["age_ms"] < 500
    assert loop.processed("cam-a") >= 5 and loop.processed("cam-b") >= 5
    newest = latest.get("cam-a")
    assert newest is not None and newest.message["camera"] == "cam-a"
    assert newest.frame.image.shape == (240, 320, 3)


def test_two_cameras_run_as_one_batch_and_results_go_to_their_camera(onnx_model, cameras) -> None:
    model = onnx_model()
    cam_a, cam_b = cameras("cam-a", seed=1), cameras("cam-b", seed=2)
    _wait_frames(cam_a, cam_b)
    hub = Hub()
    sub = hub.subscribe(types={"frame"})
    loop = InferenceLoop(
        "tiny", model, model.info.classes,
        [CameraFeed("cam-a", cam_a), CameraFeed("cam-b", cam_b)], hub, max_batch=8,
    )
    assert loop.step() == 2
    assert model.last_timing.batch_size == 2 and model.last_timing.runs == 1
    assert loop.batches == 1
    messages = [sub.get_nowait(), sub.get_nowait()]
    by_camera = {m["camera"]: m for m in messages if m is not None}
    assert set(by_camera) == {"cam-a", "cam-b"}
    # echo model: x1 of the first row = 10 + the image's mean pixel (in model pixels,
    # then mapped back to the frame): two different images give two different boxes
    assert by_camera["cam-a"]["instances"][0]["box"][0] != by_camera["cam-b"]["instances"][0][
        "box"][0]


def test_max_batch_splits_the_cameras_into_several_runs(onnx_model, cameras) -> None:
    model = onnx_model()
    cams = [cameras(f"cam-{i}", seed=i) for i in range(3)]
    _wait_frames(*cams)
    hub = Hub()
    loop = InferenceLoop(
        "tiny", model, model.info.classes, [CameraFeed(c.camera_id, c) for c in cams], hub,
        max_batch=2,
    )
    assert loop.step() == 3
    assert loop.batches == 2


@pytest.mark.slow
def test_a_slow_model_sees_only_the_newest_frames(onnx_model, cameras) -> None:
    slow = SlowModel(onnx_model(), delay_s=0.15)
    cam = cameras("cam-a", fps=30.0)
    hub = Hub()
    sub = hub.subscribe(types={"frame"}, maxsize=1000)
    loop = InferenceLoop(
        "tiny", slow, slow.model.info.classes, [CameraFeed("cam-a", cam)], hub
    )
    _wait_frames(cam)
    loop.start()
    time.sleep(2.0)
    loop.stop()
    messages = []
    while (m := sub.get_nowait()) is not None:
        messages.append(m)
    status = cam.status()
    assert 5 <= len(messages) <= 16
    seqs = [m["seq"] for m in messages]
    assert all(b - a >= 2 for a, b in zip(seqs, seqs[1:], strict=False)), seqs
    # no queue builds up: every frame is at most one model run + one frame period old
    assert max(m["age_ms"] for m in messages) < 150 + 1000 / 30 + 100
    assert status.frames_dropped >= status.frames_captured - len(messages) - 3
    assert status.frames_dropped > len(messages)


def test_stop_publishes_the_in_flight_batch(onnx_model, cameras) -> None:
    slow = SlowModel(onnx_model(), delay_s=0.3)
    cam = cameras("cam-a")
    _wait_frames(cam)
    hub = Hub()
    sub = hub.subscribe(types={"frame"})
    loop = InferenceLoop("tiny", slow, slow.model.info.classes, [CameraFeed("cam-a", cam)], hub)
    loop.start()
    deadline = time.monotonic() + 5
    while slow.calls == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    loop.stop()  # while the first batch is in the model
    assert not loop.running
    published = 0
    while sub.get_nowait() is not None:
        published += 1
    assert published == slow.calls >= 1


class SlowPublisher:
    """A publisher whose every message costs ``delay_s`` (heavy stages); may fail once."""

    def __init__(self, delay_s: float, fail_first: bool = False) -> None:
        self.delay_s, self.fail_first = delay_s, fail_first
        self.messages: list[dict[str, object]] = []

    def publish(self, msg: dict[str, object]) -> None:
        time.sleep(self.delay_s)
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("publisher broke once")
        self.messages.append(msg)


@pytest.mark.slow
def test_the_stages_of_one_frame_run_while_the_model_computes_the_next(
    onnx_model, cameras
) -> None:
    slow = SlowModel(onnx_model(), delay_s=0.1)
    cam = cameras("cam-a", fps=100.0)
    _wait_frames(cam)
    publisher = SlowPublisher(delay_s=0.1, fail_first=True)
    loop = InferenceLoop(
        "tiny", slow, slow.model.info.classes, [CameraFeed("cam-a", cam)], publisher
    )
    loop.start()
    time.sleep(2.0)
    loop.stop()
    # in series: 0.2 s a frame, <= 10 frames in 2 s; overlapped: ~0.1 s a frame
    assert len(publisher.messages) >= 14, len(publisher.messages)
    assert loop.errors == 1 and "publisher broke once" in (loop.last_error or "")
    seqs = [m["seq"] for m in publisher.messages]
    assert seqs == sorted(set(seqs))  # in order, once each
    assert slow.calls == len(publisher.messages) + 1  # the failed one, and all drained


class AllCoresModel(SlowModel):
    """A model whose session takes every core (a heavy model on the CPU)."""

    uses_all_cores = True


def test_a_model_on_every_core_runs_the_steps_in_turn_on_one_thread(
    onnx_model, cameras
) -> None:
    heavy = AllCoresModel(onnx_model(), delay_s=0.02)
    cam = cameras("cam-a", fps=50.0)
    _wait_frames(cam)
    hub = Hub()
    sub = hub.subscribe(types={"frame"}, maxsize=1000)
    loop = InferenceLoop("tiny", heavy, heavy.model.info.classes, [CameraFeed("cam-a", cam)], hub)
    assert not loop.overlapped
    loop.start()
    try:
        names = {t.name for t in threading.enumerate()}
        assert "inference-tiny" in names and "stages-tiny" not in names
        assert "prepare-tiny" not in names
        deadline = time.monotonic() + 10
        while loop.processed("cam-a") < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        loop.stop()
    seqs = []
    while (m := sub.get_nowait()) is not None:
        seqs.append(m["seq"])
    assert len(seqs) >= 5 and seqs == sorted(set(seqs))
    assert not loop.running


class InstancesModel:
    """Several instances of the real model whose runs take random times and overlap
    (like ``OrtModel`` with ``instances: N``): later batches often finish first."""

    def __init__(self, model: OrtModel, instances: int, fail_on: int = -1) -> None:
        self.model, self.instances, self.fail_on = model, instances, fail_on
        self.rng = random.Random(5)
        self.lock = threading.Lock()
        self.running = self.most_running = self.runs = 0

    def prepare(self, images: list[np.ndarray], cameras: Any) -> Any:
        return self.model.prepare(images, cameras)

    def infer(self, prepared: Any) -> Any:
        with self.lock:
            self.runs += 1
            number = self.runs
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            delay = self.rng.uniform(0.005, 0.06)
        try:
            time.sleep(delay)
            if number == self.fail_on:
                raise RuntimeError("one run broke")
            return self.model.infer(prepared)
        finally:
            with self.lock:
                self.running -= 1

    def finish(self, inferred: Any) -> list[Detections]:
        return self.model.finish(inferred)

    def predict(self, images: list[np.ndarray]) -> list[Detections]:
        return self.finish(self.infer(self.prepare(images, None)))


@pytest.mark.slow
def test_instances_run_side_by_side_and_frames_stay_in_order(onnx_model, cameras) -> None:
    model = InstancesModel(onnx_model(), instances=3, fail_on=4)
    cam_a = cameras("cam-a", seed=1, realtime=False)
    cam_b = cameras("cam-b", seed=2, realtime=False)
    _wait_frames(cam_a, cam_b)
    hub = Hub()
    sub = hub.subscribe(types={"frame"}, maxsize=10000)
    loop = InferenceLoop(
        "tiny", model, model.model.info.classes,
        [CameraFeed("cam-a", cam_a), CameraFeed("cam-b", cam_b)], hub, max_batch=1,
    )
    loop.start()
    try:
        names = {t.name for t in threading.enumerate()}
        assert {"inference0-tiny", "inference1-tiny", "inference2-tiny"} <= names
        time.sleep(2.0)
    finally:
        loop.stop()
    assert not loop.running
    seqs: dict[str, list[int]] = {"cam-a": [], "cam-b": []}
    while (m := sub.get_nowait()) is not None:
        seqs[str(m["camera"])].append(int(str(m["seq"])))
    assert model.most_running == 3  # three runs at once
    assert loop.errors == 1 and "one run broke" in (loop.last_error or "")
    for cam, got in seqs.items():
        assert len(got) >= 10, (cam, len(got))
        assert got == sorted(set(got)), cam  # in order, once each, after the failed run
    # every run but the failed one was published; nothing is left waiting
    assert sum(len(g) for g in seqs.values()) == model.runs - 1 == loop.batches


def test_a_loop_without_cameras_is_refused(onnx_model) -> None:
    model = onnx_model()
    with pytest.raises(ValueError, match="no cameras"):
        InferenceLoop("tiny", model, model.info.classes, [], Hub())


@pytest.mark.slow
@pytest.mark.parametrize(("window_s", "min_ratio", "max_ratio"), [(0.0, 1.0, 1.5), (0.3, 1.8, 2.0)])
def test_the_batch_window_waits_for_the_other_cameras(
    onnx_model, cameras, window_s: float, min_ratio: float, max_ratio: float
) -> None:
    model = onnx_model()
    cam_a = cameras("cam-a", seed=1, fps=5.0)
    time.sleep(0.1)  # out of phase with cam-a
    cam_b = cameras("cam-b", seed=2, fps=5.0)
    _wait_frames(cam_a, cam_b)
    loop = InferenceLoop(
        "tiny", model, model.info.classes,
        [CameraFeed("cam-a", cam_a), CameraFeed("cam-b", cam_b)], Hub(), max_batch=8,
        batch_window_s=window_s,
    )
    loop.start()
    time.sleep(2.0)
    loop.stop()
    frames = loop.processed("cam-a") + loop.processed("cam-b")
    assert frames >= 12
    assert min_ratio <= frames / loop.batches <= max_ratio, (frames, loop.batches)


# --- tracking, poses and rules (issue 5) ------------------------------------------------

from service.app import camera_stages, part_templates  # noqa: E402
from service.config import load_config  # noqa: E402
from service.domain import Event, Tracks  # noqa: E402
from service.geometry import Homography, PoseEstimator  # noqa: E402
from service.pipeline import (  # noqa: E402
    DET_ROW,
    CameraStages,
    EventRecorder,
    LatestStates,
    LineTicker,
    event_message,
)
from service.rules import LineConfig, RuleEngine  # noqa: E402
from service.sim import CLASSES as SIM_CLASSES  # noqa: E402
from service.sim import Scene  # noqa: E402
from service.store import EventStore  # noqa: E402
from service.tracking import Tracker, TrackerConfig  # noqa: E402

SIM_INFO = tuple(ClassInfo(c.name, c.keypoint_names, c.skeleton) for c in SIM_CLASSES)
SIM_FPS = 15.0


def truth_detections(truth: Any) -> Detections:
    """A perfect detector: the sim's truth as Detections (parts >= 60 % in view)."""
    inst = [x for x in truth.instances if x.in_view >= 0.6]
    n = len(inst)
    kp = np.zeros((n, 5, 3), np.float32)
    for j, x in enumerate(inst):
        kp[j, :, :2] = x.keypoints_px
        kp[j, :, 2] = np.where(x.visible, 0.9, 0.05)
    return Detections(
        boxes=np.array([x.box for x in inst], np.float32).reshape(n, 4),
        scores=np.full(n, 0.95, np.float32),
        class_ids=np.array([x.class_id for x in inst], np.int32),
        keypoints=kp,
        extra={"uid": np.array([x.uid for x in inst], object)},
    )


@pytest.fixture
def sim_stages() -> Callable[..., tuple[Scene, CameraStages]]:
    """Stages of the default config's cam-1 (true calibration) on a sim scene."""

    def make(seed: int, engine: RuleEngine | None = None) -> tuple[Scene, CameraStages]:
        config = load_config(None, env={}, check_files=False)
        stages = camera_stages(config.camera("cam-1"), SIM_INFO, {}, engine)
        return Scene("conveyor", seed=seed, fps=SIM_FPS), stages

    return make


def test_frame_message_with_tracks_carries_ids_mm_pose_velocity_and_joints(make_frame) -> None:
    frame = make_frame()
    arm = np.array([[0, 0], [10, 0], [10, 10], [20, 10], [20, 20]], np.float32)
    kp = np.zeros((3, 5, 3), np.float32)
    kp[:, :, :2] = arm
    kp[:, :, 2] = 0.9
    dets = Detections(
        boxes=np.array([[0, 0, 20, 20]] * 3, np.float32), scores=np.full(3, 0.9, np.float32),
        class_ids=np.array([0, 2, 1], np.int32), keypoints=kp,
        extra={DET_ROW: np.arange(3)},
    )
    tracked = dets[[0, 1]]  # the third detection has no confirmed track yet
    mm = kp[[0, 1], :, :2] * 2.0
    mm[0, 4] = np.nan  # not seen
    tracks = Tracks(
        detections=tracked, track_ids=np.array([7, 9], np.int32),
        velocity_px_s=np.array([[50.0, 0.0], [0.0, 0.0]], np.float32),
        keypoints_mm=mm, poses=np.array([[10.0, 20.0, 30.0], [np.nan] * 3], np.float32),
        pose_residual_mm=np.array([0.25, np.nan], np.float32),
        velocity_mm_s=np.array([[100.0, 0.0], [0.0, 0.0]], np.float32),
    )
    table = ClassTable.from_classes(SIM_INFO)
    assert table.chains == frozenset({2})  # the arm's skeleton is one chain
    msg = build_frame_message(frame, dets, table, model="m", line="line-1",
                              published_mono=100.0, tracks=tracks)
    part, arm_inst, untracked = msg["instances"]
    assert part["track_id"] == 7 and arm_inst["track_id"] == 9 and untracked["track_id"] is None
    assert part["pose"] == {"x_mm": 10.0, "y_mm": 20.0, "theta_deg": 30.0, "residual_mm": 0.25}
    assert part["velocity"] == {"px_s": [50.0, 0.0], "mm_s": [100.0, 0.0]}
    assert part["keypoints"]["long_tip"]["x_mm"] == 20.0
    assert part["keypoints"]["hole_short"]["x_mm"] is None  # not seen: null, never NaN
    assert arm_inst["pose"] is None  # no rigid template
    assert arm_inst["joints_deg"] == pytest.approx([0.0, 90.0, -90.0, 90.0])
    assert "velocity" not in untracked and untracked["keypoints"]["centre"]["x_mm"] is None
    json.dumps(msg, allow_nan=False)


def test_stages_keep_track_ids_and_measure_parts_in_mm(sim_stages) -> None:
    scene, stages = sim_stages(seed=5)
    ids_of_uid: dict[str, set[int]] = {}
    errors, speeds = [], []
    for i in range(int(3 * SIM_FPS)):
        _, truth = scene.render(i)
        dets = truth_detections(truth)
        tracks, _ = stages.update("cam-1", dets, i / SIM_FPS, i / SIM_FPS, 0.0)
        if i < 5:
            continue
        rows = tracks.detections.extra[DET_ROW]
        uids = dets.extra["uid"][rows]
        by_uid = {x.uid: x for x in truth.instances}
        assert tracks.poses is not None and tracks.velocity_mm_s is not None
        for r, uid in enumerate(uids):
            ids_of_uid.setdefault(uid, set()).add(int(tracks.track_ids[r]))
            x = by_uid[uid]
            if x.class_name in ("bracket", "flange") and x.in_view >= 0.8 and x.visible.all():
                errors.append(float(np.hypot(*(tracks.poses[r, :2] - np.array(x.pose_mm[:2])))))
                if "at_station" not in x.flags:
                    speeds.append(float(tracks.velocity_mm_s[r, 0]))
    assert len(ids_of_uid) >= 5
    assert all(len(ids) == 1 for ids in ids_of_uid.values()), ids_of_uid  # stable ids
    assert len({next(iter(v)) for v in ids_of_uid.values()}) == len(ids_of_uid)  # unique
    assert np.mean(errors) < 1.0 and np.max(errors) < 4.0, (np.mean(errors), np.max(errors))
    assert np.median(speeds) == pytest.approx(scene.belt_speed_mm_s, rel=0.1)


def test_an_incident_becomes_a_stored_and_published_event(sim_stages, tmp_path: Path) -> None:
    config = load_config(None, env={}, check_files=False)
    line = config.line("line-1").model_copy(update={"id": "line-stages"})
    engine = RuleEngine(line, classes=SIM_INFO)
    scene, stages = sim_stages(seed=12, engine=engine)  # a hand reaches in at 10.4 s
    (incident,) = [i for i in scene.incidents(0, 20) if i.kind == "zone_intrusion"]
    hub = Hub()
    sub = hub.subscribe(types={"event", "state"})
    with EventStore(f"sqlite:///{tmp_path / 'events.db'}") as store:
        recorder = EventRecorder(store, hub, LatestStates())
        start = int((incident.start_s - 2.0) * SIM_FPS)
        for i in range(start, int((incident.start_s + 1.5) * SIM_FPS)):
            _, truth = scene.render(i)
            t = i / SIM_FPS
            _, events = stages.update("cam-1", truth_detections(truth), t, t, 0.0)
            recorder.record(engine, events)
        stored, _ = store.list(line="line-stages", limit=100)
    hits = [e for e in stored if e.name == "danger-zone" and e.new == "violated"]
    assert len(hits) == 1 and incident.start_s <= hits[0].t_wall <= incident.start_s + 1.0
    fault = [e for e in stored if e.kind == "state" and e.new == "FAULT"]
    assert fault and fault[0].t_wall == hits[0].t_wall
    published = []
    while (m := sub.get_nowait()) is not None:
        published.append(m)
    events = [m for m in published if m["type"] == "event"]
    # every stored event was published once, in cursor order, with the stored cursor
    assert [m["cursor"] for m in events] == [e.cursor for e in stored]
    assert events == [event_message(e) for e in stored]
    states = [m for m in published if m["type"] == "state"]
    assert states[-1]["state"] == "FAULT" and states[-1]["v"] == 1
    assert states[-1]["line"] == "line-stages"


class FailingStore:
    def append(self, events: list[Any]) -> list[Any]:
        raise OSError("disk full")


def test_an_event_that_cannot_be_stored_is_never_published() -> None:
    line = LineConfig.model_validate({"id": "line-fail", "rules": []})
    engine = RuleEngine(line)
    hub = Hub()
    sub = hub.subscribe(types={"event", "state"})
    recorder = EventRecorder(FailingStore(), hub)
    with pytest.raises(OSError):
        recorder.record(engine, [Event("line-fail", "state", "state", "UNKNOWN", "RUNNING", 1.0)])
    assert sub.get_nowait() is None


def test_the_ticker_turns_a_silent_line_unknown_and_publishes_state(tmp_path: Path) -> None:
    line = LineConfig.model_validate(
        {"id": "line-tick", "cameras": ["cam-1"],
         "rules": [{"type": "stale_camera", "name": "fresh", "max_age_s": 1.0}]}
    )
    engine = RuleEngine(line)
    empty = Tracks(Detections.empty(5), np.zeros(0, np.int32), np.zeros((0, 2), np.float32))
    hub = Hub()
    sub = hub.subscribe(types={"event", "state"})
    with EventStore(f"sqlite:///{tmp_path / 'e.db'}") as store:
        recorder = EventRecorder(store, hub)
        recorder.record(engine, engine.update("cam-1", empty, t_wall=100.0, frame_age_s=0.0))
        ticker = LineTicker([engine], recorder, clock=lambda: 100.5)
        assert ticker.tick() == 0  # fresh: no change, but a state message
        assert ticker.tick(now=102.0) == 2  # silent for 2 s: rule violated, line UNKNOWN
        stored, _ = store.list(line="line-tick")
    published = []
    while (m := sub.get_nowait()) is not None:
        published.append(m)
    assert [m["type"] for m in published].count("state") == 3
    assert published[-1]["type"] == "state" and published[-1]["state"] == "UNKNOWN"
    assert [(e.name, e.new) for e in stored][-2:] == [("fresh", "violated"), ("state", "UNKNOWN")]


def test_the_loop_runs_stages_and_records_rule_events(onnx_model, cameras, tmp_path) -> None:
    """Real sim camera, real ONNX model, real store and hub: a rule that fires at once."""
    model = onnx_model()
    cam = cameras("cam-1", seed=1)
    line = LineConfig.model_validate(
        {"id": "line-loop", "cameras": ["cam-1"],
         "rules": [{"type": "zone_intrusion", "name": "anything", "units": "px",
                    "zone": [[-1e4, -1e4], [1e4, -1e4], [1e4, 1e4], [-1e4, 1e4]]}]}
    )
    engine = RuleEngine(line, classes=model.info.classes)
    stages = CameraStages(Tracker(TrackerConfig(min_hits=2)), engine=engine)
    hub = Hub()
    sub = hub.subscribe(types={"frame", "event", "state"}, maxsize=1000)
    with EventStore(f"sqlite:///{tmp_path / 'loop.db'}") as store:
        loop = InferenceLoop(
            "tiny", model, model.info.classes, [CameraFeed("cam-1", cam, stages=stages)], hub,
            recorder=EventRecorder(store, hub),
        )
        _wait_frames(cam)
        for _ in range(40):
            loop.step(timeout=1.0)
            if any(e.new == "FAULT" for e in store.list(line="line-loop")[0]):
                break
        stored, _ = store.list(line="line-loop")
    # no track before min_hits frames: nothing in the zone (ok), then the track: violated
    assert [(e.name, e.new) for e in stored] == [
        ("anything", "ok"), ("state", "RUNNING"), ("anything", "violated"), ("state", "FAULT")
    ]
    published = []
    while (m := sub.get_nowait()) is not None:
        published.append(m)
    assert [m["cursor"] for m in published if m["type"] == "event"] == [1, 2, 3, 4]
    tracked = [m for m in published if m["type"] == "frame" and m["instances"][0]["track_id"]]
    assert tracked and tracked[-1]["instances"][0]["track_id"] == 1


def test_a_loop_with_engines_needs_a_recorder(onnx_model) -> None:
    model = onnx_model()
    engine = RuleEngine(LineConfig.model_validate({"id": "line-x", "rules": []}))
    feed = CameraFeed("cam-1", None, stages=CameraStages(Tracker(), engine=engine))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recorder"):
        InferenceLoop("tiny", model, model.info.classes, [feed], Hub())


def test_part_templates_come_from_metadata_or_the_sim_classes() -> None:
    sim = part_templates(SIM_INFO)
    assert set(sim) == {0, 1}  # bracket, flange; the arm and the hand are articulated
    assert SIM_CLASSES[1].template_mm is not None
    assert np.allclose(sim[1], SIM_CLASSES[1].template_mm)
    renamed = (ClassInfo("bracket", ("a", "b", "c", "d", "e")),)
    assert part_templates(renamed) == {}  # other keypoints: not the sim's part
    meta = {"templates_mm": json.dumps({"bracket": [[0, 0], [10, 0], [0, 10]]})}
    assert part_templates(renamed, meta)[0].shape == (3, 2)
    empty = Tracks(Detections.empty(5), np.zeros(0, np.int32), np.zeros((0, 2), np.float32))
    h = Homography.from_dict({"homography": np.eye(3).tolist()})
    assert PoseEstimator(sim).update(empty, h).poses is not None


def test_message_numbers_are_short_decimals_in_json(make_frame) -> None:
    dets = Detections(
        boxes=np.array([[1.234567, 2.0, 30.5, 40.25]], np.float32),
        scores=np.array([0.97312], np.float32), class_ids=np.zeros(1, np.int32),
        keypoints=np.array([[[10.123456, 20.98765, 0.87654]] * 5], np.float32),
    )
    msg = build_frame_message(make_frame(), dets, ClassTable.from_classes(CLASSES), model="m",
                              line=None, published_mono=100.0)
    text = json.dumps(msg["instances"])
    assert '"score": 0.973' in text and "0.97299" not in text
    assert '"box": [1.23, 2.0, 30.5, 40.25]' in text
    assert '"x": 10.12, "y": 20.99, "score": 0.877' in text


def test_changes_from_two_threads_are_stored_in_the_engines_order(tmp_path: Path) -> None:
    """Frames (one thread) and ticks (another) flip a freshness rule back and forth:
    each rule's and the line's stored changes chain (old == the previous new)."""
    import itertools
    import threading

    line = LineConfig.model_validate(
        {"id": "line-chain", "cameras": ["cam-1"],
         "rules": [{"type": "stale_camera", "name": "fresh", "max_age_s": 0.5}]}
    )
    engine = RuleEngine(line)
    empty = Tracks(Detections.empty(5), np.zeros(0, np.int32), np.zeros((0, 2), np.float32))
    with EventStore(f"sqlite:///{tmp_path / 'chain.db'}") as store:
        recorder = EventRecorder(store, Hub())

        clock = itertools.count()

        def frames() -> None:
            for _ in range(300):
                t = next(clock) * 0.3
                recorder.judge(engine, "cam-1", empty, t_wall=t, age_s=0.0)
                time.sleep(0.0005 * (next(clock) % 3))

        def ticks() -> None:
            for _ in range(300):
                recorder.tick(engine, next(clock) * 0.3)  # stale after 2 ticks in a row
                time.sleep(0.0005 * (next(clock) % 2))

        threads = [threading.Thread(target=frames), threading.Thread(target=ticks)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        stored, _ = store.list(line="line-chain", limit=10_000)
    assert len(stored) > 20
    last: dict[str, str] = {}
    for event in stored:
        if event.name in last:
            assert event.old == last[event.name], (event, last)
        last[event.name] = event.new


def test_the_next_batch_is_prepared_a_share_of_the_run_before_it_ends() -> None:
    from service.pipeline import prepare_at

    # a heavy CPU model (60 ms runs, 2 ms to prepare): 10 % of the run ahead of its end
    assert prepare_at(100.0, 0.060, 0.002) == pytest.approx(100.0 + 0.060 - 0.002 - 0.006)
    # a light model (5 ms runs): the fixed 1 ms margin
    assert prepare_at(100.0, 0.005, 0.001) == pytest.approx(100.0 + 0.005 - 0.001 - 0.001)
