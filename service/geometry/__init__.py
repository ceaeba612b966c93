"""Geometry: calibration (pixels <-> work-plane mm), part poses, PnP, joint angles.

Public API::

    from service.geometry import Homography, PoseEstimator

    h = Homography.from_points(px, mm)          # or from_checkerboard / from_charuco
    h.px_to_mm(points); h.mm_to_px(points); h.reprojection_error_px()
    tracks = PoseEstimator({class_id: template_mm}).update(tracks, h)
"""

from service.geometry.calibration import CalibrationConfig, Homography, ReprojectionError
from service.geometry.pose import (
    PnPResult,
    PoseEstimator,
    fit_rigid_2d,
    fit_rigid_2d_batch,
    joint_angles,
    rotation_variance,
    solve_pnp,
)
from service.geometry.pose_filter import OrientationFilter, PoseFilterConfig

__all__ = [
    "CalibrationConfig",
    "Homography",
    "PnPResult",
    "OrientationFilter",
    "PoseEstimator",
    "PoseFilterConfig",
    "ReprojectionError",
    "fit_rigid_2d",
    "fit_rigid_2d_batch",
    "joint_angles",
    "rotation_variance",
    "solve_pnp",
]
