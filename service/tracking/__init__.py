"""Tracking: per-camera multi-object tracker over boxes and keypoints.

Public API::

    from service.tracking import Tracker, TrackerConfig

    tracker = Tracker(TrackerConfig())
    tracks = tracker.update(detections, t)   # Detections at time t (s) -> Tracks

``OneEuroFilter`` smooths any stream of points on its own.
"""

from service.tracking.config import OneEuroConfig, TrackerConfig
from service.tracking.one_euro import OneEuroFilter
from service.tracking.tracker import Tracker

__all__ = ["OneEuroConfig", "OneEuroFilter", "Tracker", "TrackerConfig"]
