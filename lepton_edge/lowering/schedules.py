"""Default CPU schedules: what an untuned (``--tune 0``) LLVM build runs instead of naive loops.

TVM 0.27's ``tvm.compile`` for LLVM lowers the legalized TIR of every kernel as written: one
scalar loop nest per operator, single-threaded. :func:`apply_default_schedules` rewrites each
kernel (PrimFunc) that is not scheduled yet with ``tvm.s_tir.Schedule`` primitives, trying in
order

1. the int8 rules of :func:`lepton_edge.lowering.x86_int8.int8_rules` (dot-product kernels);
2. ``nchwc`` / ``nchwc-pool``: :func:`lepton_edge.lowering.nchwc.schedule_nchwc` for the
   channel-blocked float32 convolutions that :class:`ConvertConvLayout` created (register
   tile of output-channel vectors x output columns, fused epilogue), and
   :func:`lepton_edge.lowering.nchwc.schedule_pool_nchwc` for the pools between them;
3. :func:`schedule_contraction`: matmul / dense / batch-matmul and NCHW conv2d (regular,
   strided, padded, 1x1, grouped, depthwise), any dtype. Detected structurally: one reduction
   block ``C[...] += f(A[...], B[...])`` whose output's innermost index is a spatial iterator
   that one operand does not read (so it is broadcast) and the other reads contiguously (unit
   stride in its innermost dimension, or a small stride for strided convolutions). The output
   tile (a few rows x one to three SIMD vectors: a matmul's 4 x 24 floats on AVX2 are 12 of
   the 16 vector registers, each weight vector loaded once per reduction step and reused
   over the rows, each row value broadcast) accumulates in registers over the whole
   reduction, the tile loop runs in parallel, and the fused epilogue (bias, activation,
   residual add, int8 requantization; epilogue stages with forks such as GELU's are inlined
   first) is computed per tile while it is still in registers. Rows counted symbolically
   (``N * 128`` when a Reshape folds the batch into a Gemm's rows) are tiled by a divisor of
   their constant factor, without bounds checks. A matmul whose only rows are the batch
   itself (``N``: a dense layer) gets two schedules in one kernel, chosen per call: row
   tiles of ``_ACCUMULATORS / vectors`` rows (a split with a remainder; the accumulator is
   stored ``[N // t, t, ...]`` so it stays a register tile, and TVM's loop partitioning,
   asked for by a ``pragma_loop_partition_hint``, runs the whole tiles with no bounds check
   and the remainder with one) when there are at least two tiles of rows or whole tiles
   only, else one row at a time in tiles widened along the columns (:func:`_dispatch`).
   A strided convolution's input is stored de-interleaved (``[..., w % s, w // s]``) so its
   vector loads are contiguous; padding becomes a fill plus a vectorized copy; a matmul with
   many rows copies each weight column panel contiguously before sweeping the rows (constant
   weights come packed in panels already, see below). A
   depthwise convolution with large planes (:data:`STAGE_MIN_PLANE`) runs its channels in
   parallel and pads (and de-interleaves) each input channel inside that loop, into a
   per-channel buffer that stays in cache, instead of separate passes over the whole input.
4. :func:`schedule_generic`: every other block (elementwise, broadcast, transpose, pad,
   pooling, softmax/layer-norm reductions): producers inlined, the spatial loops fused and
   run in parallel, the innermost loop vectorized when the block is injective; a float32
   reduction over the innermost axis is split into per-lane partial results (``rfactor``)
   accumulated with vector instructions (:func:`_vectorize_reduction`).

Before legalization, :class:`ConvertConvLayout` (lowering/nchwc.py) stores the activations of
float32 convolutions with constant filters as ``[N, C / 8, H, W, 8]`` (AVX2; the vector width
in floats) from one graph boundary to the next, filters packed once at compile time
(``LEPTON_NCHWC=0`` turns it off). For the convolutions it leaves in NCHW,
:class:`PackConvWeights` stores the constant filters of fp32 pointwise
(1x1) convolutions output-channel innermost and the constant weights of fp32 matmuls in
column panels ``[N / 24, K, 24]`` (lowering/layout.py); the contraction rule then vectorizes
those convolutions along output channels and register-blocks along the output width (each
input value broadcast), which suits the 7- and 14-wide late layers of CNNs, and sweeps each
matmul panel front to back with no run-time copy. :class:`VectorMath` replaces float32 erf
and last-axis softmax by kernels built from :func:`rational_erf` / :func:`rational_exp`,
polynomials that vectorize (LLVM calls libm once per element for ``T.erf`` / ``T.exp``).

Shapes may be symbolic (the runtime's batch ``N``): symbolic loops are split by a divisor of
their constant factor, or fused into the parallel loop, or (a dense layer's rows, above) split
with a predicated remainder, so every schedule holds for any size. :data:`MarkShapeFuncsNoAlias`
(in :func:`finalize_passes`) keeps LLVM's ``noalias`` on the kernels of such builds.

A schedule never changes what is computed (TVM's primitives check that), except the order of
float additions where `_vectorize_reduction` splits an innermost float32 reduction into 8 lane
sums (rfactor; results differ in the last bits, as any vectorized sum does); a rule that does
not fit a kernel leaves it to the next rule, and :class:`ScheduleReport` says which rule scheduled
which kernel.

The pass runs after legalization and fusion and before the dataflow lowering, where TVM's GPU
pipeline applies dlight (see :func:`cpu_pipeline`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError
from tvm.ir.expr import TensorLoad
from tvm.sym import detect_linear_equation

from lepton_edge.lowering.layout import narrow_lanes

Rule = Callable[[Any, Any], bool]
Log = Callable[[str], None]

#: A loop nest with fewer scalar iterations than this is not worth a thread-pool launch.
PARALLEL_MIN_WORK = 1 << 17
#: Depthwise outputs with at least this many pixels per channel pad their input per channel
#: inside the convolution's parallel loop (smaller planes fit the caches whole: measured 1.3-1.5x
#: slower staged, 14x14 and 7x7 planes).
STAGE_MIN_PLANE = 28 * 28
#: SIMD vectors per output row of a matmul tile (convolutions: 2): 3 x 4 rows = 12 accumulators.
MATMUL_VECTORS = 3
#: A matmul whose columns are no multiple of the SIMD width (AVX-512: 16) but of this many
#: lanes is packed in panels of and vectorized with vectors of this width (ymm on AVX-512:
#: MobileNetV2's 1280 -> 1000 classifier at batch 1, 1 thread, kernel alone 0.55 -> 0.19 ms from memory, 0.16 -> 0.07 ms from cache; it
#: was unpacked, in 10-lane vectors that LLVM splits). 16 (or more): off.
MATMUL_MIN_LANES = 8
#: Register-block a dense layer's rows counted only at run time (the batch) with a remainder
#: (False: one row per tile, the columns widened; for A/B runs, benchmarks/kernel_ab.py).
SYMBOLIC_ROW_TILES = True
#: Most vector accumulators one output tile keeps in registers (AVX2 has 16, AVX-512 32).
_ACCUMULATORS = {256: 12, 512: 24, 128: 12}

_normalize = tvm.get_global_func("s_tir.schedule.NormalizePrimFunc")


@dataclass
class ScheduleReport:
    """Which rule scheduled each kernel; kernels no rule fitted keep TVM's default loops."""

    rules: dict[str, str] = field(default_factory=dict)
    #: kernel -> "rule: why" for every rule whose schedule primitive refused the kernel (the
    #: next rule then got a fresh copy; nothing of the refused attempt is kept).
    refused: dict[str, list[str]] = field(default_factory=dict)
    #: kernel -> what became of its parallel variant for large symbolic batches
    #: (_with_parallel_variant), for kernels where one was tried
    variants: dict[str, str] = field(default_factory=dict)

    def count(self, rule: str) -> int:
        return sum(1 for r in self.rules.values() if r == rule)

    def summary(self) -> str:
        names = sorted(set(self.rules.values()))
        text = ", ".join(f"{self.count(n)} {n}" for n in names) or "no kernels"
        if self.refused:
            text += f" ({sum(map(len, self.refused.values()))} rule attempt(s) refused)"
        made = sum(1 for v in self.variants.values() if not v.startswith("none"))
        if self.variants:
            text += f"; {made} of {len(self.variants)} small kernel(s) parallel for large batches"
        return text


def apply_default_schedules(mod: tvm.IRModule, target: Any, *, log: Log | None = None,
                            report: ScheduleReport | None = None) -> tvm.IRModule:
    """Schedule every PrimFunc of ``mod`` that is not scheduled yet (attribute
    ``tirx.is_scheduled``) for the LLVM ``target``; returns the new module."""
    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    from lepton_edge.lowering.x86_int8 import int8_rules

    rules: list[tuple[str, Rule]] = [(f"int8:{getattr(r, '__name__', 'rule')}", r)
                                     for r in int8_rules(target)]
    from lepton_edge.lowering.nchwc import schedule_nchwc, schedule_pool_nchwc

    rules += [("nchwc", schedule_nchwc), ("nchwc-pool", schedule_pool_nchwc),
              ("contraction", schedule_contraction),
              ("generic", schedule_generic)]
    report = report if report is not None else ScheduleReport()
    updates: dict[Any, tirx.PrimFunc] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
            continue
        scheduled = _schedule_one(func, target, rules, report.refused.setdefault(
            gvar.name_hint, []))
        if not report.refused[gvar.name_hint]:
            del report.refused[gvar.name_hint]
        if scheduled is None:
            report.rules[gvar.name_hint] = "unscheduled"
            continue
        name, new_func = scheduled
        new_func, variant = _with_parallel_variant(func, new_func, name, target, rules)
        if variant is not None:
            report.variants[gvar.name_hint] = variant
        report.rules[gvar.name_hint] = name
        updates[gvar] = new_func.with_attr("tirx.is_scheduled", True)
    if log is not None:
        log(f"default schedules: {report.summary()}")
    if not updates:
        return mod
    functions = {gvar: updates.get(gvar, func) for gvar, func in mod.functions_items()}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


