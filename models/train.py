"""Train the LineWatch keypoint model.

    python -m models.train --recipe default --out runs/default [--resume] [--epochs N]
                           [--max-steps N] [--threads 2] [--cache-dir DIR]

``--max-steps N`` stops early (smoke tests) without changing the learning-rate
schedule; a later ``--resume`` goes on from the next epoch.  Writes ``OUT/last.pt``
every epoch, ``OUT/best.pt`` when the validation fitness
improves, and ``OUT/log.jsonl`` (one JSON line per epoch: losses, validation
metrics, epoch and total wall time).  ``--resume`` continues from ``OUT/last.pt``
with the same data order and learning-rate schedule it would have had.
Everything is seeded; the sim cache (rendered once) lives in ``--cache-dir``
(default ``runs/cache``).  ``--coco FILE`` trains on a COCO keypoints file instead
of the synthetic line (``--coco-val FILE`` validates on another).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models.data import CocoKeypointDataset, Sample, SimKeypointDataset, SimSpec
from models.nets import STRIDE, HeadOutputs, KeypointNet, NetConfig, decode, normalise
from models.targets import AugmentSpec, TargetSpec, augment, encode
from service.errors import DataError
from service.evaluation import EvalAccumulator, GroundTruth, match_frame
from service.inference.adapters import decode_end2end
from service.inference.preprocess import Transform

EVAL_MIN_IN_VIEW = 0.8  # validation counts instances at least this much in view


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on."""

    name: str
    net: NetConfig
    train: tuple[SimSpec, ...]
    val: tuple[SimSpec, ...]
    epochs: int
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 300
    ema_decay: float = 0.999
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    seed: int = 0
    workers: int = 1
    score_threshold: float = 0.3  # for the validation metrics
    loss_weights: dict[str, float] = field(
        default_factory=lambda: {"hm": 1.0, "khm": 1.0, "wh": 0.1, "off": 1.0, "kreg": 0.5,
                                 "koff": 1.0}
    )


def _sim_num_classes() -> int:
    from service.sim import CLASSES

    return len(CLASSES)


def _default_recipe() -> Recipe:
    return Recipe(
        name="default",
        net=NetConfig(num_classes=_sim_num_classes()),
        train=(
            SimSpec("train", tuple(range(1000, 1200)), frames=24, step=13, start=7),
            SimSpec("conveyor", tuple(range(1200, 1350)), frames=24, step=73, start=11),
        ),
        val=(
            SimSpec("conveyor", tuple(range(2000, 2008)), frames=15, step=119, start=5),
            # the train scenario shows operators' hands far more often than the conveyor
            SimSpec("train", tuple(range(2100, 2105)), frames=8, step=97, start=3),
        ),
        epochs=8,  # ~25 min on a quiet 2-core machine, ~50 min on a busy one
    )


def _tiny_recipe() -> Recipe:
    return Recipe(
        name="tiny",
        net=NetConfig(num_classes=_sim_num_classes(), widths=(8, 8, 16, 16), blocks=(0, 0, 1),
                      neck=8, head=8, max_det=10),
        train=(SimSpec("train", (1000,), frames=4, step=15),),
        val=(SimSpec("conveyor", (2000,), frames=2, step=30),),
        epochs=2,
        batch_size=2,
        warmup_steps=2,
        workers=0,
        ema_decay=0.9,
    )


RECIPES = {"default": _default_recipe, "tiny": _tiny_recipe}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise DataError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


# --- data ------------------------------------------------------------------------------------


