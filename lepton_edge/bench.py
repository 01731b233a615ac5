"""MLPerf-style measurements: single-stream latency, offline throughput, engine comparisons.

    from lepton_edge import bench
    stats = bench.single_stream(lambda: session.run(feeds), warmup=5, runs=50)
    report = bench.compare("model.lepton", feeds, model_path="model.onnx",
                           int8_model="model.int8.onnx", runs=30, warmup=5)
    print(report.table())

- `single_stream(fn, warmup=, runs=)` times one query at a time (the MLPerf "SingleStream"
  scenario): `LatencyStats` with p50, p90, mean, min, max (milliseconds), the number of timed
  runs and `spread` = (p90 - p50) / p50, a noise indicator (0.05 = p90 is 5% above median).
- `offline(fn, batch, warmup=, runs=)` times calls that each process `batch` samples (the
  "Offline" scenario): `ThroughputStats` with samples/s = batch / median call time.
- `compare(artifact, feeds, ...)` runs the same feeds through the compiled artifact and the
  reference engines (onnxruntime fp32 on the original ONNX, onnxruntime int8 on a QDQ model,
  optionally a torch module) in one process, in per-engine blocks (see `Protocol`): each
  round runs every engine once as a block of back-to-back calls, the engine order rotating
  from round to round, with a pause before each block so the previous engine's worker
  threads have gone idle. Slow drifts of the machine's load hit all engines alike, and no
  engine is timed while another one's spinning threads hold the cores. The report gives each
  engine's p50/p90 over all its timed calls, its time relative to lepton, and the fraction
  of this CPU's measured peak ("roofline") when the artifact's manifest knows the model's
  MACs; its footer states the protocol.
- `cpu_peak()` measures this machine's fp32 peak, cached per process: the FMA throughput of
  a kernel built here with TVM/LLVM for this CPU (independent fused multiply-add chains held
  in vector registers, no memory traffic, one chain set per thread of TVM's pool, 2 flops
  per FMA lane), i.e. what the silicon does at the clock it runs now. The fp32 roofline
  column is the share of that. int8 on x86: the same kind of kernel with `vpdpbusd` (AVX-512
  VNNI) or `vpmaddubsw` (AVX2 without VNNI; `int8_dot_peak`); elsewhere onnxruntime's
  MatMulInteger rate stands in
  (uint8 x int8 -> int32, 2 ops per MAC, all cores; the method says which). Also recorded:
  numpy's BLAS sgemm rate and onnxruntime's MatMulInteger rate, achievable *library*
  figures (onnxruntime's fp32 exceeds numpy's sgemm here).

Everything measured here is wall-clock time of whole `run` calls, input checks included.

Why blocks and not call-by-call alternation: on a machine with as many cores as threads per
engine, onnxruntime's intra-op threads busy-wait for a while after each run and TVM's thread
pool waits for all its workers, so a lepton call right after an onnxruntime call ran up to 8x
slower than after a pause (benchmarks/RESULTS.md, 2026-11-29); ratios measured call by call
swung from 2.3x to 3.35x between identical runs. A block measures each engine in its own
steady state (SingleStream: one query after another), the untimed first call of a block
absorbs waking the thread pool, and rotating the order cancels slow drifts. The default
100 ms pause: after a run, onnxruntime 1.32's threads burnt ~36-39 ms of CPU within 100 ms
and nothing more in the next 100 ms (BERT-shaped layer, 2 cores); TVM's pool burnt none.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.errors import InputError, ModelError

ENGINES = ("onnxruntime", "onnxruntime-int8", "torch")
LEPTON = "lepton"


# --------------------------------------------------------------------------------- statistics

def _percentile(sorted_ms: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list (q in [0, 100])."""
    if len(sorted_ms) == 1:
        return sorted_ms[0]
    pos = (len(sorted_ms) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Per-call latency in milliseconds over `runs` timed calls."""

    p50: float
    p90: float
    mean: float
    min: float
    max: float
    runs: int
    spread: float  # (p90 - p50) / p50

    @classmethod
    def from_samples(cls, times_ms: list[float]) -> LatencyStats:
        if not times_ms:
            raise InputError("no timed runs: runs must be >= 1")
        s = sorted(float(t) for t in times_ms)
        p50, p90 = _percentile(s, 50), _percentile(s, 90)
        return cls(p50=p50, p90=p90, mean=statistics.fmean(s), min=s[0], max=s[-1],
                   runs=len(s), spread=(p90 - p50) / p50 if p50 > 0 else 0.0)

    def __str__(self) -> str:
        return (f"p50 {self.p50:.3f} ms, p90 {self.p90:.3f} ms, mean {self.mean:.3f} ms, "
                f"min {self.min:.3f} ms, max {self.max:.3f} ms ({self.runs} runs, "
                f"spread {self.spread:.1%})")


@dataclass(frozen=True)
class ThroughputStats:
    """Samples per second when each call processes `batch` samples."""

    batch: int
    samples_per_s: float  # batch / median call time
    latency: LatencyStats

    def __str__(self) -> str:
        return (f"{self.samples_per_s:,.1f} samples/s at batch {self.batch} "
                f"(call p50 {self.latency.p50:.3f} ms, {self.latency.runs} runs)")


@dataclass(frozen=True)
class Protocol:
    """How `compare` interleaves engines: `rounds` rounds; in each, every engine in turn (the
    order rotated by one per round) gets a pause of `pause_ms`, `settle` untimed calls, then
    up to `block` timed calls back to back, until each engine has `runs` timed calls.
    Before the first round each engine gets `warmup` untimed calls, in its own block.

    `min_block_ms` > 0 makes an engine's blocks at least that long: an engine whose calls
    (the median of back-to-back calls over min_block_ms after its warm-up) take less than
    min_block_ms / block gets
    ceil(min_block_ms / call) timed calls per block, and so more timed calls than `runs`
    (the same number of rounds). A 50 us model timed 3 calls at a time after a 100 ms pause
    measures a core waking up (digits rows moved 20-40% between runs,
    benchmarks/RESULTS.md 2026-11-30); with blocks of 20 ms it runs in its steady state."""

    runs: int
    warmup: int
    block: int
    pause_ms: float
    settle: int = 1
    min_block_ms: float = 0.0

    @property
    def rounds(self) -> int:
        return -(-self.runs // self.block)

    def block_for(self, call_ms: float | None) -> int:
        """Timed calls per block for an engine whose calls take `call_ms`."""
        if self.min_block_ms <= 0 or not call_ms or call_ms <= 0:
            return self.block
        return max(self.block, math.ceil(self.min_block_ms / call_ms))

    def describe(self) -> str:
        head = (f"protocol: per-engine blocks, {self.warmup} warm-up call(s) per engine, then "
                f"{self.rounds} round(s) in rotating engine order; each block: pause "
                f"{self.pause_ms:g} ms, {self.settle} untimed call(s), up to {self.block} timed "
                "calls back to back")
        if self.min_block_ms <= 0:
            return f"{head}; p50/p90 over all {self.runs} timed calls per engine"
        return (f"{head}, or more to fill {self.min_block_ms:g} ms for engines with shorter "
                f"calls; p50/p90 over all timed calls per engine ({self.runs} or more)")


def _check_counts(warmup: int, runs: int) -> None:
    if runs < 1:
        raise InputError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise InputError(f"warmup must be >= 0, got {warmup}")


def _time_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def single_stream(fn: Callable[[], Any], *, warmup: int = 5, runs: int = 50) -> LatencyStats:
    """Call `fn` `warmup` times untimed, then `runs` times timed one after another."""
    _check_counts(warmup, runs)
    for _ in range(warmup):
        fn()
    return LatencyStats.from_samples([_time_ms(fn) for _ in range(runs)])


def offline(fn: Callable[[], Any], batch: int, *, warmup: int = 3, runs: int = 20
            ) -> ThroughputStats:
    """Throughput of `fn`, one call processing `batch` samples: batch / median latency."""
    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}")
    lat = single_stream(fn, warmup=warmup, runs=runs)
    return ThroughputStats(batch=batch, samples_per_s=batch / (lat.p50 / 1e3), latency=lat)


# -------------------------------------------------------------------------------- CPU peak

@dataclass(frozen=True)
class Peak:
    """Measured peaks of this CPU: fp32 FMA throughput (the roofline), and library figures."""

    fp32_gflops: float
    int8_gops: float | None
    threads: int
    fp32_method: str
    int8_method: str
    #: numpy's BLAS sgemm (n^3, all threads): what a good library reaches, not the silicon.
    fp32_library_gflops: float | None = None
    #: onnxruntime's MatMulInteger (n^3, all threads): a library figure.
    int8_library_gops: float | None = None

    def __str__(self) -> str:
        i8 = f"{self.int8_gops:.1f} int8 GOPS" if self.int8_gops else "int8 not measured"
        lib = (f"; sgemm library {self.fp32_library_gflops:.1f} GFLOPS"
               if self.fp32_library_gflops else "")
        lib8 = (f"; MatMulInteger library {self.int8_library_gops:.1f} GOPS"
                if self.int8_library_gops else "")
        return (f"{self.fp32_gflops:.1f} fp32 GFLOPS, {i8} on {self.threads} threads "
                f"(fp32: {self.fp32_method}{lib}; int8: {self.int8_method}{lib8})")


_PEAK: dict[tuple[int, int, bool], Peak] = {}


def _best_rate(fn: Callable[[], Any], ops: float, repeats: int) -> float:
    fn()  # warm-up: thread pools, page faults, packing buffers
    best = min(_time_ms(fn) for _ in range(repeats)) / 1e3
    return ops / best / 1e9


def _fp32_peak(n: int, repeats: int) -> float:
    """numpy (BLAS) float32 n x n x n matmul rate in GFLOPS: a library figure."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    return _best_rate(lambda: np.matmul(a, b, out=out), 2.0 * n**3, repeats)


def _host_pool() -> tuple[Any, int]:
    """TVM's target for this CPU (``mcpu`` = LLVM's name for the host) and the number of
    threads in TVM's pool (``TVM_NUM_THREADS``, set up as lepton_edge.threads does)."""
    from lepton_edge import threads as tvm_threads

    tvm_threads.default_tvm_threads()
    import tvm

    from lepton_edge.lowering.relax import system_cpu

    target = tvm.target.Target({"kind": "llvm", "mcpu": system_cpu()})
    workers = max(1, int(os.environ.get("TVM_NUM_THREADS") or tvm_threads.physical_cores()))
    return target, workers


def _kernel_peak(chains: Any, target: Any, args: list[np.ndarray], ops_per_thread: float,
                 workers: int, repeats: int) -> tuple[float, str]:
    """Build the register-only kernel ``chains(*args, used)`` (its first ``used`` threads
    each run their own chains) and measure it with :func:`_chain_peak`."""
    import tvm

    lib = tvm.compile(tvm.IRModule({"main": chains.with_attr("global_symbol", "main")}),
                      target=target)
    kernel = lib["main"]
    tensors = [tvm.runtime.tensor(a) for a in args]
    return _chain_peak(lambda used: kernel(*tensors, used), ops_per_thread, workers, repeats)


def _chain_peak(run: Callable[[int], Any], ops_per_thread: float, workers: int,
                repeats: int) -> tuple[float, str]:
    """Peak rate of a register-only kernel: the best of ``repeats`` runs on all ``workers``
    threads, or the best on one thread times ``workers`` when that is higher. On a shared
    machine another process often holds one core for seconds; the per-core figure times the
    cores is then still the silicon's peak (the cores are identical). It is measured per
    thread, though: a CPU that clocks one busy core higher than all of them (single-core
    turbo) makes it overstate the all-core peak, so the method text says which figure was
    taken and gives the all-threads one beside it."""
    every = _best_rate(lambda: run(workers), ops_per_thread * workers, repeats)
    one = _best_rate(lambda: run(1), ops_per_thread, repeats)
    if workers > 1 and one * workers > every:
        return one * workers, (f"best of {repeats} on one thread x {workers} threads "
                               f"(all {workers} together: {every:.1f}; the per-thread rate "
                               "may overstate an all-core peak under single-core turbo)")
    return every, f"best of {repeats} on {workers} thread(s)"


def fma_peak(*, repeats: int = 5, iterations: int = 1 << 20) -> tuple[float, int, str]:
    """fp32 FMA throughput of this CPU on TVM's thread pool: ``(GFLOPS, threads, method)``.

    A kernel built with TVM/LLVM for this CPU (``mcpu`` = LLVM's name for the host) runs, on
    each of the pool's threads (``TVM_NUM_THREADS``, lepton_edge.threads), ``iterations``
    rounds of ``acc[j] = acc[j] * a + b`` over as many vector accumulators as the register
    file holds with room to spare (12 on AVX2's 16 registers, 24 on AVX-512's 32): independent
    chains, so the FMA pipes never wait on a result, and no loads or stores in the loop.
    GFLOPS = 2 x lanes x accumulators x iterations x threads / best of ``repeats`` seconds,
    or the same on one thread times the threads when that is more (see :func:`_chain_peak`:
    measured per thread, that may overstate an all-core peak under single-core turbo).
    """
    target, workers = _host_pool()
    from tvm.script import tirx as T

    from lepton_edge.lowering.relax import system_cpu
    from lepton_edge.lowering.schedules import vector_bits

    bits = vector_bits(target)
    lanes, accs = bits // 32, (24 if bits >= 512 else 12)

    @T.prim_func(s_tir=True)
    def chains(x: T.Buffer((workers, accs, lanes), "float32"),
               y: T.Buffer((workers, accs, lanes), "float32"), used: T.int32) -> None:
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(used):
            acc = T.alloc_buffer((accs, lanes), "float32", scope="local")
            for j in T.unroll(accs):
                for lane in T.vectorized(lanes):
                    acc[j, lane] = x[t, j, lane]
            for _ in range(iterations):
                for j in T.unroll(accs):
                    for lane in T.vectorized(lanes):
                        acc[j, lane] = acc[j, lane] * T.float32(0.999999) + T.float32(1e-7)
            for j in T.unroll(accs):
                for lane in T.vectorized(lanes):
                    y[t, j, lane] = acc[j, lane]

    rate, how = _kernel_peak(
        chains, target, [np.ones((workers, accs, lanes), np.float32),
                         np.zeros((workers, accs, lanes), np.float32)],
        2.0 * lanes * accs * iterations, workers, repeats)
    method = (f"FMA throughput, {accs} independent {lanes}-lane chains per thread in "
              f"registers, {system_cpu()}, {how}")
    return rate, workers, method


def int8_dot_peak(*, repeats: int = 5, iterations: int = 1 << 20
                  ) -> tuple[float, int, str] | None:
    """int8 multiply-add throughput of this x86 CPU on TVM's thread pool: ``(GOPS, threads,
    method)``, or None on CPUs with neither AVX-512 VNNI nor AVX2 (non-x86 CPUs have other
    int8 instructions this kernel does not use).

    Like :func:`fma_peak` (and measured the same way, with its per-thread caveat): independent
    chains per thread held in registers, no memory traffic; 2 ops per multiply-add.

    * AVX-512 VNNI: 24 chains ``c = vpdpbusd(c, a, b)`` on 512-bit registers (64 uint8 x int8
      products summed by fours into 16 int32 accumulators per instruction): the complete int8
      dot product, what lepton-edge's VNNI kernels use.
    * AVX2 without VNNI: 12 chains ``v = vpmaddubsw(v, w)`` (32 uint8 x int8 products summed
      pairwise into int16, the result fed back as the next uint8 operand). A complete int8 dot
      product with int32 accumulation also needs ``vpmaddwd`` and ``vpaddd`` (lepton-edge's
      exact AVX2 kernels: 7-bit weights `vpmaddubsw` + `vpmaddwd`, 8-bit ones `vpmaddwd` on
      int16, 16 multiply-adds per instruction), so this is the ceiling, not what a kernel can
      reach."""
    target, workers = _host_pool()
    from tvm.script import tirx as T
    from tvm.target import codegen

    from lepton_edge.lowering.relax import system_cpu

    with target:
        vnni = codegen.target_has_features("avx512vnni", target)
        if not vnni and (not codegen.target_has_features("avx2", target) or any(
                codegen.target_has_features(f, target) for f in ("avx512f", "avxvnni"))):
            return None
    if vnni:
        accs, ops = 24, 2.0 * 64 * 24 * iterations

        @T.prim_func(s_tir=True)
        def chains(x: T.Buffer((workers, accs, 16), "int32"), a: T.Buffer((64,), "uint8"),
                   w: T.Buffer((64,), "int8"), y: T.Buffer((workers, accs, 16), "int32"),
                   used: T.int32) -> None:
            T.func_attr({"tirx.noalias": True})
            for t in T.parallel(used):
                acc = T.alloc_buffer((accs, 16), "int32", scope="local")
                for j in T.unroll(accs):
                    acc[j, T.ramp(0, 1, 16)] = x[t, j, T.ramp(0, 1, 16)]
                for _ in range(iterations):
                    for j in T.unroll(accs):
                        acc[j, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                            acc[j, T.ramp(0, 1, 16)], a[T.ramp(0, 1, 64)],
                            w[T.ramp(0, 1, 64)], dtype="int32x16")
                for j in T.unroll(accs):
                    y[t, j, T.ramp(0, 1, 16)] = acc[j, T.ramp(0, 1, 16)]

        args = [np.zeros((workers, accs, 16), np.int32), np.ones(64, np.uint8),
                np.ones(64, np.int8), np.zeros((workers, accs, 16), np.int32)]
        what = (f"vpdpbusd throughput (u8 x s8 quads -> s32, 512-bit), {accs} independent "
                "chains per thread in registers")
    else:
        accs, ops = 12, 2.0 * 32 * 12 * iterations

        @T.prim_func(s_tir=True)
        def chains(x: T.Buffer((workers, accs, 32), "uint8"), w: T.Buffer((32,), "int8"),
                   y: T.Buffer((workers, accs, 32), "uint8"), used: T.int32) -> None:
            T.func_attr({"tirx.noalias": True})
            for t in T.parallel(used):
                acc = T.alloc_buffer((accs, 32), "uint8", scope="local")
                for j in T.unroll(accs):
                    acc[j, T.ramp(0, 1, 32)] = x[t, j, T.ramp(0, 1, 32)]
                for _ in range(iterations):
                    for j in T.unroll(accs):
                        acc[j, T.ramp(0, 1, 32)] = T.reinterpret(T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                            acc[j, T.ramp(0, 1, 32)], w[T.ramp(0, 1, 32)], dtype="int16x16"),
                            dtype="uint8x32")
                for j in T.unroll(accs):
                    y[t, j, T.ramp(0, 1, 32)] = acc[j, T.ramp(0, 1, 32)]

        args = [np.ones((workers, accs, 32), np.uint8), np.ones(32, np.int8),
                np.zeros((workers, accs, 32), np.uint8)]
        what = (f"vpmaddubsw throughput (u8 x s8 pairs -> s16), {accs} independent chains per "
                "thread in registers")
    rate, how = _kernel_peak(chains, target, args, ops, workers, repeats)
    method = f"{what}, {system_cpu()}, {how}"
    if not vnni:
        method += "; a full int32 dot product also needs vpmaddwd + vpaddd"
    return rate, workers, method