def _schedule_one(func: tirx.PrimFunc, target: Any, rules: list[tuple[str, Rule]],
                  refused: list[str]) -> tuple[str, tirx.PrimFunc] | None:
    for name, rule in rules:
        sch = Schedule(tvm.IRModule({"main": func}))
        try:
            done = rule(sch, target)
        except (ScheduleError, tvm.error.InternalError) as exc:
            # A primitive refused (a layout this rule did not foresee): record why and give
            # the next rule a fresh copy of the kernel.
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            refused.append(f"{name}: {lines[-1][:200] if lines else type(exc).__name__}")
            continue
        if isinstance(done, tirx.PrimFunc):  # a rule that combined schedules itself
            return name, done
        if done:
            return name, sch.mod["main"]
    return None


#: The work (N * per-sample iterations of the largest block) from which such a kernel runs its
#: parallel schedule. Higher than PARALLEL_MIN_WORK: a 3-layer MLP (64 -> 128 -> 128 -> 10)
#: at batch 64, 2 threads, ran 1.21x slower parallel (kernels of 0.5-1M iterations, ~20 us),
#: at batch 512 (4-8M) 0.61x the serial time.
BATCH_PARALLEL_MIN_WORK = 1 << 21
#: The same on AVX-512 targets: PARALLEL_MIN_WORK, the threshold of kernels with static shapes.
#: Measured 2026-11-30, Zen 4, 2 threads, engines in blocks after a pause: the MLP above at
#: batch 64 ran 1.44x faster parallel (0.0395 -> 0.0275 ms; the 1.21x slower run: Zen 3),
#: the digits CNN at batch 64 0.277 -> 0.246 ms and at batch 16 0.093 -> 0.080 ms (its
#: 1 -> 16 channel conv, max pool and layout transform, 0.1-1M iterations, ran serial at 2M).
BATCH_PARALLEL_MIN_WORK_AVX512 = PARALLEL_MIN_WORK


def batch_parallel_min_work(target: Any) -> int:
    """The work from which a symbolic-batch kernel runs its parallel schedule on ``target``:
    BATCH_PARALLEL_MIN_WORK_AVX512 on AVX-512 targets, BATCH_PARALLEL_MIN_WORK elsewhere (AVX2:
    measured on Zen 3, kept)."""
    if vector_bits(target) == 512:
        return BATCH_PARALLEL_MIN_WORK_AVX512
    return BATCH_PARALLEL_MIN_WORK


#: LEPTON_BATCH_PARALLEL=0: kernels with a symbolic batch keep the one-sample decision
#: (serial below PARALLEL_MIN_WORK at any batch), as before 2026-11-30 (for comparisons).
BATCH_PARALLEL_ENV = "LEPTON_BATCH_PARALLEL"


def _with_parallel_variant(func: tirx.PrimFunc, serial: tirx.PrimFunc, name: str, target: Any,
                           rules: list[tuple[str, Rule]]) -> tuple[tirx.PrimFunc, str | None]:
    """``serial`` (``func`` scheduled by rule ``name``), or, when none of its loops runs in
    parallel only because one sample's work is below PARALLEL_MIN_WORK while the batch is
    symbolic, one kernel that runs ``func`` scheduled as for a large batch, its parallel
    loops parallel when the work of its largest block (``N * per-sample work``) reaches
    batch_parallel_min_work(target) and serial otherwise (the same schedule replayed without its
    ``parallel`` steps: the two branches share the loops neither changes, and lowering
    requires such a loop to have one extent). Without it a small model's kernels never used
    a second thread at any batch. With it, a note for ScheduleReport.variants when a
    variant was tried: what became of it (None when none was tried)."""
    if os.environ.get(BATCH_PARALLEL_ENV, "1") == "0":
        return serial, None
    if relax.analysis.has_reshape_pattern(func):
        # a pure reshape: with one schedule it stays recognisable, and RewriteDataflowReshape
        # makes it a view (no copy, no kernel call; the digits CNN's flatten at batch 64: a
        # ~4 us copy); the two-schedule kernel would be a copy at every batch
        return serial, None
    work = _symbolic_work(func)
    rule = dict(rules).get(name)
    if work is None or _has_parallel(serial) or rule is None:
        return serial, None
    sch = Schedule(tvm.IRModule({"main": func}))
    _WORK.symbolic = float(PARALLEL_MIN_WORK)
    try:
        done = rule(sch, target)
    except Exception as exc:  # noqa: BLE001 - any failure of the optional variant: serial
        return serial, f"none: rule {name} refused ({_last_line(exc)})"
    finally:
        _WORK.symbolic = 1.0
    parallel = done if isinstance(done, tirx.PrimFunc) else sch.mod["main"] if done else None
    # a schedule whose parallel loops lie under a serial loop over the batch (per-image
    # staging) would wake the thread pool once per sample: no gain for small samples
    if parallel is None or not _has_parallel(parallel, batch=True):
        return serial, "none: no parallel loop over the batch"
    try:
        plain = serial  # a rule that combines schedules itself (a dense layer's rows)
        if done is True:
            from tvm.s_tir.schedule import Trace

            trace = sch.trace
            kept = [inst for inst in trace.insts if inst.kind.name != "Parallel"]
            replay = Schedule(tvm.IRModule({"main": func}))
            _fresh_buffers(replay)
            Trace(kept, {inst: trace.get_decision(inst) for inst in kept
                         if trace.get_decision(inst) is not None}).apply_to_schedule(
                replay, remove_postproc=False)
            plain = replay.mod["main"]
        try:
            renewed = Schedule(tvm.IRModule({"main": plain}))
            _renew_symbolic_loops(renewed)
            plain = renewed.mod["main"]
        except Exception:  # noqa: BLE001 - e.g. a rule's own two-schedule kernel: its block
            pass  # names repeat; _check_lowering decides
        # a rule's kernels may do several multiply-adds per iteration of a float32 kernel's
        # time (the int8 dot products: x86_int8.int8_work_scale)
        scale = getattr(rule, "work_scale", 1)
        both = _dispatch(work >= batch_parallel_min_work(target) * scale, parallel, plain)
        _check_lowering(both, target)
        return both, "parallel for large batches"
    except Exception as exc:  # noqa: BLE001 - no replay, no shared kernel, no lowering: serial
        return serial, f"none: {_last_line(exc)}"


def _fresh_buffers(sch: Schedule) -> None:
    """Give each buffer that ``sch``'s function allocates at its root a new buffer object
    (an identity layout transform of its writer): the second schedule of a kernel that
    holds two (_with_parallel_variant) would otherwise share its stages' buffers with the
    first, and a buffer used in both branches is allocated whole above them, outside the
    parallel loop that stages it per channel (the digits CNN's int8 max pool at batch 64,
    2 threads: 11.5 -> 18 us)."""
    root = sch.mod["main"].body.block
    for buf in root.alloc_buffers:
        for node in _statements(sch.mod["main"].body):
            if type(node).__name__ != "SBlock" or node.name_hint == "root":
                continue
            index = next((i for i, w in enumerate(node.writes) if w.source.same_as(buf)), None)
            if index is None:
                continue
            dtype = str(buf.shape[0].ty) if buf.shape else "int64"
            try:
                sch.transform_layout(sch.get_sblock(node.name_hint), ("write", index),
                                     tirx.IndexMap.from_func(lambda *i: list(i),
                                                             ndim=len(buf.shape),
                                                             index_dtype=dtype))
            except Exception:  # noqa: BLE001 - kept shared: correct, slower where staged
                pass
            break


def _last_line(exc: Exception) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _renew_symbolic_loops(sch: Schedule) -> None:
    """Give every loop of ``sch`` over a symbolic extent a new variable (a split off a unit
    loop): a loop the two branches of a dispatched kernel share is bounded by each branch's
    condition differently (``N * w < T`` bounds the batch loop in the serial branch), and
    lowering binds a loop variable once ("Trying to update var 'b' with a different const
    bound")."""
    renewed: list[Any] = []
    names = [n.name_hint for n in _statements(sch.mod["main"].body)
             if type(n).__name__ == "SBlock" and n.name_hint != "root"]
    for name in names:
        for loop in sch.get_loops(sch.get_sblock(name)):
            var = sch.get(loop).loop_var
            if _const(sch.get(loop).extent) is not None or any(v.same_as(var) for v in renewed):
                continue
            _, inner = sch.split(loop, [1, None])
            renewed.append(sch.get(inner).loop_var)


def _check_lowering(func: tirx.PrimFunc, target: Any) -> None:
    """Run TVM's loop lowering (through loop partitioning and simplification, ~30 ms) on one
    kernel; raises what the build would. A kernel holding two schedules can fail there (a
    loop both branches share, bound differently: "Trying to update var 'b' with a different
    const bound", seen on a per-image staged convolution) and must not fail the whole build."""
    from tvm import s_tir

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")
                        .with_attr("target", target)})
    tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),  # tensorized blocks (x86_int8's intrinsics)
        s_tir.transform.StmtSimplify(), s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(), s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True), tirx.transform.UnrollLoop(),
        tirx.transform.StmtSimplify()])(mod)


