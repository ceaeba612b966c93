"""What a model file says about itself: tensors and ``metadata_props``, typed.

Metadata is read, never guessed: a key the file does not carry falls back to what
its input tensor shows (dtype, layout) or to the Ultralytics convention (RGB,
letterbox, 0..1 floats), and the fallback is recorded in ``ModelInfo.defaulted``
so ``linewatch model inspect`` can say so.

Two readers build the same :class:`ModelInfo`: :func:`read_model_info` (from the
file with ``onnx``, no session) and :func:`model_info_from_session` (from a live
ONNX Runtime session, so the service does not parse the file twice).
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from service.domain import ClassInfo
from service.errors import ModelError

Dim = int | str | None  # a static size, a symbolic name, or unknown
Layout = Literal["NHWC", "NCHW"]
Color = Literal["BGR", "RGB", "GRAY"]  # GRAY: a one-channel input (OpenCV BGR -> gray)
Normalization = Literal["in-graph", "unit"]  # unit: float 0..1 (divide by 255)
Resize = Literal["letterbox", "stretch"]

# ONNX TensorProto element types -> numpy dtype names (the ones models use).
_ONNX_DTYPES = {
    1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
    9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 16: "bfloat16",
}
# ONNX Runtime type strings -> numpy dtype names.
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
    "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bfloat16)": "bfloat16",
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One graph input or output: name, shape (symbolic dims as str), dtype name."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass(frozen=True, slots=True)
class InputSpec:
    """How images must be prepared for the model's image input."""

    name: str
    height: int
    width: int
    layout: Layout
    dtype: str
    color: Color
    normalization: Normalization
    resize: Resize
    pad_value: int = 114


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Everything LineWatch reads from a model file."""

    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: Mapping[str, str]
    task: str | None
    classes: tuple[ClassInfo, ...]
    kpt_shape: tuple[int, int] | None  # (K, D): keypoints per instance, values per keypoint
    imgsz: tuple[int, int]  # (H, W) of the model input
    stride: int | None
    output_format: str | None
    max_det: int | None
    input: InputSpec
    dynamic_batch: bool
    fixed_batch: int | None  # the batch size when it is static
    defaulted: tuple[str, ...] = field(default=())  # keys not in metadata, filled by fallback

    @property
    def num_keypoints(self) -> int:
        return self.kpt_shape[0] if self.kpt_shape else 0

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def describe_found(self) -> str:
        """One line: inputs, outputs and metadata keys (for error messages)."""
        ins = "; ".join(t.describe() for t in self.inputs) or "none"
        outs = "; ".join(t.describe() for t in self.outputs) or "none"
        keys = ", ".join(sorted(self.metadata)) or "none"
        return f"inputs: {ins}; outputs: {outs}; metadata keys: {keys}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (for ``linewatch model inspect --json`` and the API)."""

        def tensor(t: TensorSpec) -> dict[str, Any]:
            return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype}

        return {
            "path": str(self.path),
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
            "metadata": dict(self.metadata),
            "task": self.task,
            "classes": [
                {"id": i, "name": c.name, "keypoint_names": list(c.keypoint_names),
                 "skeleton": [list(e) for e in c.skeleton]}
                for i, c in enumerate(self.classes)
            ],
            "kpt_shape": list(self.kpt_shape) if self.kpt_shape else None,
            "imgsz": list(self.imgsz),
            "stride": self.stride,
            "output_format": self.output_format,
            "max_det": self.max_det,
            "input": {
                "name": self.input.name, "height": self.input.height, "width": self.input.width,
                "layout": self.input.layout, "dtype": self.input.dtype,
                "color": self.input.color, "normalization": self.input.normalization,
                "resize": self.input.resize, "pad_value": self.input.pad_value,
            },
            "dynamic_batch": self.dynamic_batch,
            "fixed_batch": self.fixed_batch,
            "defaulted": list(self.defaulted),
        }


# --- readers -----------------------------------------------------------------


