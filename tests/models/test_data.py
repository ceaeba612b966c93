"""The sim and COCO keypoint datasets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from models.data import (
    CocoKeypointDataset,
    SimKeypointDataset,
    SimSpec,
    letterbox,
    scale_points,
)
from service.errors import DataError

# --- letterbox -----------------------------------------------------------------------------


def test_letterbox_halves_a_sim_frame_and_maps_pixel_centres() -> None:
    image = np.zeros((480, 640, 3), np.uint8)
    image[100:102, 200:202] = 255  # a 2x2 block centred on (200.5, 100.5)
    small, scale, pad = letterbox(image, (240, 320))
    assert small.shape == (240, 320, 3) and scale == 0.5 and pad == (0.0, 0.0)
    ys, xs = np.nonzero(small[..., 0] > 200)
    assert (xs.tolist(), ys.tolist()) == ([100], [50])
    assert scale_points(np.array([200.5, 100.5]), scale, pad).tolist() == [100.0, 50.0]


def test_letterbox_pads_other_aspect_ratios_centred() -> None:
    image = np.full((100, 100, 3), 7, np.uint8)
    small, scale, pad = letterbox(image, (240, 320))
    assert scale == 2.4 and pad == (40.0, 0.0)
    assert (small[:, :40] == 114).all() and (small[:, 40:280] == 7).all()
    assert scale_points(np.array([-0.5, -0.5]), scale, pad).tolist() == [39.5, -0.5]


# --- sim ---------------------------------------------------------------------------------------


def test_sim_dataset_renders_once_then_reads_the_same_cache(tmp_path: Path) -> None:
    spec = SimSpec("conveyor", (2000,), frames=3, step=20)
    first = SimKeypointDataset([spec], tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith(first.key) for f in files)
    mtimes = [p.stat().st_mtime_ns for p in tmp_path.iterdir()]
    second = SimKeypointDataset([spec], tmp_path)
    assert [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == mtimes
    assert len(first) == len(second) == 3
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.image, b.image)
        assert np.array_equal(a.keypoints, b.keypoints)
        assert a.meta["index"] == b.meta["index"]
    other = SimKeypointDataset([SimSpec("conveyor", (2001,), frames=1)], tmp_path)
    assert other.key != first.key and len(list(tmp_path.iterdir())) == 4


def test_sim_dataset_matches_the_sim_truth_at_half_scale(tmp_path: Path) -> None:
    from service.sim import Scene

    ds = SimKeypointDataset([SimSpec("conveyor", (2002,), frames=2, step=30, start=30)], tmp_path)
    sample = ds[1]
    image, truth = Scene("conveyor", seed=2002).render(60)
    assert sample.meta == {**sample.meta, "seed": 2002, "index": 60, "scenario": "conveyor"}
    assert sample.num_instances == len(truth.instances) > 0
    expected = np.array([(i.keypoints_px + 0.5) * 0.5 - 0.5 for i in truth.instances])
    np.testing.assert_allclose(sample.keypoints, expected, atol=1e-4)
    assert sample.visible.tolist() == [i.visible.tolist() for i in truth.instances]
    np.testing.assert_array_equal(sample.image, cv2.resize(image, (320, 240),
                                                           interpolation=cv2.INTER_AREA))
    in_view = np.array([i.in_view for i in truth.instances], np.float32)
    np.testing.assert_array_equal(sample.in_view, in_view)
    assert not sample.ignore.any()


# --- COCO --------------------------------------------------------------------------------------


def test_coco_reader_reads_the_shared_sample(coco_sample: Path) -> None:
    ds = CocoKeypointDataset(coco_sample)
    assert len(ds) == 4
    assert ds.class_names == ["person"] and ds.num_keypoints == 17
    assert ds.categories[0].keypoint_names[:3] == ("nose", "left_eye", "right_eye")
    assert (15, 13) in ds.categories[0].skeleton  # [16, 14] 1-based
    samples = list(ds)
    assert sum(s.num_instances for s in samples) == 14
    raw = json.loads(coco_sample.read_text())
    ann = next(a for a in raw["annotations"] if a["id"] == 442619)
    first = next(s for s in samples if s.meta["image_id"] == ann["image_id"])
    assert first.image.shape == (240, 320, 3)
    j = [round(float(b[0]), 2) for b in first.boxes].index(
        round(float(scale_points(np.array([ann["bbox"][0], 0.0]), first.meta["scale"],
                                 first.meta["pad"])[0]), 2)
    )
    kp = np.array(ann["keypoints"], float).reshape(-1, 3)
    expected = scale_points(kp[:, :2], first.meta["scale"], first.meta["pad"])
    np.testing.assert_allclose(first.keypoints[j], expected, atol=1e-4)
    assert first.visible[j].tolist() == (kp[:, 2] == 2).tolist()
    # a labeled keypoint lands on the same image content before and after letterboxing
    assert first.meta["scale"] == pytest.approx(min(240 / 425, 320 / 640))


Mutator = Callable[[dict[str, Any]], None]


def _set(path: list[Any], value: Any) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _delete(path: list[Any]) -> Mutator:
    def mutate(data: dict[str, Any]) -> None:
        node: Any = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_delete(["annotations"]), "no 'annotations' key"),
        (_delete(["categories", 0, "keypoints"]), "categories[0] has no 'keypoints' key"),
        (_delete(["annotations", 3, "bbox"]), "annotations[3] has no 'bbox' key"),
        (_set(["annotations", 2, "keypoints"], [1, 2, 2] * 16),
         "'keypoints' has 48 values, expected 51"),
        (_set(["annotations", 0, "keypoints", 2], 5), "visibility must be 0, 1 or 2"),
        (_set(["annotations", 1, "category_id"], 99), "category_id 99 is not in 'categories'"),
        (_set(["annotations", 1, "image_id"], 12345), "image_id 12345 is not in 'images'"),
        (_set(["annotations", 0, "bbox"], [1, 2, 3]), "'bbox' must be 4 numbers"),
        (_set(["categories", 0, "skeleton"], [[1, 18]]), "skeleton entry [1, 18]"),
        (_set(["images", 0, "width"], "640"), "images[0]['width'] must be int"),
    ],
)
def test_coco_reader_rejects_a_malformed_file_naming_the_problem(
    coco_sample: Path, tmp_path: Path, mutate: Mutator, message: str
) -> None:
    data = json.loads(coco_sample.read_text())
    mutate(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        CocoKeypointDataset(bad, image_dir=coco_sample.parent)
    assert message in str(info.value)
    assert str(bad) in str(info.value)


def test_coco_reader_rejects_invalid_json_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match="is not valid JSON"):
        CocoKeypointDataset(broken)
    with pytest.raises(DataError, match="does not exist"):
        CocoKeypointDataset(tmp_path / "absent.json")


def test_coco_reader_reports_a_missing_image(coco_sample: Path, tmp_path: Path) -> None:
    ds = CocoKeypointDataset(coco_sample, image_dir=tmp_path)
    with pytest.raises(DataError, match="000000000785.jpg"):
        ds[ds.image_ids.index(785)]


def test_sim_dataset_renders_the_same_frames_on_several_processes(tmp_path: Path) -> None:
    specs = [SimSpec("train", (1000, 1001, 1002), frames=2, step=10)]
    parallel = SimKeypointDataset(specs, tmp_path / "a", workers=2)
    serial = SimKeypointDataset(specs, tmp_path / "b", workers=1)
    assert [s.meta["seed"] for s in parallel] == [1000, 1000, 1001, 1001, 1002, 1002]
    for a, b in zip(parallel, serial, strict=True):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.keypoints, b.keypoints)
