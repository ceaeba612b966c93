"""Ultralytics as a reference, run under the separate ``.venv-ultralytics`` interpreter.

Ultralytics (and its torch) is a test-only dependency that cannot share the main
virtualenv, so tests run this file as a subprocess:

    .venv-ultralytics/bin/python tests/support/ultra_ref.py export --out DIR [--imgsz 640|H,W]
            [--calib IMAGE...]
        builds YOLO("yolo11n-pose.yaml") with nc: 1 offline (untrained, seeded weights,
        BatchNorm statistics calibrated on the given images so outputs are not degenerate),
        (with coco-pose.yaml's kpt_names, as a model trained on it exports them)
        ([--channels 1]: a gray model, input [1, 1, H, W], as Ultralytics trains with a
        data yaml's channels: 1; [--detect N]: YOLO("yolo11n.yaml") with N classes instead,
        DIR/yolo11n.onnx and DIR/yolo11n-nms.onnx; [--parts]: a parts pose model of 2
        classes with 4 named keypoints each, kpt_shape [4, 2] (no visibility))
        exports DIR/yolo11n-pose.onnx (raw [1, 56, A]) and DIR/yolo11n-pose-nms.onnx
        (NMS inside, [1, 300, 57]); prints {"raw": path, "nms": path} as JSON.
    .venv-ultralytics/bin/python tests/support/ultra_ref.py predict --model X.onnx
        --conf C --iou I [--max-det N] IMAGE_OR_VIDEO...
        runs YOLO(X).predict on each file; prints one JSON object per image or video frame:
        {"file", "frame", "boxes": [[x1, y1, x2, y2]], "scores", "classes",
         "keypoints": [[[x, y, s]]], "kpt_names": the names read from the file's metadata}.
    .venv-ultralytics/bin/python tests/support/ultra_ref.py stream --model X.onnx
        --source CLIP [--frames N] [--warmup W] [--conf C]
        times YOLO(X).predict(source, stream=True) and prints {"fps", "frames", "seconds"}.

This file imports nothing from LineWatch (it runs outside its virtualenv).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def calibration_batch(images: list[str], imgsz: tuple[int, int], channels: int = 3) -> Any:
    """Real images (resized, RGB or gray, 0..1) when given, else smooth random ones."""
    import cv2
    import numpy as np
    import torch

    if images:
        if channels == 1:
            arrays = [cv2.resize(cv2.imread(p, cv2.IMREAD_GRAYSCALE), imgsz[::-1])[..., None]
                      for p in images]
        else:
            arrays = [cv2.resize(cv2.imread(p), imgsz[::-1])[..., ::-1] for p in images]
        batch = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
        return torch.from_numpy(np.ascontiguousarray(batch))
    coarse = torch.rand(4, channels, 12, 12)
    return torch.nn.functional.interpolate(coarse, size=imgsz, mode="bilinear")


def export(out: Path, imgsz: tuple[int, int], seed: int, calib: list[str] | None = None,
           arch: str = "11", opset: int | None = None, raw_only: bool = False,
           dynamic: bool = False, channels: int = 3, detect: int = 0,
           parts: bool = False) -> dict[str, str]:
    import torch
    import ultralytics
    import yaml
    from ultralytics import YOLO

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    family = {"11": "yolo11", "26": "yolo26", "v8": "yolov8"}[arch]
    task, suffix = ("detect", "") if detect else ("pose", "-pose")
    stock = Path(ultralytics.__file__).parent / "cfg" / "models" / arch / f"{family}{suffix}.yaml"
    cfg = yaml.safe_load(stock.read_text())
    # pose: the person layout of the pretrained models, [1, 4 + 1 + 17*3, A]; detect: N classes
    cfg["nc"] = detect or 1
    if parts:  # a parts model: 2 classes, 4 keypoints each without visibility
        cfg["nc"], cfg["kpt_shape"] = 2, [4, 2]
    work = out / "build"
    work.mkdir(exist_ok=True)
    yaml_path = work / f"{family}n{suffix}.yaml"  # the "n" in the name picks the nano scale
    yaml_path.write_text(yaml.safe_dump(cfg))
    model = YOLO(str(yaml_path), task=task)
    if detect:  # a parts detector's classes
        model.model.names = {i: f"part{i}" for i in range(detect)}
    if parts:
        model.model.names = {0: "bracket", 1: "plate"}
    if channels != 3:  # a gray model, as training with a data yaml's channels: 1 builds it
        from ultralytics.nn.tasks import PoseModel

        gray = PoseModel(str(yaml_path), ch=channels, verbose=False)
        gray.args, gray.task = model.model.args, model.model.task
        model.model = gray
    # Untrained, the activations vanish layer by layer (every anchor gets the same output).
    # Calibrate each BatchNorm on one batch (momentum 1: running stats = batch stats), so
    # every layer passes unit-scale features, and spread the class scores so that NMS has
    # a real order to follow and thresholds select something.
    net = model.model
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    net.train()
    with torch.no_grad():
        net(calibration_batch(calib or [], imgsz, channels))
    net.eval()
    if parts:  # what its data yaml's kpt_names would name
        net.kpt_names = {0: ["corner_a", "corner_b", "hole_1", "hole_2"],
                         1: ["top_left", "top_right", "bottom_right", "bottom_left"]}
    elif not detect:  # what training on coco-pose.yaml leaves on it (exported as kpt_names)
        coco_pose = Path(ultralytics.__file__).parent / "cfg" / "datasets" / "coco-pose.yaml"
        net.kpt_names = yaml.safe_load(coco_pose.read_text())["kpt_names"]
    head = net.model[-1]
    # box (DFL), class and keypoint output convolutions per level; YOLO26's keypoints come
    # from cv4_kpts, and its NMS-free (one-to-one) head has copies of each
    # YOLO26 regresses box sides directly (no DFL; positive: no inverted boxes); its class
    # branch, and a gray, detector or parts model's, pass larger features: a narrower spread
    # keeps the scores off 1.0 (where ties would leave the order to rounding)
    yolo26 = getattr(head, "reg_max", 16) == 1
    box_bias, cls_std, cls_bias = (2.0, 0.8, -3.5) if yolo26 else (0.0, 1.0, -2.0)
    if channels == 1 or detect:
        cls_std, cls_bias = 0.5, -4.0
    elif parts:
        cls_std, cls_bias = 0.7, -3.0
    outputs = [("cv2", 0.3, box_bias), ("cv3", cls_std, cls_bias)]
    if not detect:
        outputs.append(("cv4_kpts" if hasattr(head, "cv4_kpts") else "cv4", 0.3, 0.0))
    with torch.no_grad():
        for name, std, bias in outputs:
            for branch in getattr(head, name):
                last = branch if isinstance(branch, torch.nn.Conv2d) else branch[-1]
                last.weight.normal_(0.0, std / last.weight.shape[1] ** 0.5)
                last.bias.fill_(bias)
        for name in ("cv2", "cv3", "cv4", "cv4_kpts"):  # the NMS-free head (training leaves
            twin = getattr(head, f"one2one_{name}", None)  # it close to the other): a copy
            if twin is not None:
                twin.load_state_dict(getattr(head, name).state_dict())
    result = {}
    kinds: list[tuple[str, dict[str, Any]]] = [("raw", {})]
    if not raw_only:  # YOLO26: its own NMS-free head; earlier ones: NMS inside the graph
        kinds.append(("nms", {"nms": False} if arch == "26" else {"nms": True}))
    for key, kwargs in kinds:
        if opset is not None:
            kwargs["opset"] = opset
        if dynamic:  # batch, height and width dynamic (what users export for batching)
            kwargs["dynamic"] = True
        exported = Path(model.export(format="onnx", imgsz=list(imgsz), verbose=False, **kwargs))
        target = out / (f"{family}n{suffix}.onnx" if key == "raw"
                        else f"{family}n{suffix}-nms.onnx")
        shutil.move(str(exported), target)
        result[key] = str(target)
    return result


def predict(model_path: str, images: list[str], conf: float, iou: float, max_det: int) -> None:
    from ultralytics import YOLO

    model = YOLO(model_path, task="pose" if "-pose" in Path(model_path).name else "detect")
    for image in images:  # an image gives one result, a video one per frame
        results = model.predict(image, stream=True, conf=conf, iou=iou, max_det=max_det,
                                verbose=False)
        for frame, res in enumerate(results):
            emit(record(image, frame, res, model))


def record(image: str, frame: int, res: Any, model: Any) -> dict[str, Any]:
    return {
        "file": image,
        "frame": frame,
        "boxes": res.boxes.xyxy.cpu().numpy().tolist(),
        "scores": res.boxes.conf.cpu().numpy().tolist(),
        "classes": res.boxes.cls.cpu().numpy().astype(int).tolist(),
        "keypoints": res.keypoints.data.cpu().numpy().tolist() if res.keypoints is not None
        else [],
        "kpt_names": getattr(model.predictor.model, "kpt_names", None),  # from metadata
    }


def stream(model_path: str, source: str, frames: int, warmup: int, conf: float) -> None:
    from ultralytics import YOLO

    model = YOLO(model_path, task="pose")
    n = 0
    t0 = time.perf_counter()
    for _ in model.predict(source, stream=True, conf=conf, verbose=False):
        n += 1
        if n == warmup:
            t0 = time.perf_counter()
        if n >= warmup + frames:
            break
    elapsed = time.perf_counter() - t0
    timed = n - warmup
    emit({"fps": timed / elapsed if elapsed > 0 else 0.0, "frames": timed, "seconds": elapsed})


def imgsz_arg(text: str) -> tuple[int, int]:
    sides = [int(v) for v in text.split(",")]
    return (sides[0], sides[-1]) if len(sides) in (1, 2) else (0, 0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--imgsz", type=imgsz_arg, default=(640, 640),
                    help="640, or H,W for a rectangular export (e.g. 384,640)")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--calib", nargs="*", default=[], help="images for BatchNorm calibration")
    ex.add_argument("--arch", choices=["11", "26", "v8"], default="11",
                    help="YOLO11, YOLO26 or YOLOv8")
    ex.add_argument("--opset", type=int, default=None, help="ONNX opset (Ultralytics' default)")
    ex.add_argument("--raw-only", action="store_true", help="skip the NMS-free export")
    ex.add_argument("--detect", type=int, default=0, metavar="N",
                    help="a detection model of N classes (part0..) instead of pose")
    ex.add_argument("--parts", action="store_true",
                    help="a parts pose model: 2 classes, kpt_shape [4, 2], named keypoints")
    ex.add_argument("--channels", type=int, choices=[1, 3], default=3,
                    help="1: a gray model (input [B, 1, H, W])")
    ex.add_argument("--dynamic", action="store_true",
                    help="dynamic batch, height and width (Ultralytics' dynamic=True)")
    pr = sub.add_parser("predict")
    pr.add_argument("--model", required=True)
    pr.add_argument("--conf", type=float, default=0.25)
    pr.add_argument("--iou", type=float, default=0.7)
    pr.add_argument("--max-det", type=int, default=300)
    pr.add_argument("images", nargs="+")
    st = sub.add_parser("stream")
    st.add_argument("--model", required=True)
    st.add_argument("--source", required=True)
    st.add_argument("--frames", type=int, default=100)
    st.add_argument("--warmup", type=int, default=5)
    st.add_argument("--conf", type=float, default=0.25)
    args = parser.parse_args(argv)
    # Ultralytics prints progress to stdout: keep stdout for the JSON lines only.
    with contextlib.redirect_stdout(sys.stderr):
        if args.cmd == "export":
            emit(export(args.out, args.imgsz, args.seed, args.calib, args.arch, args.opset,
                        args.raw_only, args.dynamic, args.channels, args.detect,
                        args.parts))
        elif args.cmd == "predict":
            predict(args.model, args.images, args.conf, args.iou, args.max_det)
        else:
            stream(args.model, args.source, args.frames, args.warmup, args.conf)
    return 0


def emit(record: dict[str, Any]) -> None:
    sys.__stdout__.write(json.dumps(record) + "\n")
    sys.__stdout__.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
