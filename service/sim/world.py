"""Geometry of the synthetic line: part templates, the robot arm and the camera.

Work-plane coordinates are millimetres: X along the belt (the direction it moves),
Y across it (towards the far side, the top of the image), Z up.  The camera is a
pinhole looking down at the plane at an oblique angle, so pixels and millimetres
are related by a true homography ``H = K [r1 r2 t]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PartClass:
    """A class of the synthetic line with its named keypoints.

    ``template_mm`` holds the keypoints of a rigid part in part coordinates (the
    pose (x, y, theta) of a part maps part coordinates to the work plane); the
    arm is articulated and has no rigid template (``None``).
    """

    name: str
    keypoint_names: tuple[str, ...]
    template_mm: Array | None
    skeleton: tuple[tuple[int, int], ...]
    outline_mm: Array | None = field(default=None, repr=False)
    holes_mm: tuple[tuple[float, float, float], ...] = ()  # (x, y, radius)


def _circle(cx: float, cy: float, r: float, n: int = 48) -> Array:
    a = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _bracket() -> PartClass:
    # An L-bracket: long leg 80 mm, short leg 50 mm, 20 mm wide, two holes.
    outline = np.array([[0, 0], [80, 0], [80, 20], [20, 20], [20, 50], [0, 50]], float)
    kpts = np.array([[0, 0], [80, 10], [10, 50], [62, 10], [10, 33]], float)
    centre = kpts.mean(axis=0)
    holes = ((62.0, 10.0, 4.0), (10.0, 33.0, 4.0))
    return PartClass(
        name="bracket",
        keypoint_names=("corner", "long_tip", "short_tip", "hole_long", "hole_short"),
        template_mm=kpts - centre,
        skeleton=((0, 1), (0, 2), (1, 3), (2, 4)),
        outline_mm=outline - centre,
        holes_mm=tuple((x - centre[0], y - centre[1], r) for x, y, r in holes),
    )


def _flange() -> PartClass:
    # A round flange, radius 32 mm, 3 bolt holes and an orientation notch at 0 deg.
    r, half_w, depth = 32.0, 4.0, 7.0
    alpha = float(np.arcsin(half_w / r))
    a = np.linspace(alpha, 2.0 * np.pi - alpha, 64)
    rim = np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
    notch = np.array([[r * np.cos(alpha), -half_w], [r - depth, -half_w], [r - depth, half_w]])
    outline = np.concatenate([rim, notch])
    bolts = [(22.0 * np.cos(np.radians(d)), 22.0 * np.sin(np.radians(d))) for d in (60, 180, 300)]
    kpts = np.array([[0.0, 0.0], [r - depth, 0.0], *bolts], float)
    return PartClass(
        name="flange",
        keypoint_names=("centre", "notch", "bolt_1", "bolt_2", "bolt_3"),
        template_mm=kpts,
        skeleton=((0, 1), (0, 2), (0, 3), (0, 4)),
        outline_mm=outline,
        holes_mm=((0.0, 0.0, 9.0),) + tuple((x, y, 3.5) for x, y in bolts),
    )


def _arm() -> PartClass:
    return PartClass(
        name="arm",
        keypoint_names=("base", "shoulder", "elbow", "wrist", "tool"),
        template_mm=None,
        skeleton=((0, 1), (1, 2), (2, 3), (3, 4)),
    )


def _hand() -> PartClass:
    # An operator's gloved hand and forearm (reaches into the danger zone).
    return PartClass(
        name="hand",
        keypoint_names=("elbow", "wrist", "palm", "index_tip", "thumb_tip"),
        template_mm=None,
        skeleton=((0, 1), (1, 2), (2, 3), (2, 4)),
    )


CLASSES: tuple[PartClass, ...] = (_bracket(), _flange(), _arm(), _hand())
CLASS_IDS: dict[str, int] = {c.name: i for i, c in enumerate(CLASSES)}
NUM_KEYPOINTS = 5


def rotation(theta_deg: float) -> Array:
    t = np.radians(theta_deg)
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s], [s, c]])


def place(points_mm: Array, x: float, y: float, theta_deg: float) -> Array:
    """Part coordinates -> work-plane mm for the pose (x, y, theta)."""
    return points_mm @ rotation(theta_deg).T + np.array([x, y])


# --- the robot arm (a SCARA seen from above) ------------------------------------

ARM_LINKS_MM = (45.0, 170.0, 140.0, 55.0)  # base->shoulder, upper arm, forearm, hand


def arm_keypoints(base: Array, q_deg: Array) -> Array:
    """Forward kinematics: joint angles (yaw, shoulder, elbow, wrist) -> 5 keypoints."""
    pts = [np.asarray(base, float)]
    angle = 0.0
    for length, q in zip(ARM_LINKS_MM, q_deg, strict=True):
        angle += float(q)
        a = np.radians(angle)
        pts.append(pts[-1] + length * np.array([np.cos(a), np.sin(a)]))
    return np.stack(pts)


def arm_ik(base: Array, yaw_deg: float, wrist_target: Array, elbow_up: bool = True) -> Array:
    """Joint angles that put the wrist at ``wrist_target`` for a given base yaw.

    The hand keeps pointing along -Y (down onto the belt in the image), so the
    wrist angle follows from the other three.
    """
    shoulder = np.asarray(base, float) + ARM_LINKS_MM[0] * np.array(
        [np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))]
    )
    d = np.asarray(wrist_target, float) - shoulder
    dist = float(np.hypot(*d))
    l1, l2 = ARM_LINKS_MM[1], ARM_LINKS_MM[2]
    dist = min(max(dist, abs(l1 - l2) + 1e-6), l1 + l2 - 1e-6)
    cos_q2 = (dist**2 - l1**2 - l2**2) / (2 * l1 * l2)
    q2 = np.arccos(np.clip(cos_q2, -1.0, 1.0)) * (1 if elbow_up else -1)
    phi = np.arctan2(d[1], d[0])
    q1_abs = phi - np.arctan2(l2 * np.sin(q2), l1 + l2 * np.cos(q2))
    q1 = np.degrees(q1_abs) - yaw_deg
    q2d = np.degrees(q2)
    hand_abs = -90.0
    q3 = hand_abs - (yaw_deg + q1 + q2d)
    q = np.array([yaw_deg, q1, q2d, q3])
    return (q + 180.0) % 360.0 - 180.0


def hand_keypoints(elbow: Array, wrist: Array, bend_deg: float = 0.0) -> Array:
    """Keypoints of a hand whose forearm runs from ``elbow`` to ``wrist``."""
    e, w = np.asarray(elbow, float), np.asarray(wrist, float)
    d = (w - e) / max(float(np.linalg.norm(w - e)), 1e-6)
    d = rotation(bend_deg) @ d
    palm = w + 42.0 * d
    index_tip = w + 100.0 * (rotation(8.0) @ d)
    thumb_tip = w + 62.0 * (rotation(-48.0) @ d)
    return np.stack([e, w, palm, index_tip, thumb_tip])


# --- the camera -------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """A pinhole camera over the work plane."""

    width: int
    height: int
    focal_px: float
    position_mm: tuple[float, float, float]  # camera centre in world mm
    target_mm: tuple[float, float]  # the plane point at the image centre
    roll_deg: float = 0.0

    def rotation(self) -> Array:
        c = np.array(self.position_mm, float)
        target = np.array([self.target_mm[0], self.target_mm[1], 0.0])
        z = target - c
        z /= np.linalg.norm(z)
        x = np.cross(z, np.array([0.0, 0.0, 1.0]))  # horizontal, to the right
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        r = np.stack([x, y, z])  # world -> camera, rows are camera axes
        if self.roll_deg:
            rr = np.radians(self.roll_deg)
            rz = np.array([[np.cos(rr), -np.sin(rr), 0], [np.sin(rr), np.cos(rr), 0], [0, 0, 1]])
            r = rz @ r
        return r

    def intrinsics(self) -> Array:
        return np.array(
            [
                [self.focal_px, 0.0, (self.width - 1) / 2.0],
                [0.0, self.focal_px, (self.height - 1) / 2.0],
                [0.0, 0.0, 1.0],
            ]
        )

    def homography(self) -> Array:
        """Work-plane mm (X, Y, 1) -> image px (x, y, 1), pixel-centre convention."""
        r = self.rotation()
        t = -r @ np.array(self.position_mm, float)
        h = self.intrinsics() @ np.column_stack([r[:, 0], r[:, 1], t])
        return h / h[2, 2]


def default_camera(width: int = 640, height: int = 480) -> Camera:
    scale = width / 640.0
    return Camera(
        width=width,
        height=height,
        focal_px=760.0 * scale,
        position_mm=(0.0, -620.0, 820.0),
        target_mm=(0.0, 40.0),
    )


def project(h: Array, points_mm: Array) -> Array:
    """Apply a homography to (N, 2) points."""
    p = np.asarray(points_mm, float).reshape(-1, 2)
    q = np.column_stack([p, np.ones(len(p))]) @ h.T
    return q[:, :2] / q[:, 2:3]
