"""Single float32 convolution kernels: lepton-edge's NCHWc kernel (lowering/nchwc.py, scheduled
by its default rule, ReLU epilogue) against onnxruntime's Conv + Relu on the same shape, the
same number of threads each (default 1), in the same process: blocks of --block calls of one
engine, each after a --pause-ms pause and one untimed call, the engines alternating (back to
back single calls let one engine's spinning thread pool take the cores from the other's
next call: at 2 threads, lepton's 28x28x128 layer measured 2.9-3.7 ms that way, slower than
with 1 thread).

    TVM_NUM_THREADS=1 .venv/bin/python benchmarks/conv_kernels.py [--layers resnet,mobilenet]
        [--runs 20] [--only NAME] [--threads T] [--block 5] [--pause-ms 20]

onnxruntime runs the Conv + Relu of an NCHW model as ReorderInput -> NCHWc Conv (ReLU fused)
-> ReorderOutput; inside a network it chains NCHWc convolutions without those reorders. So its
kernel time is read from its own profiler (the NCHWc Conv node's kernel time, fastest call),
which leaves the reorders out as lepton-edge's side does (its NCHWc kernel alone); the time of
the whole onnxruntime call (reorders included) is printed alongside for reference.

Printed per layer: MACs, the floor (2 x MACs / the fp32 FMA peak measured now), the fastest
call of each (the machine is shared: a median moves with other processes' bursts), the
fraction of the peak each reaches, and the ratio lepton / onnxruntime (kernel to kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (C_in, C_out, H, W, kernel, stride, pad, depthwise)
LAYERS = {
    "resnet": {
        "r.stem7x7": (3, 64, 224, 224, 7, 2, 3, False),
        "r.l1.3x3": (64, 64, 56, 56, 3, 1, 1, False),
        "r.l2.3x3s2": (64, 128, 56, 56, 3, 2, 1, False),
        "r.l2.3x3": (128, 128, 28, 28, 3, 1, 1, False),
        "r.l2.1x1s2": (64, 128, 56, 56, 1, 2, 0, False),
        "r.l3.3x3": (256, 256, 14, 14, 3, 1, 1, False),
        "r.l4.3x3": (512, 512, 7, 7, 3, 1, 1, False),
    },
    "mobilenet": {
        "m.stem3x3s2": (3, 32, 224, 224, 3, 2, 1, False),
        "m.pw16-96.112": (16, 96, 112, 112, 1, 1, 0, False),
        "m.pw32-192.56": (32, 192, 56, 56, 1, 1, 0, False),
        "m.dw144.56": (144, 144, 56, 56, 3, 1, 1, True),
        "m.dw96.112s2": (96, 96, 112, 112, 3, 2, 1, True),
        "m.pw144-32.28": (144, 32, 28, 28, 1, 1, 0, False),
        "m.pw32-192.28": (32, 192, 28, 28, 1, 1, 0, False),
        "m.pw64-384.14": (64, 384, 14, 14, 1, 1, 0, False),
        "m.pw384-64.14": (384, 64, 14, 14, 1, 1, 0, False),
        "m.pw96-576.14": (96, 576, 14, 14, 1, 1, 0, False),
        "m.pw576-96.14": (576, 96, 14, 14, 1, 1, 0, False),
        "m.dw960.7": (960, 960, 7, 7, 3, 1, 1, True),
        "m.pw576-160.7": (576, 160, 7, 7, 1, 1, 0, False),
        "m.pw960-160.7": (960, 160, 7, 7, 1, 1, 0, False),
        "m.pw320-1280.7": (320, 1280, 7, 7, 1, 1, 0, False),
    },
}


def _host_target() -> tuple[object, int, int]:
    """This CPU's LLVM target, the NCHWc block (float32 lanes of its SIMD registers) and the
    number of vector registers, as lepton-edge's CPU build picks them (AVX-512: 16 lanes,
    32 registers; AVX2: 8, 16)."""
    import tvm

    from lepton_edge.lowering import nchwc, schedules
    from lepton_edge.lowering.relax import system_cpu

    target = tvm.target.Target({"kind": "llvm", "mcpu": system_cpu()})
    bits = schedules.vector_bits(target)
    return target, bits // 32, nchwc.vector_registers(bits)


def _tvm_kernel(cin: int, cout: int, h: int, w: int, k: int, stride: int, pad: int,
                depthwise: bool) -> tuple[object, list[object]]:
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from lepton_edge.lowering import nchwc

    target, lanes, registers = _host_target()
    blocked = cin % lanes == 0
    if blocked:
        x = te.placeholder((1, cin // lanes, h, w, lanes), name="x")
    else:
        x = te.placeholder((1, cin, h, w), name="x")
    wshape = ((cout // lanes, k, k, lanes) if depthwise
              else (cout // lanes, cin // lanes, k, k, lanes, lanes) if blocked
              else (cout // lanes, cin, k, k, lanes))
    wt = te.placeholder(wshape, name="w")
    y = nchwc.conv2d_nchwc_te(x, wt, (stride, stride), (pad, pad, pad, pad), depthwise,
                              registers)
    out = te.compute(y.shape, lambda *i: te.max(y(*i), 0.0), name="relu")
    func = te.create_prim_func([x, wt, out])
    sch = Schedule(tvm.IRModule({"main": func}))
    assert nchwc.schedule_nchwc(sch, target), "the nchwc rule did not take the kernel"
    lib = tvm.compile(sch.mod, target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.random.rand(*[int(d) for d in t.shape]).astype("float32"), dev)
            for t in (x, wt)]
    args.append(tvm.runtime.tensor(np.zeros([int(d) for d in out.shape], "float32"), dev))
    return lib["main"], args


def _ort_session(cin: int, cout: int, h: int, w: int, k: int, stride: int, pad: int,
                 depthwise: bool, threads: int = 1) -> tuple[object, dict[str, np.ndarray]]:
    """An onnxruntime session (profiling on, see :func:`_ort_conv_times`) of Conv + Relu."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    groups = cin if depthwise else 1
    weight = np.random.rand(cout, cin // groups, k, k).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[pad] * 4, strides=[stride] * 2,
                          group=groups),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = f"/tmp/conv_kernels_ort_{os.getpid()}"
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session, {"x": np.random.rand(1, cin, h, w).astype(np.float32)}


