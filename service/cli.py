"""The ``linewatch`` command line (Typer).

Each command imports what it needs inside its body: ``linewatch --help`` stays
fast and importing this module has no side effects.  A :class:`LineWatchError`
is printed as one paragraph and exits with status 2, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
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


# --- model -----------------------------------------------------------------


# --- config ----------------------------------------------------------------


# --- serve / bench ---------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
