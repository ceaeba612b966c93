"""Top-down keypoint adapters: one crop per region of interest, all crops in one batch.

:class:`TopDownAdapter` cuts every ROI of every frame (fixed boxes from the config,
or a detector's boxes) to the model input and returns one ``CropTransform`` per
crop, so a single ``session.run`` covers all ROIs of all frames; ``postprocess``
decodes the crops and groups them back into one :class:`Detections` per frame.
Each instance's box is its ROI, its score the mean keypoint score, its class the
detector's (0 for fixed ROIs); ``extra["roi_score"]`` keeps the detector score.

Families: :class:`SimccAdapter` (RTMPose: two outputs ``[B, K, W*r]``, ``[B, K, H*r]``),
:class:`HeatmapAdapter` (HRNet/ViTPose-style ``[B, K, H/s, W/s]``) and
:class:`RegressionAdapter` (direct coordinates, described by ``adapter.output``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import cast

import numpy as np

from service.domain import ClassInfo, Detections, ImageArray
from service.errors import ModelError
from service.inference.adapter_config import AdapterConfig
from service.inference.adapters import Adapter, Verdict, register_adapter
from service.inference.decoders import (
    decode_heatmaps,
    decode_regression,
    decode_simcc,
    heatmap_to_input,
)
from service.inference.inputs import to_model_input
from service.inference.metadata import ModelInfo
from service.inference.preprocess import Transform
from service.inference.roi import CropTransform, crop, whole_image_box

DEFAULT_SPLIT_RATIO = 2.0


class TopDownAdapter(Adapter):
    """Crops per ROI in, keypoints per ROI out."""

    def rois_for(
        self, images: Sequence[ImageArray], cameras: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """The configured fixed ROIs of each image's camera (the whole frame when none)."""
        out = []
        for i, image in enumerate(images):
            boxes = self.settings.roi.boxes_for(cameras[i] if cameras is not None else None)
            rois = np.asarray(boxes, np.float32).reshape(-1, 4) if boxes else np.asarray(
                [whole_image_box(image)], np.float32
            )
            out.append(rois)
        return out

    def preprocess(
        self, images: Sequence[ImageArray]
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        return self.preprocess_rois(images, self.rois_for(images))

    def preprocess_rois(
        self,
        images: Sequence[ImageArray],
        rois: Sequence[np.ndarray],
        scores: Sequence[np.ndarray] | None = None,
        classes: Sequence[np.ndarray] | None = None,
    ) -> tuple[dict[str, np.ndarray], list[Transform]]:
        """Crop every ROI (``(M_i, 4)`` boxes per image) into one model batch."""
        spec = self.info.input
        hw = (spec.height, spec.width)
        pad = self.settings.input.pad_value or 0
        crops: list[np.ndarray] = []
        transforms: list[Transform] = []
        for i, (image, boxes) in enumerate(zip(images, rois, strict=True)):
            for j, box in enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)):
                patch, t = crop(
                    image, box, hw, self.settings.roi.padding, pad, i, len(images),
                    float(scores[i][j]) if scores is not None else 1.0,
                    int(classes[i][j]) if classes is not None else 0,
                )
                crops.append(patch)
                transforms.append(t)
        batch = np.stack(crops) if crops else np.zeros((0, *hw, 3), np.uint8)
        return {spec.name: to_model_input(batch, spec, self.normalizer)}, transforms

    @abstractmethod
    def decode_crops(self, outputs: Sequence[np.ndarray], n: int) -> np.ndarray:
        """Outputs of ``n`` crops -> ``(n, K, 3)`` keypoints in model-input pixels."""

    def postprocess(
        self, outputs: Sequence[np.ndarray], transforms: Sequence[Transform]
    ) -> list[Detections]:
        crops = [cast(CropTransform, t) for t in transforms]
        if not crops:
            return []
        kps = self.decode_crops(outputs, len(crops))
        num_images = crops[0].num_images
        per_image: list[list[int]] = [[] for _ in range(num_images)]
        for c, t in enumerate(crops):
            per_image[t.image_index].append(c)
        result = []
        k = kps.shape[1]
        for idx in per_image:
            if not idx:
                result.append(Detections.empty(k))
                continue
            kp = kps[idx].copy()
            for row, c in enumerate(idx):
                kp[row, :, 0:2] = crops[c].to_source(kp[row, :, 0:2])
            scores = kp[..., 2].mean(axis=1) if k else np.ones(len(idx), np.float32)
            keep = np.flatnonzero(scores >= self.score_threshold)
            result.append(Detections(
                boxes=np.asarray([crops[c].box for c in idx], np.float32)[keep],
                scores=scores[keep],
                class_ids=np.asarray([crops[c].roi_class for c in idx], np.int32)[keep],
                keypoints=kp[keep],
                extra={"roi_score": np.asarray([crops[c].roi_score for c in idx],
                                               np.float32)[keep]},
            ))
        return result

    def classes(self) -> tuple[ClassInfo, ...]:
        """Class and keypoint names: metadata, else the config's output spec, else generic."""
        if self.info.classes:
            return self.info.classes
        spec = self.settings.output
        names = tuple(spec.keypoint_names) if spec and spec.keypoint_names else tuple(
            f"kp{i}" for i in range(self.num_keypoints)
        )
        return (ClassInfo(spec.class_name if spec else "object", names),)


