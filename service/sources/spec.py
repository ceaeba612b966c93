"""Source specs (``sim://...``, file paths, ``rtsp://...``, ``/dev/videoN``) -> sources."""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from service.errors import SourceError
from service.sources.base import Clock, FrameSource, SourceOptions, mask_credentials
from service.sources.opencv_source import OpenCVSource
from service.sources.sim_source import SimSource

STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp")
SUPPORTED = (
    "sim://<scenario>?seed=&fps=&width=&height=, a video file path (or file://...), "
    "rtsp://, rtsps://, http:// or https:// (MJPEG, HLS, ...), rtmp://, udp:// or "
    "tcp:// (e.g. MPEG-TS), /dev/videoN or a device index (USB camera)"
)
SIM_DEFAULTS = {"seed": 0, "fps": 15.0, "width": 640, "height": 480}
_DEV_VIDEO = re.compile(r"^/dev/video\d+$")


def open_source(spec: str | int, options: SourceOptions, *, clock: Clock = time) -> FrameSource:
    """The (not yet opened) source that ``spec`` names.

    Raises :class:`SourceError` for a spec that names no supported kind of source
    or has invalid parameters; problems reaching the source show up at ``open``.
    """
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        index = int(spec)
        if index < 0:
            raise SourceError(f"USB camera index must be >= 0, got {index}")
        return OpenCVSource(index, "usb", options, clock=clock)
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"empty camera source; supported: {SUPPORTED}")
    spec = spec.strip()
    if _DEV_VIDEO.match(spec):
        return OpenCVSource(spec, "usb", options, clock=clock)
    scheme = urlsplit(spec).scheme.lower() if "://" in spec else ""
    if scheme == "sim":
        return _sim_source(spec, options, clock)
    if scheme in STREAM_SCHEMES:
        return OpenCVSource(spec, "stream", options, clock=clock)
    if scheme == "file":
        return OpenCVSource(unquote(urlsplit(spec).path), "file", options, clock=clock)
    if scheme:
        raise SourceError(
            f"unsupported camera source scheme {scheme!r} in {mask_credentials(spec)!r}; "
            f"supported: {SUPPORTED}"
        )
    path = Path(spec).expanduser()
    if path.is_dir():
        raise SourceError(
            f"camera source {spec!r} is a directory; give a video file (image "
            f"directories are not supported); supported: {SUPPORTED}"
        )
    return OpenCVSource(str(path), "file", options, clock=clock)


def _sim_source(spec: str, options: SourceOptions, clock: Clock) -> SimSource:
    parts = urlsplit(spec)
    scenario = parts.netloc or parts.path.lstrip("/")
    if not scenario:
        raise SourceError(f"sim source {spec!r} names no scenario (sim://conveyor?seed=1)")
    params: dict[str, float] = {}
    for key, raw in parse_qsl(parts.query, keep_blank_values=True):
        if key not in SIM_DEFAULTS:
            raise SourceError(
                f"unknown parameter {key!r} in sim source {spec!r}; "
                f"supported: {', '.join(SIM_DEFAULTS)}"
            )
        try:
            value = float(raw)
        except ValueError:
            raise SourceError(
                f"parameter {key}={raw!r} in sim source {spec!r} is not a number"
            ) from None
        if key != "seed" and not value > 0:
            raise SourceError(f"parameter {key}={raw!r} in sim source {spec!r} must be positive")
        if key != "fps" and value != int(value):
            raise SourceError(f"parameter {key}={raw!r} in sim source {spec!r} must be an integer")
        params[key] = value
    width = params.get("width", options.width or SIM_DEFAULTS["width"])
    height = params.get("height", options.height or SIM_DEFAULTS["height"])
    return SimSource(
        scenario,
        seed=int(params.get("seed", SIM_DEFAULTS["seed"])),
        width=int(width),
        height=int(height),
        fps=float(params.get("fps", options.fps or SIM_DEFAULTS["fps"])),
        options=options,
        clock=clock,
    )
