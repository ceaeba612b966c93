"""Frames from the synthetic assembly line (``service.sim``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from service.domain import ImageArray
from service.errors import SourceError
from service.sources.base import Clock, SourceOptions
from service.sources.pacing import Pacer

if TYPE_CHECKING:
    from service.sim import FrameTruth


class SimSource:
    """Renders ``service.sim.Scene`` frames.

    Realtime (the default): paced at ``options.fps`` or the scene's fps, each frame
    shows the scene at the time elapsed since ``open`` (so a slow consumer sees
    the line move on, as with a real camera).  Otherwise consecutive frame indices
    are rendered as fast as possible.  ``last_truth`` is the ground truth
    (``service.sim.FrameTruth``) of the frame ``read`` returned last, and
    ``last_t`` its simulated time in seconds.
    """

    def __init__(
        self,
        scenario: str,
        *,
        seed: int,
        width: int,
        height: int,
        fps: float,
        options: SourceOptions,
        clock: Clock = time,
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self.width = width
        self.height = height
        self.scene_fps = fps
        self.options = options
        self.nominal_fps: float | None = options.fps or fps
        self.last_truth: FrameTruth | None = None
        self.last_t: float | None = None
        self._clock = clock
        try:
            from service.sim import Scene
        except ImportError as exc:
            raise SourceError(f"the synthetic line (service.sim) is unavailable: {exc}") from exc
        try:
            self.scene = Scene(scenario, seed=seed, width=width, height=height, fps=fps)
        except ValueError as exc:
            raise SourceError(f"invalid sim source: {exc}") from exc
        self._pacer = Pacer(self.nominal_fps or fps, clock=clock)
        self._open = False
        self._start = 0.0
        self._index = 0

    def open(self) -> None:
        """Start the simulated clock (and the frame index) at 0."""
        self._pacer.reset()
        self._start = self._clock.monotonic()
        self._index = 0
        self._open = True

    def read(self) -> ImageArray:
        scene = self.scene
        if not self._open:
            raise SourceError(f"sim source {self.scenario!r} is not open")
        if self.options.realtime:
            self._pacer.wait()
            t = self._clock.monotonic() - self._start
            image, truth = scene.render_at(t)
        else:
            t = self._index / self.scene_fps
            image, truth = scene.render(self._index)
            self._index += 1
        self.last_truth = truth
        self.last_t = t
        return image

    def close(self) -> None:
        self._open = False
