from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import SourceError
from service.sources import EndOfStream, OpenCVSource, SourceOptions, open_source
from tests.sources.conftest import CLIP_FPS, CLIP_FRAMES, CLIP_SHAPE, MjpegServer


def opened(spec: str, **options: object) -> OpenCVSource:
    source = open_source(spec, SourceOptions(**options))  # type: ignore[arg-type]
    assert isinstance(source, OpenCVSource)
    source.open()
    return source


def test_file_reports_its_frame_rate_and_gives_bgr_frames(clip: Path) -> None:
    source = opened(str(clip), realtime=False)
    try:
        image = source.read()
        assert source.nominal_fps == pytest.approx(CLIP_FPS)
        assert image.shape == CLIP_SHAPE and image.dtype == np.uint8
        assert image.flags.c_contiguous
    finally:
        source.close()


def test_file_stops_at_the_end_without_loop(clip: Path) -> None:
    source = opened(str(clip), realtime=False, loop=False)
    try:
        for _ in range(CLIP_FRAMES):
            source.read()
        with pytest.raises(EndOfStream, match="end of video file"):
            source.read()
    finally:
        source.close()


def test_file_loops_back_to_the_first_frame(clip: Path) -> None:
    source = opened(str(clip), realtime=False, loop=True)
    try:
        first = source.read()
        for _ in range(CLIP_FRAMES - 1):
            source.read()
        again = source.read()  # past the end: the first frame again
        assert np.array_equal(first, again)
        for _ in range(CLIP_FRAMES + 5):
            assert source.read().shape == CLIP_SHAPE
    finally:
        source.close()


def test_file_is_paced_at_its_own_frame_rate(clip: Path) -> None:
    source = opened(str(clip))
    try:
        started = time.monotonic()
        for _ in range(16):  # 15 intervals at 15 fps
            source.read()
        elapsed = time.monotonic() - started
    finally:
        source.close()
    assert 0.95 <= elapsed < 1.5


def test_file_is_paced_at_the_requested_frame_rate(clip: Path) -> None:
    source = opened(str(clip), fps=30.0)
    try:
        started = time.monotonic()
        for _ in range(16):
            source.read()
        elapsed = time.monotonic() - started
    finally:
        source.close()
    assert 0.47 <= elapsed < 0.9


def test_file_as_fast_as_possible(clip: Path) -> None:
    source = opened(str(clip), realtime=False)
    try:
        started = time.monotonic()
        for _ in range(CLIP_FRAMES):
            source.read()
        elapsed = time.monotonic() - started
    finally:
        source.close()
    assert elapsed < CLIP_FRAMES / CLIP_FPS / 3  # far faster than the 2.5 s of real time


def test_reopen_after_close_starts_again(clip: Path) -> None:
    source = opened(str(clip), realtime=False)
    first = source.read()
    source.read()
    source.close()
    with pytest.raises(SourceError, match="not open"):
        source.read()
    source.open()
    try:
        assert np.array_equal(source.read(), first)
    finally:
        source.close()


def test_missing_file_says_so(tmp_path: Path) -> None:
    source = open_source(str(tmp_path / "nope.mp4"), SourceOptions())
    with pytest.raises(SourceError, match="does not exist"):
        source.open()


def test_file_that_is_not_a_video(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video\n" * 100)
    source = open_source(str(bogus), SourceOptions())
    with pytest.raises(SourceError, match="cannot decode video file"):
        source.open()


def test_unreachable_stream_fails_fast_with_masked_url() -> None:
    source = open_source("rtsp://bob:secret@127.0.0.1:9/none", SourceOptions(open_timeout_s=2))
    started = time.monotonic()
    with pytest.raises(SourceError) as info:
        source.open()
    assert time.monotonic() - started < 3.0
    assert "bob:***@127.0.0.1" in str(info.value) and "secret" not in str(info.value)


def test_missing_usb_device(tmp_path: Path) -> None:
    source = open_source("/dev/video987", SourceOptions())
    with pytest.raises(SourceError, match="USB camera /dev/video987"):
        source.open()


def test_mjpeg_over_http_delivers_frames_then_reports_the_hang_up(
    mjpeg_server: MjpegServer,
) -> None:
    mjpeg_server.frames_per_client = 15
    source = opened(mjpeg_server.url, open_timeout_s=2, read_timeout_s=2)
    try:
        levels = []
        with pytest.raises(SourceError, match="ended or the connection was lost"):
            for _ in range(30):
                image = source.read()
                assert image.shape == (120, 160, 3)
                levels.append(int(image.mean().round()))
        assert len(levels) >= 10
        assert levels == sorted(levels) and levels[-1] - levels[0] >= 9  # in order, live
    finally:
        source.close()


@pytest.fixture
def own_clip(clip: Path, tmp_path: Path) -> Path:
    """A copy of the clip this test may delete, replace or truncate."""
    return Path(shutil.copy(clip, tmp_path / "line.mp4"))


def test_file_removed_while_playing_is_noticed(own_clip: Path) -> None:
    source = opened(str(own_clip), realtime=False, file_check_s=0.1)
    try:
        source.read()
        own_clip.unlink()  # the open descriptor could go on reading it forever
        started = time.monotonic()
        with pytest.raises(SourceError, match="was removed while playing"):
            while time.monotonic() - started < 5.0:
                source.read()
        assert time.monotonic() - started < 1.0
    finally:
        source.close()
    with pytest.raises(SourceError, match="does not exist"):
        source.open()


def test_file_removed_is_noticed_at_the_rewind(own_clip: Path) -> None:
    source = opened(str(own_clip), realtime=False, file_check_s=3600.0)
    try:
        for _ in range(CLIP_FRAMES - 1):
            source.read()
        own_clip.unlink()
        source.read()  # the last frame, already buffered
        with pytest.raises(SourceError, match="was removed while playing"):
            source.read()  # the end: the rewind looks at the path first
    finally:
        source.close()


def test_file_replaced_or_truncated_while_playing_is_noticed(
    own_clip: Path, clip: Path, tmp_path: Path
) -> None:
    source = opened(str(own_clip), realtime=False, file_check_s=0.05)
    try:
        source.read()
        shutil.copy(clip, tmp_path / "new.mp4")
        (tmp_path / "new.mp4").replace(own_clip)  # atomic rename over it
        time.sleep(0.1)
        with pytest.raises(SourceError, match="was replaced while playing"):
            source.read()
        source.open()  # the new file plays
        assert source.read().shape == CLIP_SHAPE
        with own_clip.open("r+b") as f:
            f.truncate(own_clip.stat().st_size // 2)
        time.sleep(0.1)
        with pytest.raises(SourceError, match="was truncated while playing"):
            source.read()
    finally:
        source.close()
