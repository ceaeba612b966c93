"""Image preparation for a model input, as pure numpy/OpenCV functions.

Coordinates use the pixel-centre convention of ``service.domain``: the centre of
the top-left pixel is (0, 0).  Resizing an image of width ``w`` to ``w'`` maps a
source x to ``(x + 0.5) * w'/w - 0.5`` (this is what ``cv2.resize`` samples), then
padding adds its offset.  :class:`Transform` holds that per-axis affine map so that
model outputs map back to original-frame pixels exactly (``to_source``), and
training code can map ground truth into model pixels the same way (``to_model``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence
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

    @property
    def content_rows(self) -> tuple[int, int]:
        """The model-input rows [first, end) that hold the image (the rest is padding)."""
        return self.pad_y, self.pad_y + round(self.src_height * self.scale_y)

    def to_source(self, xy: npt.ArrayLike) -> FloatArray:
        """Map points (..., 2) from model-input pixels back to source-image pixels."""
        p = np.asarray(xy, dtype=np.float64)
        out = np.empty_like(p)
        out[..., 0] = (p[..., 0] - self.pad_x + 0.5) / self.scale_x - 0.5
        out[..., 1] = (p[..., 1] - self.pad_y + 0.5) / self.scale_y - 0.5
        return out.astype(np.float32)


class BatchBuffers:
    """Batch arrays that one model's preprocessing reuses: :meth:`take` an array of a
    shape and dtype (one given back earlier when there is one), :meth:`give` it back once
    the model has run on it.

    Filling fresh memory costs its page faults every time: a 32-frame batch at 640 is
    39 MB, which the allocator maps anew for each batch (YOLO's letterbox: 0.2 ms a frame
    into a fresh batch, 0.08 into a reused one).  ``give`` ignores arrays it did not lend,
    and an array that is never given back is simply freed; at most ``keep`` free arrays
    are kept per shape.  Thread-safe (the prepare thread takes, the inference threads
    give).
    """

    def __init__(self, keep: int = 4) -> None:
        self._keep = keep
        self._free: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}
        self._lent: dict[int, weakref.ref[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` and ``dtype``."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            array = free.pop() if free else np.empty(shape, dtype)
            ident = id(array)
            # dropped without being given back: forget it (it is freed as usual)
            self._lent[ident] = weakref.ref(array, lambda _: self._lent.pop(ident, None))
        return array

    def give(self, arrays: Iterable[np.ndarray]) -> None:
        """Take back the arrays of this pool among ``arrays``; their contents may be
        overwritten by the next :meth:`take`."""
        with self._lock:
            for array in arrays:
                ref = self._lent.get(id(array))
                if ref is None or ref() is not array:
                    continue
                del self._lent[id(array)]
                free = self._free.setdefault((array.shape, array.dtype.str), [])
                if len(free) < self._keep:
                    free.append(array)

    @property
    def lent(self) -> int:
        """Arrays taken and not given back (nor dropped)."""
        return len(self._lent)


def new_batch(buffers: BatchBuffers | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array: from ``buffers`` when given, else a fresh one."""
    return np.empty(shape, dtype) if buffers is None else buffers.take(shape, dtype)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.shape} {image.dtype}")


def _interpolation(image: ImageArray, width: int, height: int) -> int:
    """Area averaging to shrink, bilinear to enlarge."""
    h, w = image.shape[:2]
    return cv2.INTER_AREA if width < w or height < h else cv2.INTER_LINEAR


def _resize(image: ImageArray, width: int, height: int) -> ImageArray:
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    interp = _interpolation(image, width, height)
    return np.asarray(cv2.resize(image, (width, height), interpolation=interp), np.uint8)


def _fill_border(
    canvas: ImageArray, top: int, left: int, h: int, w: int, pad_value: int
) -> None:
    """Fill ``canvas`` with ``pad_value`` around the (top, left, h, w) box."""
    canvas[:top] = pad_value
    canvas[top + h:] = pad_value
    canvas[top:top + h, :left] = pad_value
    canvas[top:top + h, left + w:] = pad_value


