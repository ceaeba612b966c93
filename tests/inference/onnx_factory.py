"""Tiny ONNX models built with onnx.helper, for inference tests (no torch).

``build_model(path, rows=...)`` writes a model whose output is a constant
``[B, N, 6+K*3]`` block (the rows given, in model-input pixels) broadcast over the
batch; with ``echo=True`` the x1 of row 0 also gets the image's mean pixel value,
so a test can tell which output belongs to which input image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

K = 5
NAMES = {0: "bracket", 1: "flange", 2: "arm"}
KEYPOINT_NAMES = {
    "bracket": ["corner_a", "corner_b", "corner_c", "hole_1", "hole_2"],
    "flange": ["centre", "bolt_1", "bolt_2", "bolt_3", "notch"],
    "arm": ["base", "shoulder", "elbow", "wrist", "tool"],
}
SKELETON = {
    "bracket": [[0, 1], [1, 2]],
    "flange": [[0, 1], [0, 2], [0, 3], [0, 4]],
    "arm": [[0, 1], [1, 2], [2, 3], [3, 4]],
}


def default_metadata(height: int = 240, width: int = 320) -> dict[str, str]:
    return {
        "task": "pose",
        "kpt_shape": "[5, 3]",
        "names": repr(NAMES),
        "imgsz": f"[{height}, {width}]",
        "stride": "8",
        "keypoint_names": json.dumps(KEYPOINT_NAMES),
        "skeleton": json.dumps(SKELETON),
        "output_format": "end2end",
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_color": "BGR",
        "normalization": "in-graph",
        "resize": "letterbox",
        "max_det": "20",
    }


def make_row(
    box: tuple[float, float, float, float], score: float, class_id: int,
    keypoints: np.ndarray | None = None,
) -> np.ndarray:
    """One detection row: box, score, class, K keypoints (x, y, score)."""
    kp = np.zeros((K, 3), np.float32) if keypoints is None else np.asarray(keypoints, np.float32)
    if kp.shape[1] == 2:
        kp = np.concatenate([kp, np.ones((kp.shape[0], 1), np.float32)], axis=1)
    return np.concatenate([np.asarray(box, np.float32), [score, class_id], kp.ravel()])


def build_model(
    path: Path,
    rows: np.ndarray | None = None,
    *,
    height: int = 240,
    width: int = 320,
    batch: int | str = "batch",
    layout: str = "NHWC",
    channels: int = 3,
    dtype: int = TensorProto.UINT8,
    output_shape: list[int | str] | None = None,
    metadata: Mapping[str, str | None] | None = None,
    echo: bool = False,
    num_rows: int = 8,
    opset: int = 17,
) -> Path:
    """Write a constant-output ONNX model to ``path`` and return the path."""
    if rows is None:
        rows = np.zeros((0, 6 + K * 3), np.float32)
    rows = np.asarray(rows, np.float32)
    width_out = rows.shape[1] if rows.size else 6 + K * 3
    block = np.zeros((num_rows, width_out), np.float32)
    block[: len(rows)] = rows
    nhwc = layout == "NHWC"
    in_shape: list[Any] = (
        [batch, height, width, channels] if nhwc else [batch, channels, height, width]
    )
    out_dims: list[Any] = output_shape or [batch, num_rows, width_out]
    if output_shape is not None:  # an arbitrary layout: constant of that shape (batch 1 broadcast)
        const_shape = [1 if isinstance(d, str) else d for d in output_shape]
        block = np.zeros(const_shape, np.float32)
    else:
        block = block[None]
    mask = np.zeros_like(block)
    if echo:
        mask.reshape(-1)[0] = 1.0
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["m", "shape_b11"], ["m3"]),
        helper.make_node("Mul", ["m3", "mask"], ["echoed"]),
        helper.make_node("Add", ["echoed", "block"], ["detections"]),
    ]
    inits = [
        numpy_helper.from_array(block.astype(np.float32), "block"),
        numpy_helper.from_array(mask.astype(np.float32), "mask"),
        numpy_helper.from_array(np.array([-1] + [1] * (block.ndim - 1), np.int64), "shape_b11"),
    ]
    graph = helper.make_graph(
        nodes, "constant_pose",
        [helper.make_tensor_value_info("images", dtype, in_shape)],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, out_dims)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    meta = default_metadata(height, width)
    for key, value in (metadata or {}).items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
