from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

from service.domain import Frame
from service.sources import LatestFrameSlot


@pytest.fixture
def make_frame() -> Callable[[int], Frame]:
    def make(seq: int) -> Frame:
        return Frame("cam", seq, float(seq), 1e9 + seq, np.full((4, 6, 3), seq, np.uint8))

    return make


def test_keeps_only_the_newest_and_counts_replaced_frames(
    make_frame: Callable[[int], Frame],
) -> None:
    drops: list[int] = []
    slot = LatestFrameSlot(on_drop=lambda: drops.append(1))
    for seq in range(3):
        slot.put(make_frame(seq))
    assert slot.dropped == 2 and len(drops) == 2
    frame = slot.take()
    assert frame is not None and frame.seq == 2
    assert slot.take(after_seq=2) is None
    slot.put(make_frame(3))  # replaces a frame that was taken: not a drop
    assert slot.dropped == 2
    frame = slot.take(after_seq=2)
    assert frame is not None and frame.seq == 3


def test_empty_slot_gives_nothing() -> None:
    slot = LatestFrameSlot()
    assert slot.take() is None
    started = time.monotonic()
    assert slot.wait(-1, timeout=0.1) is None
    assert 0.09 <= time.monotonic() - started < 1.0


def test_peek_does_not_take(make_frame: Callable[[int], Frame]) -> None:
    slot = LatestFrameSlot()
    slot.put(make_frame(0))
    assert slot.peek() is not None
    slot.put(make_frame(1))
    assert slot.dropped == 1


def test_wait_wakes_on_a_newer_frame(make_frame: Callable[[int], Frame]) -> None:
    slot = LatestFrameSlot()
    slot.put(make_frame(0))
    assert slot.take() is not None
    timer = threading.Timer(0.1, lambda: slot.put(make_frame(1)))
    started = time.monotonic()
    timer.start()
    frame = slot.wait(after_seq=0, timeout=5.0)
    timer.join()
    assert frame is not None and frame.seq == 1
    assert time.monotonic() - started < 2.0


def test_wait_taken_returns_when_the_consumer_takes_the_frame(
    make_frame: Callable[[int], Frame],
) -> None:
    slot = LatestFrameSlot()
    assert slot.wait_taken(0.0)  # empty: nothing to wait for
    slot.put(make_frame(0))
    started = time.monotonic()
    assert not slot.wait_taken(0.1)  # not taken: times out
    assert time.monotonic() - started >= 0.09
    timer = threading.Timer(0.1, slot.take)
    timer.start()
    assert slot.wait_taken(5.0)
    timer.join()
    assert slot.dropped == 0
