"""The One-Euro filter (Casiez, Roussel, Vogel, CHI 2012), vectorised.

An exponential smoother whose cutoff frequency rises with the signal's speed:
strong smoothing at rest (jitter goes away), little lag in fast motion.  Values
are points of any leading shape ``(..., D)``; the speed is the norm over the last
axis, so a 2-D keypoint gets one cutoff.

Visibility: an entry whose ``valid`` flag is false does not update its state and
is marked for reset; the next valid value restarts the filter there (a keypoint
that re-appears after an occlusion does not drag its stale value along).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from service.tracking.config import OneEuroConfig

F64 = npt.NDArray[np.float64]
Bool = npt.NDArray[np.bool_]


def smoothing_factor(dt: npt.ArrayLike, cutoff: npt.ArrayLike) -> F64:
    """Exponential smoothing factor for a sample interval and cutoff frequency (Hz)."""
    r = 2.0 * np.pi * np.asarray(cutoff, np.float64) * np.asarray(dt, np.float64)
    return np.asarray(r / (r + 1.0), np.float64)


def one_euro_step(
    x: F64,
    x_prev: F64,
    dx_prev: F64,
    dt: npt.ArrayLike,
    config: OneEuroConfig,
) -> tuple[F64, F64]:
    """One filter step for points x (..., D) given the previous estimate and its speed.

    ``dt`` broadcasts against ``x[..., 0]`` (seconds, > 0).  Returns the smoothed
    value and the smoothed speed (..., D).
    """
    dt = np.maximum(np.asarray(dt, np.float64), 1e-9)[..., None]
    a_d = smoothing_factor(dt, config.d_cutoff)
    dx = (x - x_prev) / dt
    dx_hat = a_d * dx + (1.0 - a_d) * dx_prev
    speed = np.linalg.norm(dx_hat, axis=-1, keepdims=True)
    a = smoothing_factor(dt, config.min_cutoff + config.beta * speed)
    return a * x + (1.0 - a) * x_prev, dx_hat


@dataclass
class _State:
    x: F64
    dx: F64
    t: F64
    live: Bool  # the entry holds a filtered value (seen, and valid since)


class OneEuroFilter:
    """Smooths a stream of points of a fixed shape (..., D) sampled at times t."""

    def __init__(self, config: OneEuroConfig | None = None) -> None:
        self.config = config or OneEuroConfig()
        self._state: _State | None = None

    def filter(self, x: npt.ArrayLike, t: float, valid: npt.ArrayLike | None = None) -> F64:
        """Filter one sample; invalid entries come back as given and reset their filter."""
        x = np.asarray(x, np.float64)
        if x.ndim == 0:
            raise ValueError("OneEuroFilter.filter needs points of shape (..., D)")
        lead = x.shape[:-1]
        ok = np.ones(lead, bool)
        if valid is not None:
            ok = np.broadcast_to(np.asarray(valid, bool), lead).copy()
        ok = ok & np.isfinite(x).all(axis=-1)
        st = self._state
        if st is None or st.x.shape != x.shape:
            st = self._state = _State(
                x=x.copy(),
                dx=np.zeros_like(x),
                t=np.full(lead, float(t)),
                live=np.zeros(lead, bool),
            )
        step = ok & st.live & (t > st.t)
        restart = ok & ~st.live
        out = x.copy()
        if step.any():
            xs, dxs = one_euro_step(x[step], st.x[step], st.dx[step], t - st.t[step], self.config)
            out[step] = xs
            st.x[step] = xs
            st.dx[step] = dxs
        same_time = ok & st.live & (t <= st.t)
        out[same_time] = st.x[same_time]
        st.x[restart] = x[restart]
        st.dx[restart] = 0.0
        st.t[ok] = np.maximum(st.t[ok], float(t))
        st.live = ok.copy()
        return out
