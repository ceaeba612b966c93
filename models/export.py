"""Export a training checkpoint to the end-to-end ONNX model the service runs.

    python -m models.export CKPT --out models/zoo/NAME.onnx [--opset 18] [--version X]

The graph takes ``images`` uint8 [B, 240, 320, 3] NHWC BGR (dynamic B) and returns
``detections`` float32 [B, N, 6 + 3K] (see ``models.nets``).  The metadata the
runtime reads is written into ``metadata_props``.  After export, torch and ONNX
Runtime run the same inputs and the largest absolute difference of the outputs
must stay within 1e-4 (``ExportError`` otherwise); it is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from models.nets import INPUT_HW, STRIDE, ExportModel, KeypointNet, NetConfig
from service.errors import ModelError

PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 18
AUTHOR = "LineWatch contributors"
LICENSE = "Apache-2.0"


class ExportError(ModelError):
    """The exported graph is missing or disagrees with the torch model."""


def load_checkpoint(path: Path, weights: str = "ema") -> tuple[KeypointNet, dict[str, Any]]:
    """A checkpoint's network (EMA weights by default) in eval mode, and the checkpoint."""
    if not path.exists():
        raise ExportError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "net_config" not in ckpt:
        raise ExportError(f"{path} is not a LineWatch training checkpoint (no 'net_config')")
    net = KeypointNet(NetConfig.from_dict(ckpt["net_config"]))
    net.load_state_dict(ckpt[weights if weights in ckpt else "model"])
    net.eval()
    return net, ckpt


def build_metadata(net: KeypointNet, ckpt: dict[str, Any], version: str) -> dict[str, str]:
    cfg = net.config
    classes = ckpt["classes"]
    names = {i: n for i, n in enumerate(classes["names"])}
    metrics = ckpt.get("metrics") or {}
    return {
        "task": "pose",
        "kpt_shape": json.dumps([cfg.num_keypoints, 3]),
        "names": repr(names),
        "imgsz": json.dumps(list(INPUT_HW)),
        "stride": str(STRIDE),
        "keypoint_names": json.dumps(classes["keypoint_names"]),
        "skeleton": json.dumps(classes["skeleton"]),
        "output_format": "end2end",
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "input_color": "BGR",
        "normalization": "in-graph",
        "resize": "letterbox",
        "max_det": str(cfg.max_det),
        "pad_value": "114",
        "score_threshold": str(ckpt.get("recipe_full", {}).get("score_threshold", 0.3)),
        "author": AUTHOR,
        "license": LICENSE,
        "version": version,
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "description": "LineWatch keypoint model (CenterNet-style, stride 4, in-graph decoding)",
        "recipe": str(ckpt.get("recipe", "")),
        "train_seed": str(ckpt.get("seed", "")),
        "train_epochs": str(int(ckpt.get("epoch", -1)) + 1),
        "val_metrics": json.dumps(
            {k: metrics[k] for k in ("recall", "precision", "kpt_err_px_mean", "kpt_err_px_p95")
             if k in metrics}
        ),
    }


def export_onnx(net: KeypointNet, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Trace ``ExportModel(net)`` to ``path`` with a dynamic batch dimension."""
    model = ExportModel(net).eval()
    example = torch.zeros(2, *INPUT_HW, 3, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # "torchvision is not installed. Skipping torchvision::nms" is irrelevant here
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # the exporter's own deprecation chatter is not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model, (example,), None, dynamo=True, opset_version=opset,
            input_names=["images"], output_names=["detections"],
            dynamic_shapes=({0: batch},), external_data=False, verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        program.save(str(tmp_path), external_data=False)
        proto = onnx.load(str(tmp_path))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = metadata.get("description", "")
    onnx.save(proto, str(path))


def parity_inputs(seed: int = 0) -> np.ndarray:
    """Batch of 3: two sim frames and random noise.

    No flat images: on a flat image every cell of an untrained heatmap ties, and
    top-k may order exact ties differently in torch and ONNX Runtime.
    """
    from models.data import letterbox
    from service.sim import Scene

    rng = np.random.default_rng(seed)
    frames = [Scene(scenario, seed=7).render(45)[0] for scenario in ("conveyor", "train")]
    images = [letterbox(f, INPUT_HW)[0] for f in frames]
    images.append(rng.integers(0, 256, (*INPUT_HW, 3), dtype=np.uint8))
    return np.stack(images)


def check_parity(net: KeypointNet, path: Path, images: np.ndarray | None = None) -> float:
    """Max |torch - ORT| over a batch (and batch 1); raises ExportError above tolerance."""
    import onnxruntime as ort

    images = parity_inputs() if images is None else images
    with torch.no_grad():
        expected = ExportModel(net).eval()(torch.from_numpy(images)).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = session.run(["detections"], {"images": images})[0]
    single = session.run(["detections"], {"images": images[:1]})[0]
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} != torch {expected.shape}")
    diff = max(float(np.abs(got - expected).max()), float(np.abs(single - expected[:1]).max()))
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"parity check failed for {path}: max |torch - onnxruntime| = {diff:.3g} > "
            f"{PARITY_TOLERANCE:g}"
        )
    return diff


def export_checkpoint(ckpt_path: Path, out: Path, version: str = "0.1.0",
                      opset: int = DEFAULT_OPSET) -> float:
    net, ckpt = load_checkpoint(ckpt_path)
    export_onnx(net, out, opset)
    write_metadata(out, build_metadata(net, ckpt, version))
    return check_parity(net, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--version", default="0.1.0")
    args = parser.parse_args(argv)
    if args.opset < 17:
        print("error: --opset must be 17 or newer", file=sys.stderr)
        return 2
    try:
        diff = export_checkpoint(args.checkpoint, args.out, args.version, args.opset)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size_mb = args.out.stat().st_size / 1e6
    print(f"exported {args.out} ({size_mb:.2f} MB); parity torch vs onnxruntime: "
          f"max abs diff {diff:.2e} (tolerance {PARITY_TOLERANCE:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
