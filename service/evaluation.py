"""Model evaluation against the synthetic line's exact ground truth.

Pure numpy core:

- :func:`oks_matrix`: COCO object keypoint similarity between predictions and
  ground-truth instances, with a per-class sigma (rigid parts: 0.05 for every
  keypoint) and the ground-truth box area as the scale;
- :func:`match_pairs`: one-to-one matching at OKS >= threshold (Hungarian, most
  matches first, then highest total OKS);
- :func:`match_frame`: one frame's true/false positives and misses, with
  ground-truth instances mostly out of view treated as *ignore* regions (like
  COCO crowd): a prediction on them is neither a true nor a false positive;
- :class:`EvalAccumulator` sums frames into the report.

:func:`evaluate_model` renders held-out frames with ``service.sim.Scene`` and runs
them through the same :class:`service.inference.OrtModel` the service uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy.optimize import linear_sum_assignment

from service.domain import Detections

if TYPE_CHECKING:
    from service.inference import InferenceConfig

log = logging.getLogger(__name__)

DEFAULT_SIGMA = 0.05
OKS_THRESHOLD = 0.5
MIN_IN_VIEW = 0.8
_EPS = np.spacing(1)


class InstanceLike(Protocol):
    """What evaluation reads from a ground-truth instance (``service.sim.InstanceTruth``)."""

    class_name: str
    box: Any  # (4,) x1 y1 x2 y2 px
    keypoints_px: Any  # (K, 2)
    visible: Any  # (K,) bool
    in_view: float


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """One frame's ground truth as parallel arrays (G instances, K keypoints)."""

    class_names: tuple[str, ...]
    boxes: npt.NDArray[np.float64]  # (G, 4)
    keypoints: npt.NDArray[np.float64]  # (G, K, 2)
    visible: npt.NDArray[np.bool_]  # (G, K)
    ignore: npt.NDArray[np.bool_]  # (G,) mostly out of view: neither TP nor FN

    @classmethod
    def from_instances(
        cls, instances: Sequence[InstanceLike], min_in_view: float = MIN_IN_VIEW,
        num_keypoints: int = 0,
    ) -> GroundTruth:
        k = len(instances[0].keypoints_px) if instances else num_keypoints
        return cls(
            class_names=tuple(i.class_name for i in instances),
            boxes=np.array([np.asarray(i.box, float) for i in instances], float).reshape(-1, 4),
            keypoints=np.array(
                [np.asarray(i.keypoints_px, float) for i in instances], float
            ).reshape(-1, k, 2),
            visible=np.array([np.asarray(i.visible, bool) for i in instances], bool).reshape(-1, k),
            ignore=np.array([i.in_view < min_in_view for i in instances], bool),
        )

    def __len__(self) -> int:
        return len(self.class_names)


def oks_matrix(
    pred_keypoints: npt.ArrayLike,
    gt_keypoints: npt.ArrayLike,
    gt_visible: npt.ArrayLike,
    gt_areas: npt.ArrayLike,
    sigmas: npt.ArrayLike,
) -> npt.NDArray[np.float64]:
    """COCO OKS for every (prediction, ground truth) pair -> (P, G).

    ``sigmas`` is one value per ground truth (G,) or per ground truth and keypoint
    (G, K).  Only visible keypoints count; a ground truth with none visible uses
    all of its keypoints (the sim knows where hidden ones are).
    """
    pred = np.asarray(pred_keypoints, float)[..., :2]
    gt = np.asarray(gt_keypoints, float)
    vis = np.asarray(gt_visible, bool).copy()
    area = np.asarray(gt_areas, float)
    p, g = pred.shape[0], gt.shape[0]
    if p == 0 or g == 0:
        return np.zeros((p, g))
    if pred.shape[1] != gt.shape[1]:
        raise ValueError(f"keypoint counts differ: predictions {pred.shape}, truth {gt.shape}")
    sig = np.broadcast_to(np.asarray(sigmas, float).reshape(g, -1), vis.shape)
    vis[~vis.any(axis=1)] = True
    d2 = ((pred[:, None] - gt[None]) ** 2).sum(-1)  # (P, G, K)
    var = (2.0 * sig) ** 2  # (G, K)
    e = d2 / var[None] / (area[None, :, None] + _EPS) / 2.0
    sim = np.exp(-e) * vis[None]
    return np.asarray(sim.sum(-1) / vis.sum(-1)[None], float)


