"""Kernel-level A/B timing of the default schedules: each variant's kernels, timed interleaved.

    .venv/bin/python benchmarks/kernel_ab.py MODEL.onnx [--keep matmul] [--reps 15] [--cold]
                                             [--size 1] [VARIANT ...]

Each VARIANT is a line of Python run before that variant's module is prepared, with `S` =
lepton_edge.lowering.schedules, `L` = lepton_edge.lowering.layout and `os` in scope (both
modules are reloaded first), e.g. ``"S.MATMUL_VECTORS = 2"`` or
``"os.environ['LEPTON_PACK_MATMUL'] = '0'"``; no VARIANT = the code as it is. The ONNX model
is imported and legalized like an untuned CPU build (weight packing, VectorMath, TVM's
legalization and fusion); every kernel whose name contains --keep is scheduled with
`apply_default_schedules`, built alone and called on random inputs (symbolic sizes: --size).
Kernels of the variants are matched by MAC count and name order, timed round-robin (`--reps`
rounds; `--cold` touches 64 MB between calls so weights come from memory), and printed with
min / median milliseconds and GFLOPS of the min. Threads: TVM_NUM_THREADS (default: the
physical cores). Not a test; timings are only comparable within one run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lepton_edge import threads  # noqa: E402

threads.default_tvm_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("variants", nargs="*", default=[""])
    parser.add_argument("--keep", default="matmul", help="substring of the kernels to time")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--cold", action="store_true", help="evict the caches between calls")
    parser.add_argument("--size", type=int, default=1,
                        help="value of every symbolic size (the batch)")
    args = parser.parse_intermixed_args()

    import onnx
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import Schedule

    from lepton_edge.lowering import layout as L  # noqa: N812
    from lepton_edge.lowering import schedules as S  # noqa: N812
    from lepton_edge.lowering.relax import import_onnx, legalize_passes, system_cpu

    base = import_onnx(onnx.load(args.model))
    target = tvm.target.Target({"kind": "llvm", "mcpu": system_cpu()})

    def concrete(expr: Any) -> int:
        if isinstance(expr, tirx.IntImm):
            return int(expr.value)
        analyzer = tvm.sym.Analyzer()
        for var in S._vars_in(expr):  # noqa: SLF001 - the symbolic batch
            analyzer.bind(var, tirx.const(args.size, "int64"))
        return int(analyzer.simplify(expr).value)

    def inputs(func: Any) -> list[Any]:
        rng = np.random.default_rng(0)
        out: list[Any] = []
        for param in func.params:
            try:
                shape = [concrete(d) for d in param.shape]
            except Exception:  # noqa: BLE001 - a scalar parameter (a symbolic size)
                out.append(args.size)
                continue
            out.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(param.dtype))))
        return out

    def macs(func: Any) -> int:
        found = [0]
        for blk in S._blocks(Schedule(tvm.IRModule({"main": func}))) or []:  # noqa: SLF001
            if blk.is_reduction:
                found.append(int(np.prod([concrete(iv.dom.extent) for iv in blk.iters])))
        return max(found)

    variants: list[list[list[Any]]] = []
    for code in args.variants:
        saved = dict(os.environ)
        importlib.reload(S)
        importlib.reload(L)
        exec(code, {"S": S, "L": L, "os": os})  # noqa: S102 - the user's own A/B switch
        with target:
            mod = tvm.transform.Sequential([
                S.PackConvWeights(target), S.VectorMath(),
                *cpu.library_dispatch_passes(target), *legalize_passes()])(base)
        kernels = []
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or args.keep not in gvar.name_hint:
                continue
            one = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            lib = tvm.compile(S.apply_default_schedules(one, target), target=target)
            feed = inputs(func)
            lib["main"](*feed)
            kernels.append([macs(func), gvar.name_hint, lib["main"], feed, []])
        kernels.sort(key=lambda k: (-k[0], k[1]))
        variants.append(kernels)
        os.environ.clear()
        os.environ.update(saved)
    flush = np.ones(16 << 20, np.float32)
    for _ in range(args.reps):
        for kernels in variants:
            for kernel in kernels:
                if args.cold:
                    flush += 1
                start = time.perf_counter()
                kernel[2](*kernel[3])
                kernel[4].append(time.perf_counter() - start)
    print(f"threads: TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for row in range(min(len(k) for k in variants)):
        line = f"{variants[0][row][0] / 1e6:8.1f} M MACs"
        for at, kernels in enumerate(variants):
            count, name, _, _, times = kernels[row]
            times.sort()
            rate = 2 * count / times[0] / 1e9 if count else 0.0
            line += (f" | v{at} {name[:30]:30s} min {times[0] * 1e3:8.3f} "
                     f"med {times[len(times) // 2] * 1e3:8.3f} ms {rate:6.1f} GFLOPS")
        print(line)


if __name__ == "__main__":
    main()