def read_model_info(path: str | Path) -> ModelInfo:
    """Read a model's tensors and metadata with ``onnx`` (no inference session)."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"Model file {str(p)!r} does not exist (or is not a file).")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise ModelError(
            f"Model file {str(p)!r} is not a readable ONNX model ({type(exc).__name__}: "
            f"{exc}). Re-export it, or check that the download is complete."
        ) from exc
    return model_info_from_proto(p, proto)


def model_info_from_proto(path: str | Path, proto: Any) -> ModelInfo:
    """Build ``ModelInfo`` from a loaded ``onnx.ModelProto`` (``path`` names it in errors)."""
    initializers = {i.name for i in proto.graph.initializer}
    inputs = tuple(_onnx_tensor(v) for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(_onnx_tensor(v) for v in proto.graph.output)
    metadata = {m.key: m.value for m in proto.metadata_props}
    return build_model_info(Path(path), inputs, outputs, metadata)


def model_info_from_session(path: str | Path, session: Any) -> ModelInfo:
    """Build ``ModelInfo`` from a live ``onnxruntime.InferenceSession``."""
    inputs = tuple(_ort_tensor(a) for a in session.get_inputs())
    outputs = tuple(_ort_tensor(a) for a in session.get_outputs())
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    return build_model_info(Path(path), inputs, outputs, metadata)


def _onnx_tensor(value: Any) -> TensorSpec:
    ttype = value.type.tensor_type
    dims: list[Dim] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(str(d.dim_param))
        else:
            dims.append(None)
    return TensorSpec(value.name, tuple(dims), _ONNX_DTYPES.get(ttype.elem_type, "unknown"))


def _ort_tensor(arg: Any) -> TensorSpec:
    dims: list[Dim] = []
    for d in arg.shape or ():
        dims.append(d if isinstance(d, int | str) else None)
    return TensorSpec(arg.name, tuple(dims), _ORT_DTYPES.get(arg.type, str(arg.type)))


# --- parsing -------------------------------------------------------------------


def build_model_info(
    path: Path,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    metadata: Mapping[str, str],
) -> ModelInfo:
    """Turn raw tensors and ``metadata_props`` into a typed :class:`ModelInfo`."""
    defaulted: list[str] = []
    where = f"model {str(path)!r}"
    task = metadata.get("task")
    kpt_shape = _parse_kpt_shape(metadata.get("kpt_shape"), where)
    names = _parse_names(metadata.get("names"), where)
    stride = _parse_int(metadata.get("stride"), "stride", where)
    max_det = _parse_int(metadata.get("max_det"), "max_det", where)
    kp_names = _parse_json_by_class(metadata.get("keypoint_names"), "keypoint_names", where)
    if not kp_names:  # Ultralytics (8.3.x on) writes its dataset's kpt_names: {class id: [...]}
        kp_names = _parse_json_by_class(metadata.get("kpt_names"), "kpt_names", where)
    skeletons = _parse_json_by_class(metadata.get("skeleton"), "skeleton", where)

    image = _image_input(inputs, path)
    layout = _layout(metadata.get("input_layout"), image, where)
    if "input_layout" not in metadata:
        defaulted.append("input_layout")
    imgsz = _parse_imgsz(metadata.get("imgsz"), image, layout, where)
    if "imgsz" not in metadata:
        defaulted.append("imgsz")
    dtype = metadata.get("input_dtype") or image.dtype
    if "input_dtype" not in metadata:
        defaulted.append("input_dtype")
    channels = input_channels(image, layout)
    color = _choice(metadata.get("input_color"), ("BGR", "RGB", "GRAY"),
                    "GRAY" if channels == 1 else "RGB", "input_color", where)
    check_channels(image, layout, color, where)
    normalization = _choice(
        metadata.get("normalization"), ("in-graph", "unit"),
        "in-graph" if dtype == "uint8" else "unit", "normalization", where,
    )
    resize = _choice(metadata.get("resize"), ("letterbox", "stretch"), "letterbox", "resize", where)
    for key in ("input_color", "normalization", "resize"):
        if key not in metadata:
            defaulted.append(key)
    pad_value = _parse_int(metadata.get("pad_value"), "pad_value", where)
    spec = InputSpec(
        name=image.name, height=imgsz[0], width=imgsz[1], layout=layout, dtype=dtype,
        color=color, normalization=normalization, resize=resize,  # type: ignore[arg-type]
        pad_value=114 if pad_value is None else pad_value,
    )

    batch_dim = image.shape[0] if image.shape else None
    dynamic = not isinstance(batch_dim, int) or batch_dim <= 0
    classes = _classes(names, kp_names, skeletons, kpt_shape, where)
    return ModelInfo(
        path=path, inputs=tuple(inputs), outputs=tuple(outputs), metadata=dict(metadata),
        task=task, classes=classes, kpt_shape=kpt_shape, imgsz=imgsz, stride=stride,
        output_format=metadata.get("output_format"), max_det=max_det, input=spec,
        dynamic_batch=dynamic, fixed_batch=None if dynamic else int(batch_dim),  # type: ignore[arg-type]
        defaulted=tuple(defaulted),
    )


def _image_input(inputs: Sequence[TensorSpec], path: Path) -> TensorSpec:
    images = [t for t in inputs if len(t.shape) == 4]
    if len(images) != 1 or len(inputs) != 1:
        found = "; ".join(t.describe() for t in inputs) or "none"
        raise ModelError(
            f"Model {str(path)!r} must have exactly one image input of rank 4 "
            f"(NHWC or NCHW); found inputs: {found}. Multi-input models are not supported."
        )
    return images[0]


def _layout(value: str | None, image: TensorSpec, where: str) -> Layout:
    if value is not None:
        if value not in ("NHWC", "NCHW"):
            raise ModelError(f"{where}: input_layout must be NHWC or NCHW, got {value!r}.")
        return value  # type: ignore[return-value]
    for channels in (3, 1):  # color, then gray (e.g. Ultralytics trained with channels: 1)
        if image.shape[3] == channels:
            return "NHWC"
        if image.shape[1] == channels:
            return "NCHW"
    raise ModelError(
        f"{where}: cannot tell the layout of input {image.describe()} (no channel "
        "dimension of size 3 or 1 and no input_layout metadata). Add input_layout=NHWC or NCHW."
    )


def input_channels(image: TensorSpec, layout: Layout) -> Dim:
    """The image input's channel dimension, as the layout places it."""
    return image.shape[3] if layout == "NHWC" else image.shape[1]


