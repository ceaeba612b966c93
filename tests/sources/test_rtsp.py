"""Cameras against a real GStreamer RTSP server on loopback (tests/support/rtsp_server.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from service.errors import SourceError
from service.sources import Camera, OpenCVSource, SourceOptions, open_source
from tests.sources.conftest import CLIP_SHAPE, RtspServer

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 2.0
MARGIN_S = 1.5  # scheduling slack on a busy 2-core machine
OPTIONS = SourceOptions(
    open_timeout_s=2.0, read_timeout_s=READ_TIMEOUT_S, backoff_initial_s=0.2, backoff_max_s=1.0
)


@pytest.fixture
def camera_factory() -> Iterator[Callable[[str, str], Camera]]:
    cameras: list[Camera] = []

    def make(camera_id: str, url: str) -> Camera:
        camera = Camera(camera_id, url, OPTIONS)
        cameras.append(camera)
        return camera

    yield make
    for camera in cameras:
        camera.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started


def test_camera_survives_a_server_crash_and_restart(
    rtsp_server: Callable[..., RtspServer],
    camera_factory: Callable[[str, str], Camera],
    camera_id: str,
) -> None:
    server = rtsp_server()
    camera = camera_factory(camera_id, server.url)
    camera.start()
    wait_for(lambda: camera.ready, 10.0, "the first RTSP frame")
    first = camera.wait(-1, timeout=1.0)
    assert first is not None and first.image.shape == CLIP_SHAPE
    time.sleep(1.0)
    status = camera.status()
    assert status.state == "up" and status.frames_captured >= 10
    assert status.fps == pytest.approx(15.0, rel=0.3)

    server.kill()
    took = wait_for(lambda: camera.status().state != "up", READ_TIMEOUT_S + MARGIN_S,
                    "the camera to notice the crash")
    assert took < READ_TIMEOUT_S + MARGIN_S
    wait_for(lambda: camera.status().reconnects >= 2, 5.0, "reconnect attempts")
    down = camera.status()
    assert down.state in ("down", "connecting") and down.reason
    assert down.fps == 0.0 and not camera.ready
    captured_before = down.frames_captured
    last_seq = camera.take()
    after_seq = last_seq.seq if last_seq is not None else -1

    rtsp_server(port=server.port)  # same URL again
    wait_for(lambda: camera.ready, 15.0, "frames after the server restarted")
    frame = camera.wait(after_seq, timeout=2.0)
    assert frame is not None and frame.seq > after_seq and frame.image.shape == CLIP_SHAPE
    time.sleep(0.5)
    up = camera.status()
    assert up.state == "up" and up.reason is None
    assert up.frames_captured > captured_before
    assert up.reconnects >= 2


def test_reader_never_hangs_past_its_read_timeout_on_a_hung_server(
    rtsp_server: Callable[..., RtspServer],
) -> None:
    server = rtsp_server()
    source = open_source(server.url, OPTIONS)
    assert isinstance(source, OpenCVSource)
    source.open()
    try:
        for _ in range(5):
            assert source.read().shape == CLIP_SHAPE
        server.pause()  # SIGSTOP: the TCP connection stays open, nothing comes
        started = time.monotonic()
        with pytest.raises(SourceError, match="read timeout"):
            while True:
                call = time.monotonic()
                source.read()  # frames already buffered come at once
                assert time.monotonic() - call < READ_TIMEOUT_S + MARGIN_S
        assert time.monotonic() - started < READ_TIMEOUT_S + MARGIN_S + 1.0
    finally:
        server.resume()
        source.close()


def test_camera_on_a_hung_server_goes_down_within_the_read_timeout(
    rtsp_server: Callable[..., RtspServer],
    camera_factory: Callable[[str, str], Camera],
    camera_id: str,
) -> None:
    server = rtsp_server()
    camera = camera_factory(camera_id, server.url)
    camera.start()
    wait_for(lambda: camera.ready, 10.0, "the first RTSP frame")
    server.pause()
    took = wait_for(lambda: camera.status().state != "up", READ_TIMEOUT_S + MARGIN_S + 1.0,
                    "the camera to notice the hung server")
    assert took < READ_TIMEOUT_S + MARGIN_S + 1.0
    assert "read timeout" in (camera.status().reason or "")
    server.resume()
    wait_for(lambda: camera.ready, 15.0, "frames after the server woke up")
    started = time.monotonic()
    camera.stop(timeout=READ_TIMEOUT_S + MARGIN_S)
    assert time.monotonic() - started < READ_TIMEOUT_S + MARGIN_S


def test_live_stream_is_thinned_to_the_requested_rate(
    rtsp_server: Callable[..., RtspServer],
) -> None:
    server = rtsp_server()
    source = open_source(server.url, SourceOptions(fps=5.0, open_timeout_s=2.0,
                                                   read_timeout_s=READ_TIMEOUT_S))
    source.open()
    try:
        source.read()
        started = time.monotonic()
        for _ in range(5):
            source.read()
        elapsed = time.monotonic() - started
    finally:
        source.close()
    assert 0.8 <= elapsed < 1.4  # 5 intervals at 5 fps, from a 15 fps stream
