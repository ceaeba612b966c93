"""Replay: the first frames of a source, read once, then served from memory in a loop."""

from __future__ import annotations

import time

from service.domain import ImageArray
from service.errors import SourceError
from service.sources.base import EndOfStream, FrameSource


class ReplaySource:
    """Reads up to ``frames`` frames of ``inner`` at the first ``open``, then replays them.

    ``linewatch bench`` uses it so that what it measures is the pipeline, not the
    synthetic renderer or the video decoder: the cost of producing a frame is
    measured once (``capture_ms_per_frame``) and reported next to the pipeline's
    numbers.  ``read`` returns the same arrays again and again (nobody writes into
    a frame's image), cycling through them; ``last_t`` follows the inner source's
    ``last_t`` (sim time) of each frame when it has one.
    """

    def __init__(self, inner: FrameSource, frames: int) -> None:
        if frames < 1:
            raise SourceError(f"a replay needs at least one frame, got {frames}")
        self.inner = inner
        self.frames = int(frames)
        self.nominal_fps: float | None = getattr(inner, "nominal_fps", None)
        self.capture_ms_per_frame: float | None = None
        self.last_t: float | None = None
        self._images: list[ImageArray] = []
        self._times: list[float | None] = []
        self._index = 0
        self._open = False

    def open(self) -> None:
        self.record()
        self._index = 0
        self._open = True

    @property
    def images(self) -> list[ImageArray]:
        """The recorded frames (empty before the first ``open`` or ``record``)."""
        return list(self._images)

    def record(self) -> None:
        """Read the frames from the inner source, once (``open`` does it if needed)."""
        if not self._images:
            self._record()

    def read(self) -> ImageArray:
        if not self._open:
            raise SourceError("replay source is not open")
        i = self._index % len(self._images)
        self._index += 1
        self.last_t = self._times[i]
        return self._images[i]

    def close(self) -> None:
        self._open = False

    def _record(self) -> None:
        self.inner.open()
        try:
            t0 = time.perf_counter()
            while len(self._images) < self.frames:
                try:
                    image = self.inner.read()
                except EndOfStream:
                    break
                self._images.append(image)
                self._times.append(getattr(self.inner, "last_t", None))
            elapsed = time.perf_counter() - t0
        finally:
            self.inner.close()
        if not self._images:
            raise SourceError("replay: the source ended before its first frame")
        self.capture_ms_per_frame = 1000.0 * elapsed / len(self._images)
