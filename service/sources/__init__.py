"""Camera sources: files, RTSP/HTTP streams, USB cameras and the synthetic line.

``open_source(spec, options)`` turns a spec into a :class:`FrameSource`;
:class:`Camera` reads one on its own thread, keeps only the newest frame,
reconnects with backoff and reports its :class:`CameraStatus`.  See docs/sources.md.
"""

from service.sources.backoff import Backoff
from service.sources.base import (
    Clock,
    EndOfStream,
    FrameSource,
    SourceOptions,
    mask_credentials,
)
from service.sources.camera import Camera, CameraStatus
from service.sources.opencv_source import OpenCVSource
from service.sources.pacing import Pacer
from service.sources.sim_source import SimSource
from service.sources.slot import LatestFrameSlot
from service.sources.spec import open_source

__all__ = [
    "Backoff",
    "Camera",
    "CameraStatus",
    "Clock",
    "EndOfStream",
    "FrameSource",
    "LatestFrameSlot",
    "OpenCVSource",
    "Pacer",
    "SimSource",
    "SourceOptions",
    "mask_credentials",
    "open_source",
]
