"""The composition root: building from a Config, start, graceful stop, status snapshots."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.app import JsonLogFormatter, Runtime, api_settings, masked_config
from service.bus import Hub, HubClosed
from service.config import ConfigError, load_config
from service.errors import ModelError, SourceError
from service.sim import Scene
from tests.api.conftest import RuntimeFactory, runtime_config, wait_for, wait_for_frames
from tests.inference.onnx_factory import build_model

SIM = "sim://conveyor?seed={}&fps=20&width=320&height=240"


@pytest.fixture
def runtime_factory(tmp_path: Path) -> Iterator[RuntimeFactory]:
    factory = RuntimeFactory(tmp_path)
    yield factory
    factory.close()


def test_start_status_and_graceful_stop(runtime_factory) -> None:
    runtime, hub = runtime_factory(start=False)
    sub = hub.subscribe(types={"frame"}, maxsize=10_000)
    runtime.start()
    wait_for_frames(runtime)
    wait_for(lambda: runtime.status.readiness().ready, 10, "ready")
    cams = {c.id: c for c in runtime.status.cameras()}
    assert set(cams) == {"cam-1", "cam-2"} and cams["cam-1"].state == "up"
    assert runtime.status.camera("nope") is None
    (model,) = runtime.status.models()
    assert model.provider == "CPUExecutionProvider" and model.max_batch == 8
    runtime.stop()
    runtime.stop()  # idempotent
    assert not any(loop.running for loop in runtime.loops)
    assert all(c.state == "stopped" for c in runtime.status.cameras())
    assert not runtime.status.readiness().ready
    # the hub is closed: queued messages are still delivered, then the subscription ends
    delivered = 0
    with pytest.raises(HubClosed):
        while True:
            sub.get_nowait()
            delivered += 1
    processed = sum(c.frames_processed for c in runtime.status.cameras())
    assert delivered == processed > 0


def test_models_load_before_anything_starts(tmp_path: Path) -> None:
    bad = build_model(tmp_path / "bad.onnx", output_shape=[1, 7, 3])
    config = runtime_config(bad, {"cam-1": SIM.format(1)})
    with pytest.raises(ModelError) as info:
        Runtime.build(config, Hub())
    message = str(info.value)
    assert "bad.onnx" in message and "\n" not in message.strip()


def test_a_missing_model_file_is_a_model_error(tmp_path: Path) -> None:
    config = runtime_config(tmp_path / "nope.onnx", {"cam-1": SIM.format(1)})
    with pytest.raises(ModelError, match="does not exist"):
        Runtime.build(config, Hub())


def test_a_bad_source_is_a_source_error(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    config = runtime_config(model, {"cam-1": "sim://no-such-scenario"})
    with pytest.raises(SourceError, match="no-such-scenario"):
        Runtime.build(config, Hub())


def test_load_config_reports_a_missing_model_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "cameras:\n  - id: cam-1\n    source: sim://conveyor\nmodels:\n"
        "  - id: m\n    path: nope.onnx\n"
    )
    with pytest.raises(ConfigError, match="nope.onnx"):
        load_config(cfg, env={})


def test_config_and_api_settings_mask_secrets(tmp_path: Path) -> None:
    model = build_model(tmp_path / "m.onnx")
    config = runtime_config(
        model, {"cam-1": "rtsp://u:secret@10.0.0.1/s"},
        auth={
            "enabled": True,
            "tokens": [{"token": "tok-r"}, {"token": "tok-a", "scope": "admin"}],
        },
    )
    data = masked_config(config)
    assert "secret" not in str(data) and "tok-r" not in str(data) and "tok-a" not in str(data)
    auth = api_settings(config).auth
    assert auth.check("Bearer tok-r", "read").allowed
    assert auth.check("Bearer tok-r", "admin").status == 403
    assert auth.check("Bearer tok-a", "read").allowed
    assert auth.check("Bearer tok-a", "admin").allowed
    assert auth.check(None, "read").status == 401
    assert not api_settings(runtime_config(model, {"cam-1": SIM.format(1)})).auth.enabled


def test_sim_t_names_the_frame_the_camera_rendered(runtime_factory) -> None:
    runtime, _ = runtime_factory({"cam-1": SIM.format(7)})
    wait_for_frames(runtime)
    runtime.stop()
    latest = runtime.latest.get("cam-1")
    assert latest is not None
    image, _ = Scene("conveyor", seed=7, width=320, height=240, fps=20).render_at(
        latest.message["sim_t"]
    )
    diff = np.abs(image.astype(np.int16) - latest.frame.image.astype(np.int16))
    assert float(diff.mean()) < 0.5, "the truth at sim_t is the truth of this very frame"


def test_json_log_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("service.x", logging.ERROR, __file__, 1, "camera %s down",
                                   ("cam-1",), sys.exc_info())
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["level"] == "ERROR" and entry["logger"] == "service.x"
    assert entry["message"] == "camera cam-1 down" and entry["time"].endswith("Z")
    assert "ValueError: boom" in entry["exception"]


# --- lines: engines, store, recorder and ticker (issue 5) -------------------------------

WHOLE = [[-1e4, -1e4], [1e4, -1e4], [1e4, 1e4], [-1e4, 1e4]]


def test_a_runtime_with_lines_judges_stores_and_publishes(runtime_factory) -> None:
    lines = [
        {"id": "line-1", "rules": [
            {"type": "zone_intrusion", "name": "anything", "units": "px", "zone": WHOLE},
        ]},
        {"id": "line-2", "rules": []},  # no camera feeds it: UNKNOWN, still ticked
    ]  # fmt: skip
    runtime, hub = runtime_factory(start=False, lines=lines)
    sub = hub.subscribe(types={"event", "state"})
    runtime.start()
    wait_for(lambda: (runtime.status.line("line-1") or {}).get("state") == "FAULT", 15, "FAULT")
    wait_for(lambda: (runtime.status.line("line-2") or {}).get("state") == "UNKNOWN", 15, "tick")
    assert [ln["line"] for ln in runtime.status.lines()] == ["line-1", "line-2"]
    assert runtime.status.line("nope") is None
    store = runtime.store
    assert store is not None
    stored, _ = store.list(line="line-1")
    assert ("anything", "violated") in [(e.name, e.new) for e in stored]
    # the line/rule metrics move with the rules (the engine sets them)
    assert REGISTRY.get_sample_value(
        "linewatch_line_state", {"line": "line-1", "state": "FAULT"}) == 1.0
    assert REGISTRY.get_sample_value(
        "linewatch_line_state", {"line": "line-1", "state": "RUNNING"}) == 0.0
    assert REGISTRY.get_sample_value(
        "linewatch_rule_violated",
        {"line": "line-1", "rule": "anything", "type": "zone_intrusion"}) == 1.0
    time.sleep(1.2)  # at least one tick: every line's state, changed or not
    runtime.stop()
    messages = []
    with pytest.raises(HubClosed):
        while True:
            m = sub.get_nowait()
            if m is not None:
                messages.append(m)
    events = [m for m in messages if m["type"] == "event"]
    assert [m["cursor"] for m in events] == list(range(1, len(events) + 1))
    assert {m["line"] for m in messages if m["type"] == "state"} == {"line-1", "line-2"}
    frame_engines = {f.camera_id: f.stages.engine for loop in runtime.loops for f in loop._feeds
                     if f.stages is not None}
    assert frame_engines["cam-1"] is runtime.engines["line-1"]


def test_a_camera_its_line_does_not_list_is_not_judged(tmp_path: Path) -> None:
    """(bench copies cameras without touching the lines: they are tracked, not judged)"""
    model = build_model(tmp_path / "m.onnx")
    config = runtime_config(
        model, {"cam-1": SIM.format(1)}, store_url=f"sqlite:///{tmp_path / 'e.db'}",
        lines=[{"id": "line-1", "cameras": ["cam-1"], "rules": []}],
    )
    data = config.model_dump(mode="python", by_alias=True)
    data["cameras"][0]["id"] = "copy-1"
    copied = type(config).model_validate(data, context={"cross_checked": True})
    runtime = Runtime.build(copied, Hub())
    try:
        (feed,) = runtime.loops[0]._feeds
        assert feed.stages is not None and feed.stages.engine is None
    finally:
        runtime.stop()


# --- bring your own model: a top-down model on fixed ROIs per camera --------------------

SHARED = Path(__file__).resolve().parents[1] / "../shared/data"
MOVENET = SHARED / "models" / "movenet" / "movenet_singlepose_lightning_int8_4_dequant.onnx"
CLIP = SHARED / "videos" / "intel_worker-zone-detection_preview_h264.mp4"  # 480x270, a worker
COCO17 = ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
          "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
          "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle"]
MOVENET_CONFIG = f"""
cameras:
  - {{id: cam-a, source: "{CLIP}", model: movenet, realtime: false}}
  - {{id: cam-b, source: "{CLIP}", model: movenet, realtime: false}}
