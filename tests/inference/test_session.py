from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import REGISTRY

import service.inference.session as session_mod
from service.errors import ModelError
from service.inference import InferenceConfig, OrtModel
from service.inference.session import CPU, nvidia_driver_present, resolve_providers
from tests.inference.conftest import ModelFactory
from tests.inference.onnx_factory import make_row

SHARED = Path(__file__).resolve().parents[2] / "../shared/data"
MOVENET = SHARED / "models/movenet/movenet_singlepose_lightning_int8_4_dequant.onnx"
NO_GPU = pytest.mark.skipif(
    nvidia_driver_present(), reason="needs a machine without an NVIDIA driver (CPU fallback)"
)


def frame(value: int, h: int = 480, w: int = 640) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_predict_maps_model_outputs_to_frame_pixels(model_factory: ModelFactory) -> None:
    kps = np.array([[100 + 10 * i, 50 + 5 * i, 0.9] for i in range(5)], np.float32)
    path = model_factory(rows=np.stack([make_row((90, 40, 150, 80), 0.8, 1, kps)]))
    model = OrtModel(path, InferenceConfig(intra_op_threads=1))
    (det,) = model.predict([frame(0)])
    np.testing.assert_allclose(det.boxes[0], [180.5, 80.5, 300.5, 160.5])
    np.testing.assert_allclose(det.keypoints[0, :, 0], [200.5, 220.5, 240.5, 260.5, 280.5])
    np.testing.assert_allclose(det.keypoints[0, :, 1], [100.5, 110.5, 120.5, 130.5, 140.5])
    assert det.class_ids.tolist() == [1]
    assert model.info.classes[1].name == "flange"


def test_dynamic_batch_runs_all_images_in_one_session_run(model_factory: ModelFactory) -> None:
    path = model_factory(rows=np.stack([make_row((0, 0, 10, 10), 0.9, 0)]), echo=True)
    model = OrtModel(path, InferenceConfig(intra_op_threads=1, warmup_runs=1))
    dets = model.predict([frame(v) for v in (3, 7, 11, 20)])
    assert model.last_timing.runs == 1 and model.last_timing.batch_size == 4
    # x1 of row 0 is the mean pixel value: each output belongs to its own image, in order
    x1_model = [(d.boxes[0, 0] + 0.5) / 2 - 0.5 for d in dets]
    np.testing.assert_allclose(x1_model, [3, 7, 11, 20], atol=1e-4)
    assert model.last_timing.model_s > 0
    assert model.last_timing.model_ms_per_image == pytest.approx(
        1000 * model.last_timing.model_s / 4
    )


@pytest.mark.parametrize(("fixed", "images", "runs"), [(1, 3, 3), (2, 3, 2), (2, 4, 2)])
def test_fixed_batch_runs_in_chunks_and_keeps_order(
    model_factory: ModelFactory, fixed: int, images: int, runs: int
) -> None:
    path = model_factory(rows=np.stack([make_row((0, 0, 10, 10), 0.9, 0)]), echo=True,
                         batch=fixed)
    model = OrtModel(path, InferenceConfig(warmup_runs=1))
    assert not model.info.dynamic_batch
    values = [5 * (i + 1) for i in range(images)]
    dets = model.predict([frame(v) for v in values])
    assert model.last_timing.runs == runs
    np.testing.assert_allclose([(d.boxes[0, 0] + 0.5) / 2 - 0.5 for d in dets], values, atol=1e-4)


@pytest.mark.parametrize("layout", ["NHWC-uint8", "NCHW-float32"])
def test_batches_in_flight_keep_their_own_memory_and_a_run_batch_is_reused(
    model_factory: ModelFactory, layout: str
) -> None:
    from onnx import TensorProto

    options: dict[str, Any] = {}
    if layout == "NCHW-float32":
        options = {"layout": "NCHW", "dtype": TensorProto.FLOAT, "metadata": {
            "input_layout": "NCHW", "input_dtype": "float32", "input_color": "RGB",
            "normalization": "unit"}}
    path = model_factory(rows=np.stack([make_row((0, 0, 10, 10), 0.9, 0)]), echo=True,
                         **options)
    model = OrtModel(path, InferenceConfig(intra_op_threads=1, warmup_runs=1))
    first = model.prepare([frame(40), frame(60)])
    second = model.prepare([frame(90), frame(120)])  # prepared while the first waits
    (feed1,), (feed2,) = first.feeds.values(), second.feeds.values()
    assert feed1 is not feed2
    scale = 255.0 if layout == "NCHW-float32" else 1.0
    assert feed1.mean() * scale == pytest.approx(50, abs=0.01)  # untouched by the second
    dets = model.finish(model.infer(first)) + model.finish(model.infer(second))
    x1 = [((d.boxes[0, 0] + 0.5) / 2 - 0.5) * scale for d in dets]
    tolerance = 0.05 if layout == "NCHW-float32" else 1e-3  # x / 255 in float32, times 255
    np.testing.assert_allclose(x1, [40, 60, 90, 120], atol=tolerance)
    assert model.adapter.buffers.lent == 0  # both given back once run
    third = model.prepare([frame(7), frame(7)])
    feed3 = next(iter(third.feeds.values()))
    assert feed3 is feed1 or feed3 is feed2  # no new 2-frame batch
    (det, _) = model.finish(model.infer(third))
    assert ((det.boxes[0, 0] + 0.5) / 2 - 0.5) * scale == pytest.approx(7, abs=tolerance)


