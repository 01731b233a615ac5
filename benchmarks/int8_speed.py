"""Compiled int8 vs compiled fp32, next to onnxruntime fp32 and int8, in one process.

    .venv/bin/python benchmarks/int8_speed.py [--runs 30]

Models: the digits CNN at batch 64, and a BERT-shaped encoder (2 layers, d=128, 4 heads,
FFN 256) at sequence 128, batch 1. Both are quantized with lepton_edge.compress.quantize
(MinMax, per-channel); the same QDQ model is what onnxruntime int8 runs. Engines are measured
in alternating rounds so machine noise hits all of them alike; the medians and the ratios are
printed. Builds use TVM's default schedules (no tuning yet).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime

import lepton_edge
from lepton_edge.compress.quantize import quantize

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def models() -> dict[str, tuple[lepton_edge.Model, np.ndarray, dict[str, np.ndarray]]]:
    import torch

    x = np.load(REPO / "samples/digits/x_test.npy")
    digits = lepton_edge.load(REPO / "samples/digits/digits.onnx")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256,
                                             dropout=0.0, activation="gelu", batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    bert = lepton_edge.load(encoder, torch.randn(1, 128, 128), input_names=["tokens"])
    rng = np.random.default_rng(0)
    return {
        "digits CNN, batch 64": (digits, x[:128], {"image": x[:64]}),
        "encoder 2x128, seq 128": (bert, rng.standard_normal((16, 128, 128)).astype(np.float32),
                                   {"tokens": rng.standard_normal((1, 128, 128)).astype(
                                       np.float32)}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    print("| model | lepton fp32 ms | lepton int8 ms | ORT fp32 ms | ORT int8 ms | "
          "int8/fp32 (lepton) | lepton int8 / best ORT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (model, calib, feeds) in models().items():
        q = quantize(model, calib)
        engines: dict[str, Callable[[], object]] = {}
        for label, m in (("lepton fp32", model), ("lepton int8", q)):
            path = lepton_edge.compile(m, ["cpu"], golden_count=0).save(tmp / f"{label}.lepton")
            session = lepton_edge.runtime.load(path)
            engines[label] = lambda s=session: s.run(feeds)
        for label, m in (("ORT fp32", model), ("ORT int8", q)):
            ort = onnxruntime.InferenceSession(m.proto.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
            engines[label] = lambda s=ort: s.run(None, feeds)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for fn in engines.values():
            fn()  # warm-up
        for _ in range(3):
            for label, fn in engines.items():
                times[label] += median_ms(fn, max(1, args.runs // 3))
        med = {k: statistics.median(v) for k, v in times.items()}
        best_ort = min(med["ORT fp32"], med["ORT int8"])
        print(f"| {name} | {med['lepton fp32']:.3f} | {med['lepton int8']:.3f} | "
              f"{med['ORT fp32']:.3f} | {med['ORT int8']:.3f} | "
              f"{med['lepton int8'] / med['lepton fp32']:.2f} | "
              f"{med['lepton int8'] / best_ort:.1f} |")


if __name__ == "__main__":
    main()
