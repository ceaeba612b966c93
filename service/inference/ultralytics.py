"""Time Ultralytics' own predict loop on an ONNX file and a clip (``bench --compare``).

Ultralytics (and torch) never load into LineWatch's process unless they are already
importable there; otherwise the loop runs under a separate interpreter: the
``LINEWATCH_ULTRALYTICS_PYTHON`` environment variable, else ``.venv-ultralytics``
in the repository (``scripts/ultralytics-env`` creates it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from service.errors import LineWatchError

# Runs under the Ultralytics interpreter: argv = model, source, seconds, warmup frames, conf.
STREAM_SCRIPT = r"""
import contextlib, json, sys, time
model_path, source = sys.argv[1], sys.argv[2]
seconds, warmup, conf = float(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
with contextlib.redirect_stdout(sys.stderr):
    from ultralytics import YOLO
    model = YOLO(model_path, task="pose")
    n, t0 = 0, time.perf_counter()
    while True:
        for _ in model.predict(source, stream=True, conf=conf, verbose=False):
            n += 1
            if n == warmup:
                t0 = time.perf_counter()
            if n > warmup and time.perf_counter() - t0 >= seconds:
                break
        else:
            continue  # the clip ended: loop it, as the bench cameras do
        break
    elapsed = time.perf_counter() - t0
print(json.dumps({"fps": (n - warmup) / elapsed, "frames": n - warmup, "seconds": elapsed}))
"""


@dataclass(frozen=True, slots=True)
class UltralyticsTiming:
    fps: float
    frames: int
    seconds: float
    python: str


def ultralytics_python(repo_root: Path) -> str:
    """The interpreter that can import ultralytics (this one, the env var, or the venv)."""
    if importlib.util.find_spec("ultralytics") is not None:
        return sys.executable
    env = os.environ.get("LINEWATCH_ULTRALYTICS_PYTHON")
    if env:
        return env
    venv = repo_root / ".venv-ultralytics" / "bin" / "python"
    if venv.exists():
        return str(venv)
    raise LineWatchError(
        "bench --compare ultralytics needs Ultralytics: it is not importable here, "
        "LINEWATCH_ULTRALYTICS_PYTHON is unset and .venv-ultralytics does not exist. Run "
        "scripts/ultralytics-env (or set LINEWATCH_ULTRALYTICS_PYTHON to a python with "
        "ultralytics installed)."
    )


def time_ultralytics(
    model: Path, source: str, seconds: float, repo_root: Path, warmup: int = 5,
    conf: float = 0.25,
) -> UltralyticsTiming:
    """Frames/s of ``YOLO(model).predict(source, stream=True)`` over ``seconds``."""
    python = ultralytics_python(repo_root)
    cmd = [python, "-c", STREAM_SCRIPT, str(model), source, str(seconds), str(warmup), str(conf)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 4 + 120,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise LineWatchError(f"Ultralytics' predict loop did not finish ({exc}).") from exc
    if done.returncode != 0:
        raise LineWatchError(
            f"Ultralytics' predict loop failed under {python} (exit {done.returncode}): "
            f"{done.stderr.strip()[-600:]}"
        )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return UltralyticsTiming(float(result["fps"]), int(result["frames"]),
                             float(result["seconds"]), python)
