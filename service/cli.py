"""The ``linewatch`` command line (Typer).

Each command imports what it needs inside its body: ``linewatch --help`` stays
fast and importing this module has no side effects.  A :class:`LineWatchError`
is printed as one paragraph and exits with status 2, without a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from service.errors import LineWatchError

if TYPE_CHECKING:
    from service.overrides import RuntimeOverride

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="LineWatch: keypoint models on camera streams."
)
sim_app = typer.Typer(no_args_is_help=True, help="The synthetic assembly line.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect and evaluate models.")
config_app = typer.Typer(no_args_is_help=True, help="Check and print configuration.")
rules_app = typer.Typer(no_args_is_help=True, help="Line rules: evaluate them on the sim.")
app.add_typer(sim_app, name="sim")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")

# Options several commands share.
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config; default: the embedded default config."),
]
MqttConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config with bus.url: mqtt://host:1883."),
]
HostOption = Annotated[str | None, typer.Option(help="Listen address (default: api.host).")]
PortOption = Annotated[
    int | None, typer.Option(help="Listen port, 0 = any free (default: api.port).")
]
ProbeHostOption = Annotated[str | None, typer.Option(help="Probe address (default: api.host).")]
ProbePortOption = Annotated[
    int | None, typer.Option(help="Probe port, 0 = any free (default: api.port).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


class PrecisionChoice(StrEnum):
    """OpenVINO's inference precision (``openvino.precision``)."""

    f32 = "f32"
    bf16 = "bf16"


ProvidersOption = Annotated[
    str | None,
    typer.Option(help="Run the model on these providers instead of its config's: auto, or a "
                 "list such as openvino,cpu or cuda,cpu."),
]
PrecisionOption = Annotated[
    PrecisionChoice | None,
    typer.Option(help="OpenVINO's precision (with --providers openvino,cpu): bf16 is several "
                 "times faster on AMX Xeons and moves keypoints slightly (docs/models.md)."),
]


def runtime_override(
    providers: str | None, precision: PrecisionChoice | None
) -> RuntimeOverride:
    """The ``RuntimeOverride`` of the two options above."""
    from service.overrides import RuntimeOverride

    return RuntimeOverride(providers, None if precision is None else precision.value)


def friendly_errors(fn: F) -> F:
    """Turn a LineWatchError into a one-paragraph message and exit status 2."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LineWatchError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


# --- sim -------------------------------------------------------------------
@sim_app.command("render")
@friendly_errors
def sim_render(
    scenario: str = typer.Option("conveyor", help="conveyor | calm | train"),
    seed: int = typer.Option(0, help="Random seed: the same seed gives the same clip."),
    frames: int = typer.Option(300, min=1, help="Number of frames."),
    fps: float = typer.Option(30.0, min=0.1, help="Frames per second."),
    width: int = typer.Option(640, min=64),
    height: int = typer.Option(480, min=48),
    belt_speed: float | None = typer.Option(
        None, help="Belt speed in mm/s (default per scenario)."
    ),
    out: Path = typer.Option(Path("sim.mp4"), help="Video file (.mp4 = H.264, .avi = MJPG)."),
    truth: Path | None = typer.Option(None, help="JSON-lines ground truth, one line per frame."),
) -> None:
    """Render a clip of the synthetic line with its ground truth."""
    from service.sim.render import render_clip
    from service.sim.scene import SCENARIOS, Scene

    if scenario not in SCENARIOS:
        raise LineWatchError(
            f"unknown scenario {scenario!r}; choose one of: {', '.join(SCENARIOS)}"
        )
    scene = Scene(
        scenario, seed=seed, width=width, height=height, fps=fps, belt_speed_mm_s=belt_speed
    )
    res = render_clip(scene, frames, out, truth)
    typer.echo(
        f"wrote {res.frames} frames ({res.codec}) to {res.video}"
        + (f", truth to {res.truth}" if res.truth else ""),
        err=True,
    )


# --- model -----------------------------------------------------------------
@model_app.command("inspect")
@friendly_errors
def model_inspect(
    path: Annotated[
        Path | None, typer.Argument(help="An ONNX model file (default: the config entry's).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="LineWatch YAML whose model entry has the adapter."),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="Which model entry of the config.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Print what LineWatch reads from a model: inputs, outputs, metadata, its adapter.

    With --config, the entry's adapter settings apply (a forced adapter, input
    overrides), as linewatch serve applies them. Exits 1 when the model is refused
    (the report says why).
    """
    import json

    from service.inference.adapter_config import AdapterConfig
    from service.inference.report import inspect_model, render_inspection

    settings, source = AdapterConfig(), None
    if config is not None:
        from service.config import load_config
        from service.predict import pick_model

        mod = pick_model(load_config(config, check_files=False), model_id, path, str(config))
        settings, source = mod.adapter.resolved(), f"{config} (model {mod.id!r})"
        path = path or mod.path
    elif model_id is not None:
        raise typer.BadParameter("--model-id needs --config")
    if path is None:
        raise typer.BadParameter("give a model file, or --config with --model-id")
    report = inspect_model(path, settings, source)
    typer.echo(json.dumps(report, indent=2) if as_json else render_inspection(report))
    if report["adapter"] is None:
        raise typer.Exit(code=1)


