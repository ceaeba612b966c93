"""A model with its configured adapter: ``Predictor.predict(images, camera) -> [Detections]``.

Like :class:`service.inference.OrtModel`, plus the per-model ``adapter:`` settings:
a forced adapter, input-spec overrides, NMS settings, and for top-down models the
ROIs (fixed per camera, or boxes from a detector :class:`Predictor`).  All crops of
all frames go through one ``session.run`` when the batch dimension is dynamic (in
chunks of the fixed batch size otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.adapters import Adapter, choose_adapter
from service.inference.config import InferenceConfig
from service.inference.inputs import apply_input_override
from service.inference.metadata import ModelInfo, model_info_from_session
from service.inference.session import open_session, run_in_batches
from service.inference.topdown import TopDownAdapter

log = logging.getLogger(__name__)


class Predictor:
    """A loaded model, its adapter (and detector, for top-down models on detected boxes)."""

    def __init__(
        self,
        path: str | Path,
        inference: InferenceConfig | None = None,
        settings: AdapterConfig | None = None,
        detector: Predictor | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.inference = inference or InferenceConfig()
        self.settings = settings or AdapterConfig()
        self.name = name or self.path.stem
        self.detector = detector
        self._session, _ = open_session(self.path, self.inference)
        raw_info = model_info_from_session(self.path, self._session)
        self.info: ModelInfo
        self.info, normalizer = apply_input_override(raw_info, self.settings.input)
        choice = choose_adapter(self.info, self.settings)
        self.adapter: Adapter = choice.adapter(
            self.info, self.inference.score_threshold, self.inference.max_detections,
            self.settings, normalizer,
        )
        self.adapter_reason = choice.reason
        if detector is not None and not isinstance(self.adapter, TopDownAdapter):
            raise ModelError(
                f"Model {self.name!r} has a detector ({detector.name!r}) in adapter.roi, but its "
                f"adapter {self.adapter.name!r} is not top-down (simcc, heatmap, regression)."
            )
        self._outputs = [o.name for o in self.info.outputs]
        self.runs = 0  # session.run calls of the last predict
        for _ in range(self.inference.warmup_runs):
            self.predict([np.zeros((self.info.input.height, self.info.input.width, 3), np.uint8)])
        log.info("model %s (%s): adapter %s (%s), provider %s", self.name, self.path,
                 self.adapter.name, self.adapter_reason, self.provider)

    @property
    def provider(self) -> str:
        return str(self._session.get_providers()[0])

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        if isinstance(self.adapter, TopDownAdapter):
            return self.adapter.classes()
        if self.info.classes:
            return self.info.classes
        k = self.info.num_keypoints
        return (ClassInfo("object", tuple(f"kp{i}" for i in range(k))),)

    def predict(self, images: Sequence[ImageArray], camera: str | None = None) -> list[Detections]:
        """Images (HxWx3 uint8 BGR) -> one Detections per image, in frame pixels."""
        if not images:
            return []
        self.runs = 0
        adapter = self.adapter
        if isinstance(adapter, TopDownAdapter):
            if self.detector is not None:
                found = self.detector.predict(images, camera)
                found = [self._select_rois(d) for d in found]
                feeds, transforms = adapter.preprocess_rois(
                    images, [d.boxes for d in found], [d.scores for d in found],
                    [d.class_ids for d in found],
                )
            else:
                feeds, transforms = adapter.preprocess_rois(
                    images, adapter.rois_for(images, camera)
                )
            if not transforms:
                return [Detections.empty(adapter.num_keypoints) for _ in images]
        else:
            feeds, transforms = adapter.preprocess(images)
        outputs = self._run(feeds, len(transforms))
        return adapter.postprocess(outputs, transforms)

    def _select_rois(self, found: Detections) -> Detections:
        roi = self.settings.roi
        if roi.detector_classes is not None:
            found = found[np.flatnonzero(np.isin(found.class_ids, roi.detector_classes))]
        order = np.argsort(-found.scores, kind="stable")[: roi.max_rois]
        return found[order]

    def _run(self, feeds: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        outputs, model_s, runs = run_in_batches(
            self._session, self._outputs, feeds, n, self.info, self.name
        )
        self.runs += runs
        log.debug("model %s: %d inputs in %d run(s), %.1f ms", self.name, n, runs, 1000 * model_s)
        return outputs