def match_pairs(score: npt.ArrayLike, threshold: float = OKS_THRESHOLD) -> list[tuple[int, int]]:
    """One-to-one (row, column) pairs with score >= threshold: most pairs, then best total."""
    s = np.asarray(score, float)
    if s.size == 0:
        return []
    ok = s >= threshold
    cost = np.where(ok, -(1.0 + s), 0.0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if ok[r, c]]


@dataclass(slots=True)
class FrameResult:
    """One frame's outcome, by class name."""

    tp: dict[str, int] = field(default_factory=dict)
    fp: dict[str, int] = field(default_factory=dict)
    fn: dict[str, int] = field(default_factory=dict)
    ignored: int = 0
    kpt_errors: list[float] = field(default_factory=list)  # px, visible keypoints of TPs
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (prediction, truth)


def match_frame(
    pred: Detections,
    truth: GroundTruth,
    class_names: Sequence[str],
    sigma: float | Mapping[str, float] = DEFAULT_SIGMA,
    oks_threshold: float = OKS_THRESHOLD,
) -> FrameResult:
    """Match one frame's predictions to its ground truth (same class only).

    ``class_names`` maps prediction class ids to names (the model's classes).
    """
    pred_names = [
        class_names[c] if 0 <= c < len(class_names) else f"class{c}" for c in pred.class_ids
    ]
    sigmas = np.array([_sigma(sigma, n) for n in truth.class_names], float)
    w = np.clip(truth.boxes[:, 2] - truth.boxes[:, 0], 0.0, None)
    h = np.clip(truth.boxes[:, 3] - truth.boxes[:, 1], 0.0, None)
    oks = oks_matrix(pred.keypoints, truth.keypoints, truth.visible, w * h, sigmas)
    same = np.array(pred_names, object)[:, None] == np.array(truth.class_names, object)[None]
    oks = np.where(same.reshape(oks.shape), oks, 0.0)

    result = FrameResult()
    valid = np.flatnonzero(~truth.ignore)
    pairs = [(p, int(valid[g])) for p, g in match_pairs(oks[:, valid], oks_threshold)]
    matched_pred = {p for p, _ in pairs}
    matched_gt = {g for _, g in pairs}
    ignore_cols = np.flatnonzero(truth.ignore)
    for p, name in enumerate(pred_names):
        if p in matched_pred:
            _inc(result.tp, name)
        elif ignore_cols.size and bool((oks[p, ignore_cols] >= oks_threshold).any()):
            result.ignored += 1
        else:
            _inc(result.fp, name)
    for gi in valid.tolist():
        if gi not in matched_gt:
            _inc(result.fn, truth.class_names[gi])
    for pi, gi in pairs:
        vis = truth.visible[gi]
        d = np.linalg.norm(pred.keypoints[pi, :, :2] - truth.keypoints[gi], axis=-1)
        result.kpt_errors.extend(float(x) for x in d[vis])
    result.pairs = pairs
    return result


def _sigma(sigma: float | Mapping[str, float], name: str) -> float:
    if isinstance(sigma, Mapping):
        return float(sigma.get(name, DEFAULT_SIGMA))
    return float(sigma)


def _inc(table: dict[str, int], key: str, by: int = 1) -> None:
    table[key] = table.get(key, 0) + by


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


