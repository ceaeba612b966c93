from __future__ import annotations

import pytest

from service.sources import Pacer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return 1e9 + self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_ticks_at_the_frame_rate() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)
    ticks = []
    for _ in range(5):
        pacer.wait()
        ticks.append(clock.now)
        clock.now += 0.03  # the work per frame
    assert ticks == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])


def test_falling_behind_restarts_the_schedule_without_a_burst() -> None:
    clock = FakeClock()
    pacer = Pacer(10.0, clock=clock, sleep=clock.sleep)
    pacer.wait()
    clock.now += 1.0  # a stall of ten frames
    pacer.wait()  # returns at once ...
    stalled = clock.now
    pacer.wait()  # ... and the next tick is one interval later, not immediately
    assert clock.now == pytest.approx(stalled + 0.1)


def test_reset_returns_at_once() -> None:
    clock = FakeClock()
    pacer = Pacer(2.0, clock=clock, sleep=clock.sleep)
    pacer.wait()
    pacer.reset()
    pacer.wait()
    assert clock.slept == []
