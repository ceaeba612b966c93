"""The synthetic assembly line: rendered camera frames with exact ground truth.

Public API (numpy + OpenCV only, deterministic by seed)::

    from service.sim import Scene, CLASSES, SCENARIOS

    scene = Scene("conveyor", seed=1, width=640, height=480, fps=30.0)
    image, truth = scene.render(index)      # frame index -> t = index / fps
    image, truth = scene.render_at(t)       # any simulated time in seconds
    scene.homography                        # 3x3, work-plane mm -> image px
    scene.incidents(t0, t1)                 # scripted incidents overlapping [t0, t1)

``image`` is HxWx3 uint8 BGR.  ``truth`` is a :class:`FrameTruth` whose
``instances`` are :class:`InstanceTruth` (class id and name, box in px, keypoints in
px and mm with visibility, in-view fraction, pose (x, y, theta) in mm/deg, flags).
``CLASSES`` lists the classes in class-id order: ``bracket``, ``flange``, ``arm``,
``hand`` (an operator's hand, during ``zone_intrusion`` incidents), each with 5
named keypoints.
"""

from service.sim.scene import (
    CLASSES,
    SCENARIOS,
    FrameTruth,
    Incident,
    InstanceTruth,
    PartClass,
    Scene,
)

__all__ = [
    "CLASSES",
    "SCENARIOS",
    "FrameTruth",
    "Incident",
    "InstanceTruth",
    "PartClass",
    "Scene",
]
