"""Where a small model's call time goes: Session.run, the CPU executable's run, the bare Relax
VM call, and (--kernels) each VM call inside it.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/call_overhead.py [--int8] [--weight-bits 7]
        [--batch 1] [--calls 3000] [--kernels]

The model is the digits sample (samples/digits/digits.onnx), compiled untuned; --int8
quantizes it first as benchmarks/run.sh does (lepton_edge.quantize, MinMax, 16 random
calibration samples). Printed: the p50 of --calls back-to-back calls of each layer (the bare VM call is the
function executable.run picks: the static batch-1 entry main_N1 at batch 1) (one
engine only, nothing alternated: run old and new trees one after the other, twice, and
compare), so that "session - executable" is the runtime's Python per call and "executable -
VM" the input staging and output copy. --kernels then times every VM call with the VM's
instrument hook (each adds ~1.4 us of Python: read the kernels against each other, and the
builtins' count rather than their time) and runs the same model with TVM_NUM_THREADS as set,
so running it with 1 and with 2 threads shows which kernels lose to thread-pool launches.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def p50_us(fn: object, calls: int) -> float:
    for _ in range(min(200, calls)):
        fn()  # type: ignore[operator]
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return float(np.median(samples)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--int8", action="store_true", help="quantize the model first")
    parser.add_argument("--weight-bits", type=int, default=8, choices=(7, 8))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--kernels", action="store_true", help="time each VM call too")
    args = parser.parse_args()

    import lepton_edge

    rng = np.random.default_rng(0)
    model = lepton_edge.load(REPO / "samples/digits/digits.onnx")
    shape = [d if isinstance(d, int) else 1 for d in model.inputs[0].shape]
    if args.int8:
        calib = rng.standard_normal((16, *shape[1:])).astype(np.float32)
        model = lepton_edge.quantize(model, calib, weight_bits=args.weight_bits)
    with tempfile.TemporaryDirectory() as tmp:
        path = lepton_edge.compile(model, ["cpu"], golden_count=0, tune=0).save(
            Path(tmp) / "digits.lepton")
        session = lepton_edge.runtime.load(path)
        x = rng.standard_normal((args.batch, *shape[1:])).astype(np.float32)
        feeds = {session.inputs[0].name: x}
        executable = session._subgraphs[0].executable
        vm_args = [executable._convert(0, x)]
        # the function executable.run calls for this shape: a static batch entry (main_N1
        # for batch 1) or the symbolic main
        vm_main = executable._entries.get(x.shape, (None, executable._main))[1]
        what = f"digits {'int8' if args.int8 else 'fp32'}, batch {args.batch}"
        whole = p50_us(lambda: session.run(feeds), args.calls)
        run = p50_us(lambda: executable.run([x]), args.calls)
        bare = p50_us(lambda: vm_main(*vm_args), args.calls)
        print(f"{what}: session.run {whole:.2f} us, executable.run {run:.2f} us, "
              f"bare VM call {bare:.2f} us (p50 of {args.calls} calls each)")
        if not args.kernels:
            return
        times: dict[str, list[float]] = collections.defaultdict(list)
        began: dict[str, float] = {}

        def instrument(_func: object, symbol: str, before: bool, _ret: object,
                       *_args: object) -> int:
            if before:
                began[symbol] = time.perf_counter()
            else:
                times[symbol].append(time.perf_counter() - began[symbol])
            return 0

        executable._vm.set_instrument(instrument)
        runs = 500
        for _ in range(runs):
            vm_main(*vm_args)
        rows = sorted(((float(np.median(v)) * 1e6 * len(v) / runs, k, len(v) // runs)
                       for k, v in times.items()), reverse=True)
        print("per VM call, us per model call (instrumented):")
        for us, symbol, uses in rows:
            print(f"{us:9.2f}  x{uses:<3} {symbol}")


if __name__ == "__main__":
    main()
