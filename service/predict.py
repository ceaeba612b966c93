"""``linewatch predict``: run a model (with its adapter and ROI settings) on image/video files.

One JSON object per frame::

    {"file": "a.mp4", "frame": 0, "width": 640, "height": 360, "instances": [
        {"class": "person", "class_id": 0, "score": 0.91, "box": [x1, y1, x2, y2],
         "keypoints": {"nose": [x, y, score], ...}}]}

Coordinates are pixels of the original image (pixel-centre convention).  With
``--config``, the model entry (``--model-id``, or the entry whose path is the model,
or the only one) supplies thresholds, threads, providers and its ``adapter:``
section; a ``roi.detector`` there names another model entry of the same file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ConfigError, SourceError
from service.inference.adapter_config import AdapterConfig
from service.inference.config import InferenceConfig
from service.inference.runner import Predictor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _model_entries(config_path: Path) -> list[dict[str, Any]]:
    try:
        data = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"Cannot read config {str(config_path)!r}: {exc}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ConfigError(f"Config {str(config_path)!r} has no 'models:' list of model entries.")
    return models


def _pick(entries: list[dict[str, Any]], model_id: str | None, model: Path | None,
          base: Path, where: str) -> dict[str, Any]:
    if model_id is not None:
        for e in entries:
            if e.get("id") == model_id:
                return e
        ids = ", ".join(str(e.get("id")) for e in entries)
        raise ConfigError(f"{where}: no model with id {model_id!r} (ids: {ids}).")
    if model is not None:
        for e in entries:
            if "path" in e and (base / str(e["path"])).resolve() == model.resolve():
                return e
    if len(entries) == 1:
        return entries[0]
    raise ConfigError(f"{where} has {len(entries)} models; choose one with --model-id.")


def _settings(entry: dict[str, Any], base: Path, where: str) -> tuple[
    Path | None, InferenceConfig, AdapterConfig
]:
    from pydantic import ValidationError

    from service.config import ORT_PROVIDERS, ModelConfig

    rest = {k: v for k, v in entry.items() if k != "adapter"}
    rest.setdefault("path", "unset.onnx")
    try:
        mod = ModelConfig.model_validate(rest, context={"base_dir": base})
        adapter = AdapterConfig.model_validate(entry.get("adapter"))
    except ValidationError as exc:
        raise ConfigError(f"{where}: model {entry.get('id')!r}: {exc}") from exc
    providers: str | list[str] = (
        "auto" if mod.providers == "auto" else [ORT_PROVIDERS[p] for p in mod.providers]
    )
    inference = InferenceConfig(
        providers=providers, intra_op_threads=mod.intra_op_threads,
        inter_op_threads=mod.inter_op_threads, warmup_runs=0,
        score_threshold=mod.score_threshold,
    )
    return (mod.path if "path" in entry else None), inference, adapter


def load_predictor(
    model: Path | None,
    config: Path | None = None,
    model_id: str | None = None,
    score_threshold: float | None = None,
    adapter: str | None = None,
) -> Predictor:
    """The model as ``predict`` runs it: CLI options over the config entry's settings."""
    if config is None:
        if model is None:
            raise ConfigError("linewatch predict needs --model (or --config with --model-id).")
        settings = AdapterConfig.model_validate(adapter or "auto")
        return Predictor(model, InferenceConfig(warmup_runs=0, score_threshold=score_threshold),
                         settings)
    base = config.resolve().parent
    where = f"config {str(config)!r}"
    entries = _model_entries(config)
    entry = _pick(entries, model_id, model, base, where)
    path, inference, settings = _settings(entry, base, where)
    if score_threshold is not None:
        inference = inference.model_copy(update={"score_threshold": score_threshold})
    if adapter is not None:
        settings = settings.model_copy(update={"kind": adapter})
    detector = None
    if settings.roi.detector is not None:
        det_entry = _pick(entries, settings.roi.detector, None, base, where)
        det_path, det_inf, det_settings = _settings(det_entry, base, where)
        if det_path is None:
            raise ConfigError(f"{where}: detector model {settings.roi.detector!r} has no path.")
        detector = Predictor(det_path, det_inf, det_settings, name=settings.roi.detector)
    chosen = model or path
    if chosen is None:
        raise ConfigError(f"{where}: model {entry.get('id')!r} has no path; give --model.")
    return Predictor(chosen, inference, settings, detector, name=entry.get("id"))


def read_inputs(paths: Sequence[Path]) -> Iterator[tuple[Path, int, ImageArray]]:
    """(file, frame index, BGR image) for every image file and every frame of every video."""
    for path in paths:
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
