"""A model with its configured adapter and ROIs: ``Predictor.predict(images, cameras=...)``.

:class:`Predictor` is an :class:`service.inference.OrtModel` (providers, warm-up,
metrics, the per-model ``adapter:`` settings: a forced adapter, input-spec
overrides, NMS) plus, for top-down models, where the regions of interest come
from: fixed boxes per camera (each image's camera id picks its boxes) or the boxes
of a detector :class:`Predictor`.  All crops of all frames go through one
``session.run`` when the batch dimension is dynamic (in chunks of the fixed batch
size otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from service.domain import Detections, ImageArray
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.config import InferenceConfig
from service.inference.preprocess import Transform
from service.inference.roi import whole_image_box
from service.inference.session import OrtModel
from service.inference.topdown import TopDownAdapter


class Predictor(OrtModel):
    """A loaded model, its adapter (and detector, for top-down models on detected boxes)."""

    def __init__(
        self,
        path: str | Path,
        inference: InferenceConfig | None = None,
        settings: AdapterConfig | None = None,
        detector: Predictor | None = None,
        name: str | None = None,
    ) -> None:
        self.detector = detector
        super().__init__(path, inference, name, settings)

    def _before_warm_up(self) -> None:
        if self.detector is not None and not isinstance(self.adapter, TopDownAdapter):
            raise ModelError(
                f"Model {self.name!r} has a detector ({self.detector.name!r}) in adapter.roi, "
                f"but its adapter {self.adapter.name!r} is not top-down (simcc, heatmap, "
                "regression). Remove adapter.roi.detector, or force a top-down adapter."
            )

    def _warm_up(self, *, every_instance: bool = False) -> None:
        if not isinstance(self.adapter, TopDownAdapter):
            super()._warm_up(every_instance=every_instance)
            return
        blank = np.zeros((self.info.input.height, self.info.input.width, 3), np.uint8)
        runs = self.config.warmup_runs * (self.instances if every_instance else 1)
        for _ in range(runs):  # one whole-frame ROI (a detector finds none)
            feeds, transforms = self.adapter.preprocess_rois(
                [blank], [np.asarray([whole_image_box(blank)], np.float32)]
            )
            self._run(feeds, len(transforms))

    @property
    def inference(self) -> InferenceConfig:
        return self.config

    @property
    def top_down(self) -> bool:
        """True for SimCC, heatmap and regression models (crops of ROIs, not whole frames)."""
        return isinstance(self.adapter, TopDownAdapter)

    @property
    def per_camera(self) -> bool:
        """True when the result depends on each image's camera (per-camera fixed ROIs)."""
        if not isinstance(self.adapter, TopDownAdapter):
            return False
        if self.detector is not None:
            return self.detector.per_camera
        return self.settings.roi.per_camera

    @property
    def runs(self) -> int:
        """``session.run`` calls of the last predict (the detector's not counted)."""
        return self.last_timing.runs

    def predict(
        self,
        images: Sequence[ImageArray],
        camera: str | None = None,
        *,
        cameras: Sequence[str | None] | None = None,
    ) -> list[Detections]:
        """Images (HxWx3 uint8 BGR) -> one Detections per image, in frame pixels.

        ``cameras`` gives each image's camera id (whose fixed ROIs apply); ``camera``
        is the same id for every image.
        """
        if cameras is not None and len(cameras) != len(images):
            raise ValueError(f"{len(cameras)} camera ids for {len(images)} images")
        if cameras is None and camera is not None:
            cameras = [camera] * len(images)
        return self._observed(images, cameras)

    def _prepare(
        self, images: Sequence[ImageArray], cameras: Sequence[str | None] | None
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        adapter = self.adapter
        if not isinstance(adapter, TopDownAdapter):
            return adapter.preprocess(images)
        if self.detector is None:
            return adapter.preprocess_rois(images, adapter.rois_for(images, cameras))
        found = [self._select_rois(d) for d in self.detector.predict(images, cameras=cameras)]
        return adapter.preprocess_rois(
            images, [d.boxes for d in found], [d.scores for d in found],
            [d.class_ids for d in found],
        )

    def _select_rois(self, found: Detections) -> Detections:
        roi = self.settings.roi
        if roi.detector_classes is not None:
            found = found[np.flatnonzero(np.isin(found.class_ids, roi.detector_classes))]
        order = np.argsort(-found.scores, kind="stable")[: roi.max_rois]
        return found[order]
