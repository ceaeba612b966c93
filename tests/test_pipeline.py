"""The frame message builder (pure) and the inference loop on real cameras and ONNX models."""

from __future__ import annotations

import json
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


def test_a_loop_without_cameras_is_refused(onnx_model) -> None:
    model = onnx_model()
    with pytest.raises(ValueError, match="no cameras"):
        InferenceLoop("tiny", model, model.info.classes, [], Hub())


@pytest.mark.slow
@pytest.mark.parametrize(("window_s", "min_ratio", "max_ratio"), [(0.0, 1.0, 1.3), (0.3, 1.8, 2.0)])
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