def _int_dims(shape: Sequence[object]) -> list[int] | None:
    dims = [d for d in shape]
    return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None  # type: ignore[call-overload]


@register_adapter
class SimccAdapter(TopDownAdapter):
    """RTMPose SimCC: ``simcc_x [B, K, W*r]`` and ``simcc_y [B, K, H*r]`` (r: split ratio)."""

    name = "simcc"
    supports = (
        "two rank-3 outputs [B, K, W*r] and [B, K, H*r] (SimCC x and y, r = split ratio, "
        "metadata simcc_split_ratio or 2.0), run on ROIs"
    )

    @classmethod
    def accepts(cls, info: ModelInfo) -> Verdict:
        return cls._check(info, None)

    @classmethod
    def fits(cls, info: ModelInfo, settings: AdapterConfig) -> Verdict:
        return cls._check(info, settings.simcc_split_ratio)

    @classmethod
    def _check(cls, info: ModelInfo, ratio: float | None) -> Verdict:
        if len(info.outputs) != 2:
            return Verdict(False, f"{len(info.outputs)} outputs, expected 2 (simcc_x, simcc_y)")
        sx, sy = (_int_dims(o.shape[1:]) for o in info.outputs)
        if sx is None or sy is None or len(sx) != 2 or len(sy) != 2:
            return Verdict(False, "SimCC outputs must be rank 3 with static K and bins")
        if sx[0] != sy[0]:
            return Verdict(False, f"keypoint counts differ: {sx[0]} vs {sy[0]}")
        r = ratio or _split_ratio(info) or DEFAULT_SPLIT_RATIO
        h, w = info.imgsz
        if abs(sx[1] - w * r) > 0.5 or abs(sy[1] - h * r) > 0.5:
            return Verdict(
                False, f"bins {sx[1]}x{sy[1]} != input {w}x{h} times split ratio {r}"
            )
        return Verdict(True, f"two outputs [B, {sx[0]}, {sx[1]}], [B, {sy[0]}, {sy[1]}] = SimCC "
                             f"x/y bins of a {w}x{h} input at split ratio {r}")

    @property
    def num_keypoints(self) -> int:
        k = self.info.outputs[0].shape[1]
        return int(k) if isinstance(k, int) else self.info.num_keypoints

    def decode_crops(self, outputs: Sequence[np.ndarray], n: int) -> np.ndarray:
        r = self.settings.simcc_split_ratio or _split_ratio(self.info) or DEFAULT_SPLIT_RATIO
        locs, vals = decode_simcc(outputs[0][:n], outputs[1][:n], r, self.settings.simcc_score)
        return np.concatenate([locs, vals[..., None]], axis=-1)


def _split_ratio(info: ModelInfo) -> float | None:
    raw = info.metadata.get("simcc_split_ratio")
    try:
        return float(raw) if raw is not None else None
    except ValueError as exc:
        raise ModelError(
            f"Model {str(info.path)!r}: metadata simcc_split_ratio must be a number, got {raw!r}."
        ) from exc