class EvalAccumulator:
    """Sums frame results and model timings into the evaluation report."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = tuple(class_names)
        self.frames = 0
        self.instances = 0
        self.ignored_instances = 0
        self.ignored_predictions = 0
        self.tp: dict[str, int] = {}
        self.fp: dict[str, int] = {}
        self.fn: dict[str, int] = {}
        self.errors: list[float] = []
        self.model_ms: list[float] = []

    def add(self, result: FrameResult, truth: GroundTruth, model_ms: float | None = None) -> None:
        self.frames += 1
        self.instances += int((~truth.ignore).sum())
        self.ignored_instances += int(truth.ignore.sum())
        self.ignored_predictions += result.ignored
        for src, dst in ((result.tp, self.tp), (result.fp, self.fp), (result.fn, self.fn)):
            for k, v in src.items():
                _inc(dst, k, v)
        self.errors.extend(result.kpt_errors)
        if model_ms is not None:
            self.model_ms.append(model_ms)

    def summary(self) -> dict[str, Any]:
        tp, fp, fn = (sum(t.values()) for t in (self.tp, self.fp, self.fn))
        names = list(self.class_names) + sorted(
            (set(self.tp) | set(self.fp) | set(self.fn)) - set(self.class_names)
        )
        per_class = {}
        for n in names:
            t, f, m = self.tp.get(n, 0), self.fp.get(n, 0), self.fn.get(n, 0)
            per_class[n] = {
                "recall": _ratio(t, t + m), "precision": _ratio(t, t + f),
                "instances": t + m, "tp": t, "fp": f, "fn": m,
            }
        err = np.asarray(self.errors, float)
        ms = np.asarray(self.model_ms, float)
        return {
            "recall": _ratio(tp, tp + fn),
            "precision": _ratio(tp, tp + fp),
            "kpt_err_px_mean": float(err.mean()) if err.size else None,
            "kpt_err_px_median": float(np.median(err)) if err.size else None,
            "kpt_err_px_p95": float(np.percentile(err, 95)) if err.size else None,
            "ms_per_frame": float(np.median(ms)) if ms.size else None,
            "ms_per_frame_p95": float(np.percentile(ms, 95)) if ms.size else None,
            "frames": self.frames,
            "instances": self.instances,
            "keypoints": int(err.size),
            "tp": tp, "fp": fp, "fn": fn,
            "ignored_instances": self.ignored_instances,
            "ignored_predictions": self.ignored_predictions,
            "per_class": per_class,
        }


@dataclass(frozen=True, slots=True)
class Matching:
    """How predictions are matched to the truth: per-class keypoint sigma for OKS, the OKS
    a match needs, and the in-view fraction below which a true instance is ignored."""

    sigma: float | Mapping[str, float] = DEFAULT_SIGMA
    oks_threshold: float = OKS_THRESHOLD
    min_in_view: float = MIN_IN_VIEW

    def to_dict(self) -> dict[str, Any]:
        sigma = dict(self.sigma) if isinstance(self.sigma, Mapping) else self.sigma
        return {"sigma": sigma, "oks_threshold": self.oks_threshold,
                "min_in_view": self.min_in_view}


@dataclass(frozen=True, slots=True)
class HeldOutFrames:
    """The sim frames ``start + i * every`` (i < ``frames``) of ``scenario`` / ``seed``,
    rendered at ``width`` x ``height`` (defaults: outside the shipped model's training
    and validation seeds)."""

    scenario: str = "conveyor"
    seed: int = 9000
    frames: int = 100
    every: int = 5
    start: int = 0
    width: int = 640
    height: int = 480
    fps: float = 30.0

    def render(self) -> Iterator[tuple[np.ndarray, Sequence[InstanceLike]]]:
        """(image, truth instances) of each frame, rendered as they are asked for."""
        from service.errors import LineWatchError
        from service.sim import Scene

        if self.frames < 1 or self.every < 1 or self.start < 0:
            raise LineWatchError("frames and every must be >= 1 and start >= 0.")
        try:
            scene = Scene(self.scenario, seed=self.seed, width=self.width, height=self.height,
                          fps=self.fps)
        except ValueError as exc:
            raise LineWatchError(f"Cannot build the evaluation scene: {exc}") from exc
        for i in range(self.frames):
            image, truth = scene.render(self.start + i * self.every)
            yield image, truth.instances

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "seed": self.seed, "start": self.start,
                "every": self.every, "width": self.width, "height": self.height}


def evaluate_frames(
    model: Any,
    frames: Iterable[tuple[np.ndarray, Sequence[InstanceLike]]],
    matching: Matching = Matching(),
) -> dict[str, Any]:
    """Run (image, truth instances) pairs one at a time through an ``OrtModel``."""
    names = model.info.class_names
    acc = EvalAccumulator(names)
    for image, instances in frames:
        det = model.predict([image])[0]
        truth = GroundTruth.from_instances(instances, matching.min_in_view,
                                           model.info.num_keypoints)
        result = match_frame(det, truth, names, matching.sigma, matching.oks_threshold)
        acc.add(result, truth, model.last_timing.model_ms_per_image)
    return acc.summary()


def evaluation_inference(
    providers: str | list[str] = "auto", threads: int = 1,
    score_threshold: float | None = None,
) -> InferenceConfig:
    """The inference settings ``model eval`` runs a model with: one frame at a time
    (one instance), ``threads`` threads inside an operator, one across."""
    from service.inference import InferenceConfig

    return InferenceConfig(providers=providers, intra_op_threads=threads, inter_op_threads=1,
                           score_threshold=score_threshold, instances=1)


def evaluate_model(
    model_path: str | Path,
    held_out: HeldOutFrames = HeldOutFrames(),
    inference: InferenceConfig | None = None,
    matching: Matching = Matching(),
) -> dict[str, Any]:
    """Score the model (run as ``inference`` says, default :func:`evaluation_inference`)
    on the ``held_out`` sim frames."""
    from service.inference import OrtModel

    config = inference or evaluation_inference()
    model = OrtModel(model_path, config, name="eval")
    report = evaluate_frames(model, held_out.render(), matching)
    head = {
        "model": str(model_path), "provider": model.provider,
        "inference_precision": (model.acceleration or {}).get("precision"),  # OpenVINO
        "adapter": model.adapter.name, **held_out.to_dict(),
        "threads": config.intra_op_threads,
        "score_threshold": model.adapter.score_threshold, **matching.to_dict(),
    }
    return {**report, **head}


def render_report(report: Mapping[str, Any]) -> str:
    """Human-readable text of an evaluation report."""

    def num(v: Any, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"model {report['model']} on {report['provider']}"
        + (f" {report['inference_precision']}" if report.get("inference_precision") else "")
        + f" ({report['threads']} thread(s)), "
        f"scenario {report['scenario']} seed {report['seed']}: {report['frames']} frames, "
        f"{report['instances']} instances >= {report['min_in_view']:.0%} in view",
        f"recall {num(report['recall'])}  precision {num(report['precision'])}  "
        f"(OKS >= {report['oks_threshold']}, score >= {report['score_threshold']})",
        f"keypoint error px: mean {num(report['kpt_err_px_mean'], '.2f')}  "
        f"p95 {num(report['kpt_err_px_p95'], '.2f')}  over {report['keypoints']} keypoints",
        f"model ms/frame: median {num(report['ms_per_frame'], '.2f')}  "
        f"p95 {num(report['ms_per_frame_p95'], '.2f')}",
    ]
    for name, c in report["per_class"].items():
        lines.append(
            f"  {name:10s} recall {num(c['recall'])}  precision {num(c['precision'])}  "
            f"tp {c['tp']}  fp {c['fp']}  fn {c['fn']}"
        )
    return "\n".join(lines)
