"""Multi-object tracking over boxes and keypoints: ``Tracker(config).update(dets, t)``.

ByteTrack-style (Zhang et al., ECCV 2022) two-stage association:

1. confirmed tracks (active and recently lost) against high-score detections;
2. the still unmatched *active* tracks against low-score detections, which keeps
   a track alive through a partial occlusion where the detector is unsure;
3. tentative tracks against the remaining high-score detections.

Costs are ``1 - similarity`` with the similarity mixing box IoU and keypoint
similarity (OKS); tracks and detections of different classes never match.  Each
track has a constant-velocity Kalman filter on its box (centre and size; velocity
in px/s comes from its state) and a One-Euro filter per keypoint.

State is one table of parallel numpy arrays (one row per track), so the per-frame
cost is a handful of vectorised operations whatever the number of instances.
Tentative tracks that miss a frame are dropped; confirmed tracks without a match
are kept for ``max_lost_s`` (predicted along their velocity) and then pruned, so
the table stays bounded over any run length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from service.domain import Detections, Tracks
from service.tracking import kalman
from service.tracking.association import assign, similarity_matrix
from service.tracking.config import TrackerConfig
from service.tracking.one_euro import one_euro_step

F64 = npt.NDArray[np.float64]
Int = npt.NDArray[np.intp]

_MAX_ID = 2**31 - 1


@dataclass
class _Table:
    """Per-track state, one row per track."""

    ids: npt.NDArray[np.int64]
    cls: npt.NDArray[np.int32]
    mean: F64  # (M, 8) Kalman state
    cov: F64  # (M, 8, 8)
    t_pred: F64  # time the Kalman state refers to
    t_seen: F64  # time of the last matched detection
    hits: npt.NDArray[np.int64]
    confirmed: npt.NDArray[np.bool_]
    score: F64
    det_index: npt.NDArray[np.int64]  # detection matched in the current update, else -1
    centre_seen: F64  # (M, 2) box centre after the last matched update
    kp: F64  # (M, K, 3) reported keypoints: smoothed x y, detected score
    ef_x: F64  # (M, K, 2) One-Euro value
    ef_dx: F64  # (M, K, 2) One-Euro speed
    ef_live: npt.NDArray[np.bool_]  # (M, K) the keypoint's filter holds a value

    @classmethod
    def empty(cls, k: int) -> _Table:
        return cls(
            ids=np.zeros(0, np.int64),
            cls=np.zeros(0, np.int32),
            mean=np.zeros((0, 8)),
            cov=np.zeros((0, 8, 8)),
            t_pred=np.zeros(0),
            t_seen=np.zeros(0),
            hits=np.zeros(0, np.int64),
            confirmed=np.zeros(0, bool),
            score=np.zeros(0),
            det_index=np.zeros(0, np.int64),
            centre_seen=np.zeros((0, 2)),
            kp=np.zeros((0, k, 3)),
            ef_x=np.zeros((0, k, 2)),
            ef_dx=np.zeros((0, k, 2)),
            ef_live=np.zeros((0, k), bool),
        )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_keypoints(self) -> int:
        return int(self.kp.shape[1])

    def keep(self, mask: npt.NDArray[np.bool_]) -> _Table:
        return _Table(**{f.name: getattr(self, f.name)[mask] for f in fields(self)})

    def extend(self, other: _Table) -> _Table:
        return _Table(
            **{
                f.name: np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                for f in fields(self)
            }
        )


class Tracker:
    """Turns per-frame detections of one camera into tracks with stable ids."""

    def __init__(self, config: TrackerConfig | None = None) -> None:
        self.config = config or TrackerConfig()
        self._table: _Table | None = None
        self._next_id = 1
        self._last_t = -np.inf

    @property
    def num_tracks(self) -> int:
        """Tracks held internally (tentative, active and lost): bounded by pruning."""
        return 0 if self._table is None else len(self._table)

    def update(self, detections: Detections, t: float) -> Tracks:
        """Associate the detections at time t (seconds) and return the confirmed tracks."""
        cfg = self.config
        t = float(t)
        tab = self._prepare(detections)
        if len(tab):
            tab.mean, tab.cov = kalman.predict(tab.mean, tab.cov, t - tab.t_pred)
            tab.t_pred[:] = t
            tab.det_index[:] = -1
        scores = detections.scores
        high = np.flatnonzero(scores >= cfg.track_high_thresh)
        low = np.flatnonzero((scores >= cfg.track_low_thresh) & (scores < cfg.track_high_thresh))
        lost = tab.t_seen < self._last_t  # missed at least the previous update
        pool = np.flatnonzero(tab.confirmed)
        m1, um_pool, um_high = self._associate(tab, pool, detections, high, cfg.match_thresh)
        active_left = um_pool[~lost[um_pool]]
        m2, _, _ = self._associate(tab, active_left, detections, low, cfg.low_match_thresh)
        tentative = np.flatnonzero(~tab.confirmed)
        m3, um_tent, um_new = self._associate(
            tab, tentative, detections, um_high, cfg.tentative_match_thresh
        )
        matches = np.concatenate([m1, m2, m3])
        if len(matches):
            self._correct(tab, matches[:, 0], detections, matches[:, 1], t)
        keep = np.ones(len(tab), bool)
        keep[um_tent] = False
        keep &= ~(tab.confirmed & (t - tab.t_seen > cfg.max_lost_s))
        if not keep.all():
            tab = tab.keep(keep)
        new = um_new[scores[um_new] >= cfg.new_track_thresh]
        if len(new):
            tab = tab.extend(self._start(detections, new, t))
        self._table = tab
        self._last_t = t
        return self._output(tab, detections, t)

    # -- steps -----------------------------------------------------------------
    def _prepare(self, detections: Detections) -> _Table:
        k = detections.num_keypoints
        tab = self._table
        if tab is None or (len(tab) == 0 and len(detections) and tab.num_keypoints != k):
            tab = self._table = _Table.empty(k if len(detections) else 0)
        if len(detections) and tab.num_keypoints != k:
            raise ValueError(
                f"detections have {k} keypoints but this tracker's tracks have "
                f"{tab.num_keypoints}; use one tracker per model"
            )
        return tab

    def _associate(
        self, tab: _Table, rows: Int, dets: Detections, cols: Int, max_cost: float
    ) -> tuple[Int, Int, Int]:
        """Match track rows to detection columns; returns indices into tab / dets."""
        if len(rows) == 0 or len(cols) == 0:
            return np.zeros((0, 2), np.intp), rows, cols
        cfg = self.config
        boxes = kalman.cxcywh_to_xyxy(tab.mean[rows, :4])
        kp = tab.kp[rows].copy()
        kp[:, :, :2] += (tab.mean[rows, None, :2] - tab.centre_seen[rows, None, :])
        sim = similarity_matrix(
            boxes, kp, tab.cls[rows],
            dets.boxes[cols], dets.keypoints[cols], dets.class_ids[cols],
            oks_weight=cfg.oks_weight, oks_sigma=cfg.oks_sigma,
            keypoint_thresh=cfg.keypoint_thresh,
        )  # fmt: skip
        m, um_r, um_c = assign(1.0 - sim, max_cost)
        return np.column_stack([rows[m[:, 0]], cols[m[:, 1]]]), rows[um_r], cols[um_c]

    def _correct(self, tab: _Table, ti: Int, dets: Detections, di: Int, t: float) -> None:
        cfg = self.config
        velocity = tab.mean[ti, 4:6].copy()
        dt = t - tab.t_seen[ti]
        z = kalman.xyxy_to_cxcywh(dets.boxes[di])
        # A track's second sighting: its velocity is the step between the two boxes (the
        # filter's prior, zero, would lag a moving part for many frames).
        second = (tab.hits[ti] == 1) & (dt > 0)
        if second.any():
            velocity[second] = (z[second, :2] - tab.centre_seen[ti[second]]) / dt[second, None]
        tab.mean[ti], tab.cov[ti] = kalman.update(tab.mean[ti], tab.cov[ti], z)
        if second.any():
            tab.mean[ti[second], 4:6] = velocity[second]
        if tab.num_keypoints:
            raw = dets.keypoints[di].astype(np.float64)
            xy = raw[:, :, :2]
            valid = (raw[:, :, 2] >= cfg.keypoint_thresh) & np.isfinite(xy).all(axis=2)
            prior = tab.ef_x[ti]
            if cfg.motion_compensation:
                prior = prior + velocity[:, None, :] * dt[:, None, None]
            live = tab.ef_live[ti]
            smoothed, speed = one_euro_step(xy, prior, tab.ef_dx[ti], dt[:, None], cfg.one_euro)
            step = (valid & live)[:, :, None]
            restart = (valid & ~live)[:, :, None]
            tab.ef_x[ti] = np.where(step, smoothed, np.where(restart, xy, tab.ef_x[ti]))
            tab.ef_dx[ti] = np.where(step, speed, np.where(restart, 0.0, tab.ef_dx[ti]))
            tab.ef_live[ti] = valid
            out = raw.copy()
            out[:, :, :2] = np.where(valid[:, :, None], tab.ef_x[ti], xy)
            tab.kp[ti] = out
        tab.t_seen[ti] = t
        tab.hits[ti] += 1
        tab.confirmed[ti] |= tab.hits[ti] >= cfg.min_hits
        tab.score[ti] = dets.scores[di]
        tab.det_index[ti] = di
        tab.centre_seen[ti] = tab.mean[ti, :2]

    def _start(self, dets: Detections, di: Int, t: float) -> _Table:
        n = len(di)
        mean, cov = kalman.initiate(kalman.xyxy_to_cxcywh(dets.boxes[di]))
        ids = (self._next_id - 1 + np.arange(n)) % _MAX_ID + 1
        self._next_id = int(ids[-1]) % _MAX_ID + 1
        raw = dets.keypoints[di].astype(np.float64)
        valid = (raw[:, :, 2] >= self.config.keypoint_thresh) & np.isfinite(raw[:, :, :2]).all(2)
        return _Table(
            ids=ids.astype(np.int64),
            cls=dets.class_ids[di].astype(np.int32),
            mean=mean,
            cov=cov,
            t_pred=np.full(n, t),
            t_seen=np.full(n, t),
            hits=np.ones(n, np.int64),
            confirmed=np.full(n, self.config.min_hits <= 1),
            score=dets.scores[di].astype(np.float64),
            det_index=di.astype(np.int64),
            centre_seen=mean[:, :2].copy(),
            kp=raw,
            ef_x=raw[:, :, :2].copy(),
            ef_dx=np.zeros_like(raw[:, :, :2]),
            ef_live=valid,
        )

    def _output(self, tab: _Table, dets: Detections, t: float) -> Tracks:
        rows = np.flatnonzero(tab.confirmed & (tab.det_index >= 0))
        di = tab.det_index[rows]
        out = Detections(
            boxes=kalman.cxcywh_to_xyxy(tab.mean[rows, :4]).astype(np.float32),
            scores=tab.score[rows].astype(np.float32),
            class_ids=tab.cls[rows],
            keypoints=tab.kp[rows].astype(np.float32),
            extra={key: value[di] for key, value in dets.extra.items()},
        )
        return Tracks(
            detections=out,
            track_ids=tab.ids[rows].astype(np.int32),
            velocity_px_s=tab.mean[rows, 4:6].astype(np.float32),
        )
