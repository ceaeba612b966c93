"""A camera: one capture thread, the newest frame, reconnects and state."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from service.domain import Frame, ImageArray
from service.errors import SourceError
from service.sources.backoff import Backoff
from service.sources.base import Clock, EndOfStream, FrameSource, SourceOptions, mask_credentials
from service.sources.sim_source import SimSource
from service.sources.slot import LatestFrameSlot
from service.sources.spec import open_source
from service.telemetry import metrics

log = logging.getLogger(__name__)

State = Literal["connecting", "up", "down", "stopped"]
STATES: tuple[State, ...] = ("connecting", "up", "down", "stopped")
FPS_SMOOTHING = 0.2  # EMA weight of the newest frame interval
SIM_TIMES_KEPT = 256  # sim_time(seq) answers for this many recent frames


@dataclass(frozen=True, slots=True)
class CameraStatus:
    """A snapshot of one camera (``source`` has its credentials masked)."""

    camera: str
    state: State
    reason: str | None
    reconnects: int
    fps: float
    last_frame_wall: float | None
    frames_captured: int
    frames_dropped: int
    source: str


class Camera:
    """Reads one source on its own thread and keeps only the newest frame.

    After any failure (open error, read error, a read that took the read timeout,
    the end of a live stream) the camera goes ``down`` with the reason, waits a
    backoff delay (exponential, full jitter, capped; ``stop`` interrupts it) and
    reconnects (``connecting``, then ``up`` at the first frame).  A non-looping
    file that ends leaves the camera ``stopped``.  Consumers call ``take`` or
    ``wait``; a frame replaced before anyone took it is counted as dropped
    (reason ``stale``).  A non-realtime camera (``options.realtime`` False: files
    and sim read as fast as possible) is paced by its consumer instead: it reads
    the next frame only once the last one was taken, so it drops nothing and
    spends no CPU on frames nobody would see.

    ``source`` replaces the source that ``spec`` names (e.g. a
    :class:`~service.sources.replay.ReplaySource` around it, for benchmarks).
    The spec is parsed at construction (a bad spec raises :class:`SourceError`
    at once); reaching the source happens on the thread.
    """

    def __init__(
        self,
        camera_id: str,
        spec: str | int,
        options: SourceOptions,
        *,
        clock: Clock = time,
        backoff: Backoff | None = None,
        source: FrameSource | None = None,
    ) -> None:
        self.camera_id = camera_id
        self.spec = spec
        self.options = options
        self.source_label = mask_credentials(str(spec))
        self._clock = clock
        self._source: FrameSource = (
            source if source is not None else open_source(spec, options, clock=clock)
        )
        self._backoff = backoff or Backoff(
            options.backoff_initial_s, options.backoff_max_s, factor=options.backoff_factor
        )
        self._slot = LatestFrameSlot(on_drop=self._count_drop)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the status fields below; never held on I/O
        self._state: State = "stopped"
        self._reason: str | None = None
        self._reconnects = 0
        self._fps = 0.0
        self._interval: float | None = None
        self._last_mono: float | None = None
        self._last_wall: float | None = None
        self._captured = 0
        self._seq = -1
        self._sim_times: OrderedDict[int, float] = OrderedDict()
        self._frames_dropped = metrics.FRAMES_DROPPED.labels(camera=camera_id, reason="stale")
        self._frames_captured = metrics.FRAMES_CAPTURED.labels(camera=camera_id)
        if options.fps:
            metrics.CAMERA_EXPECTED_FPS.labels(camera=camera_id).set(options.fps)
        self._publish_state("stopped")

    @property
    def source(self) -> FrameSource:
        """The source object (read it only from tests or after ``stop``)."""
        return self._source

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"camera {self.camera_id} was already started")
        self._set_state("connecting", None)
        self._thread = threading.Thread(
            target=self._run, name=f"camera-{self.camera_id}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread (it closes its source) and wait up to ``timeout`` for it."""
        self._stop.set()
        self._slot.wake()
        thread = self._thread
        if thread is None:
            return
        thread.join(timeout)
        if thread.is_alive():
            # a blocking open/read ends within its timeout; the thread then closes
            # the source itself (closing it from here could free it mid-read)
            log.warning(
                "camera %s: capture thread still blocked in its source after %.1f s; "
                "it will close the source when the call returns",
                self.camera_id,
                timeout,
            )

    # --- consumers ---------------------------------------------------------------

    def take(self, after_seq: int = -1) -> Frame | None:
        """The newest frame with ``seq > after_seq``, or None."""
        return self._slot.take(after_seq)

    def wait(self, after_seq: int, timeout: float) -> Frame | None:
        """Block up to ``timeout`` s for a frame with ``seq > after_seq``."""
        return self._slot.wait(after_seq, timeout)

    def peek(self) -> Frame | None:
        """The newest frame without taking it (snapshots: it is not counted as taken)."""
        return self._slot.peek()

    def sim_time(self, seq: int) -> float | None:
        """The simulated time (s) of frame ``seq`` of a ``sim://`` camera, if still known.

        The last few hundred frames are remembered; None for other sources.
        """
        with self._lock:
            return self._sim_times.get(seq)

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._state == "up" and self._captured > 0

    def status(self) -> CameraStatus:
        with self._lock:
            return CameraStatus(
                camera=self.camera_id,
                state=self._state,
                reason=self._reason,
                reconnects=self._reconnects,
                fps=self._fps if self._state == "up" else 0.0,
                last_frame_wall=self._last_wall,
                frames_captured=self._captured,
                frames_dropped=self._slot.dropped,
                source=self.source_label,
            )

    # --- the capture thread --------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                ended = self._session()
                if ended or self._stop.is_set():
                    break
                delay = self._backoff.next_delay()
                log.info("camera %s: reconnecting in %.2f s", self.camera_id, delay)
                if self._stop.wait(delay):
                    break
                with self._lock:
                    self._reconnects += 1
                metrics.CAMERA_RECONNECTS.labels(camera=self.camera_id).inc()
                self._set_state("connecting", self._reason)
        finally:
            with self._lock:
                keep_reason = self._state == "stopped"
            if not keep_reason:
                self._set_state("stopped", None)
            self._slot.wake()

    def _session(self) -> bool:
        """Open, pump frames until a failure or stop; True when the stream ended for good."""
        try:
            self._source.open()
            if not self.options.fps and self._source.nominal_fps:
                metrics.CAMERA_EXPECTED_FPS.labels(camera=self.camera_id).set(
                    self._source.nominal_fps
                )
            while not self._stop.is_set():
                if not self.options.realtime and not self._wait_consumed():
                    break
                image = self._source.read()
                self._deliver(image)
        except EndOfStream as exc:
            self._set_state("stopped", mask_credentials(str(exc)))
            return True
        except SourceError as exc:
            self._fail(mask_credentials(str(exc)))
        except Exception as exc:  # a bug or an OpenCV error: still reconnect, loudly
            log.exception("camera %s: unexpected error from its source", self.camera_id)
            self._fail(mask_credentials(f"unexpected {type(exc).__name__}: {exc}"))
        finally:
            self._close_source()
        return False

    def _wait_consumed(self) -> bool:
        """Consumer pacing (non-realtime): wait until the last frame was taken; False on stop."""
        while not self._slot.wait_taken(0.1):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    def _deliver(self, image: ImageArray) -> None:
        now_mono = self._clock.monotonic()
        now_wall = self._clock.time()
        source = self._source
        sim_t = source.last_t if isinstance(source, SimSource) else None
        with self._lock:
            first = self._state != "up"
            self._seq += 1
            seq = self._seq
            if sim_t is not None:
                self._sim_times[seq] = sim_t
                if len(self._sim_times) > SIM_TIMES_KEPT:
                    self._sim_times.popitem(last=False)
            self._captured += 1
            if self._last_mono is not None and not first:
                dt = now_mono - self._last_mono
                if dt > 0:
                    self._interval = (
                        dt
                        if self._interval is None
                        else self._interval + FPS_SMOOTHING * (dt - self._interval)
                    )
                    self._fps = 1.0 / self._interval
            self._last_mono = now_mono
            self._last_wall = now_wall
            fps = self._fps
        frame = Frame(camera=self.camera_id, seq=seq, t_mono=now_mono, t_wall=now_wall, image=image)
        self._slot.put(frame)
        self._frames_captured.inc()
        metrics.CAMERA_LAST_FRAME.labels(camera=self.camera_id).set(now_wall)
        metrics.CAMERA_FPS.labels(camera=self.camera_id).set(fps)
        if first:
            self._backoff.reset()
            self._set_state("up", None)

    def _fail(self, reason: str) -> None:
        log.warning("camera %s (%s) down: %s", self.camera_id, self.source_label, reason)
        with self._lock:
            self._interval = None
            self._fps = 0.0
        metrics.CAMERA_FPS.labels(camera=self.camera_id).set(0.0)
        self._set_state("down", reason)

    def _close_source(self) -> None:
        try:
            self._source.close()
        except Exception:  # closing must not keep the camera from reconnecting
            log.exception("camera %s: error while closing its source", self.camera_id)

    def _count_drop(self) -> None:
        self._frames_dropped.inc()

    # --- state ---------------------------------------------------------------------

    def _set_state(self, state: State, reason: str | None) -> None:
        with self._lock:
            changed = state != self._state or reason != self._reason
            self._state = state
            self._reason = reason
        if changed and state in ("up", "stopped"):
            log.info("camera %s (%s) %s%s", self.camera_id, self.source_label, state,
                     f": {reason}" if reason else "")
        self._publish_state(state)

    def _publish_state(self, state: State) -> None:
        metrics.CAMERA_UP.labels(camera=self.camera_id).set(1.0 if state == "up" else 0.0)
        for name in STATES:
            metrics.CAMERA_STATE.labels(camera=self.camera_id, state=name).set(
                1.0 if name == state else 0.0
            )