@model_app.command("eval")
@friendly_errors
def model_eval(
    model: Annotated[
        Path | None,
        typer.Option(help="ONNX model (default: the shipped models/zoo/linewatch-parts-s.onnx)."),
    ] = None,
    scenario: Annotated[str, typer.Option(help="Sim scenario: conveyor | calm | train.")] = (
        "conveyor"
    ),
    seed: Annotated[
        int,
        typer.Option(
            help="Sim seed; default 9000 is outside the training (1000-1349) and val (2000+) seeds."
        ),
    ] = 9000,
    frames: Annotated[int, typer.Option(min=1, help="Frames to evaluate.")] = 100,
    every: Annotated[int, typer.Option(min=1, help="Take every Nth sim frame (30 fps).")] = 5,
    start: Annotated[int, typer.Option(min=0, help="First sim frame index.")] = 0,
    threads: Annotated[int, typer.Option(min=0, help="ORT intra-op threads (0 = all).")] = 1,
    providers: ProvidersOption = None,
    precision: PrecisionOption = None,
    score_threshold: Annotated[
        float | None,
        typer.Option(min=0.0, max=1.0, help="Minimum score (default: model metadata, else 0.5)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Score a model on held-out sim frames: recall, precision, keypoint error, latency."""
    import json

    from service.evaluation import (
        HeldOutFrames,
        evaluate_model,
        evaluation_inference,
        render_report,
    )
    from service.inference import default_model_path

    inference = runtime_override(providers, precision).apply(
        evaluation_inference(threads=threads, score_threshold=score_threshold))
    held_out = HeldOutFrames(scenario, seed, frames, every, start)
    report = evaluate_model(model or default_model_path(), held_out, inference)
    typer.echo(json.dumps(report, indent=2) if as_json else render_report(report))


# --- config ----------------------------------------------------------------


@config_app.command("default")
@friendly_errors
def config_default() -> None:
    """Print the embedded default configuration (YAML, with comments)."""
    from service.config import default_config_text

    typer.echo(default_config_text(), nl=False)


@config_app.command("check")
@friendly_errors
def config_check(
    file: Annotated[Path, typer.Argument(help="The YAML config file to check.")],
    as_json: JsonOption = False,
    use_env: Annotated[
        bool,
        typer.Option("--env/--no-env", help="Apply LINEWATCH_* env overrides (as serve does)."),
    ] = True,
) -> None:
    """Print every error (FILE:LINE: location: message) and exit 1, or 'ok: ...' and exit 0."""
    import json

    from service.config import check_config

    report = check_config(file, env=None if use_env else {})
    cameras = len(report.config.cameras) if report.config else 0
    models = len(report.config.models) if report.config else 0
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "file": str(file),
                    "cameras": cameras,
                    "models": models,
                    "errors": [issue.as_dict() for issue in report.issues],
                },
                indent=2,
            )
        )
    elif report.ok:
        typer.echo(f"ok: {cameras} cameras, {models} models")
    else:
        for issue in report.issues:
            typer.echo(str(issue))
    if not report.ok:
        raise typer.Exit(code=1)


@config_app.command("show")
@friendly_errors
def config_show(
    file: Annotated[
        Path | None, typer.Argument(help="Config file (default: the embedded one).")
    ] = None,
) -> None:
    """Print the effective configuration: the file, defaults and env overrides applied."""
    from service.config import dump_config, load_config

    typer.echo(dump_config(load_config(file)), nl=False)


# --- serve / bench ---------------------------------------------------------