def _int8_peak(n: int, repeats: int, threads: int) -> float:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, size=(n, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "int8_peak",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = onnxruntime.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, size=(n, n), dtype=np.uint8)
    return _best_rate(lambda: sess.run(None, {"a": a}), 2.0 * n**3, repeats)


def cpu_peak(*, n: int = 2048, repeats: int = 5, int8: bool = True) -> Peak:
    """Measure (once per process and arguments) fp32 GFLOPS and int8 GOPS on all cores.

    fp32 (`fp32_gflops`, the roofline): `fma_peak`, the FMA throughput of this CPU on TVM's
    thread pool; if TVM cannot build that kernel here, numpy's sgemm rate stands in and
    `fp32_method` says so. `fp32_library_gflops`: best of `repeats` numpy float32
    n x n x n matmuls (the BLAS numpy links, all its threads). int8 (`int8_gops`):
    `int8_dot_peak` where it applies (x86 with AVX-512 VNNI or AVX2), else the library figure
    `int8_library_gops`: best of `repeats` onnxruntime MatMulInteger (uint8 activations x
    constant int8 weights -> int32) at the same size, intra-op threads = all cores. All count
    2 operations per multiply-accumulate. If neither can be measured, `int8_gops` is None and
    `int8_method` says why.
    """
    key = (n, repeats, int8)
    if key in _PEAK:
        return _PEAK[key]
    threads = os.cpu_count() or 1
    library = _fp32_peak(n, repeats)
    try:
        fp32, threads, fp32_method = fma_peak(repeats=max(20, repeats))
    except Exception as exc:  # noqa: BLE001 - stated in the method, never hidden
        fp32 = library
        fp32_method = (f"numpy float32 matmul {n}^3, best of {repeats} (the FMA kernel could "
                       f"not be built: {type(exc).__name__}: {str(exc)[:200]})")
    int8_gops: float | None = None
    int8_library: float | None = None
    int8_method = "not measured"
    if int8:
        try:
            int8_library = _int8_peak(n, repeats, os.cpu_count() or 1)
            int8_gops = int8_library
            int8_method = (f"onnxruntime MatMulInteger u8 x s8 -> s32 {n}^3, "
                           f"best of {repeats}, a library figure")
        except Exception as exc:  # noqa: BLE001 - a missing kernel is a result, not a crash
            int8_method = f"int8 peak unavailable ({type(exc).__name__}: {exc})"
        try:
            dot = int8_dot_peak(repeats=max(20, repeats))
        except Exception as exc:  # noqa: BLE001 - stated in the method, never hidden
            dot = None
            int8_method += f" (the int8 kernel could not be built: {type(exc).__name__})"
        if dot is not None:
            int8_gops, _, int8_method = dot
    _PEAK[key] = Peak(fp32_gflops=fp32, int8_gops=int8_gops, threads=threads,
                      fp32_method=fp32_method, int8_method=int8_method,
                      fp32_library_gflops=library, int8_library_gops=int8_library)
    return _PEAK[key]


