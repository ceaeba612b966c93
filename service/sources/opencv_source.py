"""Video files, RTSP/HTTP streams and USB cameras through OpenCV.

Streams and files open with the FFMPEG backend and the open/read timeouts passed at
open (``cv2.CAP_PROP_OPEN_TIMEOUT_MSEC``, ``cv2.CAP_PROP_READ_TIMEOUT_MSEC``); USB
cameras open with V4L2.

Caveat: FFMPEG demuxer options (RTSP over TCP, a short ``analyzeduration`` so the
first frame comes in ~0.3 s instead of ~2 s) can only reach OpenCV through the
environment variable ``OPENCV_FFMPEG_CAPTURE_OPTIONS``, which is process-global.
It is set right before each open; every open with the default options sets the same
value, so concurrent opens agree.  A camera with ``rtsp_transport="udp"`` opened at
the same moment as a TCP one may get the other's transport; a value set by the user
beforehand is overwritten.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from service.domain import ImageArray
from service.errors import SourceError
from service.sources.base import Clock, EndOfStream, SourceOptions, mask_credentials
from service.sources.filewatch import FileWatch
from service.sources.pacing import Pacer

log = logging.getLogger(__name__)

Kind = Literal["file", "stream", "usb"]
CAPTURE_OPTIONS_ENV = "OPENCV_FFMPEG_CAPTURE_OPTIONS"
DEFAULT_FILE_FPS = 25.0  # a file that states no frame rate is paced at this rate


def ffmpeg_capture_options(options: SourceOptions) -> str:
    """The value of ``OPENCV_FFMPEG_CAPTURE_OPTIONS`` for an open with ``options``.

    Options a demuxer does not know are ignored by it, so one value serves files,
    RTSP and HTTP alike (which keeps concurrent opens consistent).
    """
    return f"rtsp_transport;{options.rtsp_transport}|analyzeduration;100000"


def to_bgr(image: np.ndarray) -> ImageArray:
    """Any frame OpenCV returns (gray, BGR, BGRA; 8 or 16 bit) -> HxWx3 uint8 BGR."""
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
        else:
            raise SourceError(f"unsupported frame dtype {image.dtype}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.ndim != 3 or image.shape[2] != 3:
        raise SourceError(f"unsupported frame shape {image.shape}")
    return np.ascontiguousarray(image)


class OpenCVSource:
    """One OpenCV ``VideoCapture``: a file, a network stream or a USB camera.

    ``target`` is a path or URL (files, streams, ``/dev/videoN``) or a device index
    (USB).  Files are paced at ``options.fps`` or their own rate when
    ``options.realtime`` (else as fast as they decode) and loop or end per
    ``options.loop``.  Live sources are not slowed down; with ``options.fps`` below
    their rate, early frames are skipped (grabbed, not decoded to BGR).  A live read
    that fails, ends or takes at least ``read_timeout_s`` raises :class:`SourceError`.
    A file that is removed, replaced or truncated while it plays raises
    :class:`SourceError` within ``file_check_s`` (or at the next rewind).
    """

    def __init__(
        self,
        target: str | int,
        kind: Kind,
        options: SourceOptions,
        *,
        clock: Clock = time,
    ) -> None:
        self.target = target
        self.kind = kind
        self.options = options
        self.nominal_fps: float | None = None
        self._clock = clock
        self._cap: cv2.VideoCapture | None = None
        self._pacer: Pacer | None = None
        self._next_due: float | None = None  # live sources with options.fps
        self._watch: FileWatch | None = None  # files: is the opened file still there?

    @property
    def label(self) -> str:
        """The target, safe to log (credentials masked)."""
        return mask_credentials(str(self.target))

    def open(self) -> None:
        self.close()
        watch = None
        if self.kind == "file":
            path = Path(str(self.target))
            if not path.exists():
                raise SourceError(f"video file {self.label} does not exist")
            if not path.is_file():
                raise SourceError(f"video source {self.label} is not a file")
            # identify the file before opening it: a swap in between shows as "replaced"
            watch = FileWatch(path, self.label, interval_s=self.options.file_check_s,
                              clock=self._clock)
        cap = self._create_capture()
        if not cap.isOpened():
            cap.release()
            raise SourceError(self._open_failure())
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.nominal_fps = fps if 0.0 < fps < 1000.0 else None
        self._cap = cap
        self._watch = watch
        self._next_due = None
        self._pacer = None
        if self.kind == "file" and self.options.realtime:
            rate = self.options.fps or self.nominal_fps
            if rate is None:
                log.warning(
                    "video file %s states no frame rate; pacing it at %.0f fps",
                    self.label,
                    DEFAULT_FILE_FPS,
                )
                rate = DEFAULT_FILE_FPS
            self._pacer = Pacer(rate, clock=self._clock)

    def read(self) -> ImageArray:
        cap = self._cap
        if cap is None:
            raise SourceError(f"source {self.label} is not open")
        if self.kind == "file":
            return self._read_file(cap)
        return self._read_live(cap)

    def close(self) -> None:
        self._watch = None
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    # --- internals -----------------------------------------------------------

    def _create_capture(self) -> cv2.VideoCapture:
        if self.kind == "usb":
            cap = cv2.VideoCapture(self.target, cv2.CAP_V4L2)
            if cap.isOpened():
                if self.options.width:
                    cap.set(cv2.CAP_PROP_FRAME_WIDTH, self.options.width)
                if self.options.height:
                    cap.set(cv2.CAP_PROP_FRAME_HEIGHT, self.options.height)
                if self.options.fps:
                    cap.set(cv2.CAP_PROP_FPS, self.options.fps)
            return cap
        os.environ[CAPTURE_OPTIONS_ENV] = ffmpeg_capture_options(self.options)
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
            max(1, round(self.options.open_timeout_s * 1000)),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC,
            max(1, round(self.options.read_timeout_s * 1000)),
        ]
        return cv2.VideoCapture(str(self.target), cv2.CAP_FFMPEG, params)

    def _open_failure(self) -> str:
        if self.kind == "file":
            return (
                f"cannot decode video file {self.label}: OpenCV's FFMPEG backend could not "
                "open it (not a video, or a codec this build lacks)"
            )
        if self.kind == "usb":
            return (
                f"cannot open USB camera {self.label} with V4L2 (missing device, no "
                "permission, or in use by another process)"
            )
        return (
            f"cannot open stream {self.label} within {self.options.open_timeout_s:g} s "
            "(server unreachable, wrong path or credentials, or unsupported codec)"
        )

    def _read_file(self, cap: cv2.VideoCapture) -> ImageArray:
        watch = self._watch
        if watch is not None:
            watch.check()
        ok, image = cap.read()
        if not ok:
            if watch is not None:
                watch.check(force=True)  # a file cut short ends early: say why
            if not self.options.loop:
                raise EndOfStream(f"end of video file {self.label}")
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = cap.read()
            if not ok:
                raise SourceError(f"cannot read a frame from video file {self.label}")
        if self._pacer is not None:
            self._pacer.wait()
        return to_bgr(image)

    def _read_live(self, cap: cv2.VideoCapture) -> ImageArray:
        interval = 1.0 / self.options.fps if self.options.fps else 0.0
        while True:
            started = time.monotonic()
            ok = cap.grab()
            took = time.monotonic() - started
            if took >= self.options.read_timeout_s:
                # OpenCV may hand out stale frames for a while after a stream hangs
                raise SourceError(
                    f"no frame from {self.label} for {took:.1f} s "
                    f"(read timeout {self.options.read_timeout_s:g} s)"
                )
            if not ok:
                raise SourceError(f"stream {self.label} ended or the connection was lost")
            now = self._clock.monotonic()
            if interval and self._next_due is not None and now < self._next_due - interval / 4:
                continue  # early: skip this frame to hold options.fps
            ok, image = cap.retrieve()
            if not ok:
                raise SourceError(f"cannot decode a frame from {self.label}")
            if interval:
                due = self._next_due
                self._next_due = now + interval if due is None or now - due > interval else (
                    due + interval
                )
            return to_bgr(image)
