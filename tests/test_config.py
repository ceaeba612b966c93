"""service.config: YAML -> pydantic with file:line errors, env overrides, the default."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper
from pydantic import ValidationError
from typer.testing import CliRunner

from service.cli import app
from service.config import (
    Config,
    ConfigInvalid,
    check_config,
    default_config_text,
    dump_config,
    load_config,
)
from service.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models/zoo/linewatch-parts-s.onnx"

WriteConfig = Callable[..., Path]
Cli = Callable[..., tuple[int, str]]


def _tiny_onnx(path: Path) -> Path:
    """A real (identity) ONNX model file."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph), str(path))
    return path


@pytest.fixture
def write_config(tmp_path: Path) -> WriteConfig:
    """Write YAML (dedented) to tmp/conf/<name>, next to a real model at conf/m.onnx."""
    _tiny_onnx(tmp_path / "conf" / "m.onnx")

    def write(text: str, name: str = "config.yaml") -> Path:
        path = tmp_path / "conf" / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


GOOD = """
cameras:
  - id: cam-1
    source: "sim://conveyor?seed=1"
    model: parts
  - id: cam-2
    source: /dev/video0
    model: parts
models:
  - id: parts
    path: m.onnx
api:   {host: 127.0.0.1, port: 8000}
bus:   {url: "memory://"}
store: {url: "sqlite:///linewatch.db"}
"""


def _errors(path: Path, **env: str) -> list[str]:
    return [str(issue) for issue in check_config(path, env=env).issues]


# --- valid files and defaults ------------------------------------------------------