def roofline_fraction(macs: float, seconds: float, peak: float) -> float:
    """Share of `peak` (GFLOPS or GOPS, 2 ops per MAC) reached by `macs` MACs in `seconds`."""
    if seconds <= 0 or peak <= 0:
        raise InputError(f"seconds and peak must be > 0 (got {seconds}, {peak})")
    return 2.0 * macs / seconds / 1e9 / peak


# ------------------------------------------------------------------------------- comparison

@dataclass
class EngineResult:
    name: str
    latency: LatencyStats
    ratio: float  # this engine's p50 / lepton's p50 (> 1: lepton is faster)
    samples_per_s: float
    roofline: float | None = None  # fraction of the measured peak (fp32 or int8)
    max_rel_err: float | None = None  # vs lepton's outputs
    precision: str = "fp32"


@dataclass
class BenchReport:
    artifact: str
    batch: int
    macs: int | None  # per call (per-sample manifest MACs x batch); None if unknown
    engines: dict[str, EngineResult] = field(default_factory=dict)
    peak: Peak | None = None
    protocol: Protocol | None = None
    threads: str = "each engine's default"
    #: where the artifact's subgraphs ran ("sg0 -> cpu:0 (cpu)"), so that a report never
    #: passes off an onnxruntime fallback inside the artifact as compiled code
    placement: tuple[str, ...] = ()

    @property
    def fallback(self) -> list[str]:
        """The subgraphs the artifact ran on its onnxruntime fallback, not compiled code."""
        from lepton_edge.plan import FALLBACK

        return [p for p in self.placement if p.endswith(f"({FALLBACK})")]

    @property
    def order(self) -> str:
        """The protocol in words (kept for callers of the older report)."""
        return self.protocol.describe() if self.protocol else "not recorded"

    def ratios(self) -> dict[str, float]:
        return {name: r.ratio for name, r in self.engines.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact, "batch": self.batch, "macs": self.macs,
            "peak": asdict(self.peak) if self.peak else None, "order": self.order,
            "protocol": asdict(self.protocol) if self.protocol else None,
            "threads": self.threads, "placement": list(self.placement),
            "engines": {name: {**asdict(r), "latency": asdict(r.latency)}
                        for name, r in self.engines.items()},
        }

    def table(self) -> str:
        head = f"{self.artifact}: batch {self.batch}"
        if self.macs:
            head += f", {self.macs / 1e6:,.1f} M MACs per call"
        lines = [head,
                 f"{'engine':<18} {'p50 ms':>10} {'p90 ms':>10} {'runs':>5} "
                 f"{'samples/s':>11} {'vs lepton':>10} {'roofline':>9} {'max rel err':>12}"]
        for r in self.engines.values():
            roof = f"{r.roofline:.1%}" if r.roofline is not None else "-"
            err = f"{r.max_rel_err:.2e}" if r.max_rel_err is not None else "-"
            lines.append(f"{r.name:<18} {r.latency.p50:>10.3f} {r.latency.p90:>10.3f} "
                         f"{r.latency.runs:>5} {r.samples_per_s:>11,.1f} "
                         f"{r.ratio:>9.2f}x {roof:>9} {err:>12}")
        lines.append("vs lepton = engine p50 / lepton p50 (above 1: lepton is faster); "
                     f"threads: {self.threads}")
        if self.placement:
            lines.append("lepton ran: " + ", ".join(self.placement)
                         + (f" - {len(self.fallback)} subgraph(s) on the onnxruntime "
                            "fallback, not compiled code" if self.fallback else ""))
        lines.append(self.order)
        if self.peak is not None:
            lines.append(f"roofline = share of measured peak: {self.peak}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _ort_session(path: Path, what: str, threads: int | None = None) -> Any:
    import onnxruntime

    if not path.is_file():
        raise ModelError(f"{what} not found: {path}")
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
        raise ModelError(f"onnxruntime cannot load {what} {path}: "
                         f"{' '.join(str(exc).split())[:300]}") from None


def _ort_runner(sess: Any, feeds: dict[str, np.ndarray], what: str) -> Callable[[], Any]:
    names = [i.name for i in sess.get_inputs()]
    if sorted(names) != sorted(feeds):
        raise InputError(f"{what} has inputs {names} but the feeds are {sorted(feeds)}; "
                         "is it the model the artifact was compiled from?")
    outs = [o.name for o in sess.get_outputs()]
    try:
        sess.run(outs, feeds)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{what} rejects the feeds: {' '.join(str(exc).split())[:300]}"
                         ) from None
    return lambda: dict(zip(outs, sess.run(outs, feeds), strict=True))