@app.command()
@friendly_errors
def serve(
    config: ConfigOption = None,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Run cameras, models and the API (REST, websocket, /metrics) until SIGTERM."""
    from service.app import serve as run_serve

    run_serve(config, host, port)


@app.command()
@friendly_errors
def bench(
    config: ConfigOption = None,
    cameras: Annotated[
        int | None,
        typer.Option(min=1, help="Run N cameras (copies of the first one, other seeds)."),
    ] = None,
    seconds: Annotated[float, typer.Option(min=1.0, help="Measured run time.")] = 10.0,
    json_out: JsonOption = False,
    compare: Annotated[
        str | None,
        typer.Option(help="Also time another runtime on the same model and clip: ultralytics."),
    ] = None,
    replay_frames: Annotated[
        int,
        typer.Option(
            min=0,
            help="Frames each camera renders/decodes once and replays from memory "
            "(0: read the sources live during the run).",
        ),
    ] = 90,
    providers: ProvidersOption = None,
    precision: PrecisionOption = None,
) -> None:
    """Run the pipeline as fast as it can and compare it with a bare ONNX Runtime loop."""
    import json as _json

    from service.bench import run_bench

    result = run_bench(
        config, cameras=cameras, seconds=seconds, compare=compare, replay_frames=replay_frames,
        override=runtime_override(providers, precision),
    )
    if json_out:
        typer.echo(_json.dumps(result))
    else:
        for key, value in result.items():
            typer.echo(f"{key:>16}: {value}")


@app.command()
@friendly_errors
def soak(
    config: ConfigOption = None,
    seconds: Annotated[float, typer.Option(min=1.0, help="Measured run time.")] = 600.0,
    warmup: Annotated[
        float, typer.Option(min=0.0, help="Seconds before the RSS baseline is taken.")
    ] = 60.0,
    sample_every: Annotated[
        float, typer.Option(min=0.1, help="Seconds between RSS samples.")
    ] = 10.0,
    port: Annotated[int, typer.Option(min=0, help="Server port (0: a free one).")] = 0,
    json_out: JsonOption = False,
) -> None:
    """Run `linewatch serve` with a steady and a churning websocket client; is RSS flat?

    Store in a temp dir; progress on stderr; exit 1 if serve does not exit 0 on SIGTERM.
    """
    import json as _json

    from service.soak import render_summary, run_soak

    result = run_soak(
        config, seconds=seconds, warmup=warmup, sample_every=sample_every, port=port,
        progress=lambda line: typer.echo(line, err=True),
    )
    typer.echo(_json.dumps(result) if json_out else render_summary(result))
    if result["server_exit_code"] != 0 or not result["server_stopped_in_time"]:
        typer.echo(
            f"error: linewatch serve exited with {result['server_exit_code']} on SIGTERM "
            f"(in time: {result['server_stopped_in_time']}); its log ends: "
            f"{result['server_log_tail']}",
            err=True,
        )
        raise typer.Exit(code=1)


@rules_app.command("eval")
@friendly_errors
def rules_eval(
    config: ConfigOption = None,
    scenario: Annotated[str, typer.Option(help="Sim scenario: conveyor | calm.")] = "conveyor",
    seed: Annotated[int, typer.Option(help="Sim seed (use one the model never saw).")] = 7001,
    seconds: Annotated[float, typer.Option(min=1.0, help="Simulated seconds.")] = 600.0,
    camera: Annotated[
        str | None, typer.Option(help="Camera to replay (default: the first of the first line).")
    ] = None,
    fps: Annotated[
        float | None, typer.Option(min=1.0, help="Frames per simulated second (default: the "
                                   "camera's sim fps, else 15).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="ONNX model instead of the camera's configured one.")
    ] = None,
    threads: Annotated[int, typer.Option(min=0, help="ORT intra-op threads (0: config).")] = 0,
    as_json: JsonOption = False,
) -> None:
    """Run model, tracker, poses and rules on the sim in simulated time; score them
    against the sim's truth (events, states, counts, poses; docs/rules.md)."""
    import json

    from service.rules_eval import render_report, run_eval

    report = run_eval(
        config, scenario=scenario, seed=seed, seconds=seconds, fps=fps, camera=camera,
        model_path=model, threads=threads,
    )
    typer.echo(json.dumps(report) if as_json else render_report(report))


# --- calibrate (geometry) ----------------------------------------------------


@app.command()
@friendly_errors
def calibrate(
    points: Annotated[
        Path | None,
        typer.Option(help="CSV of point pairs: u_px, v_px, x_mm, y_mm per line (>= 4)."),
    ] = None,
    checkerboard: Annotated[
        Path | None, typer.Option(help="Image of a checkerboard lying on the work plane.")
    ] = None,
    charuco: Annotated[
        Path | None, typer.Option(help="Image of a ChArUco board lying on the work plane.")
    ] = None,
    pattern: Annotated[
        str, typer.Option(help="Checkerboard inner corners COLSxROWS; ChArUco squares COLSxROWS.")
    ] = "9x6",
    square_mm: Annotated[float, typer.Option(help="Board square size in mm.")] = 25.0,
    marker_mm: Annotated[
        float | None, typer.Option(help="ChArUco marker size in mm (default 0.75 x square).")
    ] = None,
    dictionary: Annotated[str, typer.Option(help="ChArUco ArUco dictionary.")] = "DICT_5X5_100",
    intrinsics: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON with camera_matrix and dist_coeffs (undistort first)."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Compute a camera's homography (px -> work-plane mm) and its reprojection error."""
    import json

    from service.errors import CalibrationError
    from service.geometry import Homography
    from service.geometry.io import (
        calibration_report,
        parse_grid,
        read_image,
        read_intrinsics,
        read_points_csv,
        render_report,
    )

    given = [p for p in (points, checkerboard, charuco) if p is not None]
    if len(given) != 1:
        raise CalibrationError("give exactly one of --points, --checkerboard or --charuco")
    k, dist = read_intrinsics(intrinsics) if intrinsics else (None, None)
    if points is not None:
        px, mm = read_points_csv(points)
        h = Homography.from_points(px, mm, k, dist)
    elif checkerboard is not None:
        h = Homography.from_checkerboard(
            read_image(checkerboard), parse_grid(pattern), square_mm, k, dist
        )
    else:
        assert charuco is not None
        h = Homography.from_charuco(
            read_image(charuco), parse_grid(pattern, "squares"), square_mm,
            marker_mm if marker_mm is not None else 0.75 * square_mm, dictionary, k, dist,
        )  # fmt: skip
    report = calibration_report(h, str(given[0]))
    typer.echo(json.dumps(report) if as_json else render_report(report))


# --- worker / api (several machines over MQTT, docs/mqtt.md) -------------------


@app.command()
@friendly_errors
def worker(
    config: MqttConfigOption = None,
    host: ProbeHostOption = None,
    port: ProbePortOption = None,
) -> None:
    """Run cameras and models and publish over MQTT (HTTP: /healthz, /readyz, /metrics only)."""
    from service.remote import run_worker

    run_worker(config, host, port)


@app.command()
@friendly_errors
def api(
    config: MqttConfigOption = None,
    host: HostOption = None,
    port: PortOption = None,
) -> None:
    """Serve the REST and websocket API from the workers' MQTT messages until SIGTERM."""
    from service.remote import run_api

    run_api(config, host, port)


# --- predict (bring your own model) -------------------------------------------


@app.command()
@friendly_errors
def predict(
    inputs: Annotated[list[Path], typer.Argument(
        help="Image or video files, or directories of them.")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="ONNX model (default: the config's).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="LineWatch YAML whose model entry has the settings."),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--model-id", help="Which model entry of the config.")
    ] = None,
    camera: Annotated[
        str | None, typer.Option(help="Camera id whose fixed ROIs to use (top-down models).")
    ] = None,
    score_threshold: Annotated[
        float | None, typer.Option("--conf", min=0.0, max=1.0, help="Minimum instance score.")
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(help="Force an adapter: end2end, ultralytics, simcc, heatmap, regression."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Frames per model run.")] = 1,
    providers: ProvidersOption = None,
    precision: PrecisionOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines (the only format).")] = True,
) -> None:
    """Run a model on image/video files: one JSON line per frame (instances, named keypoints)."""
    import json as _json
    import sys

    from service.predict import predict_files, prepare

    setup = prepare(model, config, model_id, score_threshold, adapter, camera,
                    runtime=runtime_override(providers, precision))
    predictor = setup.predictor
    entry = f" (config entry {setup.model_id!r})" if setup.model_id else ""
    rois = f"; ROIs of camera {setup.camera!r}" if setup.camera and predictor.top_down else ""
    runs_at = (predictor.acceleration or {}).get("precision")
    typer.echo(
        f"model {predictor.path}{entry} on {predictor.provider}"
        f"{f' {runs_at}' if runs_at else ''}: adapter {predictor.adapter.name} "
        f"({predictor.adapter_reason}){rois}",
        err=True,
    )
    for record in predict_files(predictor, inputs, setup.camera, batch):
        sys.stdout.write(_json.dumps(record) + "\n")
    sys.stdout.flush()


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