def check_channels(
    image: TensorSpec, layout: Layout, color: str, where: str,
    fix: str = "the metadata's input_layout or input_color",
) -> None:
    """Refuse an input whose channel count LineWatch cannot feed or that the color
    contradicts: 3 channels (BGR, RGB) or 1 (GRAY); a symbolic channel dimension is taken
    at its word."""
    channels = input_channels(image, layout)
    want = 1 if color == "GRAY" else 3
    if isinstance(channels, int) and channels > 0 and channels != want:
        fed = "3 (color)" if want == 3 else "1 (gray)"
        raise ModelError(
            f"{where}: input {image.describe()} as {layout} has {channels!r} channels, but "
            f"input color {color} feeds {fed}. LineWatch feeds 3-channel BGR/RGB or "
            f"1-channel GRAY images; fix {fix}."
        )


def _parse_imgsz(
    value: str | None, image: TensorSpec, layout: Layout, where: str
) -> tuple[int, int]:
    if value is not None:
        parsed = _literal(value, "imgsz", where)
        if isinstance(parsed, int):
            parsed = [parsed, parsed]
        if (
            isinstance(parsed, list | tuple) and len(parsed) == 2
            and all(isinstance(v, int) and v > 0 for v in parsed)
        ):
            return int(parsed[0]), int(parsed[1])
        raise ModelError(f"{where}: imgsz must be [height, width], got {value!r}.")
    h, w = image.shape[1:3] if layout == "NHWC" else image.shape[2:4]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return h, w
    raise ModelError(
        f"{where}: input {image.describe()} has a dynamic image size and the metadata has "
        "no imgsz; add imgsz=[height, width] to the model's metadata_props."
    )


