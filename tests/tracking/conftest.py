"""Fixtures: sim ground truth turned into detections, with noise and drop-outs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import pytest

from service.domain import Detections
from service.sim import FrameTruth, InstanceTruth, Scene


@lru_cache(maxsize=8)
def _clip(scenario: str, seed: int, frames: int, fps: float) -> tuple[FrameTruth, ...]:
    scene = Scene(scenario, seed=seed, width=640, height=480, fps=fps)
    return tuple(scene.render(i)[1] for i in range(frames))


@pytest.fixture(scope="session")
def sim_truths() -> Callable[..., tuple[FrameTruth, ...]]:
    """sim_truths(scenario, seed, frames, fps) -> the truth of each frame (cached)."""

    def make(
        scenario: str = "conveyor", seed: int = 3, frames: int = 300, fps: float = 30.0
    ) -> tuple[FrameTruth, ...]:
        return _clip(scenario, seed, frames, fps)

    return make


DetectionsFactory = Callable[..., tuple[Detections, list[InstanceTruth]]]


@pytest.fixture
def detections_from_truth() -> DetectionsFactory:
    """detections_from_truth(instances, rng, noise_px, drop) -> (Detections, their truths).

    A stand-in for a good detector: instances less than 20 % in view are missed,
    the score falls with the in-view fraction, hidden keypoints get a low score.
    """

    def make(
        instances: Sequence[InstanceTruth],
        rng: np.random.Generator,
        noise_px: float = 1.0,
        drop: float = 0.0,
    ) -> tuple[Detections, list[InstanceTruth]]:
        kept = [i for i in instances if i.in_view >= 0.2 and rng.random() >= drop]
        if not kept:
            return Detections.empty(5), []
        n = len(kept)
        boxes = np.array([i.box for i in kept]) + rng.normal(0, noise_px, (n, 4))
        kxy = np.array([i.keypoints_px for i in kept]) + rng.normal(0, noise_px, (n, 5, 2))
        kscore = np.where(np.array([i.visible for i in kept]), 0.9, 0.05)
        dets = Detections(
            boxes=boxes.astype(np.float32),
            scores=np.array([0.55 + 0.4 * i.in_view for i in kept], np.float32),
            class_ids=np.array([i.class_id for i in kept], np.int32),
            keypoints=np.concatenate([kxy, kscore[:, :, None]], axis=2).astype(np.float32),
        )
        return dets, kept

    return make
