"""Run the compiled digits artifact next to onnxruntime: accuracy and latency.

    .venv/bin/python samples/digits/demo.py build/digits.lepton

Both engines see the same held-out test images; the script exits non-zero if their
accuracies differ (by more than 0.5 points for an int8 artifact). Latency is the median over repeated runs, alternating the two engines in
one process so machine noise hits both alike; the ratio matters more than the milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime

import lepton_edge.runtime

HERE = Path(__file__).resolve().parent


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()

    x = np.load(HERE / "x_test.npy", allow_pickle=False)
    y = np.load(HERE / "y_test.npy", allow_pickle=False)
    session = lepton_edge.runtime.load(args.artifact, self_test=True)
    ort = onnxruntime.InferenceSession(str(HERE / "digits.onnx"),
                                       providers=["CPUExecutionProvider"])
    for placement in session.placement.values():
        print(f"placement: {placement}")

    print(f"artifact: {args.artifact} ({'int8' if session.manifest.get('quantized') else 'fp32'})")
    ours = session.run({"image": x})["logits"]
    theirs = ort.run(["logits"], {"image": x})[0]
    acc_ours = float((ours.argmax(1) == y).mean())
    acc_ort = float((theirs.argmax(1) == y).mean())
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"test images: {len(y)}")
    print(f"accuracy  lepton-edge {acc_ours:.4f}   onnxruntime fp32 {acc_ort:.4f}   "
          f"(max relative logit difference {rel:.2e})")

    print(f"latency, median of {args.runs} runs (ms):")
    for batch in (1, 64, len(y)):
        xb = np.ascontiguousarray(x[:batch])
        t_ours, t_ort = [], []
        for _ in range(3):  # alternate blocks so both see the same machine state
            t_ours.append(median_ms(lambda xb=xb: session.run({"image": xb}), args.runs // 3))
            t_ort.append(median_ms(lambda xb=xb: ort.run(["logits"], {"image": xb}),
                                   args.runs // 3))
        a, b = statistics.median(t_ours), statistics.median(t_ort)
        print(f"  batch {batch:>4}: lepton-edge {a:8.3f}   onnxruntime fp32 {b:8.3f}   "
              f"ratio {a / b:5.2f}x")
    # fp32 must agree exactly; int8 may move a borderline image or two (budget: 0.5 points)
    allowed = 0.005 if session.manifest.get("quantized") else 0.0
    if abs(acc_ours - acc_ort) > allowed:
        print(f"FAIL: accuracies differ by more than {allowed:.3f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
