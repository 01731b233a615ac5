"""Where a model's time goes, kernel by kernel: lepton-edge's untuned CPU build against
onnxruntime's own profiler, float32, on the same input.

    .venv/bin/python benchmarks/untuned.py --models resnet18,mobilenet_v2,digits,bert \
        --export /tmp/prof                                   # the ONNX files, once
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/kernel_profile.py /tmp/prof/resnet18.onnx \
        [--batch 1] [--calls 20] [--top 60]

Printed: lepton's whole-call p50 over --calls back-to-back calls of the bare Relax VM, then
every VM call (kernels and VM builtins) timed with the VM's instrument hook (each symbol's
median per model call, summed over its uses; the hook adds a little per call), then
onnxruntime's p50 (intra-op threads = TVM_NUM_THREADS) and its per-node kernel times from its
profiler (median per node). The two columns do not name the same things (a fused TVM kernel
vs an onnxruntime node); match them by order and size. Back-to-back calls of one engine, not
alternated: on a shared machine run it twice and compare the runs (benchmarks/untuned.py and
`lepton-edge bench` alternate engines for ratios).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a float32 .onnx with one input")
    parser.add_argument("--batch", type=int, default=1, help="value of a symbolic first dim")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=60, help="rows printed per engine")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", "2")

    import onnx
    import onnxruntime
    import tvm
    from tvm import relax

    from lepton_edge.lowering import relax as lowering

    proto = onnx.load(str(args.model))
    (inp,) = [i for i in proto.graph.input
              if i.name not in {t.name for t in proto.graph.initializer}]
    shape = [d.dim_value or args.batch for d in inp.type.tensor_type.shape.dim]
    shape[0] = args.batch
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)

    target = tvm.target.Target({"kind": "llvm", "mcpu": lowering.system_cpu()})
    executable = lowering._compile_untuned(lowering.import_onnx(proto), target, None)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    xt = tvm.runtime.tensor(x, tvm.cpu())

    def p50(fn: object) -> float:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(args.calls):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
        return float(np.median(samples)) * 1e3

    print(f"lepton p50 {p50(lambda: vm['main'](xt)):.3f} ms "
          f"(TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']})")
    times: dict[str, list[float]] = collections.defaultdict(list)
    began: dict[str, float] = {}

    def instrument(_func: object, symbol: str, before: bool, _ret: object, *_args: object) -> int:
        if before:
            began[symbol] = time.perf_counter()
        else:
            times[symbol].append(time.perf_counter() - began[symbol])
        return 0

    vm.set_instrument(instrument)
    runs = 10
    for _ in range(runs):
        vm["main"](xt)
    rows = sorted(((float(np.median(v)) * 1e6 * len(v) / runs, k, len(v) // runs)
                   for k, v in times.items()), reverse=True)
    print(f"lepton per VM call, us per model call (instrumented total "
          f"{sum(r[0] for r in rows):.0f} us):")
    for us, symbol, uses in rows[:args.top]:
        print(f"{us:9.0f}  x{uses:<3} {symbol}")

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(os.environ["TVM_NUM_THREADS"])
    feeds = {inp.name: x}
    session = onnxruntime.InferenceSession(str(args.model), options,
                                           providers=["CPUExecutionProvider"])
    print(f"onnxruntime p50 {p50(lambda: session.run(None, feeds)):.3f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = onnxruntime.InferenceSession(str(args.model), options,
                                               providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    nodes: dict[str, list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            nodes[event["name"][:-len("_kernel_time")]].append(event["dur"])
    rows_ort = sorted(((float(np.median(v)), k) for k, v in nodes.items()), reverse=True)
    print(f"onnxruntime per node, us (total {sum(r[0] for r in rows_ort):.0f} us):")
    for us, node in rows_ort[:args.top]:
        print(f"{us:9.0f}  {node}")


if __name__ == "__main__":
    main()
