"""Compile time of an unrolled LSTM (lowering/bodies.py) against its sequence length.

    .venv/bin/python benchmarks/rnn_compile.py [--steps 8 32] [--hidden 64] [--input 32]

One-direction LSTM, batch 1, fp32, compiled for the CPU (untuned, no golden outputs); each
build is checked against onnxruntime. Not a test: it prints seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lepton_edge  # noqa: E402
from lepton_edge import runtime  # noqa: E402


def lstm(steps: int, hidden: int, inputs: int) -> object:
    rng = np.random.default_rng(0)
    w = nh.from_array(rng.standard_normal((1, 4 * hidden, inputs)).astype(np.float32) * .1, "w")
    r = nh.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32) * .1, "r")
    graph = h.make_graph(
        [h.make_node("LSTM", ["x", "w", "r"], ["y"], hidden_size=hidden)], "lstm",
        [h.make_tensor_value_info("x", T.FLOAT, [steps, 1, inputs])],
        [h.make_tensor_value_info("y", T.FLOAT, [steps, 1, 1, hidden])], initializer=[w, r])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 14)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--input", type=int, default=32)
    args = parser.parse_args()
    print("steps  compile s  placement  max abs err vs onnxruntime")
    for steps in args.steps:
        model = lstm(steps, args.hidden, args.input)
        started = time.perf_counter()
        art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], golden_count=0)
        took = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            art.save(Path(tmp) / "m.lepton")
            session = runtime.load(Path(tmp) / "m.lepton")
            x = np.random.default_rng(1).standard_normal((steps, 1, args.input)).astype(
                np.float32)
            got = session.run({"x": x})["y"]
            where = ",".join(p.target for p in session.placement.values())
        want = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        print(f"{steps:5d}  {took:9.1f}  {where:9s}  {float(np.abs(got - want).max()):.1e}")


if __name__ == "__main__":
    main()
