"""A constant-velocity Kalman filter on boxes, batched over tracks (pure numpy).

State per track: ``[cx, cy, w, h, vcx, vcy, vw, vh]`` in pixels and pixels per
second; the measurement is the box ``[cx, cy, w, h]``.  Noise scales with the box
size as in SORT/ByteTrack; the per-frame values of ByteTrack are expressed per
second of a nominal 30 fps stream, so the filter works at any (varying) frame rate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

NOMINAL_FPS = 30.0
STD_POSITION = 1.0 / 20.0  # of the box size, per nominal frame
STD_VELOCITY = NOMINAL_FPS / 160.0  # of the box size per second, per nominal frame
_MIN_SIZE = 1.0


def xyxy_to_cxcywh(boxes: npt.ArrayLike) -> F64:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1)


def cxcywh_to_xyxy(z: npt.ArrayLike) -> F64:
    b = np.asarray(z, np.float64).reshape(-1, 4)
    half = b[:, 2:4] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def _size(z: F64) -> F64:
    """(N, 4) noise scale per state coordinate: w, h, w, h."""
    wh = np.maximum(z[:, 2:4], _MIN_SIZE)
    return np.concatenate([wh, wh], axis=1)


def initiate(z: npt.ArrayLike) -> tuple[F64, F64]:
    """Mean (N, 8) and covariance (N, 8, 8) of new tracks from boxes (N, 4) cx cy w h."""
    z = np.asarray(z, np.float64).reshape(-1, 4)
    n = len(z)
    mean = np.concatenate([z, np.zeros((n, 4))], axis=1)
    s = _size(z)
    std = np.concatenate([2 * STD_POSITION * s, 10 * STD_VELOCITY * s], axis=1)
    cov = np.zeros((n, 8, 8))
    idx = np.arange(8)
    cov[:, idx, idx] = std**2
    return mean, cov


def predict(mean: F64, cov: F64, dt: npt.ArrayLike) -> tuple[F64, F64]:
    """Propagate (N, 8) means and (N, 8, 8) covariances by dt seconds (N,) or scalar."""
    n = len(mean)
    dt = np.broadcast_to(np.maximum(np.asarray(dt, np.float64), 0.0), (n,))
    new_mean = mean.copy()
    new_mean[:, :4] += dt[:, None] * mean[:, 4:]
    new_mean[:, 2:4] = np.maximum(new_mean[:, 2:4], _MIN_SIZE)
    # F P F^T for F = [[I, dt I], [0, I]], written out blockwise
    d = dt[:, None, None]
    p11, p12, p21, p22 = cov[:, :4, :4], cov[:, :4, 4:], cov[:, 4:, :4], cov[:, 4:, 4:]
    new_cov = np.empty_like(cov)
    new_cov[:, :4, :4] = p11 + d * (p12 + p21) + d * d * p22
    new_cov[:, :4, 4:] = p12 + d * p22
    new_cov[:, 4:, :4] = p21 + d * p22
    new_cov[:, 4:, 4:] = p22
    s = _size(mean[:, :4])
    steps = (dt * NOMINAL_FPS)[:, None]
    q = np.concatenate([(STD_POSITION * s) ** 2, (STD_VELOCITY * s) ** 2], axis=1) * steps
    idx = np.arange(8)
    new_cov[:, idx, idx] += q
    return new_mean, new_cov


def update(mean: F64, cov: F64, z: npt.ArrayLike) -> tuple[F64, F64]:
    """Correct (N, 8) means and covariances with measured boxes (N, 4) cx cy w h."""
    z = np.asarray(z, np.float64).reshape(-1, 4)
    r = (STD_POSITION * _size(mean[:, :4])) ** 2
    s = cov[:, :4, :4].copy()
    idx = np.arange(4)
    s[:, idx, idx] += r
    pht = cov[:, :, :4]  # P H^T, (N, 8, 4)
    gain = np.linalg.solve(s, pht.transpose(0, 2, 1)).transpose(0, 2, 1)  # (N, 8, 4)
    innovation = z - mean[:, :4]
    new_mean = mean + np.einsum("nij,nj->ni", gain, innovation)
    new_mean[:, 2:4] = np.maximum(new_mean[:, 2:4], _MIN_SIZE)
    new_cov = cov - gain @ s @ gain.transpose(0, 2, 1)
    return new_mean, new_cov