def paste(
    image: ImageArray, size: tuple[int, int], top: int, left: int, pad_value: int,
    out: ImageArray | None = None,
) -> ImageArray:
    """``image`` at (top, left) on a canvas of ``size`` = (H, W) filled with ``pad_value``;
    written into ``out`` when given (e.g. a row of a batch: no copy to stack it after),
    touching each pixel once."""
    out_h, out_w = size
    h, w = image.shape[:2]
    canvas = np.empty((out_h, out_w, image.shape[2]), np.uint8) if out is None else out
    _fill_border(canvas, top, left, h, w, pad_value)
    canvas[top:top + h, left:left + w] = image
    return canvas


def resize_onto(
    image: ImageArray, new_size: tuple[int, int], interpolation: int, size: tuple[int, int],
    top: int, left: int, pad_value: int, out: ImageArray | None = None,
) -> ImageArray:
    """``image`` resized to ``new_size`` = (W, H) at (top, left) on a canvas of ``size`` =
    (H, W) filled with ``pad_value``: what ``paste(cv2.resize(...))`` gives, with OpenCV
    writing the resized pixels straight into their place when that place is contiguous
    (padding above and below only: no intermediate image and copy, a 768x432 frame
    letterboxed to 640: 0.27 -> 0.22 ms); else resized, then copied in.  Any channel count
    (a gray image is (H, W, 1))."""
    out_h, out_w = size
    new_w, new_h = new_size
    canvas = np.empty((out_h, out_w, image.shape[2]), np.uint8) if out is None else out
    _fill_border(canvas, top, left, new_h, new_w, pad_value)
    place = canvas[top:top + new_h, left:left + new_w]
    if place.flags.c_contiguous:  # full-width rows (a landscape frame): written in place
        resized = cv2.resize(image, (new_w, new_h), dst=place, interpolation=interpolation)
    else:
        resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    if not np.may_share_memory(resized, place):  # a new image (2-D if gray): copy it in
        place[...] = resized.reshape(place.shape)
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
    pad_x = (out_w - new_w) // 2
    pad_y = (out_h - new_h) // 2
    transform = Transform(new_w / w, new_h / h, pad_x, pad_y, w, h)
    if (new_w, new_h) != (w, h) and out is not None:
        return resize_onto(image, (new_w, new_h), _interpolation(image, new_w, new_h), size,
                           pad_y, pad_x, pad_value, out), transform
    resized = _resize(image, new_w, new_h)
    if (new_w, new_h) == (out_w, out_h) and out is None:
        canvas = np.ascontiguousarray(resized)
    else:
        canvas = paste(resized, size, pad_y, pad_x, pad_value, out)
    return canvas, transform


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


def to_layout(
    batch: ImageArray, spec: InputSpec, buffers: BatchBuffers | None = None,
    transforms: Sequence[Transform] | None = None,
) -> np.ndarray:
    """Convert a (B, H, W, 3) uint8 BGR batch to the model's color, layout and dtype
    (a planar float batch taken from ``buffers`` when given).

    With the ``transforms`` that letterboxed each row, a planar float conversion converts
    only the rows that hold an image and fills the padding rows (whose pixels are
    ``spec.pad_value``) with that value converted: the same tensor, 0.70 -> 0.47 ms for a
    16:9 frame at 640."""
    dtype = dtype_of(spec)
    if spec.color == "GRAY":
        return _gray_layout(batch, spec, dtype, buffers)
    if spec.layout == "NCHW" and dtype != np.uint8:
        b, h, w, _ = batch.shape
        rows = None if transforms is None else [t.content_rows for t in transforms]
        return _planar(batch, spec.color == "RGB", dtype, spec.normalization == "unit",
                       new_batch(buffers, (b, 3, h, w), dtype), rows, spec.pad_value)
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


