"""Image preparation for a model input, as pure numpy/OpenCV functions.

Coordinates use the pixel-centre convention of ``service.domain``: the centre of
the top-left pixel is (0, 0).  Resizing an image of width ``w`` to ``w'`` maps a
source x to ``(x + 0.5) * w'/w - 0.5`` (this is what ``cv2.resize`` samples), then
padding adds its offset.  :class:`Transform` holds that per-axis affine map so that
model outputs map back to original-frame pixels exactly (``to_source``), and
training code can map ground truth into model pixels the same way (``to_model``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from service.domain import ImageArray
from service.inference.metadata import InputSpec, dtype_of

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Transform:
    """Source image pixels -> model input pixels, per axis: scale, then integer pad."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    src_width: int
    src_height: int

    def to_model(self, xy: npt.ArrayLike) -> FloatArray:
        """Map points (..., 2) from source-image pixels to model-input pixels."""
        p = np.asarray(xy, dtype=np.float64)
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] + 0.5) * self.scale_x - 0.5 + self.pad_x
        out[..., 1] = (p[..., 1] + 0.5) * self.scale_y - 0.5 + self.pad_y
        return out.astype(np.float32)

    def to_source(self, xy: npt.ArrayLike) -> FloatArray:
        """Map points (..., 2) from model-input pixels back to source-image pixels."""
        p = np.asarray(xy, dtype=np.float64)
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] - self.pad_x + 0.5) / self.scale_x - 0.5
        out[..., 1] = (p[..., 1] - self.pad_y + 0.5) / self.scale_y - 0.5
        return out.astype(np.float32)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")


def _resize(image: ImageArray, width: int, height: int) -> ImageArray:
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    shrink = width < w or height < h
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, (width, height), interpolation=interp), np.uint8)


def paste(
    image: ImageArray, size: tuple[int, int], top: int, left: int, pad_value: int,
    out: ImageArray | None = None,
) -> ImageArray:
    """``image`` at (top, left) on a canvas of ``size`` = (H, W) filled with ``pad_value``;
    written into ``out`` when given (e.g. a row of a batch: no copy to stack it after),
    touching each pixel once."""
    out_h, out_w = size
    h, w = image.shape[:2]
    canvas = np.empty((out_h, out_w, 3), np.uint8) if out is None else out
    canvas[:top] = pad_value
    canvas[top + h:] = pad_value
    canvas[top:top + h, :left] = pad_value
    canvas[top:top + h, left + w:] = pad_value
    canvas[top:top + h, left:left + w] = image
    return canvas


def letterbox(
    image: ImageArray, size: tuple[int, int], pad_value: int = 114,
    out: ImageArray | None = None,
) -> tuple[ImageArray, Transform]:
    """Resize keeping the aspect ratio to fit ``size`` = (H, W), pad the rest (centred);
    ``out`` (H, W, 3 uint8) receives the result when given."""
    _check_image(image)
    out_h, out_w = size
    h, w = image.shape[:2]
    r = min(out_h / h, out_w / w)
    new_w = min(out_w, max(1, round(w * r)))
    new_h = min(out_h, max(1, round(h * r)))
    resized = _resize(image, new_w, new_h)
    pad_x = (out_w - new_w) // 2
    pad_y = (out_h - new_h) // 2
    if (new_w, new_h) == (out_w, out_h) and out is None:
        canvas = np.ascontiguousarray(resized)
    else:
        canvas = paste(resized, size, pad_y, pad_x, pad_value, out)
    return canvas, Transform(new_w / w, new_h / h, pad_x, pad_y, w, h)


def stretch(
    image: ImageArray, size: tuple[int, int], out: ImageArray | None = None
) -> tuple[ImageArray, Transform]:
    """Resize to ``size`` = (H, W) ignoring the aspect ratio (into ``out`` when given)."""
    _check_image(image)
    out_h, out_w = size
    h, w = image.shape[:2]
    resized = np.ascontiguousarray(_resize(image, out_w, out_h))
    if out is not None:
        out[...] = resized
        resized = out
    return resized, Transform(out_w / w, out_h / h, 0, 0, w, h)


def fit(
    image: ImageArray, spec: InputSpec, out: ImageArray | None = None
) -> tuple[ImageArray, Transform]:
    """Letterbox or stretch one BGR image to the model's input size, as the spec says
    (into ``out`` when given)."""
    size = (spec.height, spec.width)
    if spec.resize == "stretch":
        return stretch(image, size, out)
    return letterbox(image, size, spec.pad_value, out)


def to_layout(batch: ImageArray, spec: InputSpec) -> np.ndarray:
    """Convert a (B, H, W, 3) uint8 BGR batch to the model's color, layout and dtype."""
    dtype = dtype_of(spec)
    if spec.layout == "NCHW" and dtype != np.uint8:
        return _planar(batch, spec.color == "RGB", dtype, spec.normalization == "unit")
    x: np.ndarray = batch
    if spec.color == "RGB":
        x = x[..., ::-1]
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    if spec.normalization == "unit":
        x = x.astype(dtype) * dtype.type(1.0 / 255.0)
    elif x.dtype != dtype:
        x = x.astype(dtype)
    return np.ascontiguousarray(x)


def _planar(batch: ImageArray, rgb: bool, dtype: np.dtype[Any], unit: bool) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) floats in one pass per channel (no temporaries):
    the same values as ``batch[..., ::-1].transpose(0, 3, 1, 2).astype(dtype) / 255``."""
    b, h, w, _ = batch.shape
    out = np.empty((b, 3, h, w), dtype)
    scale = dtype.type(1.0 / 255.0)
    for c in range(3):
        src = batch[..., 2 - c if rgb else c]
        if unit:
            np.multiply(src, scale, out=out[:, c], casting="unsafe")
        else:
            np.copyto(out[:, c], src, casting="unsafe")
    return out


def make_batch(
    images: Sequence[ImageArray], spec: InputSpec
) -> tuple[np.ndarray, list[Transform]]:
    """Fit every image and stack them into one model input batch."""
    batch = np.empty((len(images), spec.height, spec.width, 3), np.uint8)
    transforms = [fit(image, spec, batch[i])[1] for i, image in enumerate(images)]
    return to_layout(batch, spec), transforms
