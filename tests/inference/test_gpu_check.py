"""scripts/gpu-check: the --cpu dry run works end to end; without a GPU it fails at once."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort
import pytest

from service.inference.session import nvidia_driver_present

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts/gpu-check"
HAS_GPU = nvidia_driver_present() and "CUDAExecutionProvider" in ort.get_available_providers()


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_cpu_dry_run_writes_one_table_with_the_tests_and_a_bench(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "table.json"
    t0 = time.monotonic()
    res = run("--cpu", str(out), timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    table = json.loads(out.read_text())
    assert (table["mode"], table["status"]) == ("cpu", "ok")
    assert table["gpu_tests"]["exit_code"] == 0
    assert "passed" in table["gpu_tests"]["summary"][0]
    [row] = table["runs"]
    assert (row["model"], row["cameras"]) == ("default", 1)
    assert row["result"]["provider"] == "CPUExecutionProvider"
    assert row["result"]["fps"] > 0 and row["result"]["raw_model_fps_runs"]


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without a usable NVIDIA GPU")
def test_without_a_gpu_it_fails_at_once_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    t0 = time.monotonic()
    res = run(str(out), timeout=120)
    assert res.returncode == 2
    assert time.monotonic() - t0 < 90
    table = json.loads(out.read_text())
    assert table["status"] == "failed" and table["runs"] == []
    assert "GPU" in table["note"] and "--cpu" in res.stderr + table["note"]


def test_unknown_option_is_refused() -> None:
    res = run("--gpu-only", timeout=30)
    assert res.returncode == 64 and "unknown option --gpu-only" in res.stderr


@pytest.mark.slow
def test_pipeline_ceiling_runs_a_stand_in_that_answers_what_the_device_graph_did(
    tmp_path: Path,
) -> None:
    import cv2
    import numpy as np

    from tests.inference.test_gpu import raw_pose_model

    model = raw_pose_model(tmp_path / "raw.onnx", anchors=600)
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 10, (320, 240))
    for i in range(40):
        writer.write(np.full((240, 320, 3), (20 + i, 90, 160), np.uint8))
    writer.release()
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts/pipeline-ceiling"), str(model), str(clip),
         "--cameras", "1,2", "--seconds", "1", "--candidates", "100",
         "--linewatch", str(Path(sys.executable).parent / "linewatch")],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    table = json.loads(res.stdout)
    assert table["stand_in"]["output"] == [4 + 1 + 5 * 3, 100]  # the device's best 100 anchors
    assert [r["cameras"] for r in table["runs"]] == [1, 2]
    for row in table["runs"]:
        assert row["fps"] > 0 and row["frames_dropped"] == 0
    assert table["runs"][1]["batch"] == 2
