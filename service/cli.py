"""The ``linewatch`` command line (Typer).

Each command imports what it needs inside its body: ``linewatch --help`` stays
fast and importing this module has no side effects.  A :class:`LineWatchError`
is printed as one paragraph and exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import typer

from service.errors import LineWatchError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(no_args_is_help=True, add_completion=False, help="LineWatch: keypoint models on camera streams.")
sim_app = typer.Typer(no_args_is_help=True, help="The synthetic assembly line.")
model_app = typer.Typer(no_args_is_help=True, help="Inspect and evaluate models.")
config_app = typer.Typer(no_args_is_help=True, help="Check and print configuration.")
app.add_typer(sim_app, name="sim")
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")


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
    belt_speed: float | None = typer.Option(None, help="Belt speed in mm/s (default per scenario)."),
    out: Path = typer.Option(Path("sim.mp4"), help="Video file (.mp4 = H.264, .avi = MJPG)."),
    truth: Path | None = typer.Option(None, help="JSON-lines ground truth, one line per frame."),
) -> None:
    """Render a clip of the synthetic line with its ground truth."""
    from service.sim.render import render_clip
    from service.sim.scene import SCENARIOS, Scene

    if scenario not in SCENARIOS:
        raise LineWatchError(f"unknown scenario {scenario!r}; choose one of: {', '.join(SCENARIOS)}")
    scene = Scene(scenario, seed=seed, width=width, height=height, fps=fps, belt_speed_mm_s=belt_speed)
    res = render_clip(scene, frames, out, truth)
    typer.echo(f"wrote {res.frames} frames ({res.codec}) to {res.video}"
               + (f", truth to {res.truth}" if res.truth else ""), err=True)



# --- model -----------------------------------------------------------------


# --- config ----------------------------------------------------------------


# --- serve / bench ---------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
