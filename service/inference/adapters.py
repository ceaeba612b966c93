"""Model-family adapters: turn model outputs into :class:`service.domain.Detections`.

Each adapter is one class that says whether it accepts a model (``accepts``,
from its :class:`ModelInfo`: metadata and output shapes), prepares images for it
(``preprocess``) and decodes its outputs (``postprocess``).  Adding a model family
(Ultralytics raw YOLO-pose, RTMPose SimCC, ...) is one new subclass decorated with
:func:`register_adapter`; :func:`select_adapter` tries them in registration order.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.decoders import Decoded, decode_ultralytics_pose_batch
from service.inference.gpu import TOP_CANDIDATES_KEY
from service.inference.inputs import (
    Normalizer,
    apply_input_override,
    to_model_input,
    ultralytics_letterbox,
)
from service.inference.metadata import ModelInfo, read_model_info
from service.inference.preprocess import (
    BatchBuffers,
    Transform,
    converted,
    make_batch,
    new_batch,
)

log = logging.getLogger(__name__)

DEFAULT_SCORE_THRESHOLD = 0.5
# Said when a model is refused: what needs config rather than metadata.
NOT_YET_SUPPORTED = (
    "Direct-regression keypoint models (e.g. MoveNet) need an output spec in the config "
    "(adapter: {kind: regression, output: {...}}); see docs/models.md."
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether an adapter accepts a model, and why (shown by ``model inspect``)."""

    accepted: bool
    reason: str


def _not_one_rank3_pose_output(info: ModelInfo) -> Verdict | None:
    """Why a model is not one rank-3 pose/detect output (what both whole-frame formats
    need), or None when it is."""
    if len(info.outputs) != 1:
        return Verdict(False, f"{len(info.outputs)} outputs, expected 1")
    if len(info.outputs[0].shape) != 3:
        return Verdict(False, f"output {info.outputs[0].describe()} is not rank 3")
    if info.task not in (None, "pose", "detect"):
        return Verdict(False, f"task={info.task!r}, expected pose or detect")
    return None


