"""Datasets for the keypoint model: the synthetic line and COCO keypoint files.

Both yield :class:`Sample` records at the model's input size (240x320 by default):
the image (uint8 BGR) and its instances as parallel arrays in model-input pixels
(pixel-centre convention: the centre of the top-left pixel is (0, 0)).

- :class:`SimKeypointDataset` renders frames of ``service.sim`` once, halves them
  to the input size and caches images and instances under a cache directory
  (``<key>.images.npy`` memory-mapped + ``<key>.npz``), so epochs cost no rendering.
  The cache key hashes the scenarios, seeds, frame indices, input size and the sim
  source, so a change to any of them renders afresh.  Deterministic by seed.
- :class:`CocoKeypointDataset` reads the standard COCO keypoints JSON (as exported
  by CVAT or Label Studio) and letterboxes each image to the input size.  A
  malformed file raises :class:`service.errors.DataError` naming what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from service.errors import DataError

INPUT_HW: tuple[int, int] = (240, 320)
SIM_FRAME_HW: tuple[int, int] = (480, 640)
CACHE_VERSION = 1  # bump when what the sim cache stores changes

UInt8Array = npt.NDArray[np.uint8]
F32Array = npt.NDArray[np.float32]


@dataclass
class Sample:
    """One image at the model input size and its M instances."""

    image: UInt8Array  # (H, W, 3) BGR
    class_ids: npt.NDArray[np.int64]  # (M,)
    boxes: F32Array  # (M, 4) x1 y1 x2 y2
    keypoints: F32Array  # (M, K, 2)
    visible: npt.NDArray[np.bool_]  # (M, K) seen in the image
    labeled: npt.NDArray[np.bool_]  # (M, K) coordinate known (may lie outside the image)
    ignore: npt.NDArray[np.bool_]  # (M,) neither a positive nor a negative (crowd, unlabeled)
    in_view: F32Array  # (M,) fraction of the instance inside the image (1 where unknown)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = len(self.class_ids)
        shapes_ok = self.boxes.shape == (m, 4) and self.in_view.shape == (m,)
        if not shapes_ok or self.keypoints.shape[:1] != (m,):
            raise ValueError(f"inconsistent sample: {m} classes, boxes {self.boxes.shape}, "
                             f"keypoints {self.keypoints.shape}")

    @property
    def num_instances(self) -> int:
        return len(self.class_ids)


def scale_points(points: npt.NDArray[Any], scale: float, pad: tuple[float, float]) -> F32Array:
    """Pixel-centre-convention resize of points: ``(p + 0.5) * scale - 0.5 + pad``."""
    out = (np.asarray(points, np.float64) + 0.5) * scale - 0.5
    out[..., 0] += pad[0]
    out[..., 1] += pad[1]
    return out.astype(np.float32)


def scale_boxes(boxes: npt.NDArray[Any], scale: float, pad: tuple[float, float]) -> F32Array:
    b = np.asarray(boxes, np.float64).reshape(-1, 2, 2)
    return scale_points(b, scale, pad).reshape(-1, 4)


def letterbox(
    image: UInt8Array, hw: tuple[int, int] = INPUT_HW, fill: int = 114
) -> tuple[UInt8Array, float, tuple[float, float]]:
    """Resize keeping the aspect ratio, pad the rest (centred) with ``fill``.

    Returns the image, the scale and the (x, y) padding in output pixels; a point
    maps with :func:`scale_points`.  640x480 -> 320x240 is a plain halving.
    """
    out_h, out_w = hw
    scale, (pad_x, pad_y), (new_w, new_h) = letterbox_geometry(image.shape[:2], hw)
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = np.asarray(cv2.resize(image, (new_w, new_h), interpolation=interp), np.uint8)
    if (new_h, new_w) == (out_h, out_w):
        return resized, scale, (0.0, 0.0)
    canvas = np.full((out_h, out_w, 3), fill, np.uint8)
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized
    return canvas, scale, (float(pad_x), float(pad_y))


def letterbox_geometry(
    src_hw: tuple[int, ...], dst_hw: tuple[int, int]
) -> tuple[float, tuple[int, int], tuple[int, int]]:
    """Scale, (pad_x, pad_y) and resized (w, h) of :func:`letterbox`."""
    h, w = src_hw[:2]
    out_h, out_w = dst_hw
    scale = min(out_h / h, out_w / w)
    new_w, new_h = min(out_w, max(1, round(w * scale))), min(out_h, max(1, round(h * scale)))
    return scale, ((out_w - new_w) // 2, (out_h - new_h) // 2), (new_w, new_h)


# --- the synthetic line -----------------------------------------------------------


@dataclass(frozen=True)
class SimSpec:
    """Which sim frames to render: ``frames`` frames per seed, ``step`` frames apart."""

    scenario: str
    seeds: tuple[int, ...]
    frames: int
    step: int = 15
    start: int = 0

    def indices(self) -> range:
        return range(self.start, self.start + self.frames * self.step, self.step)


def _sim_source_digest() -> str:
    import service.sim as sim

    digest = hashlib.sha1()
    for path in sorted(Path(sim.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _render_spec(spec: SimSpec, seed: int, hw: tuple[int, int]) -> list[Sample]:
    from service.sim import Scene

    scene = Scene(spec.scenario, seed=seed, width=SIM_FRAME_HW[1], height=SIM_FRAME_HW[0],
                  fps=30.0)
    out = []
    for index in spec.indices():
        image, truth = scene.render(index)
        small, scale, pad = letterbox(image, hw)
        inst = truth.instances
        k = len(inst[0].keypoints_px) if inst else 5
        in_view = np.array([i.in_view for i in inst], np.float32)
        visible = np.array([i.visible for i in inst], bool).reshape(-1, k)
        out.append(
            Sample(
                image=small,
                class_ids=np.array([i.class_id for i in inst], np.int64),
                boxes=scale_boxes(np.array([i.box for i in inst]).reshape(-1, 4), scale, pad),
                keypoints=scale_points(
                    np.array([i.keypoints_px for i in inst]).reshape(-1, k, 2), scale, pad
                ),
                visible=visible,
                labeled=np.ones_like(visible),
                ignore=np.zeros(len(inst), bool),
                in_view=in_view,
                meta={"scenario": spec.scenario, "seed": seed, "index": index,
                      "scale": scale, "pad": pad},
            )
        )
    return out


class SimKeypointDataset:
    """Rendered sim frames, cached on disk (see the module docstring)."""

    def __init__(
        self,
        specs: Sequence[SimSpec],
        cache_dir: str | os.PathLike[str],
        hw: tuple[int, int] = INPUT_HW,
        progress: bool = False,
        workers: int = 2,
    ) -> None:
        self.specs = tuple(specs)
        self.hw = hw
        self.cache_dir = Path(cache_dir)
        self.workers = workers
        key_src = json.dumps(
            [[s.scenario, list(s.seeds), s.frames, s.step, s.start] for s in self.specs]
            + [list(hw), _sim_source_digest(), CACHE_VERSION]
        )
        self.key = "sim-" + hashlib.sha1(key_src.encode()).hexdigest()[:16]
        images_path = self.cache_dir / f"{self.key}.images.npy"
        meta_path = self.cache_dir / f"{self.key}.npz"
        if not (images_path.exists() and meta_path.exists()):
            self._build(images_path, meta_path, progress)
        self._images = np.load(images_path, mmap_mode="r")
        with np.load(meta_path) as z:
            self._arrays = {name: z[name] for name in z.files}
        self._offsets = self._arrays["offsets"]
        scale, pad, _ = letterbox_geometry(SIM_FRAME_HW, hw)
        self._scale, self._pad = scale, (float(pad[0]), float(pad[1]))

    def _build(self, images_path: Path, meta_path: Path, progress: bool) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        jobs = [(spec, seed) for spec in self.specs for seed in spec.seeds]
        total = sum(spec.frames for spec, _ in jobs)
        tmp_images = images_path.with_suffix(f".tmp{os.getpid()}.npy")
        images = np.lib.format.open_memmap(
            tmp_images, mode="w+", dtype=np.uint8, shape=(total, *self.hw, 3)
        )
        cols: dict[str, list[npt.NDArray[Any]]] = {
            "class_ids": [], "boxes": [], "keypoints": [], "visible": [], "in_view": [],
            "frame_seed": [], "frame_index": [], "frame_scenario": [],
        }
        counts = []
        bar = _progress(total, "render sim", progress)
        pos = 0
        for (spec, seed), samples in zip(jobs, self._render_all(jobs), strict=True):
            for sample in samples:
                images[pos] = sample.image
                pos += 1
                counts.append(sample.num_instances)
                cols["class_ids"].append(sample.class_ids)
                cols["boxes"].append(sample.boxes)
                cols["keypoints"].append(sample.keypoints)
                cols["visible"].append(sample.visible)
                cols["in_view"].append(sample.in_view)
                cols["frame_seed"].append(np.array([seed]))
                cols["frame_index"].append(np.array([sample.meta["index"]]))
                cols["frame_scenario"].append(np.array([spec.scenario]))
                bar.update(1)
        bar.close()
        images.flush()
        del images
        arrays = {name: np.concatenate(parts) for name, parts in cols.items()}
        arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        tmp_meta = meta_path.with_suffix(f".tmp{os.getpid()}.npz")
        with open(tmp_meta, "wb") as fh:
            np.savez(fh, allow_pickle=False, **arrays)
        os.replace(tmp_images, images_path)
        os.replace(tmp_meta, meta_path)

    def _render_all(self, jobs: list[tuple[SimSpec, int]]) -> Iterator[list[Sample]]:
        """Render every (spec, seed) job, in order, on ``workers`` processes."""
        if self.workers <= 1 or len(jobs) <= 1:
            for spec, seed in jobs:
                yield _render_spec(spec, seed, self.hw)
            return
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(self.workers) as pool:
            yield from pool.map(_render_spec, *zip(*jobs, strict=True),
                                [self.hw] * len(jobs))

    def __len__(self) -> int:
        return int(self._images.shape[0])

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        arr = self._arrays
        visible = arr["visible"][a:b].copy()
        in_view = arr["in_view"][a:b]
        return Sample(
            image=np.array(self._images[i]),
            class_ids=arr["class_ids"][a:b].copy(),
            boxes=arr["boxes"][a:b].copy(),
            keypoints=arr["keypoints"][a:b].copy(),
            visible=visible,
            labeled=np.ones_like(visible),
            ignore=np.zeros(len(in_view), bool),
            in_view=in_view.copy(),
            meta={"scenario": str(arr["frame_scenario"][i]), "seed": int(arr["frame_seed"][i]),
                  "index": int(arr["frame_index"][i]), "scale": self._scale, "pad": self._pad},
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm  # the [train] extra

    return tqdm(total=total, desc=desc, leave=False)


# --- COCO keypoints ------------------------------------------------------------------


@dataclass(frozen=True)
class CocoCategory:
    id: int
    name: str
    keypoint_names: tuple[str, ...]
    skeleton: tuple[tuple[int, int], ...]  # 0-based index pairs


def _require(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DataError(f"{where} has no {key!r} key (required by the COCO keypoints format)")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}[{key!r}] must be {names}, got {type(value).__name__}")
    return value


class CocoKeypointDataset:
    """A COCO keypoints annotation file and its images (see the module docstring).

    Class ids follow the categories sorted by their COCO id; every class gets
    ``num_keypoints`` slots (the most any category has; the rest are unlabeled).
    Keypoint visibility v: 0 unlabeled, 1 labeled but hidden, 2 visible.  COCO
    ``iscrowd`` annotations are ignored regions.  ``image_dir`` defaults to the
    folder of the JSON file.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike[str],
        image_dir: str | os.PathLike[str] | None = None,
        hw: tuple[int, int] = INPUT_HW,
    ) -> None:
        self.path = Path(annotation_file)
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        self.hw = hw
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"COCO annotation file {self.path} does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"COCO annotation file {self.path} is not valid JSON: {exc}") from None
        self.categories, self.images, self._anns = self._parse(data)
        self.num_keypoints = max(len(c.keypoint_names) for c in self.categories)
        self.image_ids = sorted(self.images)

    def _parse(
        self, data: Any
    ) -> tuple[list[CocoCategory], dict[int, dict[str, Any]], dict[int, list[dict[str, Any]]]]:
        where = str(self.path)
        cats_raw = _require(data, "categories", list, where)
        if not cats_raw:
            raise DataError(f"{where}: 'categories' is empty; a keypoints file needs at least one")
        categories = []
        for i, cat in enumerate(cats_raw):
            cw = f"{where}: categories[{i}]"
            cid = _require(cat, "id", int, cw)
            name = _require(cat, "name", str, cw)
            kpts = _require(cat, "keypoints", list, cw)
            if not kpts or not all(isinstance(k, str) for k in kpts):
                raise DataError(f"{cw} ('{name}'): 'keypoints' must be a non-empty list of names")
            skeleton_raw = cat.get("skeleton", [])
            skeleton = []
            for pair in skeleton_raw:
                ok = isinstance(pair, list) and len(pair) == 2
                if not ok or not all(isinstance(p, int) and 1 <= p <= len(kpts) for p in pair):
                    raise DataError(f"{cw} ('{name}'): skeleton entry {pair!r} must be a pair of "
                                    f"1-based keypoint indices in 1..{len(kpts)}")
                skeleton.append((pair[0] - 1, pair[1] - 1))
            categories.append(CocoCategory(cid, name, tuple(kpts), tuple(skeleton)))
        if len({c.id for c in categories}) != len(categories):
            raise DataError(f"{where}: category ids are not unique")
        categories.sort(key=lambda c: c.id)
        by_id = {c.id: c for c in categories}

        images: dict[int, dict[str, Any]] = {}
        for i, img in enumerate(_require(data, "images", list, where)):
            iw = f"{where}: images[{i}]"
            iid = _require(img, "id", int, iw)
            _require(img, "file_name", str, iw)
            _require(img, "width", int, iw)
            _require(img, "height", int, iw)
            images[iid] = img

        anns: dict[int, list[dict[str, Any]]] = {iid: [] for iid in images}
        for i, ann in enumerate(_require(data, "annotations", list, where)):
            aw = f"{where}: annotations[{i}]"
            _require(ann, "id", int, aw)
            iid = _require(ann, "image_id", int, aw)
            cid = _require(ann, "category_id", int, aw)
            if iid not in images:
                raise DataError(f"{aw}: image_id {iid} is not in 'images'")
            if cid not in by_id:
                raise DataError(f"{aw}: category_id {cid} is not in 'categories'")
            bbox = _require(ann, "bbox", list, aw)
            if len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise DataError(
                    f"{aw}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}"
                )
            if bbox[2] < 0 or bbox[3] < 0:
                raise DataError(f"{aw}: 'bbox' has a negative width or height: {bbox!r}")
            kp = _require(ann, "keypoints", list, aw)
            cat = by_id[cid]
            expected = 3 * len(cat.keypoint_names)
            if len(kp) != expected:
                raise DataError(
                    f"{aw}: 'keypoints' has {len(kp)} values, expected {expected} "
                    f"(x, y, v for each of the {len(cat.keypoint_names)} keypoints of "
                    f"category '{cat.name}')"
                )
            if not all(_is_number(v) for v in kp):
                raise DataError(f"{aw}: 'keypoints' must hold numbers only")
            bad_v = [v for v in kp[2::3] if v not in (0, 1, 2)]
            if bad_v:
                raise DataError(f"{aw}: keypoint visibility must be 0, 1 or 2, got {bad_v[0]!r}")
            anns[iid].append(ann)
        return categories, images, anns

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def __len__(self) -> int:
        return len(self.image_ids)

    def load_image(self, image_id: int) -> UInt8Array:
        info = self.images[image_id]
        path = self.image_dir / info["file_name"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"image {path} (id {image_id}) is missing or not a readable image")
        if image.shape[:2] != (info["height"], info["width"]):
            raise DataError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} but the annotation file says "
                f"{info['width']}x{info['height']}"
            )
        return np.asarray(image, np.uint8)

    def __getitem__(self, i: int) -> Sample:
        image_id = self.image_ids[i]
        small, scale, pad = letterbox(self.load_image(image_id), self.hw)
        anns = self._anns[image_id]
        k = self.num_keypoints
        cls_index = {c.id: n for n, c in enumerate(self.categories)}
        m = len(anns)
        keypoints = np.zeros((m, k, 2), np.float32)
        vis = np.zeros((m, k), np.int64)
        boxes = np.zeros((m, 4), np.float32)
        for j, ann in enumerate(anns):
            kp = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
            keypoints[j, : len(kp)] = kp[:, :2]
            vis[j, : len(kp)] = kp[:, 2]
            x, y, w, h = ann["bbox"]
            boxes[j] = (x, y, x + w, y + h)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
        return Sample(
            image=small,
            class_ids=np.array([cls_index[a["category_id"]] for a in anns], np.int64),
            boxes=scale_boxes(boxes, scale, pad),
            keypoints=scale_points(keypoints, scale, pad),
            visible=vis == 2,
            labeled=vis > 0,
            # crowd regions and instances without a labeled keypoint teach nothing
            ignore=crowd | (vis.max(axis=1, initial=0) == 0),
            in_view=np.ones(m, np.float32),
            meta={"image_id": image_id, "scale": scale, "pad": pad},
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