def _symbolic_work(func: tirx.PrimFunc) -> Any | None:
    """The iteration count of ``func``'s largest block (by its work per sample), as an int64
    expression of the symbolic extents; None if no block has a symbolic extent."""
    best: tuple[float, Any] | None = None
    for node in _statements(func.body):
        if type(node).__name__ != "SBlock" or not node.iter_vars:
            continue
        extents = [iv.dom.extent for iv in node.iter_vars]
        if all(_const(e) is not None for e in extents):
            continue
        static = _work(extents)
        expr = tirx.IntImm("int64", 1)
        for e in extents:
            expr = expr * (tirx.Cast("int64", e) if str(e.ty) != "int64" else e)
        if best is None or static > best[0]:
            best = (static, expr)
    return None if best is None else best[1]


def _has_parallel(func: tirx.PrimFunc, *, batch: bool = False) -> bool:
    """Whether ``func`` has a parallel loop (``batch``: one whose extent is symbolic)."""
    return any(type(n).__name__ == "For" and int(n.kind) == int(tirx.ForKind.PARALLEL)
               and (not batch or _const(n.extent) is None) for n in _statements(func.body))


def _statements(stmt: Any) -> list[Any]:
    """Every statement under ``stmt``, blocks included (not expressions)."""
    found: list[Any] = []
    _walk(stmt, found.append, ("body", "seq", "block", "then_case", "else_case", "init"))
    return found


@tvm.transform.module_pass(opt_level=0, name="LeptonDefaultSchedules")
class DefaultSchedules:
    """Module pass wrapping :func:`apply_default_schedules`."""

    def __init__(self, target: Any, log: Log | None = None,
                 report: ScheduleReport | None = None) -> None:
        self.target = target
        self.log = log
        self.report = report

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        return apply_default_schedules(mod, self.target, log=self.log, report=self.report)


