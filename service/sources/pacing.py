"""Pacing a source to a frame rate."""

from __future__ import annotations

import time
from collections.abc import Callable

from service.sources.base import Clock


class Pacer:
    """Hold a loop to ``fps`` ticks per second on the clock's monotonic time.

    ``wait()`` sleeps until the next tick is due.  When the caller falls behind by
    more than one interval the schedule restarts from now, so a slow consumer never
    gets a burst of catch-up frames.
    """

    def __init__(
        self,
        fps: float,
        *,
        clock: Clock = time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.interval = 1.0 / fps
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    def reset(self) -> None:
        """Start a new schedule: the next ``wait`` returns at once."""
        self._next = None

    def wait(self) -> None:
        now = self._clock.monotonic()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0:
            self._sleep(delay)
        elif delay < -self.interval:
            self._next = now  # fell behind: restart the schedule instead of bursting
        self._next += self.interval