def test_prepare_infer_finish_is_predict_in_three_steps(model_factory: ModelFactory) -> None:
    path = model_factory(rows=np.stack([make_row((0, 0, 10, 10), 0.9, 0)]), echo=True)
    model = OrtModel(path, InferenceConfig(intra_op_threads=1, warmup_runs=1))
    images = [frame(v) for v in (4, 9, 30)]
    prepared = model.prepare(images)
    assert prepared.n == 3 and len(prepared.transforms) == 3 and prepared.prepare_s > 0
    inferred = model.infer(prepared)
    assert inferred.runs == 1 and inferred.model_s > 0
    staged = model.finish(inferred)
    assert model.last_timing.batch_size == 3 and model.last_timing.runs == 1
    for got, want in zip(staged, model.predict(images), strict=True):
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_array_equal(got.keypoints, want.keypoints)
    assert model.finish(model.infer(model.prepare([]))) == []


def test_empty_batch_returns_nothing_without_running(model_factory: ModelFactory) -> None:
    model = OrtModel(model_factory(), InferenceConfig(warmup_runs=0))
    assert model.predict([]) == []


def test_auto_provider_on_this_machine_is_what_actually_runs(
    model_factory: ModelFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.inference.session"):
        model = OrtModel(model_factory(), InferenceConfig(), name="auto-test")
    assert model.provider == model.providers[0]
    if not nvidia_driver_present():
        assert model.provider == CPU
    assert f"provider {model.provider}" in caplog.text
    assert REGISTRY.get_sample_value(
        "linewatch_inference_provider", {"model": "auto-test", "provider": model.provider}
    ) == 1.0
    assert REGISTRY.get_sample_value("linewatch_model_loaded", {"model": "auto-test"}) == 1.0


def test_zero_threads_is_every_usable_core_but_one(model_factory: ModelFactory) -> None:
    import os

    model = OrtModel(model_factory(), InferenceConfig(providers=["cpu"], intra_op_threads=0))
    usable = len(os.sched_getaffinity(0))
    assert model._session.get_session_options().intra_op_num_threads == max(1, usable - 1)


def test_a_heavy_model_gets_every_core(
    model_factory: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    import service.inference.session as session_module

    usable = len(os.sched_getaffinity(0))
    if usable < 2:
        pytest.skip("needs 2 usable cores")
    light = OrtModel(model_factory(), InferenceConfig(providers=["cpu"], warmup_runs=1))
    assert light.intra_op_threads == usable - 1  # the tiny test model is not heavy
    assert light.instances == 1 and light.uses_all_cores is False
    monkeypatch.setattr(session_module, "HEAVY_MODEL_MS", 0.0)  # every model is heavy now
    one = OrtModel(model_factory(), InferenceConfig(providers=["cpu"], warmup_runs=1,
                                                    instances=1))
    assert one.intra_op_threads == usable and one.spin_wait and not light.spin_wait
    assert one._session.get_session_options().intra_op_num_threads == usable
    assert one.uses_all_cores
    # instances: auto -> two sessions with half the cores each, run side by side
    heavy = OrtModel(model_factory(), InferenceConfig(providers=["cpu"], warmup_runs=1))
    assert heavy.instances == 2 and not heavy.uses_all_cores and not heavy.spin_wait
    assert heavy.intra_op_threads == max(1, usable // 2)
    sessions = {id(i.session) for i in heavy._instances}
    assert len(sessions) == 2
    for instance in heavy._instances:
        opts = instance.session.get_session_options()
        assert opts.intra_op_num_threads == max(1, usable // 2)
    pinned = OrtModel(
        model_factory(), InferenceConfig(providers=["cpu"], intra_op_threads=1, warmup_runs=1)
    )
    assert pinned.intra_op_threads == 1  # an explicit count is never changed


def test_instances_run_batches_at_the_same_time_with_the_same_results(
    model_factory: ModelFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    path = model_factory()
    single = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=0, instances=1))
    pair = OrtModel(path, InferenceConfig(providers=["cpu"], warmup_runs=1, instances=2,
                                          intra_op_threads=1))
    assert (single.instances, pair.instances) == (1, 2)
    assert pair.intra_op_threads == 1  # an explicit count is kept
    images = [np.full((48, 64, 3), v, np.uint8) for v in (10, 120, 240)]
    want = single.predict(images)
    # two threads each hold a run until both are inside one: only two distinct
    # sessions running at once get past the barrier
    barrier = threading.Barrier(2, timeout=10)
    plain = session_mod.run_in_batches
    used: list[int] = []

    def held(session: Any, *args: Any) -> Any:
        used.append(id(session))
        barrier.wait()
        return plain(session, *args)

    monkeypatch.setattr(session_mod, "run_in_batches", held)
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        results[i] = pair.predict(images)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not barrier.broken and len(set(used)) == 2
    for got in results:
        assert got is not None
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-4)
            np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-4)


def test_instances_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="instances"):
        InferenceConfig(instances=0)
    assert InferenceConfig().instances == "auto"


