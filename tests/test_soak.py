"""``linewatch soak``: the pure helpers, argument and start-up errors, and one real run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from service import soak
from service.errors import LineWatchError
from service.soak import (
    SoakError,
    WsStats,
    camera_deltas,
    latency_summary,
    least_squares_slope,
    metric_totals,
    percentile,
    render_summary,
    rss_summary,
    run_soak,
)

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "zoo" / "linewatch-parts-s.onnx"


# --- pure helpers --------------------------------------------------------------------


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = np.random.default_rng(3)
    values = list(rng.gamma(2.0, 10.0, size=257))
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary() -> None:
    assert latency_summary([]) == {"p50": None, "p99": None, "max": None}
    summary = latency_summary([float(v) for v in range(1, 101)])
    assert summary == {"p50": 50.5, "p99": 99.01, "max": 100.0}


def test_least_squares_slope() -> None:
    assert least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    # noise around y = 0.5 x + 7: the fit recovers the slope
    rng = np.random.default_rng(0)
    xs = np.arange(0, 100.0)
    ys = 0.5 * xs + 7 + rng.normal(0, 0.1, xs.size)
    assert least_squares_slope(list(zip(xs, ys, strict=True))) == pytest.approx(0.5, abs=0.01)
    assert least_squares_slope([(1.0, 2.0)]) is None
    assert least_squares_slope([(1.0, 2.0), (1.0, 3.0)]) is None  # vertical: undefined


def test_rss_summary_baseline_growth_slope_and_max() -> None:
    # warm-up to 200 MB (and a 260 MB spike during it), then +1 MB every 10 s
    samples = [(0.0, 150.0), (10.0, 260.0), (20.0, 200.0)]
    samples += [(20.0 + 10 * k, 200.0 + k) for k in range(1, 13)]
    rss = rss_summary(samples, warmup_s=30.0)
    # median of the first three post-warm-up samples: 201, 202, 203
    assert rss["baseline_mb"] == 202.0
    assert rss["end_mb"] == 212.0
    assert rss["growth_pct"] == pytest.approx((212 - 202) / 202 * 100, abs=1e-3)
    assert rss["max_mb"] == 260.0  # the whole run, warm-up included
    assert rss["max_growth_pct"] == pytest.approx((212 - 202) / 202 * 100, abs=1e-3)
    assert rss["slope_mb_per_hour"] == pytest.approx(360.0)  # 1 MB / 10 s
    assert rss["samples_after_warmup"] == 12


def test_rss_summary_median_baseline_ignores_one_outlier_and_flat_is_zero() -> None:
    samples = [(60.0, 300.0), (70.0, 200.0), (80.0, 200.0), (90.0, 200.0), (600.0, 200.0)]
    rss = rss_summary(samples, warmup_s=60.0)
    assert rss["baseline_mb"] == 200.0 and rss["growth_pct"] == 0.0
    assert rss["slope_mb_per_hour"] < 0  # the outlier came first


def test_rss_summary_without_post_warmup_samples_is_a_user_error() -> None:
    with pytest.raises(SoakError, match="warm-up"):
        rss_summary([(0.0, 100.0), (5.0, 101.0)], warmup_s=10.0)
    assert issubclass(SoakError, LineWatchError)


def test_camera_deltas() -> None:
    start = [{"id": "cam-1", "frames_captured": 10, "frames_processed": 9, "frames_dropped": 1,
              "reconnects": 0}]
    end = [
        {"id": "cam-1", "frames_captured": 160, "frames_processed": 157, "frames_dropped": 3,
         "reconnects": 1},
        {"id": "cam-2", "frames_captured": 5, "frames_processed": 5, "frames_dropped": 0,
         "reconnects": 0},
    ]
    assert camera_deltas(start, end) == {
        "cam-1": {"frames_captured": 150, "frames_processed": 148, "frames_dropped": 2,
                  "reconnects": 1},
        "cam-2": {"frames_captured": 5, "frames_processed": 5, "frames_dropped": 0,
                  "reconnects": 0},
    }


def test_metric_totals_sums_linewatch_counters_over_labels() -> None:
    text = "\n".join([
        "# HELP linewatch_frames_dropped_total Frames dropped.",
        "# TYPE linewatch_frames_dropped_total counter",
        'linewatch_frames_dropped_total{camera="cam-1",reason="stale"} 3.0',
        'linewatch_frames_dropped_total{camera="cam-2",reason="stale"} 4.0',
        'linewatch_frames_dropped_created{camera="cam-1",reason="stale"} 1.7e9',
        "# HELP linewatch_websocket_clients Connected websocket clients.",
        "# TYPE linewatch_websocket_clients gauge",
        'linewatch_websocket_clients{stream="frames"} 1.0',
        "# HELP linewatch_camera_fps Measured capture rate.",
        "# TYPE linewatch_camera_fps gauge",
        'linewatch_camera_fps{camera="cam-1"} 15.0',
        "# HELP process_resident_memory_bytes Resident memory size in bytes.",
        "# TYPE process_resident_memory_bytes gauge",
        "process_resident_memory_bytes 2.5e8",
        "",
    ])
    assert metric_totals(text) == {
        "linewatch_frames_dropped_total": 7.0,
        "linewatch_websocket_clients": 1.0,
        "process_resident_memory_bytes": 2.5e8,
    }


def test_ws_stats_counts_dropped_and_frame_latency_only_after_warmup() -> None:
    stats = WsStats(latency_from=time.monotonic() + 3600)  # still warming up
    stats.record(json.dumps({"type": "frame", "capture_ts": time.time(), "dropped": 2}))
    assert stats.messages == 1 and stats.frame_messages == 1 and stats.latencies_ms == []
    stats.latency_from = 0.0
    stats.record(json.dumps({"type": "frame", "capture_ts": time.time() - 0.25}))
    stats.record(json.dumps({"type": "state", "line": "line-1", "dropped": 1}))
    assert stats.messages == 3 and stats.frame_messages == 2 and stats.dropped == 3
    (latency,) = stats.latencies_ms
    assert 250.0 <= latency < 1250.0


def test_render_summary_says_whether_rss_is_flat() -> None:
    result: dict[str, Any] = {
        "seconds": 600.2, "warmup_s": 60.0, "config": "<embedded default>",
        "date": "2026-11-27", "rss_mb_baseline": 230.0, "rss_mb_end": 250.0,
        "rss_growth_pct": 8.696, "rss_flat": False, "rss_floor_pct": 5.0,
        "rss_mb_max": 251.0, "rss_slope_mb_per_hour": 12.5, "ws_messages": 18000,
        "ws_latency_ms_p50": 11.0, "ws_latency_ms_p99": 30.0, "ws_dropped": 0,
        "ws_reconnects": 0, "churn_connects": 590, "churn_messages": 17000, "churn_errors": 0,
        "frames_captured": {"cam-1": 9000}, "frames_dropped": {"cam-1": 2},
        "server_exit_code": 0, "server_stopped_in_time": True, "server_log_traceback": False,
        "samples": [[0.0, 220.0], [600.2, 250.0]],
    }
    text = render_summary(result)
    assert "+8.70 %, NOT flat" in text and "+12.50 MB/h" in text
    assert "cam-1 9000 captured / 2 dropped" in text and "exit code 0" in text
    result.update(rss_growth_pct=1.0, rss_flat=True, rss_slope_mb_per_hour=None)
    assert "+1.00 %, flat" in render_summary(result)


# --- errors before and during start-up -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seconds": 10, "warmup": 10}, "--warmup"),
        ({"seconds": 10, "warmup": -1}, "--warmup"),
        ({"seconds": 10, "warmup": 1, "sample_every": 0}, "positive"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(SoakError, match=needle):
        run_soak(None, **kwargs)


def _cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
        timeout=timeout, cwd=cwd, env={**env, "PYTHONPATH": str(REPO)},
    )


def test_bad_config_is_a_one_paragraph_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cameras:\n  - id: Cam 1\n    source: sim://conveyor\nmodels: []\n")
    result = _cli("soak", "--config", str(bad), "--seconds", "5", "--warmup", "1",
                  cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and "bad.yaml" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def _small_config(tmp_path: Path, *, source: str = "sim://conveyor?seed={seed}&fps=15"
                  "&width=320&height=240") -> Path:
    if not SHIPPED_MODEL.is_file():
        pytest.skip(f"the shipped model {SHIPPED_MODEL} is missing")
    data = {
        "cameras": [{"id": f"cam-{i}", "source": source.format(seed=i)} for i in (1, 2)],
        "models": [{"id": "parts", "path": str(SHIPPED_MODEL), "warmup_runs": 1}],
        "store": {"url": "sqlite:///linewatch.db"},
    }
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_server_that_never_gets_ready_is_an_error_and_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nothing listens on port 1: the cameras never come up, so /readyz never says ready
    config = _small_config(tmp_path, source="rtsp://127.0.0.1:1/none{seed}")
    started: list[soak.ServerProcess] = []
    real = soak.ServerProcess

    def recording(*args: Any, **kwargs: Any) -> soak.ServerProcess:
        server = real(*args, **kwargs)
        started.append(server)
        return server

    monkeypatch.setattr(soak, "ServerProcess", recording)
    with pytest.raises(SoakError, match="not ready"):
        run_soak(config, seconds=5, warmup=1, ready_timeout=6)
    (server,) = started
    assert server.proc.poll() is not None, "the server subprocess must not outlive the error"


@pytest.mark.slow
def test_port_in_use_is_an_error(tmp_path: Path) -> None:
    config = _small_config(tmp_path)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("soak", "--config", str(config), "--port", str(port), "--seconds", "5",
                      "--warmup", "1", cwd=tmp_path, timeout=240)
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr.splitlines()[-1]
    assert err.startswith("error: linewatch serve"), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# --- a real run -------------------------------------------------------------------------


@pytest.mark.slow
def test_soak_end_to_end(tmp_path: Path) -> None:
    config = _small_config(tmp_path)
    result = _cli("soak", "--config", str(config), "--seconds", "25", "--warmup", "8",
                  "--sample-every", "2", "--json", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)

    assert 25 <= out["seconds"] < 30 and out["warmup_s"] == 8
    times = [t for t, _ in out["samples"]]
    assert times == sorted(times) and times[0] < 1 and times[-1] >= 25 and len(times) >= 13
    assert all(mb > 50 for _, mb in out["samples"])
    # the summary is computed from the samples it reports
    after = [mb for t, mb in out["samples"] if t >= 8]
    baseline = float(np.median(after[:3]))
    assert out["rss_mb_baseline"] == pytest.approx(baseline, abs=0.01)
    assert out["rss_mb_end"] == after[-1]
    assert out["rss_mb_max"] == max(mb for _, mb in out["samples"])
    assert out["rss_growth_pct"] == pytest.approx((after[-1] - baseline) / baseline * 100,
                                                  abs=1e-2)
    assert isinstance(out["rss_slope_mb_per_hour"], float)

    assert out["ws_messages"] > 100 and out["ws_frame_messages"] > 100
    assert 0 < out["ws_latency_ms_p50"] <= out["ws_latency_ms_p99"] <= out["ws_latency_ms_max"]
    assert out["ws_dropped"] >= 0 and out["ws_reconnects"] == 0
    assert out["churn_connects"] >= 10 and out["churn_messages"] > 0
    assert set(out["frames_captured"]) == {"cam-1", "cam-2"}
    assert all(n > 100 for n in out["frames_captured"].values())  # ~15 fps for 25 s
    assert out["metrics"]["linewatch_frames_processed_total"] > 0
    assert out["server_exit_code"] == 0 and out["server_stopped_in_time"]
    assert not out["server_log_traceback"]
    assert out["machine"]["logical_cpus"] >= 1 and out["date"]
    # the store lived in a temporary directory, never the working directory's linewatch.db
    assert not (tmp_path / "linewatch.db").exists()