def gray(batch: ImageArray, buffers: BatchBuffers | None = None) -> np.ndarray:
    """(B, H, W, 3) uint8 BGR -> (B, H, W, 1) uint8 gray, as OpenCV's BGR2GRAY (and so
    Ultralytics' channels: 1 loaders) computes it; a gray image stored as three equal
    channels converts to itself, and a batch already gray, (B, H, W, 1), is returned as
    it is."""
    b, h, w, c = batch.shape
    if c == 1:
        return batch
    out = new_batch(buffers, (b, h, w, 1), np.uint8)
    for i in range(b):
        cv2.cvtColor(batch[i], cv2.COLOR_BGR2GRAY, dst=out[i, :, :, 0])
    return out


def _gray_layout(
    batch: ImageArray, spec: InputSpec, dtype: np.dtype[Any], buffers: BatchBuffers | None
) -> np.ndarray:
    """The one-channel input of a GRAY model, (B, 1, H, W) or (B, H, W, 1), from a BGR
    batch or one letterboxed gray already (B, H, W, 1)."""
    g = gray(batch, buffers)
    b, h, w, _ = g.shape
    if spec.layout == "NHWC" and dtype == np.uint8:
        return g
    shape = (b, 1, h, w) if spec.layout == "NCHW" else (b, h, w, 1)
    out = new_batch(buffers, shape, dtype)
    src = g.reshape(shape)  # one channel: NHWC and NCHW hold the same bytes
    if spec.normalization == "unit":
        np.multiply(src, dtype.type(1.0 / 255.0), out=out, casting="unsafe")
    else:
        np.copyto(out, src, casting="unsafe")
    if buffers is not None and g is not batch:
        buffers.give([g])
    return out


def _planar(
    batch: ImageArray, rgb: bool, dtype: np.dtype[Any], unit: bool, out: np.ndarray,
    rows: Sequence[tuple[int, int]] | None = None, pad_value: int = 0,
) -> np.ndarray:
    """(B, H, W, 3) uint8 -> ``out`` (B, 3, H, W) floats in one pass per channel (no
    temporaries): the values of ``batch[..., ::-1].transpose(0, 3, 1, 2).astype(dtype) /
    255``.  Where ``rows`` gives an image's content rows [first, end), the rows outside
    it are filled with ``pad_value`` converted instead of being read."""
    scale = dtype.type(1.0 / 255.0)

    def convert(src: np.ndarray, dst: np.ndarray) -> None:
        if unit:
            np.multiply(src, scale, out=dst, casting="unsafe")
        else:
            np.copyto(dst, src, casting="unsafe")

    if rows is None:
        for c in range(3):
            convert(batch[..., 2 - c if rgb else c], out[:, c])
        return out
    height = batch.shape[1]
    pad = np.empty(1, dtype)
    convert(np.full(1, pad_value, np.uint8), pad)
    for i, (first, end) in enumerate(rows):
        if not 0 <= first < end <= height:
            first, end = 0, height
        out[i, :, :first] = pad[0]
        out[i, :, end:] = pad[0]
        for c in range(3):
            convert(batch[i, first:end, :, 2 - c if rgb else c], out[i, c, first:end])
    return out


def make_batch(
    images: Sequence[ImageArray], spec: InputSpec, buffers: BatchBuffers | None = None
) -> tuple[np.ndarray, list[Transform]]:
    """Fit every image and stack them into one model input batch (its arrays taken from
    ``buffers`` when given; an intermediate uint8 batch goes back at once)."""
    batch = new_batch(buffers, (len(images), spec.height, spec.width, 3), np.uint8)
    transforms = [fit(image, spec, batch[i])[1] for i, image in enumerate(images)]
    return converted(batch, to_layout(batch, spec, buffers, transforms), buffers), transforms


def converted(
    batch: np.ndarray, result: np.ndarray, buffers: BatchBuffers | None
) -> np.ndarray:
    """``result``, after giving ``batch`` back to ``buffers`` when the conversion made a
    new array of it (the uint8 batch is then no longer needed)."""
    if buffers is not None and result is not batch:
        buffers.give([batch])
    return result