def test_good_config_loads_with_defaults(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    config = load_config(path, env={})
    assert [c.id for c in config.cameras] == ["cam-1", "cam-2"]
    assert config.model_for("cam-2").id == "parts"
    assert config.cameras[0].line == "line-1"
    assert config.cameras[0].backoff.max_s >= config.cameras[0].backoff.initial_s
    assert config.models[0].providers == "auto"
    assert config.api.port == 8000 and not config.api.auth.enabled
    assert config.bus.frame_queue == 64


def test_model_path_resolves_against_config_dir(
    write_config: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(GOOD)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("../conf/config.yaml"), env={})
    assert config.models[0].path == (tmp_path / "conf" / "m.onnx").resolve()
    assert config.models[0].path.is_file()
    assert path.exists()


def test_single_model_is_the_default_for_every_camera(write_config: WriteConfig) -> None:
    path = write_config("""
        cameras:
          - {id: a, source: "sim://conveyor?seed=1"}
        models:
          - {id: only, path: m.onnx}
    """)
    assert load_config(path, env={}).cameras[0].model == "only"


def test_providers_accept_auto_list_and_comma_string(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - {id: a, path: m.onnx, providers: [TensorRT, cuda, cpu]}
          - {id: b, path: m.onnx, providers: "cuda, cpu"}
    """)
    config = load_config(path, env={})
    assert config.models[0].providers == ["tensorrt", "cuda", "cpu"]
    assert config.models[1].ort_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_default_config_text_is_the_documented_default() -> None:
    text = default_config_text()
    assert text.lstrip().startswith("#")  # documented with comments
    data = yaml.safe_load(text)
    assert [c["source"] for c in data["cameras"]] == [
        "sim://conveyor?seed=1&fps=15",
        "sim://conveyor?seed=2&fps=15",
    ]
    assert data["models"][0]["path"] == "models/zoo/linewatch-parts-s.onnx"
    assert data["api"] == {"host": "127.0.0.1", "port": 8000, "auth": {"enabled": False}}
    assert data["bus"]["url"] == "memory://"
    assert data["store"]["url"].startswith("sqlite:///")


def test_default_config_resolves_model_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    report = check_config(None, env={}, check_files=False)
    assert report.ok, report.issues
    assert report.config is not None
    assert report.config.models[0].path == SHIPPED_MODEL
    assert len(report.config.cameras) == 2


def test_default_config_loads_and_round_trips(tmp_path: Path) -> None:
    if not SHIPPED_MODEL.is_file():
        pytest.skip(f"the shipped model {SHIPPED_MODEL} is not there yet (issue 2)")
    config = load_config(None, env={})
    dumped = tmp_path / "effective.yaml"
    dumped.write_text(dump_config(config), encoding="utf-8")
    assert load_config(dumped, env={}) == config


def test_round_trip_of_a_full_config(write_config: WriteConfig, tmp_path: Path) -> None:
    path = write_config("""
        cameras:
          - id: cam-1
            source: "rtsp://user:pw@10.0.0.5/stream"
            fps: 12.5
            realtime: false
            backoff: {initial_s: 1, max_s: 8}
        models:
          - {id: parts, path: m.onnx, providers: [cuda, cpu], intra_op_threads: 1}
        api:
          auth: {enabled: true, tokens: [{token: s3cret-token, scope: admin}]}
          cors_origins: ["http://localhost:3000"]
        logging: {level: debug, json: true}
    """)
    config = load_config(path, env={})
    assert config.logging.level == "DEBUG" and config.logging.json_
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config), encoding="utf-8")
    assert load_config(again, env={}) == config


def test_programmatic_config_rejects_dangling_model() -> None:
    with pytest.raises(ValidationError, match=r"cameras\[0\]\.model: unknown model 'nope'"):
        Config.model_validate({
            "cameras": [{"id": "a", "source": "sim://conveyor", "model": "nope"}],
            "models": [{"id": "m", "path": "/x.onnx"}, {"id": "n", "path": "/y.onnx"}],
        })


# --- errors with exact lines ---------------------------------------------------------


def test_unknown_key_names_line_and_suggests(write_config: WriteConfig) -> None:
    path = write_config("""
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
        models:
          - {id: parts, path: m.onnx}
        api:
          host: 127.0.0.1
          prot: 8000
    """)
    errors = _errors(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:8: api.prot: unknown key (did you mean 'port'?)")


def test_missing_field_points_at_the_list_item(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - id: parts
            path: m.onnx
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
          - id: cam-2
            fps: 10
    """)
    assert _errors(path) == [f"{path}:7: cameras[1].source: Field required"]


def test_duplicate_camera_id(write_config: WriteConfig) -> None:
    path = write_config("""
        models: [{id: parts, path: m.onnx}]
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
          - id: cam-1
            source: "sim://conveyor?seed=2"
    """)
    assert _errors(path) == [f"{path}:5: cameras[1].id: duplicate id 'cam-1' (also cameras[0])"]


def test_bad_camera_id(write_config: WriteConfig) -> None:
    path = write_config("""
        models: [{id: parts, path: m.onnx}]
        cameras:
          - source: "sim://conveyor?seed=1"
            id: Cam 1
    """)
    errors = _errors(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:4: cameras[0].id: 'Cam 1' is not a valid id")


def test_dangling_camera_model(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - {id: parts, path: m.onnx}
          - {id: arms, path: m.onnx}
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
            model: bolts
          - id: cam-2
            source: "sim://conveyor?seed=2"
    """)
    assert _errors(path) == [
        f"{path}:7: cameras[0].model: unknown model 'bolts' (models: parts, arms)",
        f"{path}:8: cameras[1].model: required when more than one model is configured "
        "(models: parts, arms)",
    ]


def test_yaml_syntax_error_has_its_line(write_config: WriteConfig) -> None:
    path = write_config("""
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1
        models: []
    """)
    errors = _errors(path)
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}:")
    assert "YAML syntax error" in errors[0]
    line = int(errors[0][len(str(path)) + 1 :].split(":", 1)[0])
    assert line in (3, 4, 5)  # where the scanner notices the unterminated string


def test_duplicate_yaml_key_is_an_error(write_config: WriteConfig) -> None:
    path = write_config("""
        api:
          port: 8000
          port: 9000
    """)
    assert _errors(path) == [f"{path}:3: api.port: duplicate key (first defined at line 2)"]


def test_missing_model_file_is_an_error_naming_the_path(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - id: parts
            path: zoo/missing.onnx
        api: {port: 70000}
    """)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    lines = str(info.value).splitlines()
    missing = path.parent / "zoo" / "missing.onnx"
    assert lines == [
        f"{path}:3: models[0].path: model file not found: {missing}",
        f"{path}:4: api.port: Input should be less than or equal to 65535 (got 70000)",
    ]
    assert isinstance(info.value, ConfigInvalid) and len(info.value.issues) == 2


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_top_level_must_be_a_mapping(write_config: WriteConfig) -> None:
    path = write_config("- just\n- a list\n")
    assert _errors(path) == [f"{path}:1: the top level must be a mapping of sections, got a list"]


def test_auth_enabled_needs_tokens(write_config: WriteConfig) -> None:
    path = write_config("""
        api:
          auth:
            enabled: true
    """)
    errors = _errors(path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:2: api.auth: auth is enabled")


# --- environment overrides -------------------------------------------------------------


def test_env_overrides_are_applied(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    config = load_config(path, env={
        "LINEWATCH_API__PORT": "9000",
        "LINEWATCH_STORE__URL": "sqlite:////var/lib/linewatch/lw.db",
        "LINEWATCH_CAMERAS__0__SOURCE": "rtsp://10.0.0.7/live",
        "LINEWATCH_CAMERAS__1__REALTIME": "false",
        "LINEWATCH_MODELS__0__PROVIDERS": "[cuda, cpu]",
        "LINEWATCH_API__AUTH__ENABLED": "true",
        "LINEWATCH_API__AUTH__TOKENS__0__TOKEN": "from-a-secret",
        "LINEWATCH_API__AUTH__TOKENS__0__SCOPE": "admin",
        "LINEWATCH_CONFIG": "not/a/config/key",  # not an override: ignored
        "OTHER_API__PORT": "1",
    })
    assert config.api.port == 9000
    assert config.store.url == "sqlite:////var/lib/linewatch/lw.db"
    assert config.cameras[0].source == "rtsp://10.0.0.7/live"
    assert config.cameras[1].realtime is False
    assert config.models[0].providers == ["cuda", "cpu"]
    assert config.api.auth.enabled
    assert [(t.token, t.scope) for t in config.api.auth.tokens] == [("from-a-secret", "admin")]


def test_env_can_add_a_camera(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    config = load_config(path, env={
        "LINEWATCH_CAMERAS__2__ID": "cam-3",
        "LINEWATCH_CAMERAS__2__SOURCE": "/data/clip.mp4",
        "LINEWATCH_CAMERAS__2__MODEL": "parts",
    })
    assert [c.id for c in config.cameras] == ["cam-1", "cam-2", "cam-3"]


def test_env_override_with_bad_value_names_the_variable(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    assert _errors(path, LINEWATCH_API__PORT="eighty") == [
        "environment variable LINEWATCH_API__PORT: api.port: Input should be a valid integer, "
        "unable to parse string as an integer (got 'eighty')"
    ]


def test_env_errors_for_unknown_section_and_index(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    errors = _errors(path, LINEWATCH_APII__PORT="1", LINEWATCH_CAMERAS__7__SOURCE="x")
    assert errors == [
        "environment variable LINEWATCH_APII__PORT: apii: unknown config section "
        "(did you mean 'api'?); sections are api, bus, cameras, lines, logging, models, store",
        "environment variable LINEWATCH_CAMERAS__7__SOURCE: cameras[7]: index out of range: "
        "cameras has 2 items (use 2 to add one)",
    ]


def test_env_missing_key_in_new_camera_blames_the_variable(write_config: WriteConfig) -> None:
    path = write_config(GOOD)
    errors = _errors(path, LINEWATCH_CAMERAS__2__ID="cam-3")
    assert errors == [
        "environment variable LINEWATCH_CAMERAS__2__ID: cameras[2].source: Field required"
    ]


# --- linewatch config ... ----------------------------------------------------------------


@pytest.fixture
def cli() -> Cli:
    runner = CliRunner()

    def invoke(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args), env={"LINEWATCH_API__PORT": None})
        return result.exit_code, result.output

    return invoke


def test_cli_config_default_prints_the_default(cli: Cli) -> None:
    code, out = cli("config", "default")
    assert code == 0
    assert out == default_config_text()


def test_cli_config_check_ok(write_config: WriteConfig, cli: Cli) -> None:
    code, out = cli("config", "check", str(write_config(GOOD)))
    assert (code, out) == (0, "ok: 2 cameras, 1 models\n")


def test_cli_config_check_prints_every_error(
    write_config: WriteConfig, cli: Cli
) -> None:
    path = write_config("""
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
            model: nope
          - id: BAD
            source: "sim://conveyor?seed=1"
        models:
          - {id: parts, path: m.onnx, warmup: 3}
    """)
    code, out = cli("config", "check", str(path))
    assert code == 1
    lines = out.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [f"{path}:4", "cameras[0].model"],
        [f"{path}:5", "cameras[1].id"],
        [f"{path}:8", "models[0].warmup"],
    ]
    assert "Traceback" not in out


def test_cli_config_check_json(write_config: WriteConfig, cli: Cli) -> None:
    path = write_config("api: {port: x}\n")
    code, out = cli("config", "check", "--json", str(path))
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert report["errors"][0]["line"] == 1
    assert report["errors"][0]["location"] == "api.port"


def test_cli_config_check_missing_file(tmp_path: Path, cli: Cli) -> None:
    code, out = cli("config", "check", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert out == f"{tmp_path / 'nope.yaml'}: config file not found\n"


def test_alias_bomb_is_refused(write_config: WriteConfig) -> None:
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    path = write_config("\n".join(rows) + "\n")
    errors = _errors(path)
    assert len(errors) == 1 and "expands (through aliases)" in errors[0]


# --- lines, calibration and trackers (issue 5) ----------------------------------------


def test_lines_calibration_and_tracker_load(write_config: WriteConfig) -> None:
    path = write_config("""
        models: [{id: parts, path: m.onnx}]
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
            line: belt-a
            calibration:
              points: [[0, 0, 0, 0], [100, 0, 50, 0], [100, 100, 50, 50], [0, 100, 0, 50]]
            tracker: {min_hits: 2, one_euro: {min_cutoff: 0.5}}
        lines:
          - id: belt-a
            cameras: [cam-1]
            rules:
              - {type: presence, name: station, camera: cam-1,
                 zone: [[0, 0], [10, 0], [10, 10]]}
    """)
    config = load_config(path, env={})
    cam = config.camera("cam-1")
    assert cam.calibration is not None and cam.calibration.points is not None
    assert cam.tracker.min_hits == 2 and cam.tracker.one_euro.min_cutoff == 0.5
    assert config.line("belt-a").rules[0].name == "station"
    assert config.line_cameras("belt-a") == ["cam-1"]
    assert load_config(path, env={}).camera("cam-1").line == "belt-a"


def test_a_cameras_pose_filter_loads_reaches_its_stages_and_is_checked(
    write_config: WriteConfig,
) -> None:
    from service.app import camera_stages

    text = """
        models: [{id: parts, path: m.onnx}]
        cameras:
          - id: cam-1
            source: "sim://conveyor?seed=1"
            calibration:
              points: [[0, 0, 0, 0], [100, 0, 50, 0], [100, 100, 50, 50], [0, 100, 0, 50]]
            pose_filter: {drift_deg: 0.1, max_residual_mm: null}
    """
    cam = load_config(write_config(text), env={}).camera("cam-1")
    assert cam.pose_filter.drift_deg == 0.1 and cam.pose_filter.max_residual_mm is None
    stages = camera_stages(cam, [], {}, None)
    assert stages.pose is not None and stages.pose.smoothing == cam.pose_filter
    default = load_config(write_config(text.replace(
        "            pose_filter: {drift_deg: 0.1, max_residual_mm: null}\n", "")), env={})
    assert default.camera("cam-1").pose_filter.max_residual_mm == 3.0
    bad = write_config(text.replace("drift_deg: 0.1", "drift: 0.1"))
    errors = _errors(bad)
    assert len(errors) == 1 and errors[0].startswith(f"{bad}:7: cameras[0].pose_filter.drift:")


def test_rule_and_line_cameras_must_exist_and_feed_the_line(write_config: WriteConfig) -> None:
    path = write_config("""
        models: [{id: parts, path: m.onnx}]
        cameras:
          - {id: cam-1, source: "sim://conveyor", line: line-1}
          - {id: cam-2, source: "sim://conveyor", line: line-2}
        lines:
          - id: line-1
            cameras: [cam-1, cam-2]
            rules:
              - {type: stale_camera, name: fresh, camera: cam-9}
          - id: line-1
    """)
    errors = _errors(path)
    assert errors[0] == (
        f"{path}:6: lines[0]: rule 'fresh' names camera(s) cam-9 that are not cameras of "
        "line 'line-1' (cam-1, cam-2)"
    )
    assert errors[1:] == [
        f"{path}:7: lines[0].cameras[1]: camera 'cam-2' feeds line 'line-2', not 'line-1': "
        "set its 'line: line-1' or move the rule to line 'line-2'",
        f"{path}:9: lines[0].rules[0].camera: unknown camera 'cam-9' (cameras: cam-1, cam-2)",
        f"{path}:10: lines[1].id: duplicate id 'line-1' (also lines[0])",
    ]


def test_bad_rule_and_calibration_name_their_lines(write_config: WriteConfig) -> None:
    path = write_config("""
        models: [{id: parts, path: m.onnx}]
        cameras:
          - id: cam-1
            source: "sim://conveyor"
            calibration: {camera_matrix: [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}
        lines:
          - id: line-1
            rules:
              - {type: orientation, name: upright, tolerance_deg: 200}
    """)
    errors = _errors(path)
    assert errors[0].startswith(f"{path}:5: cameras[0].calibration: ")
    assert "needs 'points'" in errors[0]
    assert errors[1].startswith(f"{path}:9: lines[0].rules[0].orientation.tolerance_deg: ")


def test_the_default_config_has_a_calibrated_line_per_sim_camera() -> None:
    import numpy as np

    from service.geometry import Homography
    from service.sim import Scene

    config = load_config(None, env={}, check_files=False)
    assert [(ln.id, ln.cameras) for ln in config.lines] == [
        ("line-1", ["cam-1"]), ("line-2", ["cam-2"])
    ]
    assert {r.type for r in config.lines[0].rules} == {
        "stale_camera", "presence", "position", "orientation", "throughput", "conveyor",
        "zone_intrusion", "joint_range", "stall",
    }
    for cam in config.cameras:
        assert cam.calibration is not None
        h = Homography.from_config(cam.calibration)
        scene = Scene("conveyor", seed=1)
        mm = np.array([[-300.0, -80.0], [250.0, 60.0], [-170.0, 330.0]])
        px = (scene.homography @ np.column_stack([mm, np.ones(3)]).T).T
        px = px[:, :2] / px[:, 2:]
        assert np.allclose(h.px_to_mm(px), mm, atol=0.01)  # the sim's true homography


# --- models[].adapter (docs/models.md) ---------------------------------------------------


def test_adapter_short_and_long_forms_resolve(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - {id: a, path: m.onnx, adapter: ultralytics}
          - id: b
            path: m.onnx
            adapter: {kind: ultralytics, nms: {iou: 0.5, max_det: 10}}
          - {id: c, path: m.onnx}
          - {id: d, path: m.onnx, adapter: {roi: {boxes: [[0, 0, 10, 10]]}}}
        cameras: [{id: cam-1, source: "sim://conveyor", model: c}]
    """)
    config = load_config(path, env={}, check_files=False)
    a, b, c, d = (m.adapter.resolved() for m in config.models)
    assert (a.kind, a.nms.iou) == ("ultralytics", 0.7)
    assert (b.kind, b.nms.iou, b.nms.max_det) == ("ultralytics", 0.5, 10)
    assert c.kind == "auto" and d.kind == "auto" and d.roi.boxes == [(0, 0, 10, 10)]


def test_adapter_errors_name_their_line_and_kind(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - id: a
            path: m.onnx
            adapter:
              kind: simcc
              nms: {iou: 0.5}
          - id: b
            path: m.onnx
            adapter: regression
          - {id: c, path: m.onnx, adapter: yolo}
          - id: d
            path: m.onnx
            adapter:
              kind: heatmap
              roi: {boxes: [[10, 10, 5, 20]]}
        cameras: [{id: cam-1, source: "sim://conveyor", model: a}]
    """)
    errors = _errors(path)
    assert errors[0].startswith(f"{path}:6: models[0].adapter.simcc.nms: unknown key")
    assert "valid keys: input, kind, output, roi, simcc_score, simcc_split_ratio" in errors[0]
    assert errors[1] == f"{path}:9: models[1].adapter.regression.output: Field required"
    assert errors[2].startswith(f"{path}:10: models[2].adapter: ")
    assert "'auto', 'end2end', 'ultralytics', 'simcc', 'heatmap', 'regression'" in errors[2]
    assert errors[3].startswith(f"{path}:15: models[3].adapter.heatmap.roi.boxes: ")
    assert "box [10, 10, 5, 20] is empty" in errors[3]


def test_roi_cameras_and_detectors_must_exist(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - id: pose
            path: m.onnx
            adapter:
              kind: heatmap
              roi:
                boxes: {cam-1: [[0, 0, 10, 10]], cam-9: [[0, 0, 10, 10]]}
          - id: pose2
            path: m.onnx
            adapter: {kind: simcc, roi: {detector: pose3}}
          - id: pose3
            path: m.onnx
            adapter: {kind: simcc, roi: {detector: pose2}}
          - id: pose4
            path: m.onnx
            adapter: {kind: simcc, roi: {detector: nope}}
        cameras:
          - {id: cam-1, source: "sim://conveyor", model: pose}
          - {id: cam-2, source: "sim://conveyor", model: pose}
    """)
    issues = check_config(path, env={}, check_files=False).issues  # m.onnx fits none of them
    assert [str(i) for i in issues] == [
        f"{path}:7: models[0].adapter.roi.boxes.cam-9: camera 'cam-9' does not run model "
        "'pose' (its cameras: cam-1, cam-2); use a camera id or '*'",
        f"{path}:10: models[1].adapter.roi.detector: detectors form a cycle: "
        "pose2 -> pose3 -> pose2",
        f"{path}:13: models[2].adapter.roi.detector: detectors form a cycle: "
        "pose3 -> pose2 -> pose3",
        f"{path}:16: models[3].adapter.roi.detector: unknown model 'nope' "
        "(models: pose, pose2, pose3, pose4)",
        f"{path}:19: cameras[1].model: model 'pose' has fixed ROIs per camera "
        "(adapter.roi.boxes) but none for 'cam-2': add adapter.roi.boxes.cam-2 "
        "(or '*' for every camera)",
    ]


def test_forced_adapter_is_checked_against_the_file(write_config: WriteConfig) -> None:
    path = write_config("""
        models: [{id: m, path: m.onnx, adapter: ultralytics}]
        cameras: [{id: cam-1, source: "sim://conveyor"}]
    """)
    (error,) = _errors(path)
    assert error.startswith(f"{path}:1: models[0].adapter: Model ")
    assert "does not fit the configured adapter 'ultralytics'" in error
    assert check_config(path, env={}, check_files=False).ok  # the file is not read then


def test_input_overrides_and_auto_adapters_are_checked_against_the_file(
    write_config: WriteConfig, tmp_path: Path
) -> None:
    """Without a forced kind too: an input override the file contradicts, and a file that
    matches no adapter, are config errors with their lines (not only at model load)."""
    none_fits = tmp_path / "conf" / "flat.onnx"  # one rank-2 output: no adapter takes it
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 192])
    nodes = [helper.make_node("Flatten", ["images"], ["out"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), str(none_fits))
    path = write_config("""
        models:
          - id: m
            path: m.onnx
            adapter:
              input: {color: GRAY}
          - id: flat
            path: flat.onnx
        cameras: [{id: cam-1, source: "sim://conveyor", model: m}]
    """)
    first, second = _errors(path)
    assert first.startswith(f"{path}:4: models[0].adapter: model ")
    assert "has 3 channels, but input color GRAY feeds 1" in first
    assert "fix adapter.input's layout or color" in first
    assert second.startswith(f"{path}:6: models[1].adapter: Model ")
    assert "matches no LineWatch adapter" in second and "[1, 192]" in second


def test_openvino_settings_are_checked_with_their_lines(write_config: WriteConfig) -> None:
    path = write_config("""
        models:
          - id: a
            path: m.onnx
            providers: [cpu, openvino]
          - id: b
            path: m.onnx
            providers: [openvino, cpu]
            openvino: {precision: int4}
    """)
    errors = _errors(path)
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{path}:4: models[0].providers:")
    assert "openvino replaces ONNX Runtime" in errors[0] and "can only come first" in errors[0]
    assert errors[1].startswith(f"{path}:8: models[1].openvino.precision:")
    assert "'f32' or 'bf16'" in errors[1]


def test_openvino_settings_reach_the_inference_config(write_config: WriteConfig) -> None:
    from service.app import inference_config

    path = write_config("""
        models:
          - {id: a, path: m.onnx, providers: [openvino, cpu], openvino: {precision: bf16}}
    """)
    config = inference_config(load_config(path, env={}).models[0])
    assert config.providers == ["OpenVINO", "CPUExecutionProvider"]
    assert config.openvino.precision == "bf16"


def test_cpu_rewrites_reach_the_inference_config(write_config: WriteConfig) -> None:
    from service.app import inference_config

    path = write_config("""
        models:
          - {id: a, path: m.onnx}
          - {id: b, path: m.onnx, cpu_rewrites: false}
          - {id: c, path: m.onnx, cpu_rewrites: sometimes}
    """)
    errors = _errors(path)
    assert len(errors) == 1 and errors[0].startswith(f"{path}:4: models[2].cpu_rewrites:")
    path = write_config("""
        models:
          - {id: a, path: m.onnx}
          - {id: b, path: m.onnx, cpu_rewrites: false}
    """)
    models = load_config(path, env={}).models
    assert [inference_config(m).cpu_rewrites for m in models] == [True, False]