class SampleSource(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> Sample: ...


class TrainSet(Dataset[dict[str, Tensor]]):
    """Augmented, encoded samples; sample i of epoch e always gets the same draw."""

    def __init__(self, source: SampleSource, spec: TargetSpec, aug: AugmentSpec | None,
                 seed: int) -> None:
        self.source, self.spec, self.aug, self.seed = source, spec, aug, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        sample = self.source[i]
        if self.aug is not None:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            sample = augment(sample, rng, self.aug)
        out = {k: torch.from_numpy(v) for k, v in encode(sample, self.spec).items()}
        out["image"] = torch.from_numpy(np.ascontiguousarray(sample.image))
        return out


def _source_transform(sample: Sample) -> Transform:
    """Model-input pixels <-> the original frame (sim frames: 640x480 halved)."""
    scale = float(sample.meta.get("scale", 0.5))
    pad_x, pad_y = sample.meta.get("pad", (0.0, 0.0))
    return Transform(scale, scale, int(pad_x), int(pad_y), 0, 0)


def _ground_truth(sample: Sample, names: Sequence[str], to_source: Transform) -> GroundTruth:
    ignore = sample.ignore | (sample.in_view < EVAL_MIN_IN_VIEW)
    m = sample.num_instances
    return GroundTruth(
        class_names=tuple(names[int(c)] for c in sample.class_ids),
        boxes=to_source.to_source(sample.boxes.reshape(m, 2, 2)).reshape(m, 4).astype(float),
        keypoints=to_source.to_source(sample.keypoints).astype(float),
        visible=sample.visible,
        ignore=ignore,
    )


# --- losses ----------------------------------------------------------------------------------


def focal_loss(logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of peaks."""
    pos = target.ge(0.999)
    log_p = F.logsigmoid(logits)
    log_1p = log_p - logits  # log(1 - sigmoid(x))
    p = torch.exp(log_p)
    neg_w = (1 - target).square().square()
    if weight is not None:
        neg_w = neg_w * weight
    loss = torch.where(pos, log_p * (1 - p).square(), log_1p * p.square() * neg_w)
    return -loss.sum() / pos.sum().clamp(min=1)


def _at(maps: Tensor, ind: Tensor) -> Tensor:
    """[B, ch, H, W] gathered at flat cells ``ind`` [B, M] -> [B, M, ch]."""
    b, ch = maps.shape[:2]
    flat = maps.reshape(b, ch, -1)
    return torch.gather(flat, 2, ind.unsqueeze(1).expand(-1, ch, -1)).permute(0, 2, 1)


def compute_losses(heads: HeadOutputs, t: dict[str, Tensor], cfg: NetConfig) -> dict[str, Tensor]:
    b = heads.hm.shape[0]
    k = cfg.num_keypoints
    hw = heads.hm.shape[2] * heads.hm.shape[3]
    mask = t["mask"]
    n_inst = mask.sum().clamp(min=1.0)
    losses = {
        "hm": focal_loss(heads.hm, t["hm"], t["hm_weight"]),
        "khm": focal_loss(heads.khm, t["khm"]),
    }
    m2 = mask.unsqueeze(-1)
    losses["wh"] = (F.l1_loss(_at(heads.wh, t["ind"]), t["wh"], reduction="none") * m2).sum() / (
        2 * n_inst
    )
    losses["off"] = (
        F.l1_loss(_at(heads.off, t["ind"]), t["off"], reduction="none") * m2
    ).sum() / (2 * n_inst)
    kreg = _at(heads.kreg, t["ind"]).reshape(b, -1, k, 2)
    km = (t["kreg_mask"] * mask.unsqueeze(-1)).unsqueeze(-1)
    losses["kreg"] = (F.l1_loss(kreg, t["kreg"], reduction="none") * km).sum() / (
        2 * km.sum().clamp(min=1.0)
    )
    idx = t["koff_index"].reshape(b, -1)
    chan = torch.div(idx, hw, rounding_mode="floor")
    cell = idx - chan * hw
    koff = heads.koff.reshape(b, -1)
    px = torch.gather(koff, 1, chan * 2 * hw + cell)
    py = torch.gather(koff, 1, (chan * 2 + 1) * hw + cell)
    pred = torch.stack([px, py], -1)
    om = t["koff_mask"].reshape(b, -1, 1)
    target = t["koff"].reshape(b, -1, 2)
    losses["koff"] = (F.l1_loss(pred, target, reduction="none") * om).sum() / (
        2 * (om > 0).sum().clamp(min=1)
    )
    return losses


# --- the loop --------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, total - recipe.warmup_steps)
    return recipe.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Ema:
    """Exponential moving average of the weights (what is validated and exported)."""

    def __init__(self, model: KeypointNet, decay: float) -> None:
        self.decay = decay
        self.model = KeypointNet(model.config)
        self.model.load_state_dict(model.state_dict())
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 200.0))
        msd = model.state_dict()
        for name, v in self.model.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[name].detach(), alpha=1 - d)
            else:
                v.copy_(msd[name])


@torch.no_grad()
def evaluate(net: KeypointNet, samples: Sequence[Sample], class_names: Sequence[str],
             score_threshold: float, batch_size: int = 16) -> dict[str, Any]:
    """Validation metrics with the service's own decoding and matching
    (``service.inference.adapters.decode_end2end``, ``service.evaluation.match_frame``):
    keypoint errors in original-frame pixels, instances under 80% in view ignored."""
    net.eval()
    acc = EvalAccumulator(class_names)
    k = net.config.num_keypoints
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        images = torch.from_numpy(np.stack([s.image for s in chunk]))
        rows = decode(net(normalise(images)), net.config).numpy()
        for r, sample in zip(rows, chunk, strict=True):
            transform = _source_transform(sample)
            det = decode_end2end(r, transform, k, 3, score_threshold)
            truth = _ground_truth(sample, class_names, transform)
            acc.add(match_frame(det, truth, class_names), truth)
    return acc.summary()


def fitness(metrics: dict[str, Any]) -> float:
    """Worst per-class F1, less a little for keypoint error (higher is better)."""
    f1s = []
    for c in metrics["per_class"].values():
        r, p = c["recall"], c["precision"]
        if r is None:  # no instance of the class in the validation set
            continue
        p = 1.0 if p is None else p
        f1s.append(2 * r * p / max(r + p, 1e-9))
    err = metrics["kpt_err_px_mean"]
    return float(min(f1s, default=0.0) - 0.02 * (10.0 if err is None else err))


@dataclass
class ClassSet:
    names: list[str]
    keypoint_names: dict[str, list[str]]
    skeleton: dict[str, list[list[int]]]


def sim_classes() -> ClassSet:
    from service.sim import CLASSES

    return ClassSet(
        names=[c.name for c in CLASSES],
        keypoint_names={c.name: list(c.keypoint_names) for c in CLASSES},
        skeleton={c.name: [list(p) for p in c.skeleton] for c in CLASSES},
    )


def coco_classes(ds: CocoKeypointDataset) -> ClassSet:
    return ClassSet(
        names=[c.name for c in ds.categories],
        keypoint_names={c.name: list(c.keypoint_names) for c in ds.categories},
        skeleton={c.name: [list(p) for p in c.skeleton] for c in ds.categories},
    )


def train(recipe: Recipe, out: Path, *, resume: bool = False, epochs: int | None = None,
          max_steps: int | None = None, threads: int = 2, cache_dir: Path | None = None,
          coco: Path | None = None, coco_val: Path | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; returns the last epoch's log record."""
    torch.set_num_threads(threads)
    seed_everything(recipe.seed)
    if epochs is not None:
        recipe = replace(recipe, epochs=epochs)
    out.mkdir(parents=True, exist_ok=True)
    cache = cache_dir or Path("runs/cache")
    t_start = time.monotonic()

    train_src: SampleSource
    if coco is not None:
        coco_ds = CocoKeypointDataset(coco, hw=(240, 320))
        classes = coco_classes(coco_ds)
        val_ds = CocoKeypointDataset(coco_val, hw=(240, 320)) if coco_val else coco_ds
        net_cfg = replace(recipe.net, num_classes=len(classes.names),
                          num_keypoints=coco_ds.num_keypoints)
        train_src, val_samples = coco_ds, list(val_ds)
    else:
        classes = sim_classes()
        net_cfg = recipe.net
        train_src = SimKeypointDataset(recipe.train, cache, progress=progress)
        val_samples = list(SimKeypointDataset(recipe.val, cache, progress=progress))
    t_data = time.monotonic() - t_start

    spec = TargetSpec(num_classes=net_cfg.num_classes, num_keypoints=net_cfg.num_keypoints,
                      stride=STRIDE)
    net = KeypointNet(net_cfg)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = Ema(net, recipe.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    start_epoch, step, best, wall_before = 0, 0, -math.inf, 0.0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume:
        if not last_path.exists():
            raise DataError(f"--resume: {last_path} does not exist; start without --resume")
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        if NetConfig.from_dict(ckpt["net_config"]) != net_cfg:
            raise DataError(f"--resume: {last_path} was trained with a different network")
        net.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        ema.updates = ckpt["ema_updates"]
        opt.load_state_dict(ckpt["optimizer"])
        start_epoch, step, best = ckpt["epoch"] + 1, ckpt["step"], ckpt["best_fitness"]
        wall_before = ckpt["wall_time_s"]

    train_set = TrainSet(train_src, spec, recipe.augment, recipe.seed)
    steps_per_epoch = max(1, len(train_set) // recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs  # the LR schedule's length
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    log_path = out / "log.jsonl"
    record: dict[str, Any] = {}
    print(f"recipe {recipe.name}: {len(train_set)} training images, {len(val_samples)} "
          f"validation images, {recipe.epochs} epochs x {steps_per_epoch} steps, "
          f"data ready in {t_data:.1f} s", file=sys.stderr)

    for epoch in range(start_epoch, recipe.epochs):
        if step >= stop_at:
            break
        t_epoch = time.monotonic()
        train_set.epoch = epoch
        gen = torch.Generator().manual_seed(recipe.seed * 100003 + epoch)
        loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, drop_last=True,
                            generator=gen, num_workers=recipe.workers,
                            worker_init_fn=_quiet_worker, persistent_workers=False)
        net.train()
        sums: dict[str, float] = {}
        n_batches = 0
        bar = _tqdm(total=min(steps_per_epoch, stop_at - step),
                    desc=f"epoch {epoch + 1}/{recipe.epochs}", enabled=progress)
        for batch in loader:
            if step >= stop_at:
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total_steps, recipe)
            images = normalise(batch.pop("image")).contiguous(memory_format=torch.channels_last)
            losses = compute_losses(net(images), batch, net_cfg)
            loss = sum(recipe.loss_weights[k] * v for k, v in losses.items())
            assert isinstance(loss, Tensor)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            ema.update(net)
            step += 1
            n_batches += 1
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}")
        bar.close()
        train_time = time.monotonic() - t_epoch
        metrics = evaluate(ema.model, val_samples, classes.names, recipe.score_threshold)
        fit = fitness(metrics)
        wall = wall_before + (time.monotonic() - t_start)
        record = {
            "epoch": epoch + 1, "step": step,
            "loss": {k: v / max(n_batches, 1) for k, v in sums.items()},
            "val": metrics, "fitness": fit, "lr": lr_at(step, total_steps, recipe),
            "epoch_train_s": round(train_time, 1),
            "epoch_s": round(time.monotonic() - t_epoch, 1), "wall_time_s": round(wall, 1),
        }
        improved = fit > best
        best = max(best, fit)
        ckpt = {
            "recipe": recipe.name, "recipe_full": _jsonable(asdict(recipe)),
            "net_config": net_cfg.to_dict(), "model": net.state_dict(),
            "ema": ema.model.state_dict(), "ema_updates": ema.updates,
            "optimizer": opt.state_dict(), "epoch": epoch, "step": step,
            "best_fitness": best, "metrics": metrics, "wall_time_s": wall,
            "classes": asdict(classes), "seed": recipe.seed,
        }
        _atomic_save(ckpt, last_path)
        if improved:
            _atomic_save(ckpt, best_path)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"epoch {epoch + 1}: loss {record['loss'].get('loss', float('nan')):.4f} "
              f"val {_metrics_line(metrics)} "
              f"{'*best* ' if improved else ''}epoch {record['epoch_s']} s, wall {wall:.0f} s",
              file=sys.stderr, flush=True)
    print(f"done: {step} steps, wall time {wall_before + time.monotonic() - t_start:.0f} s, "
          f"best fitness {best:.4f} -> {best_path}", file=sys.stderr)
    return record


def _quiet_worker(_worker_id: int) -> None:
    """Data workers augment with numpy/OpenCV: one thread each, the cores are for torch."""
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _metrics_line(m: dict[str, Any]) -> str:
    def f(v: float | None, fmt: str = ".3f") -> str:
        return "n/a" if v is None else format(v, fmt)

    per_class = " ".join(f"{n}:R{f(c['recall'])}/P{f(c['precision'])}"
                         for n, c in m["per_class"].items())
    return (f"kpt err {f(m['kpt_err_px_mean'])} px (p95 {f(m['kpt_err_px_p95'])}) "
            f"R {f(m['recall'])} P {f(m['precision'])} {per_class}")


def _tqdm(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _atomic_save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--coco", type=Path, help="train on this COCO keypoints file")
    parser.add_argument("--coco-val", type=Path, help="validate on this COCO keypoints file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        train(get_recipe(args.recipe), args.out, resume=args.resume, epochs=args.epochs,
              max_steps=args.max_steps, threads=args.threads, cache_dir=args.cache_dir,
              coco=args.coco, coco_val=args.coco_val, progress=not args.no_progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
