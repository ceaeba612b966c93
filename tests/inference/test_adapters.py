from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import pytest
from onnx import TensorProto
from pydantic import ValidationError

from service.domain import Detections
from service.errors import ModelError
from service.inference import adapters
from service.inference.adapter_config import AdapterConfig
from service.inference.adapters import (
    Adapter,
    End2EndAdapter,
    Verdict,
    configured_adapter,
    decode_end2end,
    register_adapter,
    select_adapter,
    ultralytics_preprocess,
)
from service.inference.metadata import ModelInfo, read_model_info
from service.inference.preprocess import Transform
from tests.inference.conftest import ModelFactory
from tests.inference.onnx_factory import make_row

HALF = Transform(0.5, 0.5, 0, 0, 640, 480)  # 640x480 -> 320x240


def test_end2end_model_selects_the_end2end_adapter(model_factory: ModelFactory) -> None:
    choice = select_adapter(read_model_info(model_factory()))
    assert choice.adapter is End2EndAdapter
    assert "output_format=end2end" in choice.reason


def test_nms_free_ultralytics_export_without_output_format_is_accepted_by_shape(
    model_factory: ModelFactory,
) -> None:
    info = read_model_info(model_factory(metadata={"output_format": None}))
    choice = select_adapter(info)
    assert choice.adapter is End2EndAdapter
    assert "shape fits" in choice.reason


def test_raw_yolo_pose_layout_is_refused_with_what_was_found_and_what_is_supported(
    model_factory: ModelFactory,
) -> None:
    path = model_factory(
        "yolo_raw", output_shape=[1, 57, 8400], batch=1,  # 57 != 4 + 1 + 17*3: no adapter
        metadata={"output_format": None, "kpt_shape": "[17, 3]", "names": "{0: 'person'}"},
    )
    with pytest.raises(ModelError) as err:
        select_adapter(read_model_info(path))
    msg = str(err.value)
    assert "yolo_raw.onnx" in msg
    assert "images uint8 [1, 240, 320, 3]" in msg  # the input found
    assert "detections float32 [1, 57, 8400]" in msg  # the output found
    assert "metadata keys: imgsz, input_color" in msg
    assert "Supported: end2end" in msg and "6+K*D" in msg
    assert "\n" not in msg  # one paragraph


def test_end2end_shape_with_another_output_format_is_refused(model_factory: ModelFactory) -> None:
    with pytest.raises(ModelError, match="output_format='raw'"):
        select_adapter(read_model_info(model_factory(metadata={"output_format": "raw"})))


def test_last_dimension_must_fit_kpt_shape(model_factory: ModelFactory) -> None:
    info = read_model_info(model_factory(metadata={"kpt_shape": "[4, 3]", "keypoint_names": None}))
    verdict = End2EndAdapter.accepts(info)
    assert not verdict.accepted
    assert "6 + K*D = 18" in verdict.reason


def test_a_new_family_is_one_registered_class(
    model_factory: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters, "_REGISTRY", list(adapters._REGISTRY))

    @register_adapter
    class RawPose(Adapter):
        name = "raw-pose"
        supports = "output_format=raw"

        @classmethod
        def accepts(cls, info: ModelInfo) -> Verdict:
            ok = info.output_format == "raw"
            return Verdict(ok, "output_format=raw" if ok else "not raw")

        def postprocess(
            self, outputs: Sequence[np.ndarray], transforms: Sequence[Transform]
        ) -> list[Detections]:
            return [Detections.empty(5) for _ in transforms]

    choice = select_adapter(read_model_info(model_factory(metadata={"output_format": "raw"})))
    assert choice.adapter is RawPose
    assert choice.rejected[0][0] == "end2end"


def kp_grid(x0: float, y0: float) -> np.ndarray:
    return np.array([[x0 + i, y0 + 2 * i, 0.5 + 0.1 * i] for i in range(5)], np.float32)


