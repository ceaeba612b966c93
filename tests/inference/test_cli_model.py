"""``linewatch model inspect`` through the real Typer app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from service.cli import app
from tests.inference.conftest import ModelFactory

runner = CliRunner()


def test_inspect_prints_tensors_metadata_classes_and_adapter(model_factory: ModelFactory) -> None:
    result = runner.invoke(app, ["model", "inspect", str(model_factory())])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "images  uint8  [batch, 240, 320, 3]" in out
    assert "detections  float32  [batch, 8, 21]" in out
    assert "output_format = end2end" in out
    assert "1: flange  keypoints: centre, bolt_1" in out
    assert "adapter: end2end (output_format=end2end" in out


def test_inspect_json_is_one_object(model_factory: ModelFactory) -> None:
    result = runner.invoke(app, ["model", "inspect", "--json", str(model_factory())])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["adapter"] == "end2end"
    assert report["inputs"][0]["shape"] == ["batch", 240, 320, 3]
    assert report["metadata"]["kpt_shape"] == "[5, 3]"
    assert [c["name"] for c in report["classes"]] == ["bracket", "flange", "arm"]
    assert report["dynamic_batch"] is True
    assert report["adapters"][0] == {
        "adapter": "end2end", "accepted": True, "reason": report["adapter_reason"]
    }


def test_inspect_unsupported_model_shows_what_was_found_and_exits_1(
    model_factory: ModelFactory,
) -> None:
    path = model_factory("raw", output_shape=[1, 56, 8400], batch=1,
                         metadata={"output_format": None, "kpt_shape": "[17, 3]"})
    result = runner.invoke(app, ["model", "inspect", "--json", str(path)])
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["adapter"] is None
    assert "[1, 56, 8400]" in report["refusal"]
    assert report["outputs"][0]["shape"] == [1, 56, 8400]


def test_inspect_missing_file_is_one_line_error_without_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["model", "inspect", str(tmp_path / "gone.onnx")])
    assert result.exit_code == 2
    assert "gone.onnx" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.output
