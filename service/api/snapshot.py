"""Draw a frame message onto its image (boxes, keypoints, per-class skeleton) and encode JPEG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from service.domain import ClassInfo, ImageArray
from service.errors import LineWatchError

# BGR, distinct and readable on a grey belt
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 200, 255),
    (255, 120, 0),
    (80, 220, 80),
    (220, 60, 220),
    (0, 80, 255),
    (255, 220, 0),
)
KEYPOINT_MIN_SCORE = 0.3
_SHIFT = 4  # sub-pixel drawing: coordinates in 1/16 px
_ONE = 1 << _SHIFT


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def draw_annotations(
    image: ImageArray,
    message: Mapping[str, Any],
    classes: Sequence[ClassInfo],
    *,
    min_keypoint_score: float = KEYPOINT_MIN_SCORE,
) -> ImageArray:
    """A copy of ``image`` with the message's instances drawn on it."""
    out: ImageArray = np.ascontiguousarray(image).copy()
    for inst in message.get("instances", []):
        class_id = int(inst.get("class_id", 0))
        color = PALETTE[class_id % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in inst["box"])
        cv2.rectangle(out, _pt(x1, y1), _pt(x2, y2), color, 2, cv2.LINE_AA, _SHIFT)
        label = f"{inst.get('class', class_id)} {float(inst.get('score', 0.0)):.2f}"
        cv2.putText(
            out, label, (int(x1), max(12, int(y1) - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1,
            cv2.LINE_AA,
        )
        keypoints: Mapping[str, Mapping[str, float]] = inst.get("keypoints", {})
        visible = {
            name: _pt(kp["x"], kp["y"])
            for name, kp in keypoints.items()
            if kp.get("score", 0.0) >= min_keypoint_score
        }
        if 0 <= class_id < len(classes):
            names = classes[class_id].keypoint_names
            for a, b in classes[class_id].skeleton:
                pa = visible.get(names[a]) if a < len(names) else None
                pb = visible.get(names[b]) if b < len(names) else None
                if pa is not None and pb is not None:
                    cv2.line(out, pa, pb, color, 2, cv2.LINE_AA, _SHIFT)
        for pt in visible.values():
            cv2.circle(out, pt, 3 * _ONE, (255, 255, 255), -1, cv2.LINE_AA, _SHIFT)
            cv2.circle(out, pt, 3 * _ONE, color, 1, cv2.LINE_AA, _SHIFT)
    return out


def encode_jpeg(image: ImageArray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise LineWatchError(f"could not encode a {image.shape} image as JPEG")
    return bytes(buf.tobytes())