def cpu_pipeline(target: Any, *, log: Log | None = None,
                 report: ScheduleReport | None = None,
                 after_fusion: Iterable[tvm.transform.Pass] = ()) -> tvm.transform.Pass:
    """TVM 0.27's default Relax CPU pipeline with the default schedules after legalization and
    fusion (the place where the GPU pipeline runs dlight). `after_fusion`: passes run on the
    fused module before scheduling (tuning.BatchEntries)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from lepton_edge.lowering.relax import legalize_passes

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)

    @tvm.transform.module_pass(opt_level=0, name="LeptonCpuPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential([
                ConvertConvLayout(target, log),
                PackConvWeights(target, log),
                VectorMath(log),
                *cpu.library_dispatch_passes(target),
                *legalize_passes(),  # TVM's, FoldConstant only if needed
                *after_fusion,
                DefaultSchedules(target, log, report),
                *cpu.dataflow_lower_passes(target),
                *finalize_passes(target),
            ])
            return seq(mod)

    return _pipeline


@tvm.transform.module_pass(opt_level=0, name="LeptonConvertConvLayout")
class ConvertConvLayout:
    """Module pass: :func:`lepton_edge.lowering.nchwc.convert_conv_layout` for the target's
    vector width (float32 convolutions in channel-blocked NCHWc). ``LEPTON_NCHWC=0`` turns
    it off."""

    def __init__(self, target: Any, log: Log | None = None) -> None:
        self.target = target
        self.log = log

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        from lepton_edge.lowering import nchwc

        if not nchwc.enabled():
            return mod
        bits = vector_bits(self.target)
        # the channel block: the SIMD width, or 8 on AVX-512 when that blocks more of the
        # convolutions (24-channel layers); register tiles sized for AVX-512's 32 registers
        # in NCHW16c only (8-lane blocks on AVX-512 measured 7% slower with them than with
        # AVX2's tiles: MobileNetV2, 1 thread)
        # On AVX-512, channel counts that are multiples of 8 but not 16 (MobileNetV2's 24)
        # are first zero-padded to 32 (nchwc.pad_channels), so NCHW16c blocks all of them:
        # MobileNetV2 1 thread (Zen 4), p50 / onnxruntime's in the same run, against NCHW8c
        # with AVX2's tiles: b1 1.00x -> 0.965x (noisier runs 1.14x -> 1.02x), b8 1.04x ->
        # 1.02x.
        original = mod
        lanes = max(1, bits // 32)
        if nchwc.PAD_CHANNELS:
            mod, _ = nchwc.pad_channels(mod, lanes)
        lanes = nchwc.block_lanes(mod, lanes)
        registers = nchwc.vector_registers(bits) if lanes * 32 == bits else nchwc.REGISTERS
        try:
            mod, count = nchwc.convert_conv_layout(mod, lanes, registers)
        except nchwc.NotConvertible as exc:
            # NCHW is always correct (and scheduled by the contraction rule): say why the
            # faster layout was not used (a warning when no log is given: the Python API).
            message = f"float32 convolutions kept in NCHW (slower): {exc}"
            if self.log is not None:
                self.log(message)
            else:
                import warnings

                warnings.warn(message, UserWarning, stacklevel=2)
            return original
        if self.log is not None and count:
            self.log(f"{count} float32 convolution(s) in NCHW{lanes}c")
        mod, folded = nchwc.fold_flatten_transforms(mod)
        if self.log is not None and folded:
            self.log(f"{folded} matmul(s) read NCHW{lanes}c activations directly "
                     "(weight rows permuted)")
        return mod


@tvm.transform.module_pass(opt_level=0, name="LeptonPackConvWeights")
class PackConvWeights:
    """Module pass: :func:`lepton_edge.lowering.layout.pack_conv2d_weights` for the target's
    vector width (constant fp32 filters stored output-channel innermost, so the default
    schedule vectorizes convolutions along output channels). ``LEPTON_PACK_CONV=0`` turns it
    off (the convolutions then vectorize along the output width)."""

    def __init__(self, target: Any, log: Log | None = None, *, matmuls: bool = True) -> None:
        self.target = target
        self.log = log
        self.matmuls = matmuls  # False: filters only (tuned builds, lowering/tuning.py)

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        import os

        from lepton_edge.lowering.layout import pack_conv2d_weights, pack_matmul_weights

        lanes = max(1, vector_bits(self.target) // 32)
        if os.environ.get("LEPTON_PACK_CONV", "1") != "0":
            mod, count = pack_conv2d_weights(mod, lanes=lanes)
            if self.log is not None and count:
                self.log(f"packed the filters of {count} convolution(s) output-channel "
                         "innermost")
        if self.matmuls and os.environ.get("LEPTON_PACK_MATMUL", "1") != "0":
            mod, count = pack_matmul_weights(mod, lanes=lanes, vectors=MATMUL_VECTORS,
                                             min_lanes=MATMUL_MIN_LANES)
            if self.log is not None and count:
                self.log(f"packed the constant weights of {count} matmul(s) in column panels")
        return mod


#: erf(x) ~ x * P(x^2) / Q(x^2) on |x| <= ERF_CLAMP (beyond it float32 erf rounds to +-1), P and Q
#: of degree 5 in x^2 (Q[0] = 1), fitted here by iteratively reweighted least squares against
#: math.erf on 40,001 points of [0, 3.92]: max abs error 1.6e-8 in float64, 3.2e-7 evaluated
#: in float32 (libm's erff: 4e-8; 3.2e-7 is 5 float32 ulps at 1.0).
ERF_CLAMP = 3.92
_ERF_P = (1.128378987312317, 0.19279056787490845, 0.0530635230243206, 0.003869306296110153,
          0.0002874749479815364, 2.0342101834103232e-06)
_ERF_Q = (1.0, 0.5041878819465637, 0.11509514600038528, 0.015174318104982376,
          0.0011883004335686564, 3.8064907130319625e-05)


#: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in
#: a high part exact in float32 and a low part), exp(r) by its Taylor polynomial of degree 7
#: (relative error 9e-8 evaluated in float32), 2^n built as 2 * 2^(n - 1) in the exponent
#: bits. Inputs above EXP_HIGH give +inf, below EXP_LOW 0 (results under 2.4e-38 are flushed:
#: n >= -125 keeps 2^(n - 1) a normal number), NaN stays NaN.
EXP_HIGH = 88.72283
EXP_LOW = -86.64
_LN2_HI = 0.693145751953125
_LN2_LO = 1.428606765330187e-06


def rational_exp(x: Any) -> Any:
    """float32 TIR expression for exp(x) (see :data:`EXP_HIGH`) from multiply, add, round,
    shift and select: it vectorizes, where ``T.exp`` becomes one libm ``expf`` call per element
    (softmax over BERT's attention scores)."""
    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    xv, nv, rv = (tirx.Var(name, "float32") for name in ("exp_x", "exp_n", "exp_r"))
    xc = tirx.Select(xv > c(EXP_HIGH), c(EXP_HIGH),
                     tirx.Select(xv < c(EXP_LOW), c(EXP_LOW), xv))
    poly = c(1.0 / math.factorial(7))
    for k in range(6, -1, -1):
        poly = poly * rv + c(1.0 / math.factorial(k))
    bits = tirx.shift_left(tirx.Cast("int32", nv) + tirx.const(126, "int32"),
                           tirx.const(23, "int32"))
    value = tirx.Select(xv > c(EXP_HIGH), c(math.inf),
                        tirx.Select(xv < c(EXP_LOW), c(0.0),
                                    poly * c(2.0) * tirx.reinterpret("float32", bits)))
    value = tirx.Select(xv != xv, xv, value)  # NaN
    # (let-bound: each intermediate computed once; TIR would otherwise repeat the trees)
    value = tirx.Let(rv, xv - nv * c(_LN2_HI) - nv * c(_LN2_LO), value)
    value = tirx.Let(nv, tirx.floor(xc * c(1.4426950408889634) + c(0.5)), value)
    return tirx.Let(xv, x, value)


def rational_erf(x: Any) -> Any:
    """float32 TIR expression for erf(x) with :data:`_ERF_P` / :data:`_ERF_Q`: only multiply,
    add, divide and compare-select, so it vectorizes (LLVM has no vector erf: TVM's
    ``T.erf`` becomes one libm ``erff`` call per element, 6 ns each here, inside the
    vectorized epilogue of BERT's FFN). NaN stays NaN (both clamp comparisons are false),
    +-inf gives +-1."""
    def c(v: float) -> Any:
        return tirx.const(v, "float32")

    xv, cv, tv = (tirx.Var(name, "float32") for name in ("erf_x", "erf_xc", "erf_t"))

    def horner(coeffs: tuple[float, ...]) -> Any:
        acc = c(coeffs[-1])
        for k in reversed(coeffs[:-1]):
            acc = acc * tv + c(k)
        return acc

    value = tirx.Let(tv, cv * cv, cv * horner(_ERF_P) / horner(_ERF_Q))
    value = tirx.Let(cv, tirx.Select(xv > c(ERF_CLAMP), c(ERF_CLAMP),
                                     tirx.Select(xv < c(-ERF_CLAMP), c(-ERF_CLAMP), xv)), value)
    return tirx.Let(xv, x, value)


@tvm.transform.module_pass(opt_level=0, name="LeptonVectorMath")
class VectorMath:
    """Module pass: every float32 ``relax.erf`` becomes an elementwise kernel computing
    :func:`rational_erf` (fused into its neighbours like the original; BERT's GELU), and
    every float32 ``relax.nn.softmax`` over the last axis a softmax kernel using
    :func:`rational_exp` (max, sum of exponentials, normalisation; the reductions are
    vectorized by :func:`_vectorize_reduction`)."""

    def __init__(self, log: Log | None = None) -> None:
        self.log = log

    def transform_module(self, mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        from tvm import relax, te
        from tvm.relax.expr_functor import PyExprMutator, mutator

        count = softmaxes = 0

        def erf_te(x: Any) -> Any:
            return te.compute(x.shape, lambda *i: rational_erf(x(*i)), name="erf_rational")

        def softmax_te(x: Any) -> Any:
            rows, width = x.shape[:-1], x.shape[-1]
            k = te.reduce_axis((0, width), name="k")
            top = te.compute(rows, lambda *i: te.max(x[(*i, k)], axis=k), name="softmax_max")
            j = te.reduce_axis((0, width), name="j")
            total = te.compute(rows, lambda *i: te.sum(rational_exp(x[(*i, j)] - top[i]),
                                                       axis=j), name="softmax_sum")
            return te.compute(x.shape, lambda *i: rational_exp(x[i] - top[i[:-1]])
                              / total[i[:-1]], name="softmax")

        @mutator
        class Rewrite(PyExprMutator):  # type: ignore[misc]
            def visit_call_(self, call: Any) -> Any:
                nonlocal count, softmaxes
                call = super().visit_call_(call)
                name = str(getattr(call.op, "name", ""))
                ty = getattr(call.args[0], "ty", None) if call.args else None
                if str(getattr(ty, "dtype", "")) != "float32":
                    return call
                if name == "relax.erf":
                    count += 1
                    return self.builder_.call_te(erf_te, call.args[0],
                                                 primfunc_name_hint="erf")
                ndim = int(getattr(ty, "ndim", -1) or -1)
                if name == "relax.nn.softmax" and ndim >= 1 \
                        and int(call.attrs.axis) in (-1, ndim - 1):
                    softmaxes += 1
                    return self.builder_.call_te(softmax_te, call.args[0],
                                                 primfunc_name_hint="softmax")
                return call

        rewrite = Rewrite(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewrite.builder_.update_func(gvar, rewrite.visit_expr(func))
        if not count and not softmaxes:
            return mod
        if self.log is not None and count:
            self.log(f"erf: {count} float32 call(s) computed by a vectorizable rational")
        if self.log is not None and softmaxes:
            self.log(f"softmax: {softmaxes} float32 call(s) with a vectorizable exp")
        return rewrite.builder_.get()


def finalize_passes(target: Any) -> list[tvm.transform.Pass]:
    """TVM 0.27's CPU finalization passes followed by :data:`MarkShapeFuncsNoAlias`; use this
    list wherever a Relax module with symbolic shapes is lowered for the CPU."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return [*cpu.finalize_passes(target), MarkShapeFuncsNoAlias]


@tvm.transform.module_pass(opt_level=0, name="LeptonMarkShapeFuncsNoAlias")
def MarkShapeFuncsNoAlias(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:  # noqa: N802
    """Give the shape functions of ``VMShapeLower`` the ``tirx.noalias`` attribute.

    With symbolic shapes (the runtime batch ``N``) ``VMShapeLower`` adds a host PrimFunc
    (``shape_func``) without ``tirx.noalias``. Built in the same library, TVM 0.27's LLVM code
    generator then emits the kernels without ``noalias`` on their buffer arguments (their
    noalias-qualified compute functions disappear from the LLVM IR), so LLVM reloads the
    register-tiled accumulators after every store: ResNet-18's 512-channel 3x3 convolution took
    26 ms in the model's library against 5.4 ms built alone, and the untuned ResNet-18-shaped
    model ran 5.4x onnxruntime with a symbolic batch against 2.2x with a fixed one. A shape
    function has one buffer parameter (the shape heap), so the attribute is trivially true.
    """
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        attrs = func.attrs
        if attrs is None or not bool(attrs.get("tirx.is_host_func", False)):
            continue
        if bool(attrs.get("tirx.noalias", False)):
            continue
        buffers = [p for p in func.params if not isinstance(p, tirx.Var)]
        if len(buffers) <= 1:
            updates[gvar] = func.with_attr("tirx.noalias", True)
    if not updates:
        return mod
    functions = {gvar: updates.get(gvar, func) for gvar, func in mod.functions_items()}
    return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)


# --- analysis ----------------------------------------------------------------------------------

def _is_scheduled(func: tirx.PrimFunc) -> bool:
    return func.attrs is not None and bool(func.attrs.get("tirx.is_scheduled", False))


def vector_bits(target: Any) -> int:
    """SIMD register width of the LLVM target in bits: 512 (AVX-512), 256 (AVX/AVX2) or 128.

    (``llvm_get_vector_width`` answers 512 for every x86 CPU in TVM 0.27; the feature flags
    are reliable.)"""
    from tvm.target import codegen

    try:
        with target:
            if codegen.target_has_features("avx512f", target):
                return 512
            if codegen.target_has_features("avx", target):
                return 256
    except Exception:  # noqa: BLE001 - a non-x86 or unknown CPU: assume 128-bit SIMD
        return 128
    return 128


@dataclass
class _Block:
    rv: Any
    loops: list[Any]
    iters: list[Any]  # tirx.IterVar, one per loop, same order
    kinds: str        # "S"/"R"/"O" per iterator

    @property
    def is_reduction(self) -> bool:
        return "R" in self.kinds


def _blocks(sch: Schedule) -> list[_Block] | None:
    """The root's blocks in normal form (one loop per block iterator), or None."""
    try:
        result = _normalize(sch)
    except Exception:  # noqa: BLE001 - not in normal form: the rules do not apply
        return None
    if result is None:
        return None
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return [_Block(b, list(loops), list(iters), "".join(kinds.get(i.iter_type, "O")
                                                        for i in iters))
            for b, loops, iters, _ in zip(*result)]


def _const(expr: Any) -> int | None:
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


_IF_THEN_ELSE = ("prim.if_then_else",)  # TVM 0.27 names it so (was tir.if_then_else)
_CHILDREN = ("a", "b", "value", "args", "indices", "condition", "true_value", "false_value",
             "body", "seq", "then_case", "else_case")


def _walk(node: Any, visit: Callable[[Any], None],
          children: tuple[str, ...] | None = None) -> None:
    """Post-order walk over TIR expressions/statements (TVM 0.27 has no Python visitor),
    through the fields ``children`` (default: _CHILDREN)."""
    stack: list[Any] = [node]
    order: list[Any] = []
    while stack:
        cur = stack.pop()
        if cur is None:
            continue
        if isinstance(cur, (list, tuple)) or type(cur).__name__ == "Array":
            stack.extend(cur)
            continue
        order.append(cur)
        for name in children or _CHILDREN:
            child = getattr(cur, name, None) if _has_field(cur, name) else None
            if child is not None and not isinstance(child, (int, float, str)):
                stack.append(child)
    for cur in reversed(order):
        visit(cur)


def _has_field(obj: Any, name: str) -> bool:
    try:
        return hasattr(obj, name)
    except Exception:  # noqa: BLE001
        return False


def _vars_in(expr: Any) -> list[Any]:
    found: list[Any] = []
    _walk(expr, lambda n: found.append(n) if isinstance(n, tirx.Var) else None)
    return found


def _index_of(items: list[Any], obj: Any) -> int | None:
    """Position of ``obj`` in ``items`` by identity (``==`` on TIR nodes builds expressions)."""
    for i, item in enumerate(items):
        if item.same_as(obj):
            return i
    return None


def _uses(expr: Any, var: Any) -> bool:
    return _index_of(_vars_in(expr), var) is not None


def _loads(stmt: Any) -> list[Any]:
    loads: list[Any] = []
    _walk(stmt, lambda n: loads.append(n) if isinstance(n, TensorLoad) else None)
    return loads


def _nodes(expr: Any) -> list[Any]:
    found: list[Any] = []
    _walk(expr, found.append)
    return found


def _has_call(stmt: Any, names: Iterable[str]) -> bool:
    wanted = {name.rsplit(".", 1)[-1] for name in names}
    return any(type(n).__name__ == "Call"
               and str(getattr(n.op, "name", "")).rsplit(".", 1)[-1] in wanted
               for n in _nodes(stmt))


def _unit_stride(expr: Any, var: Any) -> int | None:
    """The coefficient of ``var`` in ``expr`` when ``expr`` is affine in it (else None)."""
    try:
        coeffs = detect_linear_equation(expr, [var])
    except Exception:  # noqa: BLE001
        return None
    if len(coeffs) != 2:
        return None
    return _const(coeffs[0])


#: What a symbolic extent (the batch N) counts for in _work (per thread: compiles may run in
#: threads): 1 (one sample's work decides) unless _with_parallel_variant is scheduling a
#: kernel's variant for large batches.
_WORK = threading.local()


def _symbolic_factor() -> float:
    return float(getattr(_WORK, "symbolic", 1.0))


def _work(extents: Iterable[Any]) -> float:
    """Scalar iterations of a loop nest; a symbolic extent counts as _symbolic_factor()."""
    total = 1.0
    for e in extents:
        c = _const(e)
        total *= c if c is not None else _symbolic_factor()
    return total


def _const_factor(expr: Any) -> int:
    """A constant that provably divides the integer expression ``expr`` (1 if none is known):
    ``N * 128`` -> 128, ``N * 64 + 32`` -> 32."""
    value = _const(expr)
    if value is not None:
        return abs(value)
    if isinstance(expr, tirx.Mul):
        return _const_factor(expr.a) * _const_factor(expr.b)
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        return math.gcd(_const_factor(expr.a), _const_factor(expr.b))
    return 1


def _largest_divisor(n: int, at_most: int) -> int:
    for d in range(min(n, at_most), 0, -1):
        if n % d == 0:
            return d
    return 1


def _param_buffers(sch: Schedule) -> list[Any]:
    """The function's parameters (TVM 0.27's PrimFunc parameters are the buffers)."""
    return list(sch.mod["main"].params)


# --- contraction rule (matmul, conv) -----------------------------------------------------------

@dataclass
class _Contraction:
    block: _Block
    vec: int              # index (in block.iters) of the vectorized spatial iterator
    reg: int | None       # index of the register-blocked spatial iterator
    vec_tile: int
    reg_tile: int
    lanes: int
    strided: list[tuple[str, int]]  # (operand buffer name, stride of the vector axis)
    #: vectorized along output channels (a packed-weight convolution), register-blocked along
    #: the output's innermost axis (the width)
    channels: bool = False
    #: the weight is stored in column panels already (lowering/layout.py): no run-time copy
    prepacked: bool = False
    #: the register-blocked extent is symbolic with no constant factor (a batch of rows): split
    #: by ``reg_tile`` with a remainder, the whole tiles partitioned from the predicated tail
    tail: bool = False


def _analyse_contraction(sch: Schedule, blk: _Block, bits: int, *,
                         batch_rows: bool = True) -> _Contraction | None:
    block = sch.get(blk.rv)
    if len(block.writes) != 1 or block.init is None or "O" in blk.kinds:
        return None
    store = block.body
    if not isinstance(store, tirx.BufferStore):
        return None
    out = store.buffer
    reads = [ld for ld in _loads(store.value) if not ld.source.same_as(out)]
    if len({ld.source.name for ld in reads}) < 2 or not any(
            isinstance(n, tirx.Mul) for n in _nodes(store.value)):
        return None  # not a sum of products
    ivars = [iv.var for iv in blk.iters]
    spatial = [i for i, k in enumerate(blk.kinds) if k == "S"]
    # The output is indexed by spatial iterators only, each a plain variable (or constant 0).
    out_vars = []
    for index in store.indices:
        if isinstance(index, tirx.Var):
            at = _index_of(ivars, index)
            if at is None or blk.kinds[at] != "S":
                return None
            out_vars.append(at)
        elif _const(index) is None:
            return None
    if not out_vars or not spatial:
        return None
    lanes = max(1, bits // max(8, tvm.DataType(str(out.dtype)).bits))
    channels = _channel_axis(blk, reads, out_vars, lanes)
    if channels is not None:
        # A convolution whose weight has the output channel innermost (lowering/layout.py
        # packs constant filters so): vectorize along output channels, register-block along
        # the output width, each input value broadcast.
        return _channel_tiles(blk, channels, out_vars[-1], lanes, bits)
    vec = out_vars[-1]  # the output's innermost (contiguous) axis
    vec_extent = _const(blk.iters[vec].dom.extent)
    if vec_extent is None:
        return None
    vvar = ivars[vec]
    # One operand must not depend on the vectorized iterator (it is broadcast) and every
    # operand that does must read it with a small constant stride in its innermost dimension.
    panels: list[int] = []
    checked = _vector_reads(reads, vvar, max_stride=4, panels=panels)
    if checked is None:
        return None
    broadcast, strided = checked
    if not broadcast:
        return None
    # Columns (or panels) that are no multiple of the vector but of a narrower one (see
    # MATMUL_MIN_LANES): narrower vectors, not odd pieces.
    lanes = narrow_lanes(math.gcd(*panels) if panels else vec_extent, lanes, MATMUL_MIN_LANES)
    if panels:
        # A weight packed in column panels (lowering/layout.py): one tile per panel.
        vec_tile = _vector_tile(math.gcd(*panels), lanes, MATMUL_VECTORS)
        if vec_tile is None or vec_extent % vec_tile or math.gcd(*panels) % vec_tile:
            return None
    else:
        vec_tile = _vector_tile(vec_extent, lanes,
                                MATMUL_VECTORS if _plain_reads(block) else 2)
    if vec_tile is None:
        return None
    # Register blocking: a spatial iterator that some operand does not read, so the other
    # operand's vector is reused across it. Pick the longest; a symbolic extent (the rows of
    # a batch folded into a matmul, N * 128) counts as longest and is tiled by a divisor of
    # its constant factor, so the split needs no bounds check for any N.
    reg, reg_extent, reg_factor = None, 0.0, 0
    symbolic_rows = None  # a matmul's symbolic row extent without a constant factor
    for i in out_vars[:-1]:
        dom = blk.iters[i].dom.extent
        extent = _const(dom)
        factor = extent if extent is not None else _const_factor(dom)
        if all(any(_uses(ix, ivars[i]) for ix in ld.indices) for ld in reads):
            continue
        if factor <= 1:
            if extent is None and symbolic_rows is None:
                symbolic_rows = i
            continue
        size = float(extent) if extent is not None else math.inf
        if size > reg_extent:
            reg, reg_extent, reg_factor = i, size, factor
    if (reg is None and symbolic_rows is not None and batch_rows and SYMBOLIC_ROW_TILES
            and _plain_reads(block)):
        reg, reg_factor = symbolic_rows, 1
    if reg is None:
        # No row to register-block (one row; or the batch rows of a dense layer in the
        # schedule its kernel runs for few rows, batch_rows=False): a tile of one row keeps
        # only its column vectors as accumulators, and two leave the FMA units waiting on
        # their latency (27% of the peak, digits' 512 -> 64 layer at batch 64).
        # Widen the tile along the columns instead (panels: whole panels per tile).
        vec_tile = _wide_tile(vec_extent, vec_tile, lanes, _ACCUMULATORS[bits] * 2 // 3,
                              math.gcd(*panels) if panels else None)
    nvec = math.ceil(vec_tile / lanes)
    reg_tile, tail = 1, False
    if reg is not None and reg_factor <= 1:
        # Rows known only at run time (the batch): whole tiles of rows in a loop of their
        # own, then the remaining rows (fewer than a tile) with a predicate.
        reg_tile, tail = max(1, _ACCUMULATORS[bits] // nvec), True
    elif reg is not None:
        reg_tile = _largest_divisor(reg_factor, max(1, _ACCUMULATORS[bits] // nvec))
    return _Contraction(blk, vec, reg, vec_tile, reg_tile, lanes, strided,
                        prepacked=bool(panels), tail=tail)


def _wide_tile(extent: int, tile: int, lanes: int, vectors: int, panel: int | None) -> int:
    """The widest tile of whole vectors (at most `vectors`) that divides `extent` (and holds
    whole `panel`s, or fits in one), if wider than `tile`; else `tile`."""
    for wide in range(vectors * lanes, tile, -lanes):
        if extent % wide == 0 and (panel is None or wide % panel == 0 or panel % wide == 0):
            return wide
    return tile


def _panel_tile(load: Any, var: Any) -> int | None:
    """``t`` when ``load`` reads ``var`` as ``W[..., var // t, ..., var % t]`` (one index each,
    the modulo innermost): a weight stored in column panels of width ``t``."""
    def split(expr: Any, kind: type) -> int | None:
        if isinstance(expr, kind) and isinstance(expr.a, tirx.Var) and expr.a.same_as(var):
            return _const(expr.b)
        return None

    *outer, last = load.indices
    tile = split(last, tirx.FloorMod)
    users = [ix for ix in outer if _uses(ix, var)]
    if tile is None or tile <= 1 or len(users) != 1 or split(users[0], tirx.FloorDiv) != tile:
        return None
    return tile


def _vector_reads(reads: list[Any], vvar: Any, *, max_stride: int,
                  panels: list[int] | None = None
                  ) -> tuple[bool, list[tuple[str, int]]] | None:
    """Check that every operand reading ``vvar`` reads it in its innermost dimension with a
    constant stride in 1..max_stride (with ``panels``: or as a column-panel weight, whose
    panel widths are appended to it). Returns (some operand does not read it, the strided
    operands) or None."""
    broadcast = False
    strided: list[tuple[str, int]] = []
    for ld in reads:
        uses = [_uses(ix, vvar) for ix in ld.indices]
        if not any(uses):
            broadcast = True
            continue
        tile = _panel_tile(ld, vvar) if panels is not None else None
        if tile is not None:
            panels.append(tile)
            continue
        if any(uses[:-1]):
            return None
        stride = _unit_stride(ld.indices[-1], vvar)
        if stride is None or not 1 <= stride <= max_stride:
            return None
        if stride > 1 and (ld.source.name, stride) not in strided:
            strided.append((ld.source.name, stride))
    return broadcast, strided


def _channel_axis(blk: _Block, reads: list[Any], out_vars: list[int], lanes: int) -> int | None:
    """For a convolution whose output is indexed ``[..., f, ..., x]``: the output axis ``f``
    other than the innermost that one operand, a filter, reads contiguously in its innermost
    dimension while the other operand does not read it, with a multiple of ``lanes`` as
    extent. A filter has at least 3 dimensions and reads only reduction iterators (and
    constants) in all but its last one (``W[c, ry, rx, f]``, lowering/layout.py's packed
    layout). None for matmuls (their operands have 2 dimensions or a batch axis) and for
    NCHW/OIHW convolutions (the output channel is the filter's outermost index)."""
    if len(out_vars) < 3:
        return None
    ivars = [iv.var for iv in blk.iters]
    spatial_vars = [v for v, k in zip(ivars, blk.kinds) if k == "S"]
    last = _const(blk.iters[out_vars[-1]].dom.extent)
    if last is None:
        return None
    for i in out_vars[:-1]:
        extent = _const(blk.iters[i].dom.extent)
        if extent is None or extent % lanes:
            continue
        checked = _vector_reads(reads, ivars[i], max_stride=1)
        if checked is None or not checked[0]:
            continue
        filters = [ld for ld in reads if _uses(ld.indices[-1], ivars[i])]
        if all(len(ld.indices) >= 3 and not any(_uses(ix, v) for ix in ld.indices[:-1]
                                                 for v in spatial_vars) for ld in filters):
            return i
    return None


def _channel_tiles(blk: _Block, vec: int, reg: int, lanes: int, bits: int) -> _Contraction:
    """Tile sizes for channel vectorization: one or two vectors of output channels times the
    largest divisor of the width that keeps the accumulators in registers; the combination
    with the most accumulators wins (a 7-wide layer: 8 channels x 7 pixels, not 16 x 1)."""
    extent = _const(blk.iters[vec].dom.extent)
    width = _const(blk.iters[reg].dom.extent)
    best: tuple[int, int, int] | None = None
    for nvec in (2, 1):
        if extent % (nvec * lanes):
            continue
        reg_tile = _largest_divisor(width, max(1, _ACCUMULATORS[bits] // nvec))
        key = (nvec * reg_tile, nvec, reg_tile)
        if best is None or key > best:
            best = key
    assert best is not None  # extent is a multiple of lanes
    _, nvec, reg_tile = best
    return _Contraction(blk, vec, reg, nvec * lanes, reg_tile, lanes, [], channels=True)


def _vector_tile(extent: int, lanes: int, vectors: int = 2) -> int | None:
    """Elements of the vectorized axis per tile: one or two full vectors when they divide the
    extent, else the largest divisor that fits one vector (LLVM widens a 7-lane vector to 8
    lanes cheaply but splits a 14-lane one into odd pieces, measured 4x slower)."""
    for tile in range(vectors * lanes, 0, -lanes):
        if extent % tile == 0:
            return tile
    best = _largest_divisor(extent, lanes)
    return best if best >= max(2, lanes // 2) else None


def schedule_contraction(sch: Schedule, target: Any) -> bool | tirx.PrimFunc:
    """Matmul / batch-matmul / dense / NCHW conv2d kernels with their fused producers and
    epilogues (see the module docstring). False when the kernel has no such block.

    A matmul whose rows are counted only at run time (the batch of a dense layer) becomes two
    schedules in one kernel, chosen per call by the row count: with at least two register
    tiles of rows (or whole tiles only), tiles of rows x columns (each weight vector reused
    over the rows) in a loop free of bounds checks, then the remaining rows with one; else
    one row at a time in tiles widened along the columns (a 6-row tile holding 1 valid row
    runs 6 predicates per step). Returns that combined kernel (a PrimFunc) instead of True."""
    original = sch.mod["main"]
    bits = vector_bits(target)
    planned = _plan(sch, bits, batch_rows=True)
    if planned is None:
        return False
    blocks, plan = planned
    if plan.tail and _row_index_at(sch.get(plan.block.rv), plan) is None:
        # the accumulator could not be stored [rows // t, t] (_tile_accumulator_rows): it
        # would stay a whole-output buffer sized by the batch; one row at a time instead
        planned = _plan(sch, bits, batch_rows=False)
        if planned is None:
            return False
        blocks, plan = planned
    _apply_contraction(sch, blocks, plan, bits)
    if not plan.tail:
        return True
    wide = Schedule(tvm.IRModule({"main": original}))
    planned = _plan(wide, bits, batch_rows=False)
    if planned is None:
        return True  # the row tiles alone: right for any row count
    _apply_contraction(wide, *planned, bits)
    if not all(a.same_as(b) for a, b in zip(sch.mod["main"].params, wide.mod["main"].params,
                                            strict=True)):
        return True
    # The predicated remainder tile costs about what the wide schedule spends on a tile's
    # rows (measured: 7 rows 15 us blocked vs 11 us wide, digits' 512 -> 64 layer): blocked
    # when the rows fill whole tiles or at least two.
    rows, tile = plan.block.iters[plan.reg].dom.extent, plan.reg_tile
    blocked = tirx.Or(rows >= 2 * tile, tirx.floormod(rows, tile) == 0)
    return _dispatch(blocked, sch.mod["main"], wide.mod["main"])


def _plan(sch: Schedule, bits: int, *, batch_rows: bool
          ) -> tuple[list[_Block], _Contraction] | None:
    blocks = _blocks(sch)
    if blocks is None:
        return None
    reductions = [b for b in blocks if b.is_reduction]
    if len(reductions) != 1:
        return None
    plan = _analyse_contraction(sch, reductions[0], bits, batch_rows=batch_rows)
    return None if plan is None else (blocks, plan)


def _dispatch(cond: Any, then_func: tirx.PrimFunc, else_func: tirx.PrimFunc) -> tirx.PrimFunc:
    """One kernel running ``then_func``'s loops when ``cond`` holds, else ``else_func``'s (two
    schedules of the same function: same parameters and buffers)."""
    from tvm.s_tir import SBlock, SBlockRealize

    then_root, else_root = then_func.body.block, else_func.body.block
    # a buffer the original kernel allocates at its root (a stage neither schedule changed)
    # is the same object in both: allocated once
    allocs = list(then_root.alloc_buffers)
    allocs += [b for b in else_root.alloc_buffers if not any(b.same_as(a) for a in allocs)]
    root = SBlock([], [], [], "root", tirx.IfThenElse(cond, then_root.body, else_root.body),
                  alloc_buffers=allocs)
    return then_func.with_body(SBlockRealize([], True, root))


def _apply_contraction(sch: Schedule, blocks: list[_Block], plan: _Contraction,
                       bits: int) -> None:
    work = _work(it.dom.extent for it in plan.block.iters)
    main = plan.block.rv
    name = sch.get(main).name_hint

    # Producers: inline injective ones (transposes, casts, zero-point shifts), keep padding
    # as its own parallel loop (inlined, its conditions would sit in the innermost loop).
    for b in blocks:
        if b.is_reduction or _has_call(sch.get(b.rv).body, _IF_THEN_ELSE):
            continue
        if _feeds(sch, b.rv, main):
            try:
                sch.compute_inline(b.rv)
            except ScheduleError:
                pass
    # Epilogue stages that are not the kernel's output (GELU's x * 0.5 * (1 + erf(x / c))
    # reads x twice, so the chain has a fork that reverse inlining cannot follow): inlined
    # into their consumers, which leaves one epilogue block that joins the register tile's
    # write-back instead of separate passes over the whole output.
    _inline_epilogue_stages(sch, main)

    main = sch.get_sblock(name)
    # Depthwise: each output channel reads one input channel, whose padded (de-interleaved)
    # plane is built per channel inside the parallel loop, in cache, not as separate passes.
    staged = _per_channel_input(sch.get(main), plan)
    if staged is None:
        _split_padding(sch, main)
    for buffer_name, stride in plan.strided:
        _deinterleave(sch, main, buffer_name, stride, iterate=staged is None)
    kinds = plan.block.kinds
    # Accumulate in a register tile, written back (with the epilogue) once per tile.
    writeback = sch.cache_write(main, 0, "local")
    if plan.tail:
        _tile_accumulator_rows(sch, main, plan)
    loops = sch.get_loops(main)
    vec_o, vec_i = sch.split(loops[plan.vec], [None, plan.vec_tile])
    vec_u = None
    if plan.vec_tile > plan.lanes and plan.vec_tile % plan.lanes == 0:
        # One SIMD register per vector op (LLVM splits a 24-lane vector badly): the
        # register count loop is unrolled, the lanes vectorized.
        vec_u, vec_i = sch.split(vec_i, [None, plan.lanes])
    if plan.reg is not None and plan.reg_tile > 1:
        reg_o, reg_i = sch.split(loops[plan.reg], [None, plan.reg_tile])
    else:
        reg_o, reg_i = (loops[plan.reg], None) if plan.reg is not None else (None, None)
    reduce_loops = [loops[i] for i, k in enumerate(kinds) if k == "R"]
    others = [loops[i] for i, k in enumerate(kinds) if k == "S" and i not in (plan.vec, plan.reg)]
    is_conv = plan.reg is not None and plan.reg < plan.vec and not _plain_reads(sch.get(main))
    pack = None if is_conv else _packed_operand(sch.get(main), plan)
    serial: list[Any] = []
    if staged is not None:
        # (n, c) in parallel; per channel, row tile by column tile over the staged plane.
        outer = [loops[i] for i, k in enumerate(kinds) if k == "S" and i not in (plan.vec,
                                                                                 plan.reg)]
        serial = [reg_o, vec_o]
    elif plan.channels:
        pack = None
        spatial_rest = [i for i, k in enumerate(kinds) if k == "S" and i not in (plan.vec,
                                                                                 plan.reg)]
        pre = [loops[i] for i in spatial_rest if i < plan.vec]
        post = [loops[i] for i in spatial_rest if i > plan.vec]
        if _weights_smaller_than_input(sch.get(main), plan):
            # Pixel tile by pixel tile, all channel tiles: the filter stays in cache.
            outer = pre + post + [reg_o, vec_o]
        else:
            # Channel tile by channel tile: its filter panel stays in cache over the pixels.
            outer = pre + [vec_o] + post + [reg_o]
    elif is_conv:
        # n, f_o, y, x_o: the channel tile's weights stay in cache over the rows.
        pre = [loops[i] for i, k in enumerate(kinds) if k == "S" and i < (plan.reg or 0)
               and i != plan.vec]
        post = [lp for lp in others if not any(lp.same_as(p) for p in pre)]
        if _weights_smaller_than_input(sch.get(main), plan):
            # Small filters (early layers): all channel tiles of a pixel tile in a row, so the
            # input tile stays in L1 instead of sweeping the whole input once per channel tile.
            outer = pre + post + [vec_o] + ([reg_o] if reg_o is not None else [])
        else:
            outer = pre + ([reg_o] if reg_o is not None else []) + post + [vec_o]
    elif pack is not None or plan.prepacked or plan.tail:
        # Matmul with many rows: each (batch, column panel) packs its weight panel [K, tile]
        # contiguously once (a strided panel thrashes the caches' sets), then sweeps the rows;
        # a weight stored in panels already (lowering/layout.py) is swept the same way.
        outer = others + [vec_o]
        serial = [reg_o] if reg_o is not None else []
    else:
        outer = others + [vec_o] + ([reg_o] if reg_o is not None else [])
    inner = ([reg_i] if reg_i is not None else []) + ([vec_u] if vec_u is not None else []) \
        + [vec_i]
    sch.reorder(*outer, *serial, *reduce_loops, *inner)
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    anchor = serial[-1] if serial else fused
    sch.reverse_compute_at(writeback, anchor, preserve_unit_loops=False)
    # The epilogue (bias, activation, residual, requantization) joins the write-back.
    _inline_consumers(sch, writeback)
    for lp in reduce_loops[1 if staged is None else 0:]:
        extent = _const(sch.get(lp).extent)
        if extent is not None and extent <= 7:
            sch.unroll(lp)
    if reg_i is not None:
        sch.unroll(reg_i)
    if vec_u is not None:
        sch.unroll(vec_u)
    sch.vectorize(vec_i)
    if pack is not None:
        panel = sch.cache_read(main, pack, "global")
        sch.compute_at(panel, fused, preserve_unit_loops=False)
        _vectorize_innermost(sch, panel, below=fused, unroll_rest=False, lanes=plan.lanes)
    if staged is not None:
        strides = dict(plan.strided)
        _stage_per_channel(sch, sch.get_sblock(name), staged, fused, strides.get(staged, 1))
    if work >= PARALLEL_MIN_WORK:
        sch.parallel(fused)
    if plan.tail:
        sch.annotate(reg_o, "pragma_loop_partition_hint", 1)
    if reduce_loops:
        # The zero-initialisation moves out of the reduction, copying the tile loops' kinds.
        sch.decompose_reduction(main, reduce_loops[0])
    _vectorize_innermost(sch, writeback, below=anchor, unroll_rest=True, lanes=plan.lanes)
    # Whatever is left at the root (padding, epilogues that could not join) runs generic.
    _schedule_rest(sch, bits)


def _row_index_at(block: Any, plan: _Contraction) -> int | None:
    """Which dimension of ``block``'s output the register-blocked row iterator indexes
    directly, or None."""
    row = block.iter_vars[plan.reg].var
    return next((d for d, ix in enumerate(block.body.indices) if ix.same_as(row)), None)


def _tile_accumulator_rows(sch: Schedule, main: Any, plan: _Contraction) -> None:
    """Store the register tile's accumulator (``main``'s output after ``cache_write``) with its
    symbolic row axis split as ``[rows // t, t]``: its per-tile region is then provably in
    bounds and TVM compacts it to a tile of registers (with the rows' remainder predicate on
    the accumulator's original ``[rows, ...]`` shape it keeps a whole-output buffer)."""
    at = _row_index_at(sch.get(main), plan)
    if at is None:  # schedule_contraction plans without row tiles then
        raise ValueError("the row tile's accumulator is not indexed by the row iterator")
    tile = plan.reg_tile

    def split_rows(*idx: Any) -> list[Any]:
        return [x for d, v in enumerate(idx) for x in ((v // tile, v % tile) if d == at
                                                         else (v,))]

    sch.transform_layout(main, ("write", 0), split_rows, assume_injective_transform=True)


def _per_channel_input(block: Any, plan: _Contraction) -> str | None:
    """For a depthwise convolution (no reduction over input channels): the name of the input
    buffer read along the vectorized axis, else None. The input's indices other than the two
    spatial ones must be free of reduction iterators (a regular or grouped convolution sums
    over input channels there)."""
    if plan.reg is None or plan.channels or not plan.reg < plan.vec:
        return None
    ivars = [iv.var for iv in plan.block.iters]
    rvars = [v for v, k in zip(ivars, plan.block.kinds) if k == "R"]
    vvar = ivars[plan.vec]
    if not rvars or len(block.reads) < 2:
        return None
    plane = _work([plan.block.iters[plan.reg].dom.extent, plan.block.iters[plan.vec].dom.extent])
    if plane < STAGE_MIN_PLANE:
        return None
    found = None
    for ld in _loads(block.body.value):
        if ld.source.name == block.writes[0].source.name:
            continue
        if not _uses(ld.indices[-1], vvar):
            continue
        if len(ld.indices) < 4 or any(_uses(ix, r) for ix in ld.indices[:-2] for r in rvars):
            return None
        found = ld.source.name
    return found


def _stage_per_channel(sch: Schedule, main: Any, buffer_name: str, loop: Any,
                       stride: int) -> None:
    """Compute the padding producer of ``buffer_name`` under ``loop`` (one channel plane at a
    time) as a fill of the padding value plus a condition-free copy of the interior, both
    vectorized."""
    producers = [rv for rv in sch.get_producers(main)
                 if any(w.source.name == buffer_name for w in sch.get(rv).writes)]
    for rv in producers:
        sch.compute_at(rv, loop, preserve_unit_loops=False)
        parts = [rv]
        if _has_call(sch.get(rv).body, _IF_THEN_ELSE):
            inner = sch.get_loops(rv)
            at = _index_of([sch.get(lp) for lp in inner], sch.get(loop))
            if at is not None and at + 1 < len(inner):
                parts = [sch.decompose_padding(rv, inner[at + 1]), rv]
        if stride > 1:
            # De-interleaved destination: copy phase by phase, each phase contiguous.
            for part in parts:
                last = sch.get_loops(part)[-1]
                extent = _const(sch.get(last).extent)
                if extent is not None and extent % stride == 0:
                    outer, phase = sch.split(last, [None, stride])
                    sch.reorder(phase, outer)
        for part in parts:
            _vectorize_innermost(sch, part, below=loop, unroll_rest=False)


def _weights_smaller_than_input(block: Any, plan: _Contraction) -> bool:
    """Compare the operand broadcast along the vector axis (the filter) with the one read
    along it (the input feature map), by elements per batch item (symbolic dims count 1)."""
    vvar = plan.block.iters[plan.vec].var
    sizes = {True: 0, False: 0}
    for region in block.reads:
        if region.source.name == block.writes[0].source.name:
            continue
        reads_vec = any(_uses(r.min, vvar) for r in region.region)
        elements = 1
        for dim in region.source.shape:
            elements *= _const(dim) or 1
        sizes[reads_vec] = max(sizes[reads_vec], elements)
    if plan.channels:  # the filter is the operand read along the vector axis
        return 0 < sizes[True] <= sizes[False]
    return 0 < sizes[False] < sizes[True]


def _packed_operand(block: Any, plan: _Contraction) -> int | None:
    """For a matmul with at least 16 rows per batch (or a symbolic number): the index (in ``block.reads``) of the
    operand read along the vector axis but not the row axis (the weight-like one)."""
    if plan.reg is None or plan.prepacked:
        return None
    rows = _const(plan.block.iters[plan.reg].dom.extent)
    if rows is not None and rows < 16:
        return None  # (symbolic rows: a batch of row blocks, N * 128)
    vvar = plan.block.iters[plan.vec].var
    rvar = plan.block.iters[plan.reg].var
    for at, region in enumerate(block.reads):
        mins = [r.min for r in region.region]
        if any(_uses(m, vvar) for m in mins) and not any(_uses(m, rvar) for m in mins):
            return at
    return None


def _deinterleave(sch: Schedule, main: Any, buffer_name: str, stride: int, *,
                  iterate: bool = True) -> None:
    """A strided convolution reads its input at ``x * stride + rx``: store that input (the
    padding stage's output, or a copy of the parameter) as ``[..., w % stride, w // stride]``
    so that the vectorized output axis reads it contiguously."""
    block = sch.get(main)
    at = next((i for i, r in enumerate(block.reads) if r.source.name == buffer_name), None)
    if at is None:
        return
    buffer = block.reads[at].source
    width = _const(buffer.shape[-1])
    if width is None or width % stride:
        return  # the vector loads stay strided (gathers): slower, still correct
    producers = [rv for rv in sch.get_producers(main)
                 if any(w.source.same_as(buffer) for w in sch.get(rv).writes)]
    if not producers:
        producers = [sch.cache_read(main, at, "global")]
    ndim = len(buffer.shape)

    def split_width(*idx: Any) -> list[Any]:
        return [*idx[:-1], idx[-1] % stride, idx[-1] // stride]

    index_map = tirx.IndexMap.from_func(split_width, ndim=ndim)
    sch.transform_layout(producers[0], ("write", 0), index_map)
    if not iterate:
        return  # (staged per channel: _stage_per_channel orders the copy's loops)
    # Iterate the producers in the new layout too: contiguous writes in their innermost loop.
    for producer in producers:
        try:
            sch.transform_block_layout(producer, index_map)
        except ScheduleError:
            pass


def _split_padding(sch: Schedule, main: Any) -> None:
    """Padding stages feeding ``main`` become a fill of the border and a condition-free copy
    of the interior (vectorizable) instead of a bounds check per element."""
    for rv in sch.get_producers(main):
        if not _has_call(sch.get(rv).body, _IF_THEN_ELSE):
            continue
        loops = sch.get_loops(rv)
        if not loops:
            continue
        try:
            sch.decompose_padding(rv, loops[0])
        except ScheduleError:
            continue


def _plain_reads(block: Any) -> bool:
    """True when every operand index is a plain variable or constant (matmul-like), or a
    variable's quotient or remainder by a constant (a weight in column panels)."""
    for region in block.reads:
        for rng in region.region:
            index = rng.min
            if isinstance(index, (tirx.FloorDiv, tirx.FloorMod)) and _const(index.b):
                index = index.a
            if not (isinstance(index, tirx.Var) or _const(index) is not None):
                return False
    return True


def _feeds(sch: Schedule, producer: Any, consumer: Any) -> bool:
    # Compare the blocks, not the handles: every get_consumers call returns new SBlockRVs.
    block = sch.get(consumer)
    return any(sch.get(c).same_as(block) for c in sch.get_consumers(producer))


def _inline_epilogue_stages(sch: Schedule, main: Any) -> None:
    """compute_inline every injective block downstream of ``main`` that writes an
    intermediate buffer (not a parameter), first to last."""
    params = _param_buffers(sch)
    stage = [main]
    seen: list[Any] = []
    while stage:
        nxt = []
        for rv in stage:
            for c in sch.get_consumers(rv):
                blk = sch.get(c)
                if any(blk.same_as(b) for b in seen):
                    continue
                seen.append(blk)
                nxt.append(c)
        stage = nxt
    for blk in seen:
        if any(_index_of(params, w.source) is not None for w in blk.writes):
            continue
        if _has_call(blk.body, _IF_THEN_ELSE):
            continue
        try:
            sch.compute_inline(sch.get_sblock(blk.name_hint))
        except ScheduleError:
            pass


def _inline_consumers(sch: Schedule, block: Any) -> None:
    """Reverse-inline the elementwise consumer chain of ``block`` into it."""
    for _ in range(16):
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except ScheduleError:
            return


def _vectorize_innermost(sch: Schedule, block: Any, *, below: Any, unroll_rest: bool,
                         lanes: int | None = None) -> None:
    """Vectorize the innermost loop of ``block`` under the loop ``below`` (and unroll the other
    short loops there): the loops ``compute_at`` / ``reverse_compute_at`` created. With
    ``lanes``, an innermost loop of several SIMD vectors is split into unrolled vectors."""
    loops = sch.get_loops(block)
    anchor = sch.get(below)
    at = next((i for i, lp in enumerate(loops) if sch.get(lp).same_as(anchor)), None)
    if at is None:
        return
    if _has_call(sch.get(block).body, _IF_THEN_ELSE):
        return
    tile = [lp for lp in loops[at + 1:] if _const(sch.get(lp).extent) is not None]
    if not tile or len(tile) != len(loops) - at - 1:
        return
    last = tile[-1]
    extent = _const(sch.get(last).extent)
    if lanes and extent > lanes and extent % lanes == 0:
        outer, last = sch.split(last, [None, lanes])
        sch.unroll(outer)
        tile = [*tile[:-1], last]
    if _const(sch.get(last).extent) > 1:
        sch.vectorize(last)
    if unroll_rest:
        for lp in tile[:-1]:
            if 1 < _const(sch.get(lp).extent) <= 16:
                sch.unroll(lp)


# --- generic rule ------------------------------------------------------------------------------

def schedule_generic(sch: Schedule, target: Any) -> bool:
    """Inline injective producers, then run every remaining block's spatial loops in parallel
    and vectorize injective blocks' innermost loop. False when nothing could be done."""
    blocks = _blocks(sch)
    if blocks is None:
        return False
    params = _param_buffers(sch)
    for b in blocks:
        blk = sch.get(b.rv)
        if b.is_reduction or any(_index_of(params, w.source) is not None for w in blk.writes):
            continue
        if _has_call(blk.body, _IF_THEN_ELSE):
            continue  # padding: inlined, its bounds checks would run in the consumer's loops
        try:
            sch.compute_inline(b.rv)
        except ScheduleError:
            pass
    return _schedule_rest(sch, vector_bits(target)) > 0


def _schedule_rest(sch: Schedule, bits: int) -> int:
    """Parallelize/vectorize every root block that still has its original loop nest."""
    done = 0
    for b in _untouched_blocks(sch):
        if _schedule_block(sch, b, bits):
            done += 1
    return done


def _untouched_blocks(sch: Schedule) -> list[_Block]:
    """Root-level blocks whose loop nest is still one serial loop per block iterator, each
    bound directly to its loop variable, with the block alone under the nest."""
    func = sch.mod["main"]
    try:
        root = sch.get_sblock(func.body.block.name_hint)
    except (AttributeError, ScheduleError):
        return []
    kinds_of = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    found = []
    for rv in sch.get_child_blocks(root):
        block = sch.get(rv)
        loops = sch.get_loops(rv)
        iters = list(block.iter_vars)
        if not loops or len(loops) != len(iters):
            continue
        if len(sch.get_child_blocks(loops[0])) != 1:
            continue
        fors = [sch.get(lp) for lp in loops]
        if any(f.kind != tirx.ForKind.SERIAL for f in fors):
            continue
        realize = fors[-1].body
        values = list(getattr(realize, "iter_values", []))
        if len(values) != len(iters) or not all(
                v.same_as(f.loop_var) for v, f in zip(values, fors)):
            continue
        kinds = "".join(kinds_of.get(i.iter_type, "O") for i in iters)
        found.append(_Block(rv, list(loops), iters, kinds))
    return found


def _schedule_block(sch: Schedule, b: _Block, bits: int) -> bool:
    loops = b.loops
    kinds = b.kinds
    if "O" in kinds:
        return False
    first_r = kinds.find("R")
    if first_r >= 0 and "S" in kinds[first_r:]:
        return False  # reductions interleaved with spatial loops: leave as is
    n_spatial = first_r if first_r >= 0 else len(kinds)
    if n_spatial == 0:
        return False
    extents = [sch.get(lp).extent for lp in loops]
    work = _work(extents)
    block = sch.get(b.rv)
    spatial = loops[:n_spatial]
    vector = None
    if first_r < 0 and not _has_call(block.body, _IF_THEN_ELSE):
        dtype = block.writes[0].source.dtype if block.writes else "float32"
        lanes = max(1, bits // max(8, tvm.DataType(str(dtype)).bits))
        last = _const(extents[n_spatial - 1])
        if last is not None and last % lanes == 0 and last >= lanes:
            outer_last, vector = sch.split(spatial[-1], [None, lanes])
            spatial = spatial[:-1] + [outer_last]
    changed = vector is not None
    if vector is not None:
        sch.vectorize(vector)
    if work >= PARALLEL_MIN_WORK:
        # Injective blocks keep their innermost loop whole (no div/mod per element) when the
        # outer loops alone give the threads enough chunks.
        outer = spatial
        if first_r < 0 and len(spatial) > 1 and _work(extents[:len(spatial) - 1]) >= 16:
            outer = spatial[:-1]
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)
        changed = True
    if first_r == len(kinds) - 1 and _vectorize_reduction(sch, b.rv, loops[-1], bits):
        changed = True
    return changed


def _vectorize_reduction(sch: Schedule, block: Any, loop: Any, bits: int) -> bool:
    """A float32 reduction over its innermost loop (softmax's max and sum, layer-norm
    statistics): ``rfactor`` into one partial result per SIMD lane, accumulated with vector
    instructions, then the lanes reduced once per output, in the same loop nest (the partials
    stay in registers). Changes the summation order (lane by lane, then across lanes); skipped when
    the extent is not a multiple of the lanes or shorter than two vectors."""
    blk = sch.get(block)
    if len(blk.writes) != 1 or str(blk.writes[0].source.dtype) != "float32":
        return False
    if not isinstance(blk.body, tirx.BufferStore):
        return False
    lanes = bits // 32
    extent = _const(sch.get(loop).extent)
    if extent is None or extent % lanes or extent < 2 * lanes:
        return False
    depth = len(sch.get_loops(block)) - 1  # loops above the reduction (anchor innermost)
    try:
        _, lane = sch.split(loop, [None, lanes])
        partial = sch.rfactor(lane, factor_axis=len(blk.writes[0].region))
    except ScheduleError:
        return False
    # rfactor gives the partial block the original loops and the final one copies of them
    sch.reverse_compute_at(block, sch.get_loops(partial)[depth - 1], preserve_unit_loops=False)
    sch.set_scope(partial, 0, "local")
    inner = sch.get_loops(partial)
    sch.vectorize(inner[-1])
    sch.decompose_reduction(partial, inner[-2])
    return True
