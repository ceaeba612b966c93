"""The synthetic assembly line: a scenario (what happens when) and its renderer.

Everything is a pure function of (scenario, seed, time): ``render_at(t)`` needs no
earlier frames, so any frame can be rendered in any order and two scenes with the
same arguments give identical frames and truth.

What happens on the line (scenario ``conveyor``):

- A belt (Y in [-80, 80] mm) moves parts along +X at ``belt_speed_mm_s``.  Parts
  (brackets and flanges) sit on the belt at random gaps, nominally at 0 degrees;
  a few are deliberately misoriented (turned by 90/180/270 deg) or misplaced
  (off the belt's centre line).
- A SCARA-type arm moves between a pick point over the belt and a station
  fixture, where a finished part sits.
- Scripted incidents, drawn per 60 s block: ``belt_stop`` (the belt and its parts
  stand still: a jam), ``station_empty`` (the part at the station is missing) and
  ``arm_stall`` (the arm freezes) and ``zone_intrusion`` (an operator's hand
  reaches into the marked danger zone).  The first 10 s of every block are calm.
- Variation: lighting drift and flicker, sensor noise, motion blur along the belt,
  distractor objects (on the floor and riding on the belt), a sensor gantry over
  the belt that partly hides parts, parts entering and leaving the frame.

Scenario ``calm`` is the same line with no incidents and no misplaced or
misoriented parts.  Scenario ``train`` randomises orientations, belt speed, arm
poses, the camera's mounting and the variation more widely; it feeds training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from service.sim.world import (
    CLASS_IDS,
    CLASSES,
    NUM_KEYPOINTS,
    Camera,
    PartClass,
    arm_ik,
    arm_keypoints,
    default_camera,
    hand_keypoints,
    place,
    project,
)

Array = npt.NDArray[np.float64]
Image = npt.NDArray[np.uint8]

SCENARIOS: tuple[str, ...] = ("conveyor", "calm", "train")

BELT_HALF_WIDTH = 80.0
BELT_PERIOD_MM = 400.0
X_ENTER, X_EXIT = -620.0, 620.0
PREROLL_MM = X_EXIT - X_ENTER
BLOCK_S = 60.0
PART_BLOCK_MM = 3000.0
ARM_BASE = np.array([120.0, 300.0])
ARM_PICK_WRIST = np.array([230.0, 55.0])
STATION_XY = np.array([-170.0, 330.0])
GANTRY_X = (-125.0, -100.0)
INCIDENT_KINDS = ("belt_stop", "station_empty", "arm_stall", "zone_intrusion")
DANGER_ZONE = (60.0, -260.0, 300.0, -140.0)  # x0, y0, x1, y1 mm
_SHIFT = 4  # sub-pixel bits for OpenCV drawing
_ONE = 1 << _SHIFT

__all__ = [
    "CLASSES",
    "SCENARIOS",
    "FrameTruth",
    "Incident",
    "InstanceTruth",
    "PartClass",
    "Scene",
]


@dataclass(frozen=True)
class Incident:
    """A scripted incident active on [start_s, end_s)."""

    kind: str
    start_s: float
    end_s: float
    detail: str = ""

    def active(self, t: float) -> bool:
        return self.start_s <= t < self.end_s

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start_s": round(self.start_s, 4),
            "end_s": round(self.end_s, 4),
            "detail": self.detail,
        }


@dataclass
class InstanceTruth:
    """Ground truth of one instance in one frame."""

    uid: str
    class_id: int
    class_name: str
    box: Array  # (4,) x1 y1 x2 y2 px, clipped to the image
    keypoints_px: Array  # (K, 2)
    keypoints_mm: Array  # (K, 2) work plane
    visible: npt.NDArray[np.bool_]  # (K,) in the image and not hidden by another object
    in_view: float  # fraction of the instance's area inside the image
    pose_mm: tuple[float, float, float]  # x, y (mm), theta (deg); the arm: its base
    flags: tuple[str, ...] = ()
    joints_deg: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "class_id": self.class_id,
            "class": self.class_name,
            "box": [round(float(v), 3) for v in self.box],
            "keypoints": {
                name: {
                    "px": [round(float(p[0]), 3), round(float(p[1]), 3)],
                    "mm": [round(float(m[0]), 3), round(float(m[1]), 3)],
                    "visible": bool(v),
                }
                for name, p, m, v in zip(
                    CLASSES[self.class_id].keypoint_names,
                    self.keypoints_px,
                    self.keypoints_mm,
                    self.visible,
                    strict=True,
                )
            },
            "in_view": round(self.in_view, 4),
            "pose": {
                "x_mm": round(self.pose_mm[0], 3),
                "y_mm": round(self.pose_mm[1], 3),
                "theta_deg": round(self.pose_mm[2], 3),
            },
            "flags": list(self.flags),
            **({"joints_deg": [round(q, 3) for q in self.joints_deg]} if self.joints_deg else {}),
        }


@dataclass
class FrameTruth:
    """Ground truth of one frame."""

    index: int
    t: float
    belt_speed_mm_s: float
    belt_offset_mm: float
    homography: Array  # mm -> px
    instances: list[InstanceTruth]
    incidents: list[Incident]
    station_occupied: bool
    arm_moving: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "frame": self.index,
            "t": round(self.t, 6),
            "belt_speed_mm_s": round(self.belt_speed_mm_s, 3),
            "belt_offset_mm": round(self.belt_offset_mm, 3),
            "homography_mm_to_px": [[float(v) for v in row] for row in self.homography],
            "station_occupied": self.station_occupied,
            "arm_moving": self.arm_moving,
            "incidents": [i.to_json() for i in self.incidents],
            "instances": [i.to_json() for i in self.instances],
        }


@dataclass(frozen=True)
class _Part:
    uid: str
    class_id: int
    belt_pos_mm: float  # belt coordinate at which the part sits
    y_mm: float
    theta_deg: float
    flags: tuple[str, ...]
    shade: int


@dataclass(frozen=True)
class _Distractor:
    kind: str  # "washer", "screw", "rag", "wrench", "tape", "cable"
    xy: tuple[float, float]  # floor position, or (belt_pos, y) for belt-borne ones
    angle: float
    size: float
    color: tuple[int, int, int]
    on_belt: bool


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in key])


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


class Scene:
    """One camera's view of the synthetic line."""

    def __init__(
        self,
        scenario: str = "conveyor",
        seed: int = 0,
        width: int = 640,
        height: int = 480,
        fps: float = 30.0,
        belt_speed_mm_s: float | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
        if width < 64 or height < 48:
            raise ValueError(f"frame size {width}x{height} is too small (min 64x48)")
        if fps <= 0:
            raise ValueError("fps must be > 0")
        self.scenario = scenario
        self.seed = int(seed)
        self.width = int(width)
        self.height = int(height)
        self.fps = float(fps)
        self._train = scenario == "train"
        rng = _rng(self.seed, 7)
        if belt_speed_mm_s is None:
            belt_speed_mm_s = float(rng.uniform(60, 240)) if self._train else 100.0
        self.belt_speed_mm_s = float(belt_speed_mm_s)
        self.camera = self._make_camera(rng)
        self.homography = self.camera.homography()
        self._h_inv = np.linalg.inv(self.homography)
        self._style = self._make_style(rng)
        self._background, self._belt_mask, self._belt_rows = self._render_background()
        self._belt_map_x, self._belt_map_y = self._belt_maps()
        self._belt_texture = self._make_belt_texture()
        self._floor_distractors = self._make_floor_distractors()
        self._noise_bank = self._make_noise_bank()
        self._vignette = self._make_vignette()

    # -- public ------------------------------------------------------------------
    @property
    def classes(self) -> tuple[PartClass, ...]:
        return CLASSES

    def render(self, index: int) -> tuple[Image, FrameTruth]:
        """Render frame ``index`` (time ``index / fps``)."""
        return self._render(index / self.fps, int(index))

    def render_at(self, t: float) -> tuple[Image, FrameTruth]:
        """Render the frame at simulated time ``t`` seconds."""
        return self._render(float(t), int(round(t * self.fps)))

    def incidents(self, t0: float, t1: float) -> list[Incident]:
        """The scripted incidents overlapping [t0, t1)."""
        out: list[Incident] = []
        for b in range(max(0, int(t0 // BLOCK_S) - 1), int(t1 // BLOCK_S) + 1):
            out.extend(i for i in self._block_incidents(b) if i.end_s > t0 and i.start_s < t1)
        return out

    def belt_offset(self, t: float) -> float:
        """Belt travel in mm at time t (stands still during belt_stop incidents)."""
        # the belt starts full: parts that entered before t = 0 are already on it
        return PREROLL_MM + self.belt_speed_mm_s * (t - self._stopped_before(t))

    # -- scenario ------------------------------------------------------------------
    def _make_camera(self, rng: np.random.Generator) -> Camera:
        cam = default_camera(self.width, self.height)
        if not self._train:
            return cam
        px, py, pz = cam.position_mm
        return Camera(
            width=cam.width,
            height=cam.height,
            focal_px=cam.focal_px * float(rng.uniform(0.85, 1.2)),
            position_mm=(
                px + float(rng.uniform(-60, 60)),
                py + float(rng.uniform(-80, 80)),
                pz + float(rng.uniform(-80, 120)),
            ),
            target_mm=(float(rng.uniform(-40, 40)), cam.target_mm[1] + float(rng.uniform(-40, 40))),
            roll_deg=float(rng.uniform(-4, 4)),
        )

    def _make_style(self, rng: np.random.Generator) -> dict[str, Any]:
        spread = 2.0 if self._train else 1.0
        return {
            "floor": np.clip(np.array([118, 122, 120]) + rng.normal(0, 8 * spread, 3), 60, 200),
            "belt": np.clip(np.array([52, 54, 56]) + rng.normal(0, 5 * spread, 3), 25, 110),
            "tint": np.clip(1.0 + rng.normal(0, 0.03 * spread, 3), 0.85, 1.15),
            "noise_sigma": float(rng.uniform(2.0, 6.0) if self._train else 3.0),
            "light_amp": float(rng.uniform(0.05, 0.25) if self._train else 0.12),
            "light_period": float(rng.uniform(15, 60)),
            "flicker": bool(rng.random() < 0.5) if self._train else True,
        }

    @lru_cache(maxsize=64)  # noqa: B019 - per-instance cache of pure block draws
    def _block_incidents(self, block: int) -> tuple[Incident, ...]:
        if self.scenario != "conveyor":
            return ()
        rng = _rng(self.seed, 11, block)
        t0 = block * BLOCK_S
        kinds = list(rng.permutation(INCIDENT_KINDS))[: int(rng.integers(1, 3))]
        slots = [(10.0, 33.0), (35.0, 58.0)]
        out = []
        for kind, (a, b) in zip(kinds, slots, strict=False):
            dur = float(
                rng.uniform(3.0, 8.0) if kind == "zone_intrusion" else rng.uniform(6.0, 12.0)
            )
            start = t0 + float(rng.uniform(a, max(a, b - dur)))
            out.append(Incident(str(kind), start, start + dur))
        return tuple(out)

    @lru_cache(maxsize=256)  # noqa: B019
    def _stopped_until_block(self, block: int) -> float:
        """Total belt-stop seconds in blocks [0, block)."""
        if block <= 0:
            return 0.0
        own = sum(
            i.end_s - i.start_s for i in self._block_incidents(block - 1) if i.kind == "belt_stop"
        )
        return self._stopped_until_block(block - 1) + own

    def _stopped_before(self, t: float) -> float:
        if self.scenario != "conveyor" or t <= 0:
            return 0.0
        b = int(t // BLOCK_S)
        total = self._stopped_until_block(b)
        for inc in self._block_incidents(b):
            if inc.kind == "belt_stop" and inc.start_s < t:
                total += min(t, inc.end_s) - inc.start_s
        return total

    @lru_cache(maxsize=64)  # noqa: B019
    def _part_block(self, block: int) -> tuple[_Part, ...]:
        """Parts whose belt coordinate lies in [block*L, (block+1)*L)."""
        rng = _rng(self.seed, 23, block)
        parts: list[_Part] = []
        pos = block * PART_BLOCK_MM + float(rng.uniform(0, 100))
        n = 0
        while pos < (block + 1) * PART_BLOCK_MM:
            cls = int(rng.integers(0, 2))
            flags: tuple[str, ...] = ()
            if self._train:
                theta = float(rng.uniform(-180, 180))
                y = float(rng.uniform(-55, 55))
            else:
                theta = float(rng.normal(0, 2.0))
                y = float(rng.normal(0, 3.0))
                if self.scenario == "conveyor":
                    u = rng.random()
                    if u < 0.07:
                        theta += float(rng.choice([90.0, 180.0, 270.0]))
                        flags = ("misoriented",)
                    elif u < 0.12:
                        y = float(rng.choice([-1, 1]) * rng.uniform(35, 50))
                        flags = ("misplaced",)
            theta = (theta + 180.0) % 360.0 - 180.0
            parts.append(
                _Part(f"p{block}-{n}", cls, pos, y, theta, flags, int(rng.integers(150, 215)))
            )
            n += 1
            gap_lo, gap_hi = (95.0, 260.0) if self._train else (150.0, 330.0)
            pos += float(rng.uniform(gap_lo, gap_hi))
        return tuple(parts)

    @lru_cache(maxsize=64)  # noqa: B019
    def _belt_distractor_block(self, block: int) -> tuple[_Distractor, ...]:
        rng = _rng(self.seed, 29, block)
        out = []
        n = int(rng.integers(1, 5 if self._train else 3))
        for _ in range(n):
            kind = str(rng.choice(["washer", "screw", "rag"]))
            # keep belt-borne distractors at the belt's edges so they rarely touch parts
            side = float(rng.choice([-1, 1]))
            y = (
                side * float(rng.uniform(58, 74))
                if not self._train
                else float(rng.uniform(-74, 74))
            )
            out.append(
                _Distractor(
                    kind,
                    (block * PART_BLOCK_MM + float(rng.uniform(0, PART_BLOCK_MM)), y),
                    float(rng.uniform(0, 360)),
                    float(rng.uniform(0.7, 1.3)),
                    tuple(int(c) for c in rng.integers(40, 230, 3)),  # type: ignore[arg-type]
                    True,
                )
            )
        return tuple(out)

    def _make_floor_distractors(self) -> list[_Distractor]:
        rng = _rng(self.seed, 31)
        out = []
        for _ in range(int(rng.integers(2, 7 if self._train else 4))):
            kind = str(rng.choice(["wrench", "tape", "cable"]))
            side = float(rng.choice([-1, 1]))
            y = side * float(rng.uniform(130, 260))
            if side > 0:
                y = float(rng.uniform(110, 200))
            x = float(rng.uniform(-500, 500))
            if side > 0 and -300 < x < 330:  # keep the station / arm area clear
                x = float(rng.choice([-1, 1])) * float(rng.uniform(340, 520))
            out.append(
                _Distractor(
                    kind,
                    (x, y),
                    float(rng.uniform(0, 360)),
                    float(rng.uniform(0.8, 1.3)),
                    tuple(int(c) for c in rng.integers(30, 220, 3)),  # type: ignore[arg-type]
                    False,
                )
            )
        return out

    def _arm_state(self, t: float) -> tuple[Array, bool]:
        """Joint angles of the arm at time t, and whether it moves."""
        stall = [i for i in self.incidents(t - BLOCK_S, t + 1e-9) if i.kind == "arm_stall"]
        moving = True
        for inc in stall:
            if inc.active(t):
                t = inc.start_s
                moving = False
        if self._train:
            rng = _rng(self.seed, 37)
            phase = rng.uniform(0, 100, 4)
            amp = np.array([35.0, 50.0, 60.0, 80.0])
            centre = np.array([-110.0, -20.0, 40.0, 0.0])
            speed = rng.uniform(0.2, 0.7, 4)
            return centre + amp * np.sin(speed * t + phase), moving
        cycle = 6.0
        u = (t % cycle) / cycle
        pick = arm_ik(ARM_BASE, -130.0, ARM_PICK_WRIST)
        station = arm_ik(ARM_BASE, -150.0, STATION_XY + np.array([0.0, 55.0]))
        # move to pick, dwell, move to station, dwell
        if u < 0.3:
            s = _smoothstep(u / 0.3)
            q = station + (pick - station) * s
        elif u < 0.45:
            q = pick
        elif u < 0.8:
            s = _smoothstep((u - 0.45) / 0.35)
            q = pick + (station - pick) * s
        else:
            q = station
        return q, moving

    # -- rendering -----------------------------------------------------------------
    def _plane_maps(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        xs, ys = np.meshgrid(
            np.arange(self.width, dtype=np.float64), np.arange(self.height, dtype=np.float64)
        )
        pts = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ self._h_inv.T
        return (pts[..., 0] / pts[..., 2]).astype(np.float32), (pts[..., 1] / pts[..., 2]).astype(
            np.float32
        )

    def _render_background(self) -> tuple[Image, npt.NDArray[np.uint8], tuple[int, int]]:
        mx, my = self._plane_maps()
        rng = _rng(self.seed, 41)
        # floor: concrete-like noise sampled in plane coordinates (2 px/mm texture)
        grain = rng.normal(0, 1, (256, 256)).astype(np.float32)
        tex = np.asarray(
            cv2.GaussianBlur(grain, (0, 0), 3) * 40 + rng.normal(0, 6, (256, 256)), np.float32
        )
        fx = ((mx * 0.5) % 256).astype(np.float32)
        fy = ((my * 0.5) % 256).astype(np.float32)
        floor = cv2.remap(tex, fx, fy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_WRAP)
        img = np.clip(self._style["floor"][None, None, :] + floor[..., None], 0, 255).astype(
            np.uint8
        )
        img = np.ascontiguousarray(img)
        h = self.homography

        def poly(pts_mm: Array, color: tuple[int, ...]) -> None:
            p = np.round(project(h, pts_mm) * _ONE).astype(np.int32)
            cv2.fillPoly(img, [p], color, cv2.LINE_AA, _SHIFT)

        def rect(x0: float, y0: float, x1: float, y1: float) -> Array:
            return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)

        # danger zone on the operator's side: hatched yellow/black border
        zx0, zy0, zx1, zy1 = DANGER_ZONE
        poly(rect(zx0, zy0, zx1, zy1), (30, 190, 220))
        poly(
            rect(zx0 + 12, zy0 + 12, zx1 - 12, zy1 - 12),
            tuple(int(c) for c in self._style["floor"]),
        )
        for k in range(0, 400, 30):
            x = zx0 + k
            if x + 12 < zx1:
                poly(
                    np.array([[x, zy0], [x + 12, zy0], [x + 12, zy0 + 12], [x, zy0 + 12]]),
                    (20, 20, 20),
                )
                poly(
                    np.array([[x, zy1 - 12], [x + 12, zy1 - 12], [x + 12, zy1], [x, zy1]]),
                    (20, 20, 20),
                )
        # belt frame rails
        poly(rect(-2000, BELT_HALF_WIDTH, 2000, BELT_HALF_WIDTH + 16), (150, 150, 155))
        poly(rect(-2000, -BELT_HALF_WIDTH - 16, 2000, -BELT_HALF_WIDTH), (150, 150, 155))
        poly(rect(-2000, BELT_HALF_WIDTH + 16, 2000, BELT_HALF_WIDTH + 19), (60, 60, 60))
        # station fixture: a plate with a pocket
        sx, sy = STATION_XY
        poly(rect(sx - 70, sy - 60, sx + 70, sy + 60), (95, 110, 120))
        poly(rect(sx - 58, sy - 48, sx + 58, sy + 48), (70, 80, 88))
        # arm pedestal plate
        bx, by = ARM_BASE
        poly(rect(bx - 70, by - 70, bx + 70, by + 70), (90, 95, 100))
        belt_mask = (np.abs(my) <= BELT_HALF_WIDTH).astype(np.uint8)
        rows = np.where(belt_mask.any(axis=1))[0]
        belt_rows = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        return img, belt_mask, belt_rows

    def _belt_maps(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        mx, my = self._plane_maps()
        r0, r1 = self._belt_rows
        return (mx[r0:r1] * 2.0).astype(np.float32), ((my[r0:r1] + BELT_HALF_WIDTH) * 2.0).astype(
            np.float32
        )

    def _make_belt_texture(self) -> Image:
        """A belt strip, 2 px/mm, periodic along X: rubber with ribs and wear marks."""
        rng = _rng(self.seed, 43)
        w, h = int(BELT_PERIOD_MM * 2), int(2 * BELT_HALF_WIDTH * 2) + 2
        base = self._style["belt"]
        noise = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5) * 6
        tex = np.clip(base[None, None, :] + noise[..., None], 0, 255).astype(np.uint8)
        for x in range(0, w, 50):  # transverse ribs every 25 mm
            cv2.line(tex, (x, 0), (x, h - 1), tuple(int(c) for c in base * 0.7), 3)
        for _ in range(14):  # wear marks that make the motion visible
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.ellipse(
                tex,
                (x0, y0),
                (int(rng.integers(6, 30)), int(rng.integers(2, 8))),
                float(rng.uniform(0, 180)),
                0,
                360,
                tuple(int(c) for c in np.clip(base * rng.uniform(0.6, 1.6), 0, 255)),
                -1,
            )
        return tex

    def _make_noise_bank(self) -> list[tuple[Image, Image]]:
        rng = _rng(self.seed, 47)
        sigma = self._style["noise_sigma"]
        bank = []
        for _ in range(4):
            n = rng.normal(0, sigma, (self.height, self.width, 3))
            bank.append((np.clip(n, 0, 255).astype(np.uint8), np.clip(-n, 0, 255).astype(np.uint8)))
        return bank

    def _make_vignette(self) -> Image:
        ys, xs = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        r = np.hypot((xs - self.width / 2) / self.width, (ys - self.height / 2) / self.height)
        v = 1.0 - 0.35 * r**2
        tint = self._style["tint"]
        return np.clip(v[..., None] * tint[None, None, :] * 235.0, 0, 255).astype(np.uint8)

    def _render(self, t: float, index: int) -> tuple[Image, FrameTruth]:
        h = self.homography
        img = self._background.copy()
        ids = np.zeros((self.height, self.width), np.uint8)
        offset = self.belt_offset(t)
        stopped = self.belt_offset(t + 1e-3) == offset
        speed = 0.0 if stopped else self.belt_speed_mm_s
        # belt: the texture moves with the belt
        r0, r1 = self._belt_rows
        if r1 > r0:
            mx = self._belt_map_x - np.float32((offset % BELT_PERIOD_MM) * 2.0)
            belt = cv2.remap(
                self._belt_texture,
                mx,
                self._belt_map_y,
                cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_WRAP,
            )
            cv2.copyTo(belt, self._belt_mask[r0:r1], img[r0:r1])

        rank: dict[int, int] = {}
        draw_order = 0
        next_id = 1

        def new_id() -> int:
            nonlocal next_id, draw_order
            i = next_id
            next_id = min(next_id + 1, 254)
            draw_order += 1
            rank[i] = draw_order
            return i

        def fill(pts_px: Array, color: tuple[int, ...], oid: int | None) -> None:
            p = np.round(pts_px * _ONE).astype(np.int32)
            cv2.fillPoly(img, [p], color, cv2.LINE_AA, _SHIFT)
            if oid is not None:
                cv2.fillPoly(ids, [p], oid, cv2.LINE_8, _SHIFT)

        # floor distractors (static)
        for d in self._floor_distractors:
            self._draw_distractor(d, d.xy, fill, None)

        pending: list[
            tuple[
                int,
                PartClass,
                _Part | None,
                Array,
                Array,
                tuple[float, float, float],
                tuple[str, ...],
                tuple[float, ...],
                list[Array],
            ]
        ] = []

        # parts on the belt
        visible_span = (offset - (X_EXIT - X_ENTER), offset)
        for part in self._parts_between(*visible_span):
            x = X_ENTER + (offset - part.belt_pos_mm)
            cls = CLASSES[part.class_id]
            assert cls.template_mm is not None and cls.outline_mm is not None
            oid = new_id()
            outline_px = project(h, place(cls.outline_mm, x, part.y_mm, part.theta_deg))
            shadow = outline_px + np.array([2.5, 3.0])
            fill(shadow, (28, 28, 30), None)
            color = (
                (part.shade, part.shade, min(255, part.shade + 8))
                if cls.name == "bracket"
                else (
                    min(255, part.shade - 20),
                    min(255, part.shade - 5),
                    min(255, part.shade + 10),
                )
            )
            fill(outline_px, color, oid)
            for hx, hy, hr in cls.holes_mm:
                c = place(np.array([[hx, hy]]), x, part.y_mm, part.theta_deg)[0]
                fill(project(h, _circle_pts(c, hr)), (35, 35, 38), None)
            kmm = place(cls.template_mm, x, part.y_mm, part.theta_deg)
            pending.append(
                (
                    oid,
                    cls,
                    part,
                    kmm,
                    project(h, kmm),
                    (x, part.y_mm, part.theta_deg),
                    part.flags,
                    (),
                    [outline_px],
                )
            )
        # belt-borne distractors
        for d in self._belt_distractors_between(*visible_span):
            x = X_ENTER + (offset - d.xy[0])
            self._draw_distractor(d, (x, d.xy[1]), fill, None)

        # the part at the station (missing during a station_empty incident)
        station_empty = any(
            i.kind == "station_empty" and i.active(t) for i in self.incidents(t - BLOCK_S, t + 1e-9)
        )
        if self.scenario == "train":
            station_empty = bool(_rng(self.seed, 53, int(t // 5)).random() < 0.3)
        if not station_empty:
            cycle = int(t // 6.0)
            srng = _rng(self.seed, 59, cycle)
            cls = CLASSES[int(srng.integers(0, 2))]
            assert cls.template_mm is not None and cls.outline_mm is not None
            theta = (
                float(srng.normal(0, 1.0)) if not self._train else float(srng.uniform(-180, 180))
            )
            sx, sy = (
                float(STATION_XY[0] + srng.normal(0, 1.0)),
                float(STATION_XY[1] + srng.normal(0, 1.0)),
            )
            oid = new_id()
            outline_px = project(h, place(cls.outline_mm, sx, sy, theta))
            fill(outline_px, (185, 190, 200), oid)
            for hx, hy, hr in cls.holes_mm:
                c = place(np.array([[hx, hy]]), sx, sy, theta)[0]
                fill(project(h, _circle_pts(c, hr)), (35, 35, 38), None)
            kmm = place(cls.template_mm, sx, sy, theta)
            pending.append(
                (
                    oid,
                    cls,
                    None,
                    kmm,
                    project(h, kmm),
                    (sx, sy, theta),
                    ("at_station",),
                    (),
                    [outline_px],
                )
            )

        # the gantry over the belt (occludes parts passing under it)
        gid = new_id()
        g = np.array(
            [
                [GANTRY_X[0], -135.0],
                [GANTRY_X[1], -135.0],
                [GANTRY_X[1], 135.0],
                [GANTRY_X[0], 135.0],
            ]
        )
        fill(project(h, g), (125, 110, 95), gid)
        foot = np.array(
            [
                [GANTRY_X[0] - 4, -150.0],
                [GANTRY_X[1] + 4, -150.0],
                [GANTRY_X[1] + 4, -130.0],
                [GANTRY_X[0] - 4, -130.0],
            ]
        )
        fill(project(h, foot), (60, 60, 64), gid)

        # the arm, on top of everything
        q, arm_moving = self._arm_state(t)
        arm_mm = arm_keypoints(ARM_BASE, q)
        aid = new_id()
        arm_polys = self._draw_arm(arm_mm, fill, aid)
        yaw = float(q[0])
        pending.append(
            (
                aid,
                CLASSES[CLASS_IDS["arm"]],
                None,
                arm_mm,
                project(h, arm_mm),
                (float(ARM_BASE[0]), float(ARM_BASE[1]), yaw),
                (),
                tuple(float(v) for v in q),
                arm_polys,
            )
        )

        # an operator's hand, above everything (zone_intrusion incidents)
        hand_mm = self._hand_state(t)
        if hand_mm is not None:
            hid = new_id()
            hand_polys = self._draw_hand(hand_mm, fill, hid)
            pending.append(
                (
                    hid,
                    CLASSES[CLASS_IDS["hand"]],
                    None,
                    hand_mm,
                    project(h, hand_mm),
                    (float(hand_mm[1][0]), float(hand_mm[1][1]), 0.0),
                    ("in_danger_zone",) if _in_zone(hand_mm, DANGER_ZONE) else (),
                    (),
                    hand_polys,
                )
            )

        # camera effects: motion blur along the belt, lighting, vignette, noise
        blur_px = speed / 60.0 * 0.75  # 1/60 s exposure, ~0.75 px/mm
        if blur_px >= 1.5 and r1 > r0:
            k = int(round(blur_px))
            band = img[r0:r1]
            cv2.blur(band, (k, 1), dst=band)
        gain = 1.0 + self._style["light_amp"] * math.sin(
            2 * math.pi * t / self._style["light_period"]
        )
        if self._style["flicker"] and (index % 97) in (13, 14):
            gain *= 0.85
        img = np.asarray(cv2.multiply(img, self._vignette, scale=gain / 235.0), np.uint8)
        pos, neg = self._noise_bank[index % len(self._noise_bank)]
        shift = (index * 7919) % (self.width * self.height)
        if shift:
            pos = np.roll(pos.reshape(-1, 3), shift, axis=0).reshape(pos.shape)
        cv2.add(img, pos, dst=img)
        cv2.subtract(img, neg, dst=img)

        instances = [
            self._truth(oid, cls, kmm, kpx, pose, flags, joints, polys, ids, rank, part)
            for oid, cls, part, kmm, kpx, pose, flags, joints, polys in pending
        ]
        instances = [i for i in instances if i.in_view > 0.0]
        truth = FrameTruth(
            index=index,
            t=t,
            belt_speed_mm_s=speed,
            belt_offset_mm=offset,
            homography=h.copy(),
            instances=instances,
            incidents=[i for i in self.incidents(t - BLOCK_S, t + 1e-9) if i.active(t)],
            station_occupied=not station_empty,
            arm_moving=arm_moving,
        )
        return img, truth

    def _parts_between(self, lo: float, hi: float) -> list[_Part]:
        out: list[_Part] = []
        for b in range(max(0, int(lo // PART_BLOCK_MM)), int(hi // PART_BLOCK_MM) + 1):
            out.extend(p for p in self._part_block(b) if lo <= p.belt_pos_mm <= hi)
        return out

    def _belt_distractors_between(self, lo: float, hi: float) -> list[_Distractor]:
        out: list[_Distractor] = []
        for b in range(max(0, int(lo // PART_BLOCK_MM)), int(hi // PART_BLOCK_MM) + 1):
            out.extend(d for d in self._belt_distractor_block(b) if lo <= d.xy[0] <= hi)
        return out

    def _draw_distractor(
        self, d: _Distractor, xy: tuple[float, float], fill: Any, oid: int | None
    ) -> None:
        h = self.homography
        x, y = xy
        s = d.size
        if d.kind == "washer":
            fill(project(h, _circle_pts((x, y), 7 * s)), d.color, oid)
            fill(
                project(h, _circle_pts((x, y), 3 * s)),
                tuple(int(c) for c in self._style["belt"]),
                None,
            )
        elif d.kind == "screw":
            fill(
                project(
                    h, place(np.array([[-9, -2], [9, -2], [9, 2], [-9, 2]]) * s, x, y, d.angle)
                ),
                (170, 170, 175),
                oid,
            )
            fill(
                project(h, _circle_pts(place(np.array([[-9 * s, 0]]), x, y, d.angle)[0], 4 * s)),
                (150, 150, 155),
                oid,
            )
        elif d.kind == "rag":
            a = np.linspace(0, 2 * np.pi, 12, endpoint=False)
            r = 14 * s * (1 + 0.3 * np.sin(3 * a + d.angle))
            fill(project(h, np.stack([x + r * np.cos(a), y + r * np.sin(a)], 1)), d.color, oid)
        elif d.kind == "wrench":
            fill(
                project(
                    h, place(np.array([[-70, -6], [50, -6], [50, 6], [-70, 6]]) * s, x, y, d.angle)
                ),
                (160, 160, 165),
                oid,
            )
            fill(
                project(h, _circle_pts(place(np.array([[55 * s, 0]]), x, y, d.angle)[0], 14 * s)),
                (160, 160, 165),
                oid,
            )
        elif d.kind == "tape":
            fill(project(h, _circle_pts((x, y), 30 * s)), d.color, oid)
            fill(
                project(h, _circle_pts((x, y), 18 * s)),
                tuple(int(c) for c in self._style["floor"]),
                None,
            )
        else:  # cable: a thick sine curve
            u = np.linspace(-120, 120, 40) * s
            v = 14 * np.sin(u / 25.0)
            top = place(np.stack([u, v + 3], 1), x, y, d.angle)
            bot = place(np.stack([u, v - 3], 1), x, y, d.angle)[::-1]
            fill(project(h, np.concatenate([top, bot])), d.color, oid)

    def _hand_state(self, t: float) -> Array | None:
        """Keypoints (mm) of the operator's hand at time t, or None when absent."""
        if self._train:
            window = int(t // 3.0)
            rng = _rng(self.seed, 61, window)
            if rng.random() > 0.4:
                return None
            ex, ey = float(rng.uniform(-400, 400)), float(rng.uniform(-330, -150))
            ang = float(rng.uniform(30, 150))
            length = float(rng.uniform(150, 240))
            wrist = np.array([ex, ey]) + length * np.array(
                [math.cos(math.radians(ang)), math.sin(math.radians(ang))]
            )
            return hand_keypoints(np.array([ex, ey]), wrist, float(rng.uniform(-25, 25)))
        for inc in self.incidents(t - BLOCK_S, t + 1e-9):
            if inc.kind != "zone_intrusion" or not inc.active(t):
                continue
            rng = _rng(self.seed, 67, int(inc.start_s * 1000))
            x0, y0, x1, y1 = DANGER_ZONE
            target = np.array(
                [float(rng.uniform(x0 + 40, x1 - 40)), float(rng.uniform(y0 + 30, y1 - 20))]
            )
            elbow = np.array([target[0] + float(rng.uniform(-60, 60)), -345.0])
            # reach in over 0.8 s, hold, pull back over the last 0.8 s
            reach = min(_smoothstep((t - inc.start_s) / 0.8), _smoothstep((inc.end_s - t) / 0.8))
            start = elbow + np.array([0.0, 120.0])
            wrist = start + (target - start) * reach
            return hand_keypoints(elbow, wrist, float(rng.uniform(-15, 15)))
        return None

    def _draw_hand(self, kpts_mm: Array, fill: Any, oid: int) -> list[Array]:
        h = self.homography
        elbow, wrist, palm, index_tip, thumb_tip = kpts_mm
        sleeve = project(h, _capsule(elbow, wrist, 36.0))
        fill(sleeve, (40, 90, 230), oid)  # hi-vis orange sleeve
        polys = [sleeve]
        for a, b, r in (
            (wrist, palm, 30.0),
            (palm, index_tip, 9.0),
            (wrist + 0.4 * (palm - wrist), thumb_tip, 10.0),
        ):
            p = project(h, _capsule(a, b, r))
            fill(p, (215, 170, 110), oid)  # blue glove
            polys.append(p)
        return polys

    def _draw_arm(self, kpts_mm: Array, fill: Any, oid: int) -> list[Array]:
        h = self.homography
        polys = []
        base = kpts_mm[0]
        ped = project(h, _circle_pts(base, 52.0))
        fill(ped, (55, 60, 66), oid)
        polys.append(ped)
        widths = (40.0, 36.0, 28.0, 16.0)
        colors = ((30, 120, 230), (30, 130, 240), (40, 140, 245), (120, 120, 125))
        for i in range(4):
            a, b = kpts_mm[i], kpts_mm[i + 1]
            cap = _capsule(a, b, widths[i] / 2)
            p = project(h, cap)
            fill(p, colors[i], oid)
            polys.append(p)
        for j, r in ((1, 14.0), (2, 12.0), (3, 9.0)):
            fill(project(h, _circle_pts(kpts_mm[j], r)), (40, 40, 45), oid)
            fill(project(h, _circle_pts(kpts_mm[j], r * 0.45)), (200, 200, 205), oid)
        tool = kpts_mm[4]
        fill(project(h, _circle_pts(tool, 6.0)), (20, 20, 200), oid)
        return polys

    def _truth(
        self,
        oid: int,
        cls: PartClass,
        kmm: Array,
        kpx: Array,
        pose: tuple[float, float, float],
        flags: tuple[str, ...],
        joints: tuple[float, ...],
        polys: list[Array],
        ids: npt.NDArray[np.uint8],
        rank: dict[int, int],
        part: _Part | None,
    ) -> InstanceTruth:
        allpts = np.concatenate(polys)
        x1, y1 = allpts.min(axis=0)
        x2, y2 = allpts.max(axis=0)
        lo_x, lo_y, hi_x, hi_y = -0.5, -0.5, self.width - 0.5, self.height - 0.5
        box = np.array([max(x1, lo_x), max(y1, lo_y), min(x2, hi_x), min(y2, hi_y)])
        if x1 >= lo_x and y1 >= lo_y and x2 <= hi_x and y2 <= hi_y:
            in_view = 1.0
        elif box[2] <= box[0] or box[3] <= box[1]:
            in_view = 0.0
        else:
            in_view = _fraction_inside(polys, self.width, self.height)
        visible = np.zeros(NUM_KEYPOINTS, bool)
        my_rank = rank[oid]
        for k, (u, v) in enumerate(kpx):
            iu, iv = int(round(u)), int(round(v))
            if 0 <= iu < self.width and 0 <= iv < self.height:
                owner = int(ids[iv, iu])
                visible[k] = owner == 0 or rank.get(owner, 0) <= my_rank
        uid = part.uid if part is not None else ("arm" if cls.name == "arm" else "station")
        return InstanceTruth(
            uid=uid,
            class_id=CLASS_IDS[cls.name],
            class_name=cls.name,
            box=box,
            keypoints_px=kpx,
            keypoints_mm=kmm,
            visible=visible,
            in_view=float(in_view),
            pose_mm=(float(pose[0]), float(pose[1]), float(pose[2])),
            flags=flags,
            joints_deg=joints,
        )


def _circle_pts(c: Array | tuple[float, float], r: float, n: int = 32) -> Array:
    a = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([c[0] + r * np.cos(a), c[1] + r * np.sin(a)], axis=1)


def _capsule(a: Array, b: Array, r: float, n: int = 10) -> Array:
    d = b - a
    ang = math.atan2(d[1], d[0])
    arc1 = np.linspace(ang + math.pi / 2, ang + 3 * math.pi / 2, n)
    arc2 = np.linspace(ang - math.pi / 2, ang + math.pi / 2, n)
    p1 = np.stack([a[0] + r * np.cos(arc1), a[1] + r * np.sin(arc1)], 1)
    p2 = np.stack([b[0] + r * np.cos(arc2), b[1] + r * np.sin(arc2)], 1)
    return np.concatenate([p1, p2])


def _in_zone(points_mm: Array, zone: tuple[float, float, float, float]) -> bool:
    x0, y0, x1, y1 = zone
    p = np.asarray(points_mm)
    return bool(np.any((p[:, 0] >= x0) & (p[:, 0] <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1)))


def _fraction_inside(polys: list[Array], width: int, height: int) -> float:
    """Fraction of the union of polygons' area that lies inside the image."""
    allpts = np.concatenate(polys)
    x0, y0 = np.floor(allpts.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(allpts.max(axis=0)).astype(int) + 1
    mask = np.zeros((y1 - y0 + 1, x1 - x0 + 1), np.uint8)
    for p in polys:
        q = np.round((p - np.array([x0, y0])) * _ONE).astype(np.int32)
        cv2.fillPoly(mask, [q], 1, cv2.LINE_8, _SHIFT)
    total = int(mask.sum())
    if total == 0:
        return 0.0
    cx0, cy0 = max(0, -x0), max(0, -y0)
    cx1, cy1 = min(mask.shape[1], width - x0), min(mask.shape[0], height - y0)
    inside = int(mask[cy0:cy1, cx0:cx1].sum()) if cx1 > cx0 and cy1 > cy0 else 0
    return inside / total
