"""The composition root: building from a Config, start, graceful stop, status snapshots."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

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
