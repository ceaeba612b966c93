from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from service.domain import Detections
from service.errors import ModelError
from service.inference import adapters
from service.inference.adapters import (
    Adapter,
    End2EndAdapter,
    Verdict,
    decode_end2end,
    register_adapter,
    select_adapter,
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
