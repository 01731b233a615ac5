"""Probe: how much MetaSchedule tuning buys on the digits CNN, next to onnxruntime.

Runs, in one process with 2 threads (TVM_NUM_THREADS=2, onnxruntime intra-op 2):
untuned TVM (the CPU target's current build), tuned with 64 and 256 trials (each into a fresh
database; batch sizes 1 and 64 are the tuned buckets), and the second compile of each from its
database. Prints latency medians and tuning / compile times as a table.

    .venv/bin/python benchmarks/tune_probe.py [--trials 64 256] [--runs 100] [--keep DIR]

Measure on a quiet machine: TVM's thread pool is very sensitive to a busy second core.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "2")  # before TVM starts its thread pool

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import tvm  # noqa: E402

from lepton_edge.lowering import relax as lowering  # noqa: E402
from lepton_edge.lowering import tuning  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "samples" / "digits" / "digits.onnx"
BATCHES = (1, 64)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def inputs() -> dict[int, np.ndarray]:
    x = np.load(ROOT / "samples" / "digits" / "x_test.npy").astype("float32")
    return {n: np.ascontiguousarray(np.resize(x, (n, 1, 8, 8))) for n in BATCHES}


def tvm_latencies(executable: tvm.runtime.Executable, xs: dict[int, np.ndarray],
                  want: dict[int, np.ndarray], runs: int) -> dict[int, float]:
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    out = {}
    for n, x in xs.items():
        arg = tvm.runtime.tensor(x)
        got = vm["main"](arg).numpy()
        err = float(np.abs(got - want[n]).max() / max(1e-12, np.abs(want[n]).max()))
        if err > 1e-4:
            raise SystemExit(f"batch {n}: TVM output differs from onnxruntime (rel {err:.2g})")
        out[n] = median_ms(lambda arg=arg: vm["main"](arg), runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--runs", type=int, default=100, help="timed runs per median (>= 50)")
    parser.add_argument("--keep", type=Path, help="keep the databases under this folder")
    parser.add_argument("--quiet", action="store_true", help="do not print tuning progress")
    args = parser.parse_args()

    model = onnx.load(str(MODEL))
    xs = inputs()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    options.inter_op_num_threads = 1
    ort = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    want = {n: ort.run(None, {"image": x})[0] for n, x in xs.items()}
    rows: list[tuple[str, str, str, dict[int, float]]] = []
    rows.append(("onnxruntime", "-", "-",
                 {n: median_ms(lambda x=x: ort.run(None, {"image": x}), args.runs)
                  for n, x in xs.items()}))

    target = tvm.target.Target({"kind": "llvm", "mcpu": lowering.system_cpu(), "num-cores": 2})
    print(f"target {target}, TVM {tvm.__version__}, TVM_NUM_THREADS="
          f"{os.environ['TVM_NUM_THREADS']}, xgboost "
          f"{'yes' if tuning.importlib.util.find_spec('xgboost') else 'no (random cost model)'}",
          flush=True)
    mod = lowering.import_onnx(model)
    start = time.perf_counter()
    untuned = tvm.compile(mod, target=target)
    compile_s = time.perf_counter() - start
    rows.append(("TVM untuned", "-", f"{compile_s:.1f}", tvm_latencies(untuned, xs, want,
                                                                       args.runs)))

    log = (lambda _m: None) if args.quiet else (lambda m: print("   ", m, flush=True))
    base = args.keep or Path(tempfile.mkdtemp(prefix="tune-probe-"))
    for trials in args.trials:
        db = base / f"trials{trials}"
        if tuning.count_records(db):
            raise SystemExit(f"{db} already holds records; pass an empty --keep folder")
        print(f"tuning with {trials} trials into {db}", flush=True)
        start = time.perf_counter()
        ex = tuning.tune_and_build(mod, target, trials=trials, database_dir=db, log=log)
        tune_s = time.perf_counter() - start
        lat = tvm_latencies(ex, xs, want, args.runs)
        records = tuning.count_records(db)
        start = time.perf_counter()
        again = tuning.tune_and_build(mod, target, trials=trials, database_dir=db, log=log)
        second_s = time.perf_counter() - start
        if tuning.count_records(db) != records:
            raise SystemExit("the second compile tuned again instead of reusing the database")
        lat2 = tvm_latencies(again, xs, want, args.runs)
        rows.append((f"TVM tuned {trials}", f"{tune_s:.0f}", f"{second_s:.1f}", lat))
        rows.append((f"  (2nd compile, {trials})", "-", f"{second_s:.1f}", lat2))

    ort_ms = rows[0][3]
    print()
    print("| build | tune s | compile s | " + " | ".join(
        f"batch {n} ms (x ort)" for n in BATCHES) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in BATCHES) + " |")
    for name, tune_s, comp_s, lat in rows:
        cells = " | ".join(f"{lat[n]:.4f} ({lat[n] / ort_ms[n]:.1f}x)" for n in BATCHES)
        print(f"| {name} | {tune_s} | {comp_s} | {cells} |")
    print(f"\n(median of {args.runs} runs; databases in {base})")


if __name__ == "__main__":
    main()