class Adapter(ABC):
    """One model family: preprocess images, postprocess outputs to Detections."""

    name: ClassVar[str]
    supports: ClassVar[str]  # one sentence: the layout and metadata it accepts

    def __init__(
        self,
        info: ModelInfo,
        score_threshold: float | None = None,
        max_detections: int | None = None,
        settings: AdapterConfig | None = None,
        normalizer: Normalizer | None = None,
    ) -> None:
        self.info = info
        self.score_threshold = resolve_score_threshold(info, score_threshold)
        self.max_detections = max_detections
        self.settings = settings or AdapterConfig()
        self.normalizer = normalizer
        self.buffers = BatchBuffers()  # batches given back by the model once it ran them

    @property
    def num_keypoints(self) -> int:
        return self.info.num_keypoints

    def classes(self) -> tuple[ClassInfo, ...]:
        """Class and keypoint names: the model's metadata, else generic ones."""
        if self.info.classes:
            return self.info.classes
        return (ClassInfo("object", tuple(f"kp{i}" for i in range(self.num_keypoints))),)

    @classmethod
    @abstractmethod
    def accepts(cls, info: ModelInfo) -> Verdict:
        """Decide from metadata and tensor shapes alone."""

    @classmethod
    def fits(cls, info: ModelInfo, settings: AdapterConfig) -> Verdict:
        """Decide with the model's adapter settings too (when the config forces this one)."""
        return cls.accepts(info)

    def preprocess(
        self, images: Sequence[ImageArray]
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        """Images (HxWx3 uint8 BGR) -> session feeds and one transform per image."""
        if self.normalizer is None:
            batch, transforms = make_batch(images, self.info.input, self.buffers)
            return {self.info.input.name: batch}, transforms
        fitted, transforms = make_batch(images, dataclasses.replace(
            self.info.input, layout="NHWC", color="BGR", dtype="uint8", normalization="in-graph"
        ), self.buffers)
        feed = converted(fitted, to_model_input(fitted, self.info.input, self.normalizer),
                         self.buffers)
        return {self.info.input.name: feed}, transforms

    @abstractmethod
    def postprocess(
        self, outputs: Sequence[np.ndarray], transforms: Sequence[Transform]
    ) -> list[Detections]:
        """Session outputs -> one Detections per image, in original-frame pixels."""


def resolve_score_threshold(info: ModelInfo, explicit: float | None) -> float:
    """Explicit value, else the model's ``score_threshold`` metadata, else the default."""
    if explicit is not None:
        value = float(explicit)
    elif "score_threshold" in info.metadata:
        try:
            value = float(info.metadata["score_threshold"])
        except ValueError as exc:
            raise ModelError(
                f"Model {str(info.path)!r}: metadata score_threshold must be a number, got "
                f"{info.metadata['score_threshold']!r}."
            ) from exc
    else:
        value = DEFAULT_SCORE_THRESHOLD
    if not 0.0 <= value <= 1.0:
        raise ModelError(f"Score threshold must be between 0 and 1, got {value}.")
    return value


_REGISTRY: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available to :func:`select_adapter`."""
    if cls not in _REGISTRY:
        _REGISTRY.append(cls)
    return cls


def registered_adapters() -> tuple[type[Adapter], ...]:
    return tuple(_REGISTRY)


@dataclass(frozen=True, slots=True)
class AdapterChoice:
    """The adapter chosen for a model, why, and why the others said no."""

    adapter: type[Adapter]
    reason: str
    rejected: tuple[tuple[str, str], ...]


def select_adapter(info: ModelInfo) -> AdapterChoice:
    """Pick the first registered adapter that accepts the model, or refuse it."""
    rejected: list[tuple[str, str]] = []
    for cls in _REGISTRY:
        verdict = cls.accepts(info)
        if verdict.accepted:
            return AdapterChoice(cls, verdict.reason, tuple(rejected))
        rejected.append((cls.name, verdict.reason))
    supported = " ".join(
        f"{cls.name}: {cls.supports} (this model: {why})"
        for cls, (_, why) in zip(_REGISTRY, rejected, strict=True)
    )
    raise ModelError(
        f"Model {str(info.path)!r} matches no LineWatch adapter. Found {info.describe_found()}. "
        f"Supported: {supported or 'none registered'}. {NOT_YET_SUPPORTED} Re-export the model "
        "in a supported format or add its metadata (task, kpt_shape, names, imgsz, output_format)."
    )


@register_adapter
class End2EndAdapter(Adapter):
    """End-to-end pose output ``[B, N, 6 + K*D]``: box, score, class, K keypoints.

    Rows are sorted by score and padded with score 0; coordinates are in model-input
    pixels (pixel-centre convention) and are mapped back to the original frame.
    """

    name = "end2end"
    supports = (
        "one rank-3 output [B, N, 6+K*D] (x1, y1, x2, y2, score, class_id, then x, y[, score] "
        "per keypoint) with metadata output_format=end2end, or kpt_shape=[K, D] matching the "
        "last dimension when output_format is absent (NMS-free Ultralytics exports)"
    )

    @classmethod
    def accepts(cls, info: ModelInfo) -> Verdict:
        refused = _not_one_rank3_pose_output(info)
        if refused is not None:
            return refused
        out = info.outputs[0]
        k, d = info.kpt_shape or (0, 3)
        width = 6 + k * d
        last = out.shape[2]
        fmt = info.output_format
        if fmt is not None and fmt != "end2end":
            return Verdict(False, f"output_format={fmt!r}")
        if isinstance(last, int):
            if last != width:
                return Verdict(
                    False, f"last output dimension is {last}, but 6 + K*D = {width} for "
                    f"kpt_shape={list(info.kpt_shape) if info.kpt_shape else None}",
                )
            why = "output_format=end2end" if fmt else "no output_format, but the shape fits"
            what = f"6 + {k}*{d}" if k else "6: boxes only (a detector)"
            return Verdict(True, f"{why}; output {out.describe()} = {what}")
        if fmt == "end2end":
            return Verdict(True, f"output_format=end2end; output {out.describe()} has a "
                                 "dynamic last dimension, checked at run time")
        return Verdict(False, f"dynamic last dimension in {out.describe()} and no output_format")

    def preprocess(
        self, images: Sequence[ImageArray]
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        if is_ultralytics_export(self.info) and self.info.input.resize == "letterbox":
            return ultralytics_preprocess(images, self.info, self.normalizer, self.buffers)
        return super().preprocess(images)

    def postprocess(
        self, outputs: Sequence[np.ndarray], transforms: Sequence[Transform]
    ) -> list[Detections]:
        out = np.asarray(outputs[0])
        k, d = self.info.kpt_shape or (0, 3)
        if out.ndim != 3 or out.shape[2] != 6 + k * d or out.shape[0] < len(transforms):
            raise ModelError(
                f"Model {str(self.info.path)!r} returned an output of shape {list(out.shape)}; "
                f"the end2end adapter expects [B>={len(transforms)}, N, {6 + k * d}]."
            )
        ultralytics = is_ultralytics_export(self.info)
        if ultralytics:  # edge convention (0..W) -> pixel centres
            out = out.copy()
            out[..., 0:4] -= 0.5
            kp = out[..., 6:].reshape(*out.shape[:2], k, d)
            kp[..., 0:2] -= 0.5
            out[..., 6:] = kp.reshape(*out.shape[:2], k * d)
        result = [
            decode_end2end(out[b], t, k, d, self.score_threshold, self.max_detections)
            for b, t in enumerate(transforms)
        ]
        if ultralytics:  # Ultralytics clips to the frame; match it
            for det, t in zip(result, transforms, strict=True):
                clip_to_frame(det, t.src_width, t.src_height)
        return result


def decode_end2end(
    rows: np.ndarray,
    transform: Transform,
    num_keypoints: int,
    values_per_keypoint: int,
    score_threshold: float,
    max_detections: int | None = None,
) -> Detections:
    """One image's ``[N, 6 + K*D]`` rows -> Detections in original-frame pixels."""
    rows = np.asarray(rows, dtype=np.float32)
    scores = rows[:, 4]
    keep = np.flatnonzero((scores >= score_threshold) & (scores > 0.0))
    if keep.size and max_detections is not None:
        keep = keep[np.argsort(-scores[keep], kind="stable")[:max_detections]]
    sel = rows[keep]
    n = sel.shape[0]
    boxes = transform.to_source(sel[:, 0:4].reshape(n, 2, 2)).reshape(n, 4)
    kp_raw = sel[:, 6:6 + num_keypoints * values_per_keypoint].reshape(
        n, num_keypoints, values_per_keypoint
    )
    keypoints = np.empty((n, num_keypoints, 3), np.float32)
    keypoints[..., 0:2] = transform.to_source(kp_raw[..., 0:2])
    if values_per_keypoint == 3:
        keypoints[..., 2] = kp_raw[..., 2]
    else:
        keypoints[..., 2] = sel[:, 4:5]
    return Detections(
        boxes=boxes,
        scores=sel[:, 4],
        class_ids=np.rint(sel[:, 5]).astype(np.int32),
        keypoints=keypoints,
    )


def is_ultralytics_export(info: ModelInfo) -> bool:
    """Ultralytics writes ``author: Ultralytics``; its coordinates span 0..W (pixel edges)."""
    return "ultralytics" in info.metadata.get("author", "").lower()


@register_adapter
class UltralyticsPoseAdapter(Adapter):
    """Ultralytics raw YOLO-pose (or detect) output ``[B, 4 + C + K*D, A]``, decoded with NMS.

    Images are letterboxed exactly as Ultralytics does (bilinear, centred, 114 gray);
    anchors scoring ``> score_threshold`` go through class-aware NMS (``adapter.nms``:
    iou, max_det, agnostic); coordinates are shifted from Ultralytics' edge convention
    to pixel centres and clipped to the frame, as Ultralytics clips them.
    """

    name = "ultralytics"
    supports = (
        "one rank-3 output [B, 4+C+K*D, A] (cx, cy, w, h, C class scores, K keypoints per "
        "anchor; A anchors > channels) with kpt_shape (pose) or without (detect) and names "
        "metadata, as Ultralytics exports without nms=True"
    )

    @classmethod
    def accepts(cls, info: ModelInfo) -> Verdict:
        refused = _not_one_rank3_pose_output(info)
        if refused is not None:
            return refused
        out = info.outputs[0]
        if info.output_format not in (None, "raw", "ultralytics"):
            return Verdict(False, f"output_format={info.output_format!r}")
        channels, anchors = out.shape[1], out.shape[2]
        if not isinstance(channels, int):
            return Verdict(False, f"dynamic channel dimension in {out.describe()}")
        k, d = info.kpt_shape or (0, 3)
        nc = len(info.classes) if info.classes else channels - 4 - k * d
        if nc < 1 or channels != 4 + nc + k * d:
            return Verdict(
                False, f"output channels {channels} != 4 + C + K*D = 4 + {nc} + {k}*{d}"
            )
        if isinstance(anchors, int) and anchors <= channels:
            return Verdict(False, f"{anchors} anchors <= {channels} channels: not [B, 4+C+K*D, A]")
        parts = f"4 + {nc} classes + {k}*{d} keypoints" if k else f"4 + {nc} classes: a detector"
        return Verdict(True, f"output {out.describe()} = [B, {parts}, anchors]")

    def __init__(self, info: ModelInfo, *args: Any, **kwargs: Any) -> None:
        super().__init__(info, *args, **kwargs)
        # the device keeps each image's best anchors only (gpu.max_candidates)
        self._candidates_only = TOP_CANDIDATES_KEY in info.metadata
        self._warned_full = False

    def _check_candidates(self, last: np.ndarray) -> None:
        """Warn (once) when an image's last kept anchor still scores above the threshold:
        anchors beyond the ones kept may have, and NMS did not see them."""
        if last.size and float(last.max()) > self.score_threshold:
            self._warned_full = True
            log.warning(
                "model output %s: an image has more anchors scoring above %.3g than the %s "
                "kept on the device; NMS saw only those, so instances may be missing. Raise "
                "gpu.max_candidates (0: every anchor) or the score threshold.",
                self.info.outputs[0].name, self.score_threshold,
                self.info.metadata[TOP_CANDIDATES_KEY],
            )

    @property
    def num_classes(self) -> int:
        k, d = self.info.kpt_shape or (0, 3)
        channels = self.info.outputs[0].shape[1]
        return int(channels) - 4 - k * d if isinstance(channels, int) else len(self.info.classes)

    def preprocess(
        self, images: Sequence[ImageArray]
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        if self.info.input.resize == "stretch":  # forced by config
            return super().preprocess(images)
        return ultralytics_preprocess(images, self.info, self.normalizer, self.buffers)

    def postprocess(
        self, outputs: Sequence[np.ndarray], transforms: Sequence[Transform]
    ) -> list[Detections]:
        out = np.asarray(outputs[0])
        kpt_shape = self.info.kpt_shape or (0, 3)
        nc = self.num_classes
        nms = self.settings.nms
        max_det = min(nms.max_det, self.max_detections or nms.max_det)
        if self._candidates_only and not self._warned_full:
            self._check_candidates(out[:len(transforms), 4:4 + nc, -1])
        decoded = decode_ultralytics_pose_batch(
            out[:len(transforms)], nc, kpt_shape, self.score_threshold, nms.iou, max_det,
            nms.agnostic,
        )
        return ultralytics_in_frames(decoded, transforms)


def ultralytics_in_frames(
    decoded: Sequence[Decoded], transforms: Sequence[Transform]
) -> list[Detections]:
    """Each image's instances (model-input pixels, Ultralytics' edge convention) in its
    frame's pixels (centre convention), clipped to the frame as Ultralytics' ``scale_*``
    clip: the whole batch in one pass (the values of mapping each image with its
    :meth:`Transform.to_source` and :func:`clip_to_frame`)."""
    counts = [d.boxes.shape[0] for d in decoded]
    if not sum(counts):
        return [Detections.empty(d.keypoints.shape[1]) for d in decoded]
    per_image = np.array([(t.scale_x, t.scale_y, t.pad_x, t.pad_y, t.src_width, t.src_height)
                          for t in transforms], np.float64)
    rows = np.repeat(per_image, counts, axis=0)[:, None, :]  # (N, 1, 6)
    scale, pad, limit = rows[..., 0:2], rows[..., 2:4], rows[..., 4:6] - 0.5

    def to_frame(xy_edge: np.ndarray) -> np.ndarray:  # (N, M, 2) float32
        p = (xy_edge - np.float32(0.5)).astype(np.float64)
        out = ((p - pad + 0.5) / scale - 0.5).astype(np.float32)
        return np.minimum(np.maximum(out, np.float32(-0.5)), limit.astype(np.float32))

    n = sum(counts)
    boxes = to_frame(np.concatenate([d.boxes for d in decoded]).reshape(n, 2, 2)).reshape(n, 4)
    keypoints = np.concatenate([d.keypoints for d in decoded])
    if keypoints.shape[1]:
        keypoints[..., 0:2] = to_frame(keypoints[..., 0:2])
    scores = np.concatenate([d.scores for d in decoded])
    class_ids = np.concatenate([d.class_ids for d in decoded])
    cuts = np.cumsum(counts)[:-1]
    return [
        Detections(b, s, c, k) for b, s, c, k in zip(
            np.split(boxes, cuts), np.split(scores, cuts), np.split(class_ids, cuts),
            np.split(keypoints, cuts), strict=True,
        )
    ]


def clip_to_frame(det: Detections, width: int, height: int) -> Detections:
    """Clip boxes and keypoints (in place) to the frame, as Ultralytics' scale_* do."""
    for values, limit in ((det.boxes[:, 0::2], width), (det.boxes[:, 1::2], height),
                          (det.keypoints[..., 0], width), (det.keypoints[..., 1], height)):
        np.minimum(np.maximum(values, -0.5, out=values), limit - 0.5, out=values)
    return det


def ultralytics_preprocess(
    images: Sequence[ImageArray], info: ModelInfo, normalizer: Normalizer | None,
    buffers: BatchBuffers | None = None,
) -> tuple[dict[str, np.ndarray], list[Transform]]:
    """Letterbox as Ultralytics does (bilinear, centred) and convert to the input tensor
    (its arrays taken from ``buffers`` when given)."""
    spec = info.input
    channels = 3
    if spec.color == "GRAY":  # Ultralytics' channels: 1 loaders convert before the letterbox
        images = [np.asarray(cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)[..., None], np.uint8)
                  for im in images]
        channels = 1
    batch = new_batch(buffers, (len(images), spec.height, spec.width, channels), np.uint8)
    transforms = [
        ultralytics_letterbox(im, (spec.height, spec.width), spec.pad_value, batch[i])[1]
        for i, im in enumerate(images)
    ]
    feed = converted(
        batch, to_model_input(batch, spec, normalizer, buffers, transforms), buffers
    )
    return {spec.name: feed}, transforms


def adapter_by_kind(kind: str) -> type[Adapter]:
    for cls in _REGISTRY:
        if cls.name == kind:
            return cls
    names = ", ".join(c.name for c in _REGISTRY)
    raise ModelError(f"Unknown adapter {kind!r}; choose auto or one of: {names}.")


def choose_adapter(info: ModelInfo, settings: AdapterConfig) -> AdapterChoice:
    """The configured adapter (refused with a clear error if the model does not fit), or auto."""
    if settings.kind == "auto":
        return select_adapter(info)
    cls = adapter_by_kind(settings.kind)
    verdict = cls.fits(info, settings)
    if not verdict.accepted:
        raise ModelError(
            f"Model {str(info.path)!r} does not fit the configured adapter {cls.name!r}: "
            f"{verdict.reason}. That adapter supports {cls.supports}. Found "
            f"{info.describe_found()}. Remove 'adapter:' to let LineWatch choose, or fix it."
        )
    return AdapterChoice(cls, f"forced by config (adapter: {cls.name}); {verdict.reason}", ())


def configured_adapter(
    info: ModelInfo, settings: AdapterConfig
) -> tuple[ModelInfo, Normalizer | None, AdapterChoice]:
    """The model info with the config's input overrides, its mean/std step, and its adapter
    (forced by ``settings.kind`` or chosen from the file); raises :class:`ModelError`."""
    info, normalizer = apply_input_override(info, settings.input)
    return info, normalizer, choose_adapter(info, settings)


def build_adapter(
    info: ModelInfo,
    settings: AdapterConfig,
    score_threshold: float | None,
    max_detections: int | None,
) -> tuple[ModelInfo, Adapter, AdapterChoice]:
    """:func:`configured_adapter`, and the adapter built: the info as the adapter sees it
    (input overrides applied), the adapter, and the choice (for its reason)."""
    info, normalizer, choice = configured_adapter(info, settings)
    return info, choice.adapter(info, score_threshold, max_detections, settings,
                                normalizer), choice


def check_adapter_fits(path: str | Path, settings: AdapterConfig) -> AdapterChoice:
    """Read the file's tensors and metadata (no session) and choose as the service will."""
    return configured_adapter(read_model_info(path), settings)[2]


# Top-down adapters (SimCC, heatmaps, regression) register themselves after the above.
from service.inference import topdown as _topdown  # noqa: E402,F401