def test_explicit_cpu_and_thread_counts(model_factory: ModelFactory) -> None:
    model = OrtModel(
        model_factory(), InferenceConfig(providers=["cpu"], intra_op_threads=1, inter_op_threads=1)
    )
    assert model.providers == (CPU,)
    opts = model._session.get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)


@NO_GPU
def test_gpu_provider_that_fails_to_load_falls_back_with_a_warning_and_clean_stdout(
    model_factory: ModelFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no TensorRT provider")
    with caplog.at_level(logging.WARNING):
        model = OrtModel(model_factory(), InferenceConfig(providers=["tensorrt", "cuda", "cpu"]))
    assert model.provider == CPU
    assert "TensorrtExecutionProvider did not load" in caplog.text
    assert capsys.readouterr().out == ""  # ORT's fall-back print must not reach stdout


@NO_GPU
def test_explicit_gpu_only_that_cannot_run_is_refused(model_factory: ModelFactory) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    with pytest.raises(ModelError, match="fell back to CPUExecutionProvider"):
        OrtModel(model_factory(), InferenceConfig(providers=["cuda"]))


def test_unknown_provider_is_refused_with_the_available_ones(model_factory: ModelFactory) -> None:
    with pytest.raises(ModelError, match="FooExecutionProvider.*available: .*CPUExecutionProvider"):
        OrtModel(model_factory(), InferenceConfig(providers=["FooExecutionProvider"]))


def test_resolve_providers_orders_auto_and_expands_aliases(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    avail = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    monkeypatch.setattr(session_mod, "tensorrt_runtime_present", lambda: True)
    monkeypatch.setattr(session_mod, "cudnn_runtime_present", lambda: True)
    assert resolve_providers("auto", avail, gpu_present=True) == avail
    monkeypatch.setattr(session_mod, "tensorrt_runtime_present", lambda: False)
    assert resolve_providers("auto", avail, gpu_present=True) == avail[1:]
    assert resolve_providers("auto", avail, gpu_present=False) == [CPU]
    assert resolve_providers("auto", [CPU], gpu_present=True) == [CPU]
    assert resolve_providers(["cuda", "cpu"], avail, True) == ["CUDAExecutionProvider", CPU]
    # without cuDNN a CUDA session is made and fails at its first Conv: auto leaves it out
    monkeypatch.setattr(session_mod, "cudnn_runtime_present", lambda: False)
    assert resolve_providers("auto", avail, gpu_present=True) == [CPU]
    monkeypatch.setattr(session_mod, "tensorrt_runtime_present", lambda: True)
    assert resolve_providers("auto", avail, gpu_present=True) == [avail[0], CPU]
    assert resolve_providers(["cuda", "cpu"], avail, True) == ["CUDAExecutionProvider", CPU]


def test_config_accepts_a_comma_separated_provider_string() -> None:
    assert InferenceConfig(providers="cuda, cpu").providers == ["cuda", "cpu"]
    assert InferenceConfig().providers == "auto"


def test_predict_records_model_time_and_batch_size(model_factory: ModelFactory) -> None:
    model = OrtModel(model_factory(), InferenceConfig(warmup_runs=3), name="metrics-test")
    labels = {"model": "metrics-test"}
    assert REGISTRY.get_sample_value("linewatch_inference_seconds_count", labels) in (None, 0.0)
    model.predict([frame(0), frame(1)])
    assert REGISTRY.get_sample_value("linewatch_inference_seconds_count", labels) == 1.0
    assert REGISTRY.get_sample_value("linewatch_inference_batch_size_sum", labels) == 2.0


def test_missing_model_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"absent\.onnx' does not exist"):
        OrtModel(tmp_path / "absent.onnx")


def test_corrupt_model_file_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(b"\x08\x08\x12\x04onnx" + bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="truncated.onnx' could not be loaded"):
        OrtModel(bad)


@pytest.mark.skipif(not MOVENET.is_file(), reason=f"shared test model absent: {MOVENET}")
def test_a_real_model_of_an_unsupported_family_is_refused_at_load() -> None:
    with pytest.raises(ModelError) as err:
        OrtModel(MOVENET, InferenceConfig(warmup_runs=0))
    msg = str(err.value)
    assert "StatefulPartitionedCall:0 float32 [1, 1, 17, 3]" in msg
    assert "serving_default_input:0 uint8 [1, 192, 192, 3]" in msg
    assert "metadata keys: none" in msg
