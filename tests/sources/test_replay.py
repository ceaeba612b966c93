"""ReplaySource: the first frames of a real source, read once, then replayed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.errors import SourceError
from service.sources import SourceOptions, open_source
from service.sources.replay import ReplaySource
from tests.sources.conftest import CLIP_FRAMES


def test_replays_the_first_frames_of_a_sim_source_in_a_loop() -> None:
    options = SourceOptions(realtime=False, width=160, height=120)
    inner = open_source("sim://conveyor?seed=3", options)
    replay = ReplaySource(inner, frames=4)
    replay.open()
    frames = [replay.read() for _ in range(9)]
    reference = open_source("sim://conveyor?seed=3", options)
    reference.open()
    expected = [reference.read() for _ in range(4)]
    for i, image in enumerate(frames):
        np.testing.assert_array_equal(image, expected[i % 4])
    assert frames[0] is frames[4]  # served from memory, not rendered again
    assert replay.capture_ms_per_frame is not None and replay.capture_ms_per_frame > 0
    assert replay.last_t == pytest.approx(0.0)  # frame 8 is frame 0 of the replay: sim t 0
    replay.close()
    replay.open()  # a reconnect starts over, without reading the source again
    assert replay.read() is frames[0]


def test_a_short_file_replays_what_it_has(clip: Path) -> None:
    inner = open_source(str(clip), SourceOptions(realtime=False, loop=False))
    replay = ReplaySource(inner, frames=10 * CLIP_FRAMES)
    replay.open()
    first = replay.read()
    for _ in range(CLIP_FRAMES - 1):
        replay.read()
    assert replay.read() is first  # the clip's frames, then the first again


def test_replay_needs_a_frame() -> None:
    inner = open_source("sim://conveyor", SourceOptions(realtime=False))
    with pytest.raises(SourceError, match="at least one frame"):
        ReplaySource(inner, frames=0)
    replay = ReplaySource(inner, frames=2)
    with pytest.raises(SourceError, match="not open"):
        replay.read()
