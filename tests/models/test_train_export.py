"""A tiny training run: checkpoints, resume, ONNX export with metadata and parity."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the model workspace needs the [train] extra")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from models import export as export_mod  # noqa: E402
from models import train as train_mod  # noqa: E402

pytestmark = [pytest.mark.train, pytest.mark.slow]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The tiny recipe run to the end in one go (2 epochs x 2 steps)."""
    out = tmp_path_factory.mktemp("straight")
    train_mod.train(train_mod.get_recipe("tiny"), out, cache_dir=cache_dir, progress=False)
    return out


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def live_ckpt(straight_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's checkpoint with its centre heatmaps lifted from the 1% prior to ~50%,
    so that the decoder emits real rows (peaks, gathers, refinement) for the parity check."""
    ckpt = _load(straight_run / "best.pt")
    num_classes = ckpt["net_config"]["num_classes"]
    for weights in ("model", "ema"):
        ckpt[weights]["head_out.bias"][:num_classes] += 4.6
    path = tmp_path_factory.mktemp("live") / "live.pt"
    torch.save(ckpt, path)
    return path


def test_training_checkpoints_each_epoch_and_resumes_where_it_stopped(
    tmp_path: Path, cache_dir: Path, straight_run: Path
) -> None:
    out = tmp_path / "run"
    recipe = train_mod.get_recipe("tiny")
    train_mod.train(recipe, out, max_steps=2, cache_dir=cache_dir, progress=False)
    first = _load(out / "last.pt")
    assert (first["epoch"], first["step"]) == (0, 2)
    assert (out / "best.pt").exists()
    assert len((out / "log.jsonl").read_text().splitlines()) == 1

    train_mod.train(recipe, out, resume=True, cache_dir=cache_dir, progress=False)
    resumed = _load(out / "last.pt")
    assert (resumed["epoch"], resumed["step"]) == (1, 4)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"kpt_err_px_mean", "recall", "precision", "per_class"} <= set(records[-1]["val"])
    assert records[-1]["wall_time_s"] >= records[0]["wall_time_s"] > 0

    # stopping and resuming gives the run an uninterrupted one would have had
    straight = _load(straight_run / "last.pt")
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, atol=1e-5, rtol=1e-4)
    changed = any(
        not torch.equal(first["model"][n], resumed["model"][n]) for n in first["model"]
    )
    assert changed


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path: Path, cache_dir: Path) -> None:
    code = train_mod.main(["--recipe", "tiny", "--out", str(tmp_path / "none"), "--resume",
                           "--cache-dir", str(cache_dir), "--no-progress"])
    assert code == 2


def test_export_matches_torch_and_carries_the_metadata(
    live_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path = tmp_path / "zoo" / "tiny.onnx"
    code = export_mod.main([str(live_ckpt), "--out", str(onnx_path)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "max abs diff" in printed
    diff = float(printed.split("max abs diff ")[1].split()[0])
    assert diff <= 1e-4

    model = onnx.load(str(onnx_path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    meta = {p.key: p.value for p in model.metadata_props}
    from service.sim import CLASSES

    assert meta["task"] == "pose" and json.loads(meta["kpt_shape"]) == [5, 3]
    assert ast.literal_eval(meta["names"]) == {i: c.name for i, c in enumerate(CLASSES)}
    assert meta["names"].startswith("{0: 'bracket', 1: 'flange', 2: 'arm'")
    assert json.loads(meta["imgsz"]) == [240, 320] and meta["stride"] == "4"
    assert json.loads(meta["keypoint_names"])["flange"] == list(CLASSES[1].keypoint_names)
    assert json.loads(meta["skeleton"])["arm"] == [list(p) for p in CLASSES[2].skeleton]
    assert {k: meta[k] for k in ("output_format", "input_layout", "input_dtype", "input_color",
                                 "normalization", "resize")} == {
        "output_format": "end2end", "input_layout": "NHWC", "input_dtype": "uint8",
        "input_color": "BGR", "normalization": "in-graph", "resize": "letterbox"}
    assert meta["max_det"] == "10"
    assert {"author", "license", "version", "date", "score_threshold"} <= set(meta)

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [240, 320, 3])
    assert out.name == "detections" and isinstance(inp.shape[0], str)
    net, _ = export_mod.load_checkpoint(live_ckpt)
    images = export_mod.parity_inputs(seed=3)
    for batch in (images[:1], images):
        got = session.run(None, {"images": batch})[0]
        with torch.no_grad():
            want = export_mod.ExportModel(net)(torch.from_numpy(batch)).numpy()
        assert got.shape == (len(batch), 10, 6 + 3 * 5)
        assert (got[..., 4] > 0).sum() >= len(batch)  # real rows, not only padding
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_service_loads_the_export_with_its_end2end_adapter(
    live_ckpt: Path, tmp_path: Path
) -> None:
    from service.inference import InferenceConfig, OrtModel

    onnx_path = tmp_path / "tiny.onnx"
    export_mod.export_checkpoint(live_ckpt, onnx_path)
    model = OrtModel(onnx_path, InferenceConfig(providers="cpu", intra_op_threads=1))
    assert model.adapter.name == "end2end"
    assert model.info.class_names[:3] == ("bracket", "flange", "arm")
    frame = np.zeros((480, 640, 3), np.uint8)
    (det,) = model.predict([frame])
    assert det.num_keypoints == 5


def test_a_broken_export_fails_the_parity_check(live_ckpt: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "tiny.onnx"
    export_mod.export_checkpoint(live_ckpt, onnx_path)
    net, _ = export_mod.load_checkpoint(live_ckpt)
    with torch.no_grad():
        net.head_out.weight.mul_(1.5)  # torch no longer matches the file
    with pytest.raises(export_mod.ExportError, match="parity check failed"):
        export_mod.check_parity(net, onnx_path)


def test_training_on_a_coco_file_exports_its_own_classes_and_keypoints(
    coco_sample: Path, tmp_path: Path
) -> None:
    out = tmp_path / "coco"
    code = train_mod.main(["--recipe", "tiny", "--out", str(out), "--coco", str(coco_sample),
                           "--max-steps", "2", "--no-progress"])
    assert code == 0
    onnx_path = tmp_path / "person.onnx"
    export_mod.export_checkpoint(out / "last.pt", onnx_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert ast.literal_eval(meta["names"]) == {0: "person"}
    assert json.loads(meta["kpt_shape"]) == [17, 3]
    assert json.loads(meta["skeleton"])["person"][0] == [15, 13]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows = session.run(None, {"images": np.zeros((1, 240, 320, 3), np.uint8)})[0]
    assert rows.shape == (1, 10, 6 + 17 * 3)


def test_the_model_card_is_written_from_the_measurements(
    live_ckpt: Path, straight_run: Path, tmp_path: Path
) -> None:
    from models import card

    onnx_path = tmp_path / "tiny.onnx"
    export_mod.export_checkpoint(live_ckpt, onnx_path)
    evaluation = {"recall": 0.985, "precision": 0.975, "kpt_err_px_mean": 0.8,
                  "kpt_err_px_p95": 2.1, "per_class": {"arm": {"recall": 1.0, "precision": 0.95,
                                                               "instances": 20}},
                  "scenario": "conveyor", "seed": 9000, "frames": 100}
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps(evaluation))
    latency = tmp_path / "latency.json"
    latency.write_text(json.dumps({"ms_median": 4.5, "ms_p90": 5.0, "threads": 1}))
    assert card.main([str(onnx_path), "--checkpoint", str(live_ckpt), "--log",
                      str(straight_run / "log.jsonl"), "--eval", str(eval_json),
                      "--latency", str(latency)]) == 0
    text = onnx_path.with_suffix(".md").read_text()
    assert "| arm | 1.000 | 0.950 | 20 |" in text
    assert "mean 0.80 px" in text and "p95 2.10 px" in text
    assert "median 4.50 ms" in text and "corner, long_tip, short_tip" in text
