"""``linewatch predict``: run a model (with its adapter and ROI settings) on image/video files.

One JSON object per frame::

    {"file": "a.mp4", "frame": 0, "width": 640, "height": 360, "instances": [
        {"class": "person", "class_id": 0, "score": 0.91, "box": [x1, y1, x2, y2],
         "keypoints": {"nose": [x, y, score], ...}}]}

Coordinates are pixels of the original image (pixel-centre convention).  With
``--config``, the file is loaded by the real config loader and the model entry
(``--model-id``, or the entry whose path is the model, or the only one) supplies
thresholds, threads, providers and its ``adapter:`` section; a ``roi.detector``
there names another model entry of the same file, and per-camera ROIs are those of
``--camera`` (default: the first camera that runs the model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pydantic import ValidationError

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ConfigError, SourceError
from service.inference.adapter_config import AdapterSpec, parse_adapter_spec
from service.inference.config import InferenceConfig
from service.inference.runner import Predictor
from service.overrides import NO_OVERRIDE, RuntimeOverride

if TYPE_CHECKING:
    from service.config import Config, ModelConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def pick_model(
    config: Config, model_id: str | None, model: Path | None, where: str
) -> ModelConfig:
    """The model entry: by id, else the one whose path is ``model``, else the only one."""
    if model_id is not None:
        try:
            return config.model(model_id)
        except KeyError:
            ids = ", ".join(m.id for m in config.models) or "none"
            raise ConfigError(f"{where}: no model with id {model_id!r} (ids: {ids}).") from None
    if model is not None:
        for mod in config.models:
            if mod.path.resolve() == model.resolve():
                return mod
    if len(config.models) == 1:
        return config.models[0]
    raise ConfigError(
        f"{where} has {len(config.models)} models "
        f"({', '.join(m.id for m in config.models) or 'none'}); choose one with --model-id."
    )


def _forced(spec: AdapterSpec, kind: str, where: str) -> AdapterSpec:
    """The config entry's adapter section with its kind replaced by ``--adapter``."""
    data = {**spec.model_dump(exclude_defaults=True), "kind": kind}
    try:
        return parse_adapter_spec(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"adapter.{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{where}: --adapter {kind} does not go with the entry's settings "
                          f"({problems}).") from exc


@dataclass(frozen=True, slots=True)
class PredictSetup:
    """The loaded model, the camera whose ROIs apply, and the config entry (if any)."""

    predictor: Predictor
    camera: str | None
    model_id: str | None


def prepare(
    model: Path | None,
    config: Path | None = None,
    model_id: str | None = None,
    score_threshold: float | None = None,
    adapter: str | None = None,
    camera: str | None = None,
    *,
    runtime: RuntimeOverride = NO_OVERRIDE,
) -> PredictSetup:
    """The model as ``predict`` runs it: CLI options over the config entry's settings.

    With a config, the entry is loaded by the real config loader (so the file is
    checked as ``linewatch serve`` checks it) and its detector, if its ROIs name one,
    is loaded too; with per-camera ROIs and no ``camera``, the first camera that runs
    the model is used.  ``runtime`` (``--providers``, ``--precision``) applies to the
    model, not to its detector.
    """
    if config is None:
        if model is None:
            raise ConfigError("linewatch predict needs --model (or --config with --model-id).")
        try:
            settings = parse_adapter_spec(adapter or "auto").resolved()
        except ValidationError as exc:
            raise ConfigError(
                f"--adapter {adapter}: {exc.errors()[0]['msg']}. Adapters that need settings "
                "(regression: an output spec; fixed ROIs) need a config entry (--config)."
            ) from exc
        inference = runtime.apply(
            InferenceConfig(warmup_runs=0, score_threshold=score_threshold))
        return PredictSetup(Predictor(model, inference, settings), camera, None)
    from service.app import load_predictors
    from service.config import load_config

    cfg = load_config(config, check_files=False)
    where = f"config {str(config)!r}"
    mod = pick_model(cfg, model_id, model, where)
    update: dict[str, Any] = {"warmup_runs": 0}
    if model is not None:
        update["path"] = model
    if score_threshold is not None:
        update["score_threshold"] = score_threshold
    if adapter is not None:
        update["adapter"] = _forced(mod.adapter, adapter, where)
    entry = runtime.apply(mod.model_copy(update=update))
    models = [entry if m.id == mod.id else m.model_copy(update={"warmup_runs": 0})
              for m in cfg.models]
    cfg = cfg.model_copy(update={"models": models})
    predictor = load_predictors(cfg, [mod.id])[mod.id]
    if camera is None and predictor.per_camera:
        camera = next((c.id for c in cfg.cameras if c.enabled and c.model == mod.id), None)
    return PredictSetup(predictor, camera, mod.id)