def _ort_conv_times(session: object) -> list[float]:
    """Seconds of each call of onnxruntime's convolution kernel (its profiler's kernel time of
    every Conv node, NCHWc or not: without the ReorderInput / ReorderOutput nodes)."""
    path = session.end_profiling()  # type: ignore[attr-defined]
    try:
        with open(path) as handle:
            events = json.load(handle)
    finally:
        os.unlink(path)
    return [e["dur"] * 1e-6 for e in events
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
            and e.get("args", {}).get("op_name") in ("Conv", "FusedConv")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="resnet,mobilenet")
    parser.add_argument("--only", default=None, help="one layer name")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--block", type=int, default=5,
                        help="timed calls of one engine back to back")
    parser.add_argument("--pause-ms", type=float, default=20.0,
                        help="pause before each block (and one untimed call)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of both engines (default: TVM_NUM_THREADS, else 1)")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = int(os.environ.get("TVM_NUM_THREADS", "1"))
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    from lepton_edge import bench

    peak = bench.cpu_peak(int8=False).fp32_gflops
    _, lanes, registers = _host_target()
    print(f"fp32 peak measured now (1 thread): {peak:.1f} GFLOPS; {args.threads} thread(s); "
          f"lepton's kernels NCHW{lanes}c with {registers} vector registers (this CPU)")
    peak *= args.threads
    print("| layer | M MACs | floor ms | lepton min ms | ORT conv min ms | lepton % peak "
          "| ORT % peak | lepton/ORT | ORT call min ms (with reorders) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for group in args.layers.split(","):
        for name, (cin, cout, h, w, k, stride, pad, dw) in LAYERS[group].items():
            if args.only and name != args.only:
                continue
            oh = (h + 2 * pad - k) // stride + 1
            ow = (w + 2 * pad - k) // stride + 1
            macs = cout * oh * ow * k * k * (1 if dw else cin)
            kernel, targs = _tvm_kernel(cin, cout, h, w, k, stride, pad, dw)
            session, feeds = _ort_session(cin, cout, h, w, k, stride, pad, dw, args.threads)
            times: dict[str, list[float]] = {"tvm": [], "ort": []}
            for _ in range(3):
                kernel(*targs)
                session.run(None, feeds)  # type: ignore[attr-defined]
            calls = {"tvm": lambda: kernel(*targs),
                     "ort": lambda: session.run(None, feeds)}  # type: ignore[attr-defined]
            for done in range(0, args.runs, args.block):
                # blocks of calls of one engine after a pause: with 2+ threads, the other
                # engine's pool spinning right after its call would take the cores
                for engine, call in calls.items():
                    time.sleep(args.pause_ms / 1e3)
                    call()
                    for _ in range(min(args.block, args.runs - done)):
                        started = time.perf_counter()
                        call()
                        times[engine].append(time.perf_counter() - started)
            conv_times = _ort_conv_times(session)
            if not conv_times:
                raise SystemExit(f"{name}: no Conv kernel time in onnxruntime's profile")
            # the fastest call: the machine is shared, and a burst of noise moves a median
            t_tvm = min(times["tvm"]) * 1e3
            t_ort = min(conv_times) * 1e3
            floor = 2 * macs / (peak * 1e9) * 1e3
            print(f"| {name} | {macs / 1e6:.1f} | {floor:.3f} | {t_tvm:.3f} | {t_ort:.3f} | "
                  f"{100 * floor / t_tvm:.0f}% | {100 * floor / t_ort:.0f}% | "
                  f"{t_tvm / t_ort:.2f}x | {min(times['ort']) * 1e3:.3f} |", flush=True)


if __name__ == "__main__":
    main()
