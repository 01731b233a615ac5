"""BERT-base's matmuls one at a time: lepton-edge (untuned) vs onnxruntime, GFLOPS per kernel.

    .venv/bin/python benchmarks/dense_kernels.py [--cases qkv,out_proj,ffn1,ffn2,scores,context,
                                                          digits_fc] [--threads T]
                                                 [--runs R] [--warmup W] [--block K]

Each case is a one-kernel ONNX model shaped like a layer of benchmarks/models.py's BERT-base
encoder at sequence 128, batch 1, with the batch symbolic as in the exported model:

- qkv: x[128, N, 768] @ W[768, 2304] + b (the fused Q/K/V projection, sequence-first);
- out_proj: x[N, 128, 768] reshaped to [N*128, 768], Gemm with W[768, 768] (transB) + b;
- ffn1: x[N, 128, 768] @ W[768, 3072] + b;
- ffn2: x[N, 128, 3072] @ W[3072, 768] + b + residual;
- scores: q[N, 12, 128, 64] @ k[N, 12, 64, 128] (both inputs, batched);
- context: p[N, 12, 128, 128] @ v[N, 12, 128, 64];
- digits_fc: the digits CNN's first dense layer at batch 64, x[N, 512] -> Gemm W[64, 512]
  (transB) + b -> ReLU, the batch N being the only (symbolic) row count.

Each is compiled for "cpu" (`lepton_edge.compile`, `--tune 0`) and timed against onnxruntime
fp32 with `lepton_edge.bench.compare` (per-engine blocks, same process, same inputs, both on
all cores or --threads). Printed: p50 of both, the ratio lepton/onnxruntime, and GFLOPS (2 x MACs / p50),
also as a share of the fp32 FMA peak of `lepton_edge.bench.cpu_peak`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

CASES = ("qkv", "out_proj", "ffn1", "ffn2", "scores", "context", "digits_fc")


def _model(case: str) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]], int]:
    """(model, feed shapes, MACs at those shapes: N = 1, digits_fc N = 64)."""
    rng = np.random.default_rng(0)

    def const(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.05).astype(np.float32), name)

    def tensor(name: str, shape: list) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    inits: list[onnx.TensorProto] = []
    if case in ("qkv", "ffn1", "ffn2"):
        k, n = {"qkv": (768, 2304), "ffn1": (768, 3072), "ffn2": (3072, 768)}[case]
        shape = [128, "N", k] if case == "qkv" else ["N", 128, k]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
                 helper.make_node("Add", ["h", "b"], ["y" if case != "ffn2" else "z"])]
        inputs = [tensor("x", shape)]
        feeds = {"x": tuple(1 if d == "N" else d for d in shape)}
        if case == "ffn2":
            nodes.append(helper.make_node("Add", ["z", "r"], ["y"]))
            inputs.append(tensor("r", ["N", 128, n]))
            feeds["r"] = (1, 128, n)
        inits += [const("w", k, n), const("b", n)]
        out = [tensor("y", [*shape[:2], n])]
        macs = 128 * k * n
    elif case == "digits_fc":
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
                 helper.make_node("Relu", ["h"], ["y"])]
        inits += [const("w", 64, 512), const("b", 64)]
        inputs = [tensor("x", ["N", 512])]
        feeds = {"x": (64, 512)}
        out = [tensor("y", ["N", 64])]
        macs = 64 * 512 * 64
    elif case == "out_proj":
        nodes = [helper.make_node("Reshape", ["x", "s2"], ["x2"]),
                 helper.make_node("Gemm", ["x2", "w", "b"], ["h"], transB=1),
                 helper.make_node("Reshape", ["h", "s3"], ["y"])]
        inits += [const("w", 768, 768), const("b", 768),
                  numpy_helper.from_array(np.array([-1, 768], np.int64), "s2"),
                  numpy_helper.from_array(np.array([-1, 128, 768], np.int64), "s3")]
        inputs = [tensor("x", ["N", 128, 768])]
        feeds = {"x": (1, 128, 768)}
        out = [tensor("y", ["N", 128, 768])]
        macs = 128 * 768 * 768
    else:
        a, b = ((128, 64), (64, 128)) if case == "scores" else ((128, 128), (128, 64))
        nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
        inputs = [tensor("a", ["N", 12, *a]), tensor("b", ["N", 12, *b])]
        feeds = {"a": (1, 12, *a), "b": (1, 12, *b)}
        out = [tensor("y", ["N", 12, a[0], b[1]])]
        macs = 12 * a[0] * a[1] * b[1]
    graph = helper.make_graph(nodes, case, inputs, out, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model, feeds, macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for both engines (TVM_NUM_THREADS, onnxruntime intra-op "
                             "threads); default: each engine's own (all cores)")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM's pool starts

    import lepton_edge
    from lepton_edge import bench

    peak = bench.cpu_peak(int8=False)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {peak}")
    print("| case | M MACs | lepton p50 ms | ORT p50 ms | lepton/ORT | lepton GFLOPS "
          "(% peak) | ORT GFLOPS (% peak) | max rel err |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(1)
    footer = ""
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
            if case not in CASES:
                parser.error(f"unknown case {case}; choose from {list(CASES)}")
            model, shapes, macs = _model(case)
            onnx_path = tmp / f"{case}.onnx"
            onnx.save(model, onnx_path)
            art = lepton_edge.compile(lepton_edge.load(onnx_path), ["cpu"], golden_count=0)
            path = art.save(tmp / f"{case}.lepton")
            feeds = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            report = bench.compare(path, feeds, model_path=onnx_path, runs=args.runs,
                                   warmup=args.warmup, block=args.block, peak=peak,
                                   threads=args.threads)
            lep = report.engines[bench.LEPTON].latency.p50
            ort = report.engines["onnxruntime"]
            rate = {n: 2 * macs / (ms / 1e3) / 1e9 for n, ms in
                    (("lep", lep), ("ort", ort.latency.p50))}
            err = f"{ort.max_rel_err:.1e}" if ort.max_rel_err is not None else "-"
            print(f"| {case} | {macs / 1e6:,.1f} | {lep:.3f} | {ort.latency.p50:.3f} | "
                  f"{lep / ort.latency.p50:.2f}x | {rate['lep']:.0f} "
                  f"({rate['lep'] / peak.fp32_gflops:.0%}) | {rate['ort']:.0f} "
                  f"({rate['ort'] / peak.fp32_gflops:.0%}) | {err} |", flush=True)
            footer = f"{report.order}; threads: {report.threads}"
    print(footer)
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
