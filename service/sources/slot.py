"""The latest-frame slot: one frame deep, newest wins, stale frames counted."""

from __future__ import annotations

import threading
from collections.abc import Callable

from service.domain import Frame


class LatestFrameSlot:
    """Holds only the newest frame of one camera.

    ``put`` replaces the frame; if nobody took the frame it replaces, that frame
    counts as dropped (``on_drop`` is called, e.g. to bump a metric).  ``take``
    and ``wait`` hand out the newest frame newer than a sequence number the
    consumer already has.  Thread-safe; nothing blocks while holding the lock
    except ``wait``, which releases it while waiting.
    """

    def __init__(self, on_drop: Callable[[], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._taken = True
        self._on_drop = on_drop
        self.dropped = 0

    def put(self, frame: Frame) -> None:
        with self._cond:
            stale = self._frame is not None and not self._taken
            self._frame = frame
            self._taken = False
            if stale:
                self.dropped += 1
            self._cond.notify_all()
        if stale and self._on_drop is not None:
            self._on_drop()

    def peek(self) -> Frame | None:
        """The newest frame, without marking it taken."""
        with self._cond:
            return self._frame

    def take(self, after_seq: int = -1) -> Frame | None:
        """The newest frame with ``seq > after_seq``, or None."""
        with self._cond:
            return self._take_locked(after_seq)

    def wait(self, after_seq: int, timeout: float) -> Frame | None:
        """Block up to ``timeout`` seconds for a frame with ``seq > after_seq``."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._frame is not None and self._frame.seq > after_seq,
                timeout=max(0.0, timeout),
            )
            return self._take_locked(after_seq)

    def wait_taken(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the newest frame was taken (or there is none).

        A consumer-paced source (non-realtime) calls this before it reads the next
        frame, so that it never produces a frame that would only be dropped.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._taken, timeout=max(0.0, timeout))

    def wake(self) -> None:
        """Wake every waiter (they re-check and time out as usual)."""
        with self._cond:
            self._cond.notify_all()

    def _take_locked(self, after_seq: int) -> Frame | None:
        frame = self._frame
        if frame is None or frame.seq <= after_seq:
            return None
        if not self._taken:
            self._taken = True
            self._cond.notify_all()  # a consumer-paced producer waits for this
        return frame
