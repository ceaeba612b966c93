from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from onnx import TensorProto

from service.errors import ModelError
from service.inference.metadata import model_info_from_session, read_model_info
from tests.inference.conftest import ModelFactory


def test_reads_linewatch_metadata(model_factory: ModelFactory) -> None:
    info = read_model_info(model_factory())
    assert info.task == "pose"
    assert info.kpt_shape == (5, 3)
    assert info.class_names == ("bracket", "flange", "arm")
    assert info.classes[1].keypoint_names == ("centre", "bolt_1", "bolt_2", "bolt_3", "notch")
    assert info.classes[2].skeleton == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert info.imgsz == (240, 320)
    assert info.stride == 8 and info.max_det == 20
    assert info.output_format == "end2end"
    spec = info.input
    assert (spec.name, spec.height, spec.width) == ("images", 240, 320)
    assert (spec.layout, spec.dtype, spec.color) == ("NHWC", "uint8", "BGR")
    assert (spec.normalization, spec.resize) == ("in-graph", "letterbox")
    assert info.dynamic_batch and info.fixed_batch is None
    assert info.defaulted == ()
    assert [t.shape for t in info.outputs] == [("batch", 8, 21)]


def test_ultralytics_style_metadata_defaults_from_the_input_tensor(
    model_factory: ModelFactory,
) -> None:
    only_ultralytics = {k: None for k in (
        "keypoint_names", "skeleton", "output_format", "input_layout", "input_dtype",
        "input_color", "normalization", "resize", "max_det",
    )}
    info = read_model_info(model_factory(
        layout="NCHW", dtype=TensorProto.FLOAT, batch=1,
        metadata={**only_ultralytics, "names": "{0: 'person'}", "imgsz": "[256, 192]"},
        height=256, width=192,
    ))
    spec = info.input
    assert (spec.layout, spec.dtype, spec.color, spec.normalization, spec.resize) == (
        "NCHW", "float32", "RGB", "unit", "letterbox"
    )
    assert (spec.height, spec.width) == (256, 192)
    assert not info.dynamic_batch and info.fixed_batch == 1
    assert info.classes[0].keypoint_names == ("kp0", "kp1", "kp2", "kp3", "kp4")
    assert set(info.defaulted) == {"input_layout", "input_dtype", "input_color",
                                   "normalization", "resize"}


def test_session_reader_agrees_with_file_reader(model_factory: ModelFactory) -> None:
    path = model_factory()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from_session = model_info_from_session(path, session)
    from_file = read_model_info(path)
    assert from_session.classes == from_file.classes
    assert from_session.input == from_file.input
    assert from_session.dynamic_batch == from_file.dynamic_batch
    assert from_session.outputs[0].shape == from_file.outputs[0].shape


@pytest.mark.parametrize(("layout", "dtype"), [("NCHW", TensorProto.FLOAT),
                                               ("NHWC", TensorProto.UINT8)])
def test_a_one_channel_input_is_a_gray_model(
    model_factory: ModelFactory, layout: str, dtype: int
) -> None:
    """E.g. Ultralytics trained with channels: 1 (a mono camera's model)."""
    unsaid = {k: None for k in ("input_layout", "input_color", "input_dtype", "normalization")}
    info = read_model_info(model_factory(layout=layout, channels=1, dtype=dtype,
                                         metadata=unsaid))
    assert (info.input.layout, info.input.color) == (layout, "GRAY")


@pytest.mark.parametrize(("channels", "color"), [(1, "RGB"), (3, "GRAY"), (4, "BGR")])
def test_input_color_must_fit_the_channel_count(
    model_factory: ModelFactory, channels: int, color: str
) -> None:
    with pytest.raises(ModelError, match=rf"has {channels} channels, but input color {color}"):
        read_model_info(model_factory(channels=channels, metadata={"input_color": color}))


def test_names_as_a_list_and_imgsz_from_the_tensor(model_factory: ModelFactory) -> None:
    info = read_model_info(model_factory(metadata={"names": "['a', 'b']", "imgsz": None}))
    assert info.class_names == ("a", "b")
    assert info.imgsz == (240, 320)
    assert "imgsz" in info.defaulted


def test_ultralytics_kpt_names_name_the_keypoints(model_factory: ModelFactory) -> None:
    """Ultralytics writes its dataset's kpt_names ({class id: [names]}, a Python literal)."""
    kpt_names = "{0: ['tip', 'hole_a', 'hole_b', 'notch', 'base']}"
    info = read_model_info(model_factory(metadata={
        "keypoint_names": None, "names": "{0: 'clip', 1: 'bar'}", "kpt_names": kpt_names,
    }))
    assert info.classes[0].keypoint_names == ("tip", "hole_a", "hole_b", "notch", "base")
    assert info.classes[1].keypoint_names == ("kp0", "kp1", "kp2", "kp3", "kp4")  # not given
    # LineWatch's own keypoint_names win where a file has both
    both = read_model_info(model_factory(metadata={"kpt_names": kpt_names}))
    assert both.classes[0].keypoint_names == ("corner_a", "corner_b", "corner_c", "hole_1",
                                              "hole_2")


@pytest.mark.parametrize("key", ["kpt_names", "keypoint_names"])
def test_more_keypoint_names_than_the_model_outputs_is_refused(
    model_factory: ModelFactory, key: str,
) -> None:
    six = "{0: ['a', 'b', 'c', 'd', 'e', 'f']}"
    meta = {"keypoint_names": None, "names": "{0: 'clip'}", key: six}
    with pytest.raises(ModelError, match=r"names 6 keypoints for class 'clip'.*outputs 5"):
        read_model_info(model_factory(metadata=meta))


@pytest.mark.parametrize(("key", "value"), [
    ("kpt_shape", "[5, 7]"), ("names", "not a literal {"), ("imgsz", "[240]"),
    ("input_layout", "HWC"), ("stride", "'eight'"),
])
def test_malformed_metadata_is_a_model_error_naming_the_key(
    model_factory: ModelFactory, key: str, value: str,
) -> None:
    with pytest.raises(ModelError, match=key):
        read_model_info(model_factory(metadata={key: value}))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelError, match="nope.onnx"):
        read_model_info(missing)


def test_corrupt_file_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    with pytest.raises(ModelError, match="bad.onnx"):
        read_model_info(bad)