@register_adapter
class HeatmapAdapter(TopDownAdapter):
    """Heatmaps ``[B, K, H/s, W/s]``: argmax with sub-pixel refinement (DARK by default)."""

    name = "heatmap"
    supports = (
        "one rank-4 output [B, K, H/s, W/s] (one heatmap per keypoint, integer stride s of "
        "the input), run on ROIs"
    )

    @classmethod
    def accepts(cls, info: ModelInfo) -> Verdict:
        if len(info.outputs) != 1:
            return Verdict(False, f"{len(info.outputs)} outputs, expected 1")
        dims = _int_dims(info.outputs[0].shape[1:])
        if dims is None or len(dims) != 3:
            return Verdict(False, f"output {info.outputs[0].describe()} is not [B, K, h, w]")
        k, hh, hw = dims
        h, w = info.imgsz
        if hh < 3 or hw < 3 or h % hh or w % hw or h // hh != w // hw:
            return Verdict(False, f"{hw}x{hh} is not the {w}x{h} input at one integer stride")
        return Verdict(True, f"output [B, {k}, {hh}, {hw}] = {k} heatmaps at stride {h // hh}")

    @property
    def num_keypoints(self) -> int:
        k = self.info.outputs[0].shape[1]
        return int(k) if isinstance(k, int) else self.info.num_keypoints

    def decode_crops(self, outputs: Sequence[np.ndarray], n: int) -> np.ndarray:
        hm = np.asarray(outputs[0][:n], np.float32)
        locs, vals = decode_heatmaps(hm, self.settings.heatmap_refine)
        xy = heatmap_to_input(locs, (hm.shape[2], hm.shape[3]), self.info.imgsz)
        return np.concatenate([xy, vals[..., None]], axis=-1)


@register_adapter
class RegressionAdapter(TopDownAdapter):
    """Direct keypoint regression, read as ``adapter.output`` describes (MoveNet and alike)."""

    name = "regression"
    supports = (
        "any keypoint tensor described by an output spec in the config: adapter: {kind: "
        "regression, output: {name, layout BNKV|BKV|BF, coords normalized|pixel, axis_order "
        "xy|yx, score_index, keypoint_names}}; run on ROIs"
    )

    @classmethod
    def accepts(cls, info: ModelInfo) -> Verdict:
        return Verdict(False, "direct regression needs an output spec in the config")

    @classmethod
    def fits(cls, info: ModelInfo, settings: AdapterConfig) -> Verdict:
        spec = settings.output
        if spec is None:
            return Verdict(False, "adapter.output (the output spec) is missing")
        names = [o.name for o in info.outputs]
        if spec.name is None and len(names) != 1:
            return Verdict(False, f"{len(names)} outputs ({', '.join(names)}); name one")
        if spec.name is not None and spec.name not in names:
            return Verdict(False, f"no output named {spec.name!r} (outputs: {', '.join(names)})")
        out = info.outputs[names.index(spec.name) if spec.name else 0]
        want = {"BNKV": 4, "BKV": 3, "BF": 2}[spec.layout]
        if len(out.shape) != want:
            return Verdict(False, f"output {out.describe()} is not rank {want} ({spec.layout})")
        return Verdict(True, f"output {out.describe()} read as {spec.layout}, {spec.coords} "
                             f"{spec.axis_order}, score at {spec.score_index}")

    @property
    def _output_index(self) -> int:
        spec = self.settings.output
        names = [o.name for o in self.info.outputs]
        return names.index(spec.name) if spec and spec.name else 0

    @property
    def num_keypoints(self) -> int:
        spec = self.settings.output
        out = self.info.outputs[self._output_index]
        if spec and spec.keypoint_names:
            return len(spec.keypoint_names)
        dim = out.shape[2] if spec and spec.layout == "BNKV" else out.shape[1]
        if isinstance(dim, int) and spec and spec.layout != "BF":
            return dim
        return self.info.num_keypoints

    def decode_crops(self, outputs: Sequence[np.ndarray], n: int) -> np.ndarray:
        spec = self.settings.output
        assert spec is not None  # fits() refused the model otherwise
        raw = np.asarray(outputs[self._output_index])[:n]
        kps = decode_regression(
            raw, self.num_keypoints, spec.layout, spec.coords, spec.axis_order,
            spec.score_index, self.info.imgsz,
        )
        return kps[:, 0]  # one instance per crop
