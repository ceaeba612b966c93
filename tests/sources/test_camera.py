from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.domain import Frame
from service.errors import SourceError
from service.sources import Backoff, Camera, CameraStatus, SourceOptions
from tests.sources.conftest import CLIP_FPS, CLIP_FRAMES, CLIP_SHAPE

FAST_RETRY = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}


@pytest.fixture
def make_camera() -> Iterator[Callable[..., Camera]]:
    """Build cameras that are stopped at teardown."""
    cameras: list[Camera] = []

    def make(camera_id: str, spec: str, **options: object) -> Camera:
        backoff = options.pop("backoff", None)
        camera = Camera(camera_id, spec, SourceOptions(**options),  # type: ignore[arg-type]
                        backoff=backoff)  # type: ignore[arg-type]
        cameras.append(camera)
        return camera

    yield make
    for camera in cameras:
        camera.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def metric(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_bad_spec_fails_at_construction(camera_id: str) -> None:
    with pytest.raises(SourceError, match="unsupported"):
        Camera(camera_id, "gopher://cam", SourceOptions())


def test_file_camera_delivers_paced_frames(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path
) -> None:
    camera = make_camera(camera_id, str(clip))
    assert camera.status().state == "stopped" and not camera.ready
    camera.start()
    first = camera.wait(-1, timeout=5.0)
    assert first is not None and first.camera == camera_id and first.image.shape == CLIP_SHAPE
    seqs = [first.seq]
    while len(seqs) < 20:
        frame = camera.wait(seqs[-1], timeout=2.0)
        assert frame is not None
        seqs.append(frame.seq)
    status = camera.status()
    assert camera.ready and status.state == "up" and status.reason is None
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert status.fps == pytest.approx(CLIP_FPS, rel=0.2)
    assert status.last_frame_wall == pytest.approx(time.time(), abs=1.0)
    assert status.source == str(clip)
    assert metric("linewatch_camera_up", camera=camera_id) == 1.0
    assert metric("linewatch_camera_state", camera=camera_id, state="up") == 1.0
    assert metric("linewatch_camera_state", camera=camera_id, state="down") == 0.0
    assert metric("linewatch_camera_expected_fps", camera=camera_id) == CLIP_FPS
    assert metric("linewatch_camera_fps", camera=camera_id) == pytest.approx(CLIP_FPS, rel=0.2)
    camera.stop()
    stopped = camera.status()
    assert stopped.state == "stopped"
    # the camera ran on while the metrics were read: compare once it has stopped
    assert metric("linewatch_frames_captured_total", camera=camera_id) == stopped.frames_captured
    assert metric("linewatch_camera_up", camera=camera_id) == 0.0


def test_stale_frames_are_dropped_and_counted_never_queued(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path
) -> None:
    # paced at 400 fps (2.5 ms a frame), read by a consumer that needs 10 ms a frame
    camera = make_camera(camera_id, str(clip), realtime=True, fps=400.0, loop=False)
    camera.start()
    taken: list[Frame] = []
    last = -1
    while camera.status().state != "stopped" or camera.take(last) is not None:
        frame = camera.wait(last, timeout=0.5)
        if frame is not None:
            taken.append(frame)
            last = frame.seq
            time.sleep(0.01)  # a consumer slower than the decoder
    frame = camera.take(last)
    if frame is not None:
        taken.append(frame)
    status = camera.status()
    assert status.state == "stopped" and "end of video file" in (status.reason or "")
    assert status.frames_captured == CLIP_FRAMES
    assert status.frames_dropped > 0
    assert len(taken) + status.frames_dropped == CLIP_FRAMES  # every frame taken or dropped
    assert taken[-1].seq == CLIP_FRAMES - 1  # the consumer always gets the newest
    assert metric("linewatch_frames_dropped_total", camera=camera_id, reason="stale") == (
        status.frames_dropped
    )


def test_a_non_realtime_camera_is_paced_by_its_consumer_and_drops_nothing(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path
) -> None:
    camera = make_camera(camera_id, str(clip), realtime=False, loop=False)
    camera.start()
    seqs: list[int] = []
    last = -1
    while camera.status().state != "stopped" or camera.take(last) is not None:
        frame = camera.wait(last, timeout=0.5)
        if frame is not None:
            seqs.append(frame.seq)
            last = frame.seq
            time.sleep(0.01)  # a consumer slower than the decoder
            # the decoder waits for the consumer: never more than one frame ahead
            assert camera.status().frames_captured <= frame.seq + 2
    status = camera.status()
    assert status.state == "stopped" and status.frames_captured == CLIP_FRAMES
    assert status.frames_dropped == 0
    assert seqs == list(range(CLIP_FRAMES))  # every frame, in order



def test_missing_file_goes_down_and_retries_while_others_deliver(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "later.mp4"
    broken = make_camera(f"{camera_id}-broken", str(missing), **FAST_RETRY)
    healthy = make_camera(f"{camera_id}-ok", str(clip))
    broken.start()
    healthy.start()
    time.sleep(1.5)
    status: CameraStatus = broken.status()
    assert status.state in ("down", "connecting")
    assert status.reason is not None and "does not exist" in status.reason
    assert status.reconnects >= 3 and not broken.ready
    assert status.frames_captured == 0 and broken.take() is None
    assert metric("linewatch_camera_up", camera=f"{camera_id}-broken") == 0.0
    assert metric("linewatch_camera_reconnects_total", camera=f"{camera_id}-broken") == (
        broken.status().reconnects
    )
    good = healthy.status()
    assert good.state == "up" and good.frames_captured >= 15
    assert good.fps == pytest.approx(CLIP_FPS, rel=0.2)
    # the file appears: the camera comes up by itself
    shutil.copy(clip, missing)
    wait_for(lambda: broken.ready, 3.0, "the camera to come up once its file exists")
    assert broken.status().reason is None and broken.status().state == "up"


def test_stop_interrupts_the_backoff_sleep_at_once(
    make_camera: Callable[..., Camera], camera_id: str, tmp_path: Path
) -> None:
    camera = make_camera(camera_id, str(tmp_path / "missing.mp4"),
                         backoff_initial_s=30.0, backoff_max_s=60.0,
                         backoff=Backoff(30.0, 60.0, rng=UpperBound()))
    camera.start()
    wait_for(lambda: camera.status().state == "down", 3.0, "the camera to go down")
    time.sleep(0.1)  # now in its 30 s backoff sleep
    started = time.monotonic()
    camera.stop(timeout=5.0)
    assert time.monotonic() - started < 0.5
    assert camera.status().state == "stopped"
    assert camera.status().reconnects == 0


def test_backoff_is_reset_by_a_good_connection(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path
) -> None:
    backoff = Backoff(0.05, 0.2, rng=random.Random(3))
    backoff.failures = 6
    camera = make_camera(camera_id, str(clip), backoff=backoff)
    camera.start()
    wait_for(lambda: camera.ready, 5.0, "the first frame")
    assert backoff.failures == 0


def test_start_twice_is_a_bug(make_camera: Callable[..., Camera], camera_id: str,
                              clip: Path) -> None:
    camera = make_camera(camera_id, str(clip))
    camera.start()
    with pytest.raises(RuntimeError):
        camera.start()


def test_sim_camera_delivers_frames_at_the_requested_size_and_rate(
    make_camera: Callable[..., Camera], camera_id: str
) -> None:
    pytest.importorskip("service.sim", reason="service.sim (the synthetic line) does not import")
    camera = make_camera(camera_id, "sim://conveyor?seed=1&fps=10&width=320&height=240")
    camera.start()
    frame = camera.wait(-1, timeout=5.0)
    assert frame is not None and frame.image.shape == (240, 320, 3)
    assert frame.image.dtype == np.uint8
    time.sleep(1.5)
    status = camera.status()
    assert status.state == "up"
    assert status.fps == pytest.approx(10.0, rel=0.2)
    assert 12 <= status.frames_captured <= 19
    assert metric("linewatch_camera_expected_fps", camera=camera_id) == 10.0


def test_sim_camera_knows_the_simulated_time_of_its_frames(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path
) -> None:
    sim = pytest.importorskip("service.sim", reason="service.sim does not import")
    camera = make_camera(camera_id, "sim://conveyor?seed=4&fps=10&width=160&height=120",
                         realtime=False)
    camera.start()
    frames: list[Frame] = []
    last = -1
    while len(frames) < 3:
        frame = camera.wait(last, timeout=5.0)
        assert frame is not None
        frames.append(frame)
        last = frame.seq
    scene = sim.Scene("conveyor", seed=4, width=160, height=120, fps=10.0)
    for frame in frames:
        sim_t = camera.sim_time(frame.seq)
        assert sim_t == pytest.approx(frame.seq / 10.0)  # non-realtime: consecutive indices
        assert np.array_equal(frame.image, scene.render(frame.seq)[0])
    file_camera = make_camera(f"{camera_id}-file", str(clip))
    file_camera.start()
    frame = file_camera.wait(-1, timeout=5.0)
    assert frame is not None and file_camera.sim_time(frame.seq) is None


class UpperBound(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return b


def test_file_removed_while_playing_goes_down_and_comes_back_with_the_file(
    make_camera: Callable[..., Camera], camera_id: str, clip: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="service.sources.camera")
    path = Path(shutil.copy(clip, tmp_path / "line.mp4"))
    camera = make_camera(camera_id, str(path), **FAST_RETRY)
    camera.start()
    wait_for(lambda: camera.ready, 5.0, "the first frame")
    path.unlink()
    removed_at = time.monotonic()
    wait_for(lambda: camera.status().state != "up", 2.0, "the camera to notice the removal")
    assert time.monotonic() - removed_at < 1.5  # file_check_s 0.5 + one frame interval
    status = camera.status()
    assert status.state in ("down", "connecting") and not camera.ready
    # the reason it went down (on a loaded machine a retry may already have replaced it
    # in the status: its log line stays)
    assert any(
        "was removed while playing" in r.getMessage() and camera_id in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert metric("linewatch_camera_up", camera=camera_id) == 0.0
    # it keeps retrying with backoff, and says why each retry fails
    wait_for(lambda: "does not exist" in (camera.status().reason or ""), 2.0, "a failed retry")
    captured = camera.status().frames_captured
    time.sleep(0.5)
    assert camera.status().frames_captured == captured  # nothing from the deleted file
    assert camera.status().reconnects >= 2
    shutil.copy(clip, path)
    wait_for(lambda: camera.ready, 3.0, "the camera to come up once its file is back")
    assert camera.status().reason is None
    assert metric("linewatch_camera_up", camera=camera_id) == 1.0
