"""Measure a model's latency with ONNX Runtime on the CPU.

    python -m models.latency models/zoo/linewatch-parts-s.onnx [--threads 1] [--runs 300]

Feeds sim frames (halved to the input size) one at a time, after a warm-up, and
prints the median and p90 milliseconds per frame as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def measure(path: Path, threads: int = 1, runs: int = 300, warmup: int = 30) -> dict[str, float]:
    import onnxruntime as ort

    from models.export import parity_inputs

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    images = parity_inputs()
    times = []
    for i in range(warmup + runs):
        x = images[i % 2 : i % 2 + 1]
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    return {"ms_median": round(float(np.median(ms)), 3),
            "ms_p90": round(float(np.percentile(ms, 90)), 3),
            "threads": threads, "runs": runs,
            "size_mb": round(path.stat().st_size / 1e6, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"error: {args.model} does not exist", file=sys.stderr)
        return 2
    print(json.dumps(measure(args.model, args.threads, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