def _torch_runner(module: Any, feeds: dict[str, np.ndarray], names: list[str]
                  ) -> Callable[[], Any]:
    import torch

    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names]
    module.eval()

    def run() -> Any:
        with torch.inference_mode():
            out = module(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().numpy() for o in outs]

    return run


def _call_ms(fn: Callable[[], Any], span_ms: float) -> float | None:
    """The median time of back-to-back calls of `fn` over about `span_ms` (at least 3 calls,
    at most 10,000), to size its blocks; None when span_ms is 0 (blocks are not sized)."""
    if span_ms <= 0:
        return None
    times: list[float] = []
    while len(times) < 3 or (sum(times) < span_ms and len(times) < 10_000):
        times.append(_time_ms(fn))
    return statistics.median(times)


def interleave(runners: Mapping[str, Callable[[], Any]], protocol: Protocol
               ) -> dict[str, list[float]]:
    """Time every runner by `protocol`: {name: [ms per timed call]}, `protocol.runs` each (more
    for an engine whose blocks `protocol.min_block_ms` lengthens).

    Round r runs the engines in the order rotated by r; an engine's block is a pause, the
    untimed settle call(s), then up to its block of timed calls.
    """
    names = list(runners)
    call_ms: dict[str, float | None] = {}
    for name in names:  # warm-up, one engine at a time
        if protocol.warmup:
            time.sleep(protocol.pause_ms / 1e3)
        for _ in range(protocol.warmup):
            runners[name]()
        call_ms[name] = _call_ms(runners[name], protocol.min_block_ms)
    blocks = {n: protocol.block_for(call_ms[n]) for n in names}
    wanted = {n: protocol.runs if blocks[n] == protocol.block else protocol.rounds * blocks[n]
              for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(protocol.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            count = min(blocks[name], wanted[name] - len(times[name]))
            time.sleep(protocol.pause_ms / 1e3)
            for _ in range(protocol.settle):
                runners[name]()
            times[name].extend(_time_ms(runners[name]) for _ in range(count))
    return times


def random_feeds(specs: Any, batch: int = 1, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for TensorSpecs (e.g. `session.inputs`); symbolic dims become `batch`."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        if getattr(spec, "kind", "tensor") != "tensor":
            raise InputError(f"cannot make random data for {spec} (not a tensor); pass real "
                             "inputs")
        shape = tuple(batch if isinstance(d, str) else int(d) for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            raise InputError(f"cannot make random data for {spec}; pass real inputs")
    return feeds


def _batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    for value in feeds.values():
        if np.ndim(value) >= 1:
            return int(np.shape(value)[0])
    return 1


def _max_rel_err(got: Any, want: list[np.ndarray]) -> float | None:
    from lepton_edge.runtime.session import compare as compare_arrays

    got_list = list(got.values()) if isinstance(got, dict) else list(got)
    if len(got_list) != len(want):
        return None
    errs = [compare_arrays(np.asarray(g), w)[1] for g, w in zip(got_list, want, strict=True)
            if w.dtype.kind == "f"]
    return max(errs) if errs else None


def compare(
    artifact_path: str | os.PathLike[str],
    feeds: Mapping[str, Any],
    *,
    vs: tuple[str, ...] | list[str] = ("onnxruntime",),
    model_path: str | os.PathLike[str] | None = None,
    int8_model: str | os.PathLike[str] | None = None,
    torch_module: Any = None,
    runs: int = 30,
    warmup: int = 5,
    peak: bool | Peak = True,
    devices: list[str] | None = None,
    block: int = 3,
    pause_ms: float = 100.0,
    threads: int | None = None,
    min_block_ms: float = 20.0,
) -> BenchReport:
    """Time the artifact against reference engines on the same `feeds`, in per-engine blocks.

    `vs` picks the references: "onnxruntime" (fp32, needs `model_path`, the original .onnx:
    the artifact does not contain it), "onnxruntime-int8" (needs `int8_model`, a QDQ .onnx;
    added automatically when `int8_model` is given) and "torch" (needs `torch_module`;
    added automatically when one is given). Each engine is warmed up `warmup` times, then
    timed `runs` times in blocks of `block` back-to-back calls, one block per engine per
    round, the engine order rotating every round, each block after a `pause_ms` pause and
    one untimed call (`Protocol`); an engine whose calls are shorter than `min_block_ms` /
    `block` gets longer blocks, at least `min_block_ms` of timed calls (and so more timed
    calls than `runs`; 0 turns this off). `threads` sets onnxruntime's intra-op threads (default:
    its own, all cores); lepton's TVM thread pool follows `TVM_NUM_THREADS`, which must be
    set before TVM starts (so: before this process first runs an artifact). `peak` True
    measures `cpu_peak()` (cached) for the roofline column, a `Peak` uses that one, False
    skips it.
    """
    from lepton_edge import runtime

    _check_counts(warmup, runs)
    if block < 1:
        raise InputError(f"block must be >= 1 timed calls, got {block}")
    if pause_ms < 0:
        raise InputError(f"pause_ms must be >= 0, got {pause_ms}")
    if not min_block_ms >= 0:
        raise InputError(f"min_block_ms must be >= 0, got {min_block_ms}")
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1 (or None for each engine's default), got "
                         f"{threads}")
    protocol = Protocol(runs=runs, warmup=warmup, block=min(block, runs), pause_ms=pause_ms,
                        min_block_ms=float(min_block_ms))
    wanted = list(dict.fromkeys(vs))
    if int8_model is not None and "onnxruntime-int8" not in wanted:
        wanted.append("onnxruntime-int8")
    if torch_module is not None and "torch" not in wanted:
        wanted.append("torch")
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        raise InputError(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    if "onnxruntime" in wanted and model_path is None:
        raise InputError("comparing with onnxruntime needs model_path=<the original .onnx> "
                         "(the artifact does not contain the original model)")
    if "onnxruntime-int8" in wanted and int8_model is None:
        raise InputError("onnxruntime-int8 needs int8_model=<a QDQ .onnx>")
    if "torch" in wanted and torch_module is None:
        raise InputError("the torch engine needs torch_module=<the torch.nn.Module>")
    art = Path(artifact_path)
    if not art.is_file():
        raise InputError(f"artifact not found: {art}")
    if not isinstance(feeds, Mapping) or not feeds:
        raise InputError("feeds must be a non-empty dict of input name -> array")
    arrays = {str(k): np.ascontiguousarray(v) for k, v in feeds.items()}

    session = runtime.load(art, devices=devices)
    in_names = [s.name for s in session.inputs]
    if sorted(in_names) != sorted(arrays):
        raise InputError(f"{art} has inputs {in_names} but the feeds are {sorted(arrays)}")
    reference = session.run(arrays)  # also checks dtypes and shapes (InputError)
    want = [np.asarray(v) for v in reference.values()]
    runners: dict[str, Callable[[], Any]] = {LEPTON: lambda: session.run(arrays)}
    precision = {LEPTON: "int8" if session.manifest.get("quantized") else "fp32"}
    if "onnxruntime" in wanted:
        runners["onnxruntime"] = _ort_runner(
            _ort_session(Path(model_path), "model", threads), arrays, str(model_path))
        precision["onnxruntime"] = "fp32"
    if "onnxruntime-int8" in wanted:
        runners["onnxruntime-int8"] = _ort_runner(
            _ort_session(Path(int8_model), "int8 model", threads), arrays, str(int8_model))
        precision["onnxruntime-int8"] = "int8"
    if "torch" in wanted:
        runners["torch"] = _torch_runner(torch_module, arrays, in_names)
        precision["torch"] = "fp32"

    errors = {name: _max_rel_err(fn(), want) for name, fn in runners.items() if name != LEPTON}
    names = list(runners)
    times = interleave(runners, protocol)

    batch = _batch_of(arrays)
    per_sample = sum(int(sg.get("macs", 0) or 0) for sg in session.manifest["subgraphs"])
    macs = per_sample * batch if per_sample else None
    measured = peak if isinstance(peak, Peak) else (cpu_peak() if peak else None)
    stats = {n: LatencyStats.from_samples(t) for n, t in times.items()}
    base = stats[LEPTON].p50
    ort_threads = f"onnxruntime {threads}" if threads else "onnxruntime default"
    tvm_threads = os.environ.get("TVM_NUM_THREADS") or "default"
    report = BenchReport(artifact=str(art), batch=batch, macs=macs, peak=measured,
                         protocol=protocol,
                         threads=f"{ort_threads}, lepton TVM_NUM_THREADS={tvm_threads}, "
                                 f"{os.cpu_count()} CPUs",
                         placement=tuple(f"{p.subgraph} -> {p.device} ({p.target})"
                                         for p in session.placement.values()))
    for name in names:
        lat = stats[name]
        roof = None
        if macs and measured is not None:
            ceiling = measured.int8_gops if precision[name] == "int8" else measured.fp32_gflops
            if ceiling:
                roof = roofline_fraction(macs, lat.p50 / 1e3, ceiling)
        report.engines[name] = EngineResult(
            name=name, latency=lat, ratio=lat.p50 / base if base > 0 else float("nan"),
            samples_per_s=batch / (lat.p50 / 1e3) if lat.p50 > 0 else float("inf"),
            roofline=roof, max_rel_err=errors.get(name), precision=precision[name])
    return report


__all__ = [
    "BenchReport", "EngineResult", "LatencyStats", "Peak", "Protocol", "ThroughputStats",
    "compare", "cpu_peak", "fma_peak", "int8_dot_peak", "interleave", "offline", "random_feeds",
    "roofline_fraction",
    "single_stream",
]