def test_decode_thresholds_drops_padding_and_maps_back_to_frame_pixels() -> None:
    rows = np.stack([
        make_row((10, 20, 30, 40), 0.9, 2, kp_grid(12, 22)),
        make_row((50, 60, 70, 80), 0.4, 1),
        np.zeros(21, np.float32),  # padding row
    ])
    det = decode_end2end(rows, HALF, 5, 3, score_threshold=0.3)
    assert len(det) == 2
    np.testing.assert_array_equal(det.class_ids, [2, 1])
    np.testing.assert_allclose(det.scores, [0.9, 0.4])
    # model px m -> frame px (m + 0.5) * 2 - 0.5
    np.testing.assert_allclose(det.boxes[0], [20.5, 40.5, 60.5, 80.5])
    np.testing.assert_allclose(det.keypoints[0, :, 0], [24.5, 26.5, 28.5, 30.5, 32.5])
    np.testing.assert_allclose(det.keypoints[0, :, 1], [44.5, 48.5, 52.5, 56.5, 60.5])
    np.testing.assert_allclose(det.keypoints[0, :, 2], [0.5, 0.6, 0.7, 0.8, 0.9], rtol=1e-6)
    assert len(decode_end2end(rows, HALF, 5, 3, score_threshold=0.5)) == 1


def test_decode_max_detections_keeps_the_best() -> None:
    rows = np.stack([make_row((0, 0, 1, 1), s, 0) for s in (0.6, 0.95, 0.7)])
    det = decode_end2end(rows, HALF, 5, 3, 0.5, max_detections=2)
    np.testing.assert_allclose(det.scores, [0.95, 0.7])


def test_decode_two_value_keypoints_take_the_instance_score() -> None:
    row = np.concatenate([[0, 0, 4, 4, 0.8, 0], np.arange(10, dtype=np.float32)])
    det = decode_end2end(row[None].astype(np.float32), HALF, 5, 2, 0.5)
    np.testing.assert_allclose(det.keypoints[0, :, 2], 0.8)
    np.testing.assert_allclose(det.keypoints[0, 1, :2], [4.5, 6.5])


def test_decode_with_nothing_above_threshold_is_empty_with_k_keypoints() -> None:
    det = decode_end2end(np.zeros((8, 21), np.float32), HALF, 5, 3, 0.5)
    assert len(det) == 0 and det.keypoints.shape == (0, 5, 3)


def test_score_threshold_comes_from_metadata_unless_given(model_factory: ModelFactory) -> None:
    info = read_model_info(model_factory(metadata={"score_threshold": "0.35"}))
    assert End2EndAdapter(info).score_threshold == 0.35
    assert End2EndAdapter(info, score_threshold=0.7).score_threshold == 0.7
    plain = read_model_info(model_factory("plain"))
    assert End2EndAdapter(plain).score_threshold == adapters.DEFAULT_SCORE_THRESHOLD


def test_postprocess_refuses_an_output_of_the_wrong_width(model_factory: ModelFactory) -> None:
    adapter = End2EndAdapter(read_model_info(model_factory()))
    with pytest.raises(ModelError, match=r"\[1, 8, 20\]"):
        adapter.postprocess([np.zeros((1, 8, 20), np.float32)], [HALF])


def test_ultralytics_instances_go_to_frame_pixels_as_one_image_at_a_time_would() -> None:
    from service.inference.adapters import clip_to_frame, ultralytics_in_frames
    from service.inference.decoders import Decoded

    rng = np.random.default_rng(11)
    transforms = [Transform(0.5, 0.5, 0, 140, 1280, 720), Transform(1.0, 1.0, 0, 0, 640, 640),
                  Transform(0.8333, 0.8333, 0, 140, 768, 432), Transform(2.0, 2.0, 10, 0, 300, 320)]
    decoded = []
    for count in (3, 0, 5, 2):
        xy = rng.uniform(-40, 680, (count, 2)).astype(np.float32)  # some outside the frame
        boxes = np.concatenate([xy, xy + rng.uniform(5, 90, (count, 2))], axis=1)
        kps = rng.uniform(-40, 680, (count, 4, 3)).astype(np.float32)
        decoded.append(Decoded(boxes.astype(np.float32), rng.uniform(0, 1, count).astype(
            np.float32), rng.integers(0, 3, count).astype(np.int32), kps))
    got = ultralytics_in_frames(decoded, transforms)
    assert [len(d) for d in got] == [3, 0, 5, 2]
    for dec, t, det in zip(decoded, transforms, got, strict=True):
        n = dec.boxes.shape[0]
        boxes = t.to_source(dec.boxes.reshape(n, 2, 2) - 0.5).reshape(n, 4)
        kps = dec.keypoints.copy()
        kps[..., 0:2] = t.to_source(dec.keypoints[..., 0:2] - 0.5)
        want = clip_to_frame(Detections(boxes, dec.scores, dec.class_ids, kps),
                             t.src_width, t.src_height)
        np.testing.assert_array_equal(det.boxes, want.boxes)
        np.testing.assert_array_equal(det.keypoints, want.keypoints)
        np.testing.assert_array_equal(det.scores, want.scores)
        np.testing.assert_array_equal(det.class_ids, want.class_ids)
        assert det.boxes.min() >= -0.5 if n else True
    empty = ultralytics_in_frames([Decoded.empty(4)] * 2, transforms[:2])
    assert [len(d) for d in empty] == [0, 0] and empty[0].keypoints.shape == (0, 4, 3)