def load_predictor(
    model: Path | None,
    config: Path | None = None,
    model_id: str | None = None,
    score_threshold: float | None = None,
    adapter: str | None = None,
) -> Predictor:
    """The model as ``predict`` runs it (see :func:`prepare`)."""
    return prepare(model, config, model_id, score_threshold, adapter).predictor


VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ts"}


def expand_inputs(paths: Sequence[Path]) -> list[Path]:
    """The files to run on: each file as given, and for a directory its image and video
    files (by their suffix, sorted by name; not its subdirectories)."""
    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_file()
                       and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        if not found:
            raise SourceError(
                f"Input directory {str(path)!r} holds no image or video file (suffixes: "
                f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})."
            )
        files.extend(found)
    return files


def read_inputs(paths: Sequence[Path]) -> Iterator[tuple[Path, int, ImageArray]]:
    """(file, frame index, BGR image) for every image file and every frame of every video
    (a directory stands for its image and video files: :func:`expand_inputs`)."""
    for path in expand_inputs(paths):
        if not path.is_file():
            raise SourceError(f"Input {str(path)!r} does not exist (or is not a file).")
        if path.suffix.lower() in IMAGE_SUFFIXES:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                raise SourceError(f"Input {str(path)!r} is not a readable image.")
            yield path, 0, np.asarray(image, np.uint8)
            continue
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise SourceError(f"Input {str(path)!r} is neither an image nor a readable video.")
        try:
            index = 0
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                yield path, index, np.asarray(frame, np.uint8)
                index += 1
        finally:
            cap.release()
        if index == 0:
            raise SourceError(f"Input {str(path)!r} opened but no frame could be decoded.")


def frame_record(
    file: Path, index: int, image: ImageArray, det: Detections, classes: Sequence[ClassInfo]
) -> dict[str, Any]:
    """One frame's JSON object (see the module doc)."""
    instances = []
    for i in range(len(det)):
        cid = int(det.class_ids[i])
        info = classes[cid] if 0 <= cid < len(classes) else None
        names = info.keypoint_names if info else ()
        kps = {
            (names[j] if j < len(names) else f"kp{j}"): [
                round(float(v), 3) for v in det.keypoints[i, j]
            ]
            for j in range(det.num_keypoints)
        }
        instances.append({
            "class": info.name if info else f"class{cid}",
            "class_id": cid,
            "score": round(float(det.scores[i]), 5),
            "box": [round(float(v), 3) for v in det.boxes[i]],
            "keypoints": kps,
        })
    return {"file": str(file), "frame": index, "width": int(image.shape[1]),
            "height": int(image.shape[0]), "instances": instances}


def predict_files(
    predictor: Predictor, paths: Sequence[Path], camera: str | None = None, batch: int = 1
) -> Iterator[dict[str, Any]]:
    """Run the predictor over every frame of ``paths``; yield one record per frame."""
    pending: list[tuple[Path, int, ImageArray]] = []

    def flush() -> Iterator[dict[str, Any]]:
        dets = predictor.predict([p[2] for p in pending], camera)
        for (file, index, image), det in zip(pending, dets, strict=True):
            yield frame_record(file, index, image, det, predictor.classes)
        pending.clear()

    for item in read_inputs(paths):
        pending.append(item)
        if len(pending) >= batch:
            yield from flush()
    if pending:
        yield from flush()