models:
  - id: movenet
    path: {MOVENET}
    score_threshold: 0.0
    warmup_runs: 1
    adapter:
      kind: regression
      input: {{layout: NHWC, color: RGB, dtype: uint8, normalization: in-graph, resize: stretch}}
      output:
        coords: normalized
        axis_order: yx
        class_name: person
        keypoint_names: {COCO17}
      roi:
        boxes:
          cam-a: [[120, 20, 360, 260]]
          cam-b: [[0, 0, 240, 135], [240, 135, 479, 269]]
store: {{url: "sqlite://"}}
"""
needs_movenet = pytest.mark.skipif(
    not MOVENET.exists() or not CLIP.exists(),
    reason="../shared/data (MoveNet model, worker-zone clip) is absent",
)


@needs_movenet
def test_runtime_runs_a_top_down_model_on_each_cameras_rois(tmp_path: Path) -> None:
    path = tmp_path / "movenet.yaml"
    path.write_text(MOVENET_CONFIG)
    config = load_config(path, env={})
    hub = Hub()
    sub = hub.subscribe(types={"frame"}, maxsize=10_000)
    runtime = Runtime.build(config, hub)
    (model,) = runtime.status.models()
    assert model.classes[0].name == "person" and model.classes[0].keypoints == COCO17
    assert model.keypoints == 17
    assert runtime.models["movenet"].model.adapter_reason.startswith("forced by config")
    runtime.start()
    seen: dict[str, list[dict]] = {"cam-a": [], "cam-b": []}
    try:
        deadline = time.monotonic() + 30
        while min(len(v) for v in seen.values()) < 3:
            assert time.monotonic() < deadline, {k: len(v) for k, v in seen.items()}
            msg = sub.get_blocking(1.0)
            if msg is not None:
                seen[msg["camera"]].append(msg)
    finally:
        runtime.stop()
    for msg in seen["cam-a"]:
        (inst,) = msg["instances"]  # one ROI on cam-a
        assert inst["class"] == "person" and list(inst["keypoints"]) == COCO17
        assert np.allclose(inst["box"], [120, 20, 360, 260], atol=1.0)  # the ROI (tracked)
        nose = inst["keypoints"]["nose"]
        assert 120 <= nose["x"] <= 360 and 20 <= nose["y"] <= 260  # in the ROI, frame px
        assert 0.0 <= nose["score"] <= 1.0
    for msg in seen["cam-b"]:  # two ROIs on cam-b
        boxes = sorted(i["box"] for i in msg["instances"])
        assert np.allclose(boxes, [[0, 0, 240, 135], [240, 135, 479, 269]], atol=1.0)


@needs_movenet
def test_a_forced_adapter_that_does_not_fit_is_refused_at_load(tmp_path: Path) -> None:
    text = MOVENET_CONFIG.replace("kind: regression", "kind: simcc").replace(
        "      output:\n        coords: normalized\n        axis_order: yx\n",
        "      output:\n")
    path = tmp_path / "wrong.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:  # config check reads the file: line and reason
        load_config(path, env={})
    message = str(info.value)
    assert f"{path}:10: models[0].adapter: " in message
    assert "does not fit the configured adapter 'simcc'" in message
    assert "1 outputs, expected 2 (simcc_x, simcc_y)" in message
    config = load_config(path, env={}, check_files=False)  # and loading the model refuses it
    with pytest.raises(ModelError, match="does not fit the configured adapter 'simcc'"):
        Runtime.build(config, Hub())


def test_a_fixed_batch_model_says_its_cameras_cannot_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cams = {"cam-1": SIM.format(1), "cam-2": SIM.format(2)}
    fixed = build_model(tmp_path / "fixed.onnx", batch=1)
    with caplog.at_level(logging.INFO, logger="service.app"):
        runtime = Runtime.build(runtime_config(fixed, cams, model={"max_batch": 4}), Hub())
    assert runtime.models["tiny"].max_batch == 1
    warned = [r for r in caplog.records if "fixed batch of 1" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    assert "its 2 cameras run in batches of 1, not up to max_batch 4" in warned[0].getMessage()
    caplog.clear()
    dynamic = build_model(tmp_path / "dynamic.onnx")
    with caplog.at_level(logging.INFO, logger="service.app"):
        runtime = Runtime.build(runtime_config(dynamic, cams, model={"max_batch": 4}), Hub())
    assert runtime.models["tiny"].max_batch == 4
    assert "fixed batch" not in caplog.text