def _choice(value: str | None, allowed: tuple[str, ...], default: str, key: str, where: str) -> str:
    if value is None:
        return default
    if value not in allowed:
        raise ModelError(f"{where}: {key} must be one of {', '.join(allowed)}; got {value!r}.")
    return value


def _literal(value: str, key: str, where: str) -> Any:
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{where}: metadata {key}={value[:80]!r} is neither a Python literal nor JSON ({exc})."
        ) from exc


def _parse_int(value: str | None, key: str, where: str) -> int | None:
    if value is None:
        return None
    parsed = _literal(value, key, where)
    if isinstance(parsed, list | tuple) and parsed:  # Ultralytics may store stride as a list
        parsed = max(parsed)
    numeric = isinstance(parsed, int | float) and not isinstance(parsed, bool)
    if numeric and float(parsed).is_integer():
        return int(parsed)
    raise ModelError(f"{where}: metadata {key} must be an integer, got {value!r}.")


def _parse_kpt_shape(value: str | None, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    parsed = _literal(value, "kpt_shape", where)
    if (
        isinstance(parsed, list | tuple) and len(parsed) == 2
        and all(isinstance(v, int) for v in parsed) and parsed[0] > 0 and parsed[1] in (2, 3)
    ):
        return int(parsed[0]), int(parsed[1])
    raise ModelError(f"{where}: kpt_shape must be [K, 2] or [K, 3], got {value!r}.")


def _parse_names(value: str | None, where: str) -> dict[int, str]:
    if value is None:
        return {}
    parsed = _literal(value, "names", where)
    if isinstance(parsed, list | tuple):
        parsed = dict(enumerate(parsed))
    if isinstance(parsed, dict):
        try:
            return {int(k): str(v) for k, v in parsed.items()}
        except (TypeError, ValueError):
            pass
    raise ModelError(
        f"{where}: names must map class ids to names, like {{0: 'bracket'}}; got {value[:80]!r}."
    )


def _parse_json_by_class(value: str | None, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    parsed = _literal(value, key, where)
    if isinstance(parsed, dict):
        return {str(k): v for k, v in parsed.items()}
    if isinstance(parsed, list):  # one list shared by every class
        return {"*": parsed}
    raise ModelError(f"{where}: {key} must be a JSON object keyed by class; got {value[:80]!r}.")


def _classes(
    names: dict[int, str],
    kp_names: dict[str, Any],
    skeletons: dict[str, Any],
    kpt_shape: tuple[int, int] | None,
    where: str,
) -> tuple[ClassInfo, ...]:
    if not names:
        return ()
    k = kpt_shape[0] if kpt_shape else 0
    out: list[ClassInfo] = []
    for cid in range(max(names) + 1):
        name = names.get(cid, f"class{cid}")
        kps = _by_class(kp_names, cid, name)
        if isinstance(kps, list):
            keypoint_names = tuple(str(n) for n in kps)
            if k and len(keypoint_names) > k:
                raise ModelError(
                    f"{where}: metadata names {len(keypoint_names)} keypoints for class "
                    f"{name!r} ({', '.join(keypoint_names[:4])}, ...) but kpt_shape says the "
                    f"model outputs {k}; fix keypoint_names (or Ultralytics' kpt_names)."
                )
        else:
            keypoint_names = tuple(f"kp{i}" for i in range(k))
        edges = _by_class(skeletons, cid, name)
        skeleton: tuple[tuple[int, int], ...] = ()
        if isinstance(edges, list):
            skeleton = tuple(
                (int(e[0]), int(e[1])) for e in edges if isinstance(e, list | tuple) and len(e) == 2
            )
        out.append(ClassInfo(name=name, keypoint_names=keypoint_names, skeleton=skeleton))
    return tuple(out)


def _by_class(table: dict[str, Any], cid: int, name: str) -> Any:
    for key in (name, str(cid), "*"):
        if key in table:
            return table[key]
    return None


def dtype_of(spec: InputSpec) -> np.dtype[Any]:
    """The numpy dtype the image input expects."""
    try:
        return np.dtype(spec.dtype)
    except TypeError as exc:
        raise ModelError(
            f"Unsupported input dtype {spec.dtype!r} for input {spec.name!r}."
        ) from exc
