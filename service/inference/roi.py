"""Regions of interest for top-down models: box expansion, affine crops, crop transforms.

A crop maps a box of the frame onto the whole model input with one scale (the box
is first padded by ``padding`` and widened or heightened to the input's aspect
ratio, like mmpose's ``bbox_xyxy2cs`` + ``top_down_affine``).  :class:`CropTransform`
maps points between the crop and the frame exactly (pixel-centre convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import numpy.typing as npt

from service.domain import ImageArray
from service.inference.preprocess import Transform

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class CropTransform(Transform):
    """Frame pixels -> crop pixels: ``p_crop = (p + 0.5) * scale - 0.5 - offset``.

    ``image_index`` says which frame of the batch the crop came from; ``box`` is the ROI
    as given (before padding), ``roi_score``/``roi_class`` what the detector said.
    """

    offset_x: float = 0.0
    offset_y: float = 0.0
    image_index: int = 0
    num_images: int = 1
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    roi_score: float = 1.0
    roi_class: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def to_model(self, xy: npt.ArrayLike) -> FloatArray:
        p = np.asarray(xy, dtype=np.float64)
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] + 0.5) * self.scale_x - 0.5 - self.offset_x
        out[..., 1] = (p[..., 1] + 0.5) * self.scale_y - 0.5 - self.offset_y
        return out.astype(np.float32)

    def to_source(self, xy: npt.ArrayLike) -> FloatArray:
        p = np.asarray(xy, dtype=np.float64)
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] + 0.5 + self.offset_x) / self.scale_x - 0.5
        out[..., 1] = (p[..., 1] + 0.5 + self.offset_y) / self.scale_y - 0.5
        return out.astype(np.float32)


def crop_region(
    box: Sequence[float] | np.ndarray, input_hw: tuple[int, int], padding: float = 1.25
) -> tuple[float, float, float, float]:
    """The frame region (left, top, width, height in edge coordinates) a crop covers.

    ``box`` is x1, y1, x2, y2 in pixel-centre coordinates (edge coordinates are 0.5
    more: the whole frame is (-0.5, -0.5, W - 0.5, H - 0.5)).  The region keeps the
    box centre, is scaled by ``padding`` and grown along one axis to the input's
    aspect ratio.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2.0 + 0.5, (y1 + y2) / 2.0 + 0.5
    w, h = max(x2 - x1, 1.0) * padding, max(y2 - y1, 1.0) * padding
    aspect = input_hw[1] / input_hw[0]
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return cx - w / 2.0, cy - h / 2.0, w, h


def crop(
    image: ImageArray,
    box: Sequence[float] | np.ndarray,
    input_hw: tuple[int, int],
    padding: float = 1.25,
    pad_value: int = 0,
    image_index: int = 0,
    num_images: int = 1,
    roi_score: float = 1.0,
    roi_class: int = 0,
) -> tuple[ImageArray, CropTransform]:
    """Cut ``box`` (padded, aspect-fixed) out of ``image`` at the model input size."""
    left, top, w, h = crop_region(box, input_hw, padding)
    out_h, out_w = input_hw
    sx, sy = out_w / w, out_h / h
    ox, oy = left * sx, top * sy
    # p_crop = sx * p + (0.5 * sx - 0.5 - ox): the same map in OpenCV's pixel-centre terms.
    m = np.array([[sx, 0.0, 0.5 * sx - 0.5 - ox], [0.0, sy, 0.5 * sy - 0.5 - oy]], np.float64)
    patch = cv2.warpAffine(
        image, m, (out_w, out_h), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(pad_value, pad_value, pad_value),
    )
    src_h, src_w = image.shape[:2]
    transform = CropTransform(
        scale_x=sx, scale_y=sy, pad_x=0, pad_y=0, src_width=src_w, src_height=src_h,
        offset_x=ox, offset_y=oy, image_index=image_index, num_images=num_images,
        box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
        roi_score=roi_score, roi_class=roi_class,
    )
    return np.asarray(patch, np.uint8), transform


def whole_image_box(image: ImageArray) -> tuple[float, float, float, float]:
    """The ROI that covers the whole frame (pixel-centre coordinates)."""
    h, w = image.shape[:2]
    return -0.5, -0.5, w - 0.5, h - 0.5
