"""linewatch bench: the bench config, the recorder and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from service.bench import LatencyRecorder, bench_config, run_bench
from service.cli import app
from service.config import Config, ConfigError, load_config
from tests.api.conftest import _rows
from tests.inference.onnx_factory import build_model
from tests.test_app import MOVENET_CONFIG, needs_movenet


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    build_model(tmp_path / "tiny.onnx", _rows(2))
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump({
        "cameras": [
            {"id": "a", "source": "sim://conveyor?seed=5&fps=15&width=320&height=240"},
            {"id": "off", "source": "sim://conveyor", "enabled": False},
        ],
        "models": [{"id": "tiny", "path": "tiny.onnx", "intra_op_threads": 1}],
    }))
    return path


def _config(path: Path) -> Config:
    from service.config import load_config

    return load_config(path, env={})


def test_bench_config_runs_enabled_cameras_flat_out(config_file: Path) -> None:
    cfg = bench_config(_config(config_file))
    assert [c.id for c in cfg.cameras] == ["a"]
    assert all(not c.realtime and c.loop for c in cfg.cameras)
    assert cfg.models[0].path == config_file.parent / "tiny.onnx"


def test_bench_config_copies_the_first_camera_with_new_seeds(config_file: Path) -> None:
    cfg = bench_config(_config(config_file), cameras=3)
    assert [c.id for c in cfg.cameras] == ["bench-1", "bench-2", "bench-3"]
    assert [c.source for c in cfg.cameras] == [
        f"sim://conveyor?fps=15&width=320&height=240&seed={i}" for i in (1, 2, 3)
    ]


def test_bench_config_gives_each_copy_its_own_copy_of_the_first_cameras_line(
    config_file: Path,
) -> None:
    data = yaml.safe_load(config_file.read_text())
    data["cameras"][0]["line"] = "line-a"
    data["lines"] = [{"id": "line-a", "cameras": ["a"], "rules": [
        {"type": "stale_camera", "name": "fresh", "max_age_s": 2.0}]}]
    config_file.write_text(yaml.safe_dump(data))
    cfg = bench_config(_config(config_file), cameras=2)
    assert [c.line for c in cfg.cameras] == ["line-a-bench-1", "line-a-bench-2"]
    assert [(ln.id, list(ln.cameras)) for ln in cfg.lines] == [
        ("line-a-bench-1", ["bench-1"]), ("line-a-bench-2", ["bench-2"])
    ]
    assert all(ln.rules[0].name == "fresh" for ln in cfg.lines)
    assert cfg.store.url == "sqlite://"  # the bench's events never touch the real store


@needs_movenet
def test_bench_copies_look_where_the_first_camera_looks(tmp_path: Path) -> None:
    path = tmp_path / "movenet.yaml"
    path.write_text(MOVENET_CONFIG)
    cfg = bench_config(load_config(path, env={}), cameras=3)
    roi = cfg.models[0].adapter.resolved().roi
    first = [[120.0, 20.0, 360.0, 260.0]]
    assert isinstance(roi.boxes, dict)
    assert {k: [list(b) for b in v] for k, v in roi.boxes.items()} == {
        f"bench-{i}": first for i in (1, 2, 3)
    }


@needs_movenet
def test_bench_keeps_the_detector_of_a_top_down_model(tmp_path: Path) -> None:
    detector = build_model(tmp_path / "people.onnx", _rows(1))
    text = MOVENET_CONFIG.replace(
        "      roi:\n        boxes:\n          cam-a: [[120, 20, 360, 260]]\n"
        "          cam-b: [[0, 0, 240, 135], [240, 135, 479, 269]]\n",
        "      roi: {detector: people}\n",
    ).replace("models:\n", f"models:\n  - {{id: people, path: {detector}}}\n", 1)
    assert "detector: people" in text and "id: people" in text
    path = tmp_path / "chain.yaml"
    path.write_text(text)
    cfg = bench_config(load_config(path, env={}), cameras=2)
    assert sorted(m.id for m in cfg.models) == ["movenet", "people"]


def test_bench_config_needs_a_camera(config_file: Path) -> None:
    cfg = _config(config_file).model_copy(update={"cameras": []})
    with pytest.raises(ConfigError, match="at least one enabled camera"):
        bench_config(cfg)


def test_recorder_records_only_while_recording() -> None:
    rec = LatencyRecorder()
    rec.publish({"type": "frame", "age_ms": 5.0, "instances": [{}]})
    rec.begin()
    rec.publish({"type": "frame", "age_ms": 7.0, "instances": [{}, {}]})
    rec.publish({"type": "event", "rule": "belt"})  # events and states have no age
    rec.publish({"type": "state", "line": "line-1"})
    rec.publish({"type": "frame", "age_ms": 9.0, "instances": []})
    rec.end()
    rec.publish({"type": "frame", "age_ms": 11.0, "instances": [{}]})
    assert rec.ages_ms == [7.0, 9.0] and rec.frames == 2 and rec.instances == 2


@pytest.mark.slow
def test_a_short_real_bench(config_file: Path) -> None:
    result = run_bench(config_file, cameras=2, seconds=1.5, warmup_s=0.5, raw_seconds=0.5)
    assert result["cameras"] == 2 and result["batch"] == 2
    # non-realtime cameras paced by the model: the loop batches both cameras' frames
    assert 1.5 <= result["pipeline_batch_mean"] <= 2
    assert result["instances_per_frame"] > 0 and result["acceleration"] is None
    assert result["fps"] > 5 and result["frames"] >= 8
    assert 0 < result["latency_ms_p50"] <= result["latency_ms_p99"] < 1000
    assert result["raw_model_fps"] > 0
    assert result["overhead_ratio"] == pytest.approx(
        result["raw_model_fps"] / result["fps"], rel=0.01
    )
    assert result["provider"] == "CPUExecutionProvider"
    assert result["peak_rss_mb"] > 10 and result["cpu_percent"] > 0
    assert result["machine"]["logical_cpus"] >= 1 and result["machine"]["onnxruntime"]
    assert result["sources"] == "replay of 90 frames" and result["capture_ms_per_frame"] > 0
    assert len(result["raw_model_fps_runs"]) == 2  # before and after the pipeline
    assert result["frames_dropped"] == 0  # non-realtime cameras are paced by the model
    assert result["instances"] == 1 and "single_session_fps" not in result
    assert result["cpu_rewrites"] == {}  # the shipped model's head split is left alone


@pytest.mark.slow
def test_a_bench_of_a_model_with_two_instances(config_file: Path) -> None:
    data = yaml.safe_load(config_file.read_text())
    data["models"][0]["instances"] = 2
    config_file.write_text(yaml.safe_dump(data))
    result = run_bench(config_file, seconds=1.0, warmup_s=0.3, raw_seconds=0.4)
    assert result["instances"] == 2 and result["frames"] >= 5
    # the bare loop runs both sessions side by side; the plain one-session loop beside it
    assert result["raw_model_fps"] > 0 and result["single_session_fps"] > 0


@pytest.mark.slow
def test_a_bench_on_openvino_also_loops_onnxruntime(config_file: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    data = yaml.safe_load(config_file.read_text())
    data["models"][0]["providers"] = ["openvino", "cpu"]
    config_file.write_text(yaml.safe_dump(data))
    result = run_bench(config_file, seconds=1.0, warmup_s=0.3, raw_seconds=0.4)
    assert result["provider"] == "OpenVINO" and result["precision"] == "f32"
    assert result["frames"] >= 5 and result["raw_model_fps"] > 0
    assert result["onnxruntime_raw_fps"] > 0
    assert result["fps_vs_onnxruntime_raw"] == pytest.approx(  # rounded to 3 decimals
        result["fps"] / result["onnxruntime_raw_fps"], rel=0.01, abs=6e-4
    )
    assert result["machine"]["openvino"]


@pytest.mark.slow
def test_bench_cli_runs_the_model_on_the_providers_given(config_file: Path) -> None:
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    args = ["bench", "--config", str(config_file), "--seconds", "1", "--json"]
    result = CliRunner().invoke(app, [*args, "--providers", "openvino,cpu",
                                      "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["provider"] == "OpenVINO" and data["onnxruntime_raw_fps"] > 0
    has_bf16 = {"avx512_bf16", "amx_bf16"} & set(data["machine"]["cpu_flags"])
    assert data["precision"] == ("bf16" if has_bf16 else "f32")  # f32 where the CPU lacks it
    refused = CliRunner().invoke(app, [*args, "--precision", "bf16"])
    assert refused.exit_code == 2 and "add --providers openvino,cpu" in refused.output


@pytest.mark.slow
def test_a_live_bench_reads_the_sources_during_the_run(config_file: Path) -> None:
    result = run_bench(config_file, seconds=1.0, warmup_s=0.3, raw_seconds=0.3, replay_frames=0)
    assert result["sources"] == "live" and result["capture_ms_per_frame"] is None
    assert result["frames"] >= 5


@pytest.mark.slow
def test_bench_cli_prints_one_json_object(config_file: Path) -> None:
    result = CliRunner().invoke(
        app, ["bench", "--config", str(config_file), "--seconds", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("fps", "latency_ms_p50", "latency_ms_p99", "raw_model_fps", "overhead_ratio",
                "cpu_percent", "peak_rss_mb", "provider"):
        assert key in data


def test_bench_cli_bad_config_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras: 3\n")
    result = CliRunner().invoke(app, ["bench", "--config", str(bad), "--json"])
    assert result.exit_code == 2
    assert "error:" in result.output and "Traceback" not in result.output
