"""The source contract: :class:`FrameSource`, :class:`SourceOptions`, credential masking."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol

from service.domain import ImageArray
from service.errors import SourceError


class EndOfStream(SourceError):
    """A non-looping file source has no more frames."""


class Clock(Protocol):
    """What the sources and cameras need of a clock (the ``time`` module fits)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class FrameSource(Protocol):
    """One stream of frames, used only by the capture thread that opened it.

    ``open`` and ``read`` raise :class:`SourceError` with a clear reason;
    ``read`` raises :class:`EndOfStream` at the end of a non-looping file.  A source
    can be opened again after ``close`` (that is how a camera reconnects).
    """

    nominal_fps: float | None

    def open(self) -> None: ...

    def read(self) -> ImageArray: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SourceOptions:
    """How to open and pace a source (all times in seconds).

    fps:       pace to this rate; None = the source's own rate.  Files and sim are
               paced by sleeping, live streams by skipping frames that come early.
    loop:      files: start again at the end (else :class:`EndOfStream`).
    realtime:  files and sim: pace at ``fps``; False = as fast as possible (benchmarks).
    open_timeout_s / read_timeout_s: a stream that takes longer counts as failed;
               a ``read`` that takes at least ``read_timeout_s`` is a disconnect.
    backoff_initial_s / backoff_max_s / backoff_factor: reconnect delays (the n-th
               drawn from [0, min(max, initial * factor**n)]: full jitter).
    width / height: sim frame size (and a USB camera's requested size).
    rtsp_transport: ``tcp`` (default, works through firewalls) or ``udp``.
    file_check_s: files: how often to check that the playing file is still there
               (also checked at each rewind); a removed, replaced or truncated file
               makes the camera go down and retry.
    """

    fps: float | None = None
    loop: bool = True
    realtime: bool = True
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    backoff_factor: float = 2.0
    width: int | None = None
    height: int | None = None
    rtsp_transport: Literal["tcp", "udp"] = "tcp"
    file_check_s: float = 0.5

    def __post_init__(self) -> None:
        if self.fps is not None and not self.fps > 0:
            raise SourceError(f"fps must be positive, got {self.fps}")
        for name in (
            "open_timeout_s", "read_timeout_s", "backoff_initial_s", "backoff_max_s",
            "file_check_s",
        ):
            if not getattr(self, name) > 0:
                raise SourceError(f"{name} must be positive, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise SourceError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s "
                f"({self.backoff_initial_s})"
            )
        if not self.backoff_factor >= 1.0:
            raise SourceError(f"backoff_factor must be >= 1, got {self.backoff_factor}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise SourceError(f"{name} must be positive, got {value}")


# scheme://user:password@host -> scheme://user:***@host, anywhere in a text
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*):(?P<secret>[^\s/@]*)@")
# ?password=...&token=... -> ***
_SECRET_QUERY = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|pass|token|access_token|api_key|apikey|key|secret|"
    r"auth)=)(?P<secret>[^&\s#]*)",
    re.IGNORECASE,
)


def mask_credentials(text: str) -> str:
    """Replace passwords and tokens in every URL of ``text`` by ``***``.

    >>> mask_credentials("rtsp://admin:hunter2@10.0.0.5:554/stream?token=abc")
    'rtsp://admin:***@10.0.0.5:554/stream?token=***'
    """
    text = _USERINFO.sub(r"\g<head>:***@", text)
    return _SECRET_QUERY.sub(r"\g<head>***", text)
