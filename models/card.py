"""Write the model card (``models/zoo/NAME.md``) of an exported model from measurements.

    python -m models.card models/zoo/linewatch-parts-s.onnx --checkpoint runs/default/best.pt \
        --log runs/default/log.jsonl --eval eval.json [--eval-command "..."] [--latency lat.json]

``--eval`` is the JSON printed by ``linewatch model eval --json`` (measured, never
typed in); ``--latency`` the JSON of ``python -m models.latency`` (measured now when
absent).  Everything else comes from the ONNX metadata, the checkpoint and the
training log.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def render_card(
    onnx_path: Path,
    meta: dict[str, str],
    ckpt: dict[str, Any],
    log: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    eval_command: str,
    latency: dict[str, Any],
    macs: int,
    params: int,
) -> str:
    name = onnx_path.stem
    names: dict[int, str] = ast.literal_eval(meta["names"])
    kp_names = json.loads(meta["keypoint_names"])
    skeleton = json.loads(meta["skeleton"])
    recipe = ckpt.get("recipe_full", {})
    net = ckpt["net_config"]
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    wall = log[-1]["wall_time_s"] if log else ckpt.get("wall_time_s")
    lines = [
        f"# {name}",
        "",
        f"LineWatch's default keypoint model: {len(names)} classes, {net['num_keypoints']} "
        "keypoints each, trained from scratch on the synthetic line (`service.sim`) only.",
        "",
        "| | |",
        "| --- | --- |",
        f"| file | `{onnx_path.name}`, {onnx_path.stat().st_size / 1e6:.2f} MB, "
        f"sha256 `{digest[:16]}…` |",
        f"| version / date | {meta.get('version')} / {meta.get('date')} |",
        f"| licence | {meta.get('license')} |",
        f"| input | `images` uint8 [B, {json.loads(meta['imgsz'])[0]}, "
        f"{json.loads(meta['imgsz'])[1]}, 3] NHWC BGR, letterboxed (a 640x480 frame is "
        "halved); cast and normalisation in the graph |",
        f"| output | `detections` float32 [B, {meta['max_det']}, "
        f"{6 + 3 * net['num_keypoints']}]: x1 y1 x2 y2 score class, then x y score per "
        "keypoint, input pixels, rows sorted by score, padding rows zero |",
        f"| architecture | CenterNet-style: stride-16 residual backbone {net['widths']}, "
        f"top-down neck ({net['neck']} ch) to a stride-4 head; per-class centre heatmaps, "
        "box size, keypoint regression from the centre, refined in per-(class, keypoint) "
        f"heatmaps with sub-cell offsets ({2 * net['window'] + 1}x{2 * net['window'] + 1} "
        "window); decoding (max-pool NMS, top-k, gathers) in the graph |",
        f"| size | {params / 1e6:.2f} M parameters, {macs / 1e6:.0f} M multiply-adds per frame |",
        f"| default score threshold | {meta.get('score_threshold')} |",
        "",
        "## Classes and keypoints",
        "",
        "| id | class | keypoints | skeleton |",
        "| --- | --- | --- | --- |",
    ]
    for cid, cname in sorted(names.items()):
        lines.append(f"| {cid} | {cname} | {', '.join(kp_names[cname])} | "
                     f"{' '.join(f'{a}-{b}' for a, b in skeleton[cname])} |")
    lines += ["", "## Accuracy", ""]
    if evaluation:
        lines += [
            f"Held-out sim frames (scenario `{evaluation.get('scenario')}`, seed "
            f"{evaluation.get('seed')}, {evaluation.get('frames')} frames, "
            f"{evaluation.get('instances')} instances at least "
            f"{_fmt(evaluation.get('min_in_view'), '.0%')} in view), through the service's "
            "own inference code; instance match at OKS >= "
            f"{evaluation.get('oks_threshold')} (sigma {evaluation.get('sigma')}), score >= "
            f"{evaluation.get('score_threshold')}; keypoint errors over the visible keypoints "
            "of matched instances, in 640x480 frame pixels.",
            "",
            f"Measured with: `{eval_command}`",
            "",
            "| class | recall | precision | instances |",
            "| --- | --- | --- | --- |",
            f"| all | {_fmt(evaluation.get('recall'))} | {_fmt(evaluation.get('precision'))} | "
            f"{evaluation.get('instances')} |",
        ]
        for cname, c in evaluation.get("per_class", {}).items():
            lines.append(f"| {cname} | {_fmt(c.get('recall'))} | {_fmt(c.get('precision'))} | "
                         f"{c.get('instances')} |")
        lines += [
            "",
            f"Keypoint error: mean {_fmt(evaluation.get('kpt_err_px_mean'), '.2f')} px, "
            f"median {_fmt(evaluation.get('kpt_err_px_median'), '.2f')} px, p95 "
            f"{_fmt(evaluation.get('kpt_err_px_p95'), '.2f')} px over "
            f"{evaluation.get('keypoints')} keypoints.",
        ]
    else:
        lines.append("Not measured yet: run `linewatch model eval --json` and pass `--eval`.")
    lines += [
        "",
        "## Latency",
        "",
        f"ONNX Runtime CPU, {latency['threads']} intra-op thread(s), batch 1: median "
        f"{latency['ms_median']:.2f} ms, p90 {latency['ms_p90']:.2f} ms per frame "
        f"(`python -m models.latency {onnx_path} --threads {latency['threads']}`)"
        + (f"; model-only median in the evaluation above: "
           f"{_fmt(evaluation.get('ms_per_frame'), '.2f')} ms on "
           f"{evaluation.get('provider')}." if evaluation else "."),
        "",
        "## Training",
        "",
        f"Recipe `{ckpt.get('recipe')}` (`models/train.py`), seed {ckpt.get('seed')}, "
        f"{ckpt.get('epoch', -1) + 1} epochs of {recipe.get('batch_size')} images, AdamW lr "
        f"{recipe.get('lr')} with warm-up and cosine decay, EMA weights exported; data: "
        + "; ".join(
            f"{s['scenario']} seeds {min(s['seeds'])}-{max(s['seeds'])} x {s['frames']} frames"
            for s in recipe.get("train", [])
        )
        + " (validation: "
        + "; ".join(
            f"{s['scenario']} seeds {min(s['seeds'])}-{max(s['seeds'])}"
            for s in recipe.get("val", [])
        )
        + "), with scale/shift and photometric augmentation.",
        "",
        f"Reproduce with `make model` (`python -m models.train --recipe {ckpt.get('recipe')} "
        f"--out runs/default` then `python -m models.export runs/default/best.pt --out "
        f"{onnx_path}`). It took {_fmt(wall / 60 if wall else None, '.0f')} minutes of wall "
        "time on the 2-core CPU build machine (torch CPU, 2 threads).",
        "",
        "## Limits",
        "",
        "- Trained on synthetic frames only: a real camera needs fine-tuning on annotated "
        "frames (`python -m models.train --coco FILE`).",
        "- Keypoint precision is bounded by the 0.5x input (about 2 frame px per input px) "
        "and the stride-4 heatmaps; sub-cell offsets recover most of it.",
        "- Hidden keypoints keep the regressed position with a low score.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.card", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--log", type=Path)
    parser.add_argument("--eval", type=Path, dest="eval_json")
    parser.add_argument("--eval-command", default="linewatch model eval --json")
    parser.add_argument("--latency", type=Path)
    parser.add_argument("--out", type=Path, help="default: the ONNX path with .md")
    args = parser.parse_args(argv)

    import onnx
    import torch

    from models.latency import measure
    from models.nets import KeypointNet, NetConfig, count_macs

    meta = {p.key: p.value for p in onnx.load(str(args.onnx)).metadata_props}
    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    log = ([json.loads(line) for line in args.log.read_text().splitlines() if line.strip()]
           if args.log else [])
    evaluation = json.loads(args.eval_json.read_text()) if args.eval_json else None
    latency = (json.loads(args.latency.read_text()) if args.latency
               else measure(args.onnx, threads=1))
    net = KeypointNet(NetConfig.from_dict(ckpt["net_config"]))
    params = sum(p.numel() for p in net.parameters())
    text = render_card(args.onnx, meta, ckpt, log, evaluation, args.eval_command, latency,
                       count_macs(net), params)
    out = args.out or args.onnx.with_suffix(".md")
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