def float_model_info(
    model_factory: ModelFactory, channels: int = 1, **metadata: str | None
) -> ModelInfo:
    """A float NCHW model at 640 whose metadata says nothing of its input, as Ultralytics
    exports one (``channels=1``: trained with channels: 1)."""
    unsaid = {k: None for k in ("input_layout", "input_color", "input_dtype", "normalization")}
    return read_model_info(model_factory(
        layout="NCHW", channels=channels, dtype=TensorProto.FLOAT, height=640, width=640,
        metadata={**unsaid, "author": "Ultralytics", **metadata},
    ))


def test_ultralytics_gray_model_sees_the_frame_turned_gray_before_the_letterbox(
    model_factory: ModelFactory,
) -> None:
    """Ultralytics' channels: 1 loaders convert each frame to gray, then letterbox it."""
    info = float_model_info(model_factory)
    frame = np.random.default_rng(8).integers(0, 256, (270, 480, 3), dtype=np.uint8)
    feed, transforms = ultralytics_preprocess([frame], info, None)
    x = feed[info.input.name]
    assert x.shape == (1, 1, 640, 640)
    expected = np.full((640, 640), 114, np.uint8)  # 480x270 -> 640x360, 140 rows above
    expected[140:500] = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), (640, 360),
                                   interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(x[0, 0], expected / 255.0, atol=1e-6)
    assert (transforms[0].pad_y, transforms[0].scale_x) == (140, 640 / 480)


@pytest.mark.parametrize(("channels", "section", "message"), [
    (3, {"color": "GRAY"}, "has 3 channels, but input color GRAY feeds 1"),
    (1, {"color": "RGB"}, "has 1 channels, but input color RGB feeds 3"),
    (1, {"normalization": "mean-std", "mean": [120, 120, 120], "std": [60, 60, 60]},
     "mean has 3 values, but the input has 1 channel"),
    (3, {"normalization": "mean-std", "mean": [120], "std": [60]},
     "mean has 1 values, but the input has 3 channels"),
])
def test_input_overrides_must_fit_the_channel_count(
    model_factory: ModelFactory, channels: int, section: dict[str, object], message: str
) -> None:
    info = float_model_info(model_factory, channels)
    with pytest.raises(ModelError, match=message):
        configured_adapter(info, AdapterConfig.model_validate({"input": section}))


def test_gray_mean_std_normalises_the_one_channel(model_factory: ModelFactory) -> None:
    info = float_model_info(model_factory, author=None, output_format="end2end")
    settings = AdapterConfig.model_validate(
        {"input": {"normalization": "mean-std", "mean": [100], "std": [50]}})
    info, normalizer, choice = configured_adapter(info, settings)
    assert normalizer is not None and choice.adapter is End2EndAdapter
    adapter = choice.adapter(info, 0.5, None, settings, normalizer)
    frame = np.full((640, 640, 3), (10, 200, 30), np.uint8)  # BGR
    x = adapter.preprocess([frame])[0][info.input.name]
    level = cv2.cvtColor(frame[:1, :1], cv2.COLOR_BGR2GRAY)[0, 0]
    assert x.shape == (1, 1, 640, 640)
    np.testing.assert_allclose(x, (float(level) - 100) / 50, atol=1e-5)


def test_mean_and_std_need_the_same_number_of_values() -> None:
    with pytest.raises(ValidationError, match="same number of values"):
        AdapterConfig.model_validate(
            {"input": {"normalization": "mean-std", "mean": [1, 2, 3], "std": [4]}})
