"""Input spec from metadata *or* config, and the batch conversion it implies (pure numpy).

:func:`apply_input_override` folds an ``adapter.input`` section over what the model's
metadata says; :func:`to_model_input` turns a (B, H, W, 3) uint8 BGR batch into the
model's color order, layout, dtype and normalisation (unit, in-graph or mean/std).
:func:`ultralytics_letterbox` is Ultralytics' ``LetterBox(auto=False, center=True)``:
bilinear resize to ``round(side * r)``, 114 gray, ``round(pad - 0.1)`` top/left.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

from service.domain import ImageArray
from service.errors import ModelError
from service.inference.adapter_config import InputOverride
from service.inference.metadata import InputSpec, ModelInfo, check_channels, dtype_of
from service.inference.preprocess import (
    BatchBuffers,
    Transform,
    gray,
    paste,
    resize_onto,
    to_layout,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Normalizer:
    """Per-channel ``(x - mean) / std`` in the model's color order (0..255 units); one
    value each for a GRAY model."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def apply_input_override(
    info: ModelInfo, override: InputOverride
) -> tuple[ModelInfo, Normalizer | None]:
    """The model info with the config's input overrides applied, plus a mean/std step."""
    spec = info.input
    changes: dict[str, object] = {}
    for key in ("layout", "color", "dtype", "resize", "pad_value"):
        value = getattr(override, key)
        if value is not None:
            changes[key] = value
    if override.normalization is not None:
        changes["normalization"] = (
            "in-graph" if override.normalization == "mean-std" else override.normalization
        )
    elif changes.get("dtype", "uint8") != "uint8" and "normalization" not in info.metadata:
        changes["normalization"] = "unit"
    if override.size is not None:
        changes["height"], changes["width"] = override.size
    new_spec = dataclasses.replace(spec, **changes)  # type: ignore[arg-type]
    where = f"model {str(info.path)!r} with the config's adapter.input"
    if "layout" in changes or "color" in changes:
        check_channels(info.inputs[0], new_spec.layout, new_spec.color, where,
                       "adapter.input's layout or color")
    channels = 1 if new_spec.color == "GRAY" else 3
    for key in ("mean", "std"):
        values = getattr(override, key)
        if values is not None and len(values) != channels:
            raise ModelError(
                f"{where}: {key} has {len(values)} values, but the input has {channels} "
                f"channel{'s' if channels > 1 else ''} ({new_spec.color})."
            )
    new_info = dataclasses.replace(info, input=new_spec, imgsz=(new_spec.height, new_spec.width))
    normalizer = None
    if override.normalization == "mean-std" and override.mean and override.std:
        normalizer = Normalizer(override.mean, override.std)
    return new_info, normalizer


def to_model_input(
    batch: np.ndarray, spec: InputSpec, normalizer: Normalizer | None = None,
    buffers: BatchBuffers | None = None, transforms: Sequence[Transform] | None = None,
) -> np.ndarray:
    """(B, H, W, 3) uint8 BGR -> the model's input tensor (a planar float batch from
    ``buffers`` when given and there is no mean/std step; ``transforms``: see
    :func:`to_layout`)."""
    if normalizer is None:
        return to_layout(batch, spec, buffers, transforms)
    x = gray(batch) if spec.color == "GRAY" else batch
    if spec.color == "RGB":
        x = x[..., ::-1]
    mean = np.asarray(normalizer.mean, np.float32)
    inv_std = 1.0 / np.asarray(normalizer.std, np.float32)
    y = (x.astype(np.float32) - mean) * inv_std
    if spec.layout == "NCHW":
        y = y.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(y.astype(dtype_of(spec), copy=False))


def ultralytics_letterbox(
    image: ImageArray, size: tuple[int, int], pad_value: int = 114,
    out: ImageArray | None = None,
) -> tuple[ImageArray, Transform]:
    """Ultralytics' LetterBox (auto=False, scaleup, center) and the matching Transform;
    ``out`` (H, W, C uint8, e.g. a row of the batch) receives the result."""
    out_h, out_w = size
    h, w = image.shape[:2]
    r = min(out_h / h, out_w / w)
    new_w, new_h = max(round(w * r), 1), max(round(h * r), 1)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    top, left = round(dh - 0.1), round(dw - 0.1)
    transform = Transform(new_w / w, new_h / h, left, top, w, h)
    if (w, h) == (new_w, new_h):
        return paste(image, (out_h, out_w), top, left, pad_value, out), transform
    return resize_onto(image, (new_w, new_h), cv2.INTER_LINEAR, (out_h, out_w), top, left,
                       pad_value, out), transform
