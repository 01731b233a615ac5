"""MetaSchedule tuning for CPU builds: tune the kernels of a Relax module, keep the results in a
persistent JSON database, and compile the module with the best schedules found.

Why it is shaped like this (measured with TVM 0.27 on a 2-core znver3; see the tune_probe
benchmark and ../shared/TVM_NOTES.md):

* Symbolic dimensions cannot be tuned. Kernels with a symbolic extent (the batch "N" of our
  ONNX models) are extracted as tasks, but MetaSchedule's search aborts the whole run on them
  (``parallel_for_dynamic ... Check failed: (old_rv != nullptr && new_rv != nullptr)`` while
  sampling the initial population) and its CPU post-processor ``DisallowDynamicLoop`` rejects
  any schedule with a symbolic loop anyway. A record tuned for N=64 is keyed by the structural
  hash of the N=64 kernel, so it never matches the symbolic kernel either.
  So a module whose ``main`` has symbolic dims is *bucketed*: ``main`` is specialised to each
  concrete value in ``buckets`` (default N=1 and N=64), the specialised copies are tuned, and a
  new ``main`` dispatches on the runtime shape (``if N == 1 ... elif N == 64 ... else``) to the
  tuned copy, or to the untouched symbolic function for every other size. One executable, one
  entry point, any batch size; only the bucket sizes are fast.
* The builder builds in this process (``InProcessBuilder``): ``LocalBuilder`` spawns a fresh
  worker pool for every batch and each worker re-imports ``tvm.s_tir.tensor_intrin``.
* The measurements run in ``LocalRunner``'s one persistent worker process, so a kernel that
  crashes (e.g. SIGILL when the target's ISA is newer than this CPU) cannot take us down.
* The database is applied to the legalized, fused module the tasks were extracted from
  (prepared once: extraction does not change it; TVM_NOTES: a module scheduled with dlight
  first then kept dlight's schedules, so nothing schedules it before the database). Kernels the
  database does not cover get lepton-edge's default schedules (lowering/schedules.py).
* Kernels MetaSchedule's runner cannot measure are not tasks: symbolic shapes (above), scalar
  parameters, and gathers whose indices come from a buffer (the runner fills buffers with
  random values: out-of-bounds reads crash its worker, which is then restarted per trial).
  Nor are kernels without a reduction axis (reshapes, transposes, elementwise chains): their
  schedule space is nearly empty, and MetaSchedule kept re-searching it for unmeasured
  candidates (6 s a round, forever, on a BERT-sized model); default schedules serve them.
  A kernel's failed measurements count towards its share, so it is not retried on every
  compile.
* A kernel keeps its default schedule (lowering/schedules.py) unless a tuned one beat it:
  the default is measured first and stored as a record, and after tuning the best tuned
  record is run head to head against it (``_confirm_against_defaults``; one early
  measurement of the default lost to candidates measured at quieter moments on this shared
  machine). With 256 trials for BERT-base most matmuls keep their default schedules.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from lepton_edge.errors import TargetError

Log = Callable[[str], None]

#: Batch sizes a symbolic dimension is specialised to when the caller names none.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 64)
#: Batch sizes an untuned CPU build gets a static entry function for (BatchEntries).
UNTUNED_BUCKETS: tuple[int, ...] = (1,)
#: MetaSchedule measures at most this many candidates of one task per round.
MAX_TRIALS_PER_ROUND = 64
DATABASE_FILES = ("database_workload.json", "database_tuning_record.json")


class TuningError(TargetError):
    """Tuning or building from the tuning database failed."""


def default_database_dir(target: tvm.target.Target) -> Path:
    """``~/.cache/lepton-edge/tuning/<target-hash>/``; the hash covers the target and TVM version,
    because records are only valid for the code generator and CPU they were measured with."""
    return Path.home() / ".cache" / "lepton-edge" / "tuning" / target_hash(target)


def target_hash(target: tvm.target.Target) -> str:
    """A short stable hash of the target's attributes and the TVM version."""
    text = json.dumps([str(tvm.__version__), _target_dict(target)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def count_records(database_dir: Path) -> int:
    """How many tuning records (measured schedules, failed ones included) the database holds."""
    path = Path(database_dir) / DATABASE_FILES[1]
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for line in f if line.strip())


def symbolic_vars(mod: tvm.IRModule, func: str = "main") -> list[Any]:
    """The symbolic dimensions (tir Vars) in the tensor parameters of ``mod[func]``, in order."""
    found: dict[str, Any] = {}
    for param in mod[func].params:
        shape = getattr(param.ty, "shape", None)
        for dim in getattr(shape, "values", None) or []:
            if isinstance(dim, tvm.tirx.Var) and dim.name not in found:
                found[dim.name] = dim
    return list(found.values())


def specialize(mod: tvm.IRModule, buckets: Mapping[str, Sequence[int]]) -> tvm.IRModule:
    """Rewrite ``main`` into a shape dispatcher over copies specialised to each bucket.

    Each combination of bucket values gets a private copy ``main_<var><value>...`` with the
    symbolic vars bound to constants (tunable; see :func:`add_bound_copy`); any other shape
    goes to ``main_generic``, the original symbolic function (default schedules). Inputs and
    outputs of ``main`` keep their symbolic types, so callers see no difference.
    """
    main = mod["main"]
    syms = {v.name: v for v in symbolic_vars(mod)}
    unknown = sorted(set(buckets) - set(syms))
    if unknown:
        raise TuningError(f"bucket for {unknown}, but main's symbolic dims are {sorted(syms)}")
    names = [n for n in syms if n in buckets and buckets[n]]
    if not names:
        return mod
    for name in names:
        bad = [b for b in buckets[name] if not isinstance(b, int) or b < 1]
        if bad:
            raise TuningError(f"bucket sizes for '{name}' must be positive integers, got {bad}")

    # The module's other functions (kernels main already calls, e.g. the int8 lowering's
    # requantize kernels) keep their GlobalVars: main refers to them by identity.
    generic_func = copy_with_new_vars(main.without_attr("global_symbol"))
    mod, generic = _with_function(mod, generic_func, "main_generic")
    params = [relax.Var(p.name, p.ty) for p in main.params]
    cases = []
    for values in itertools.product(*(sorted(set(buckets[n])) for n in names)):
        binding = dict(zip(names, values, strict=True))
        mod, gv = add_bound_copy(mod, binding, "main_" + bound_suffix(binding), source=main)
        cond = None
        for n, v in binding.items():
            # Relax shape variables are always int64.
            eq = tvm.tirx.EQ(syms[n], tvm.tirx.IntImm("int64", v))
            cond = eq if cond is None else tvm.tirx.And(cond, eq)
        cases.append((cond, gv))

    def _call(gv: Any, ty: Any | None) -> Any:
        out = relax.Var("out", ty) if ty is not None else relax.Var("out")
        return relax.SeqExpr([relax.BindingBlock([relax.VarBinding(out, relax.Call(gv, params))])],
                             out)

    body = _call(generic, main.ret_ty)
    for cond, gv in reversed(cases):
        body = relax.If(relax.prim_value(cond), _call(gv, None), body)
    result = relax.Var("result", main.ret_ty)
    # The branches return different static shapes; match_cast restores main's symbolic type.
    seq = relax.SeqExpr([relax.BindingBlock([relax.MatchCast(result, body, main.ret_ty)])], result)
    dispatcher = relax.Function(params, seq, main.ret_ty, is_pure=main.is_pure)
    for key, value in main.attrs.items():
        dispatcher = dispatcher.with_attr(key, value)
    bb = relax.BlockBuilder(mod)
    bb.update_func(mod.get_global_var("main"), dispatcher)
    return relax.transform.Normalize()(bb.get())


class BatchEntries:
    """Static entry functions for an untuned CPU build (issue #7): a module pass that adds to
    the fused module a public copy ``main_<batch><size>`` of ``main`` per batch size, with
    the batch bound to that size, and keeps one record per entry in ``made`` for the build's
    meta (``{"function", "batch", "inputs", "batch_input"}``: the entry's static input
    shapes, and the first input whose leading dim is the batch). ``main`` is untouched.

    Why: a symbolic batch makes the Relax VM compute shapes and allocate storage on every
    call; a function with static shapes gets static memory planning instead (digits CNN at
    batch 1: 2-3 us of its 14-19 us in the VM). The runtime calls an entry for inputs of
    exactly its shapes and ``main`` for any other (targets/cpu/device.py); unlike
    :func:`specialize`'s in-VM dispatcher, which cost ~1 us per call at the other sizes, that
    costs them nothing.

    The pass runs after FuseOps/FuseTIR (schedules.cpu_pipeline's ``after_fusion``): the
    entries call the very kernels ``main`` calls (symbolic in the batch, which TVM runs with
    static arguments as well), so a build compiles each kernel once (compile time and library
    size as before; a copy made before fusion had its own kernels: 1.5-2.3x the compile
    time), and an entry's outputs are bit-identical to ``main``'s. No entry is added unless
    ``main`` has exactly one symbolic dim and it leads an input (the batch), so the entries
    are static. A failure only costs speed: the build goes on without entries, and
    ``error`` says why.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        bad = [n for n in sizes if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if bad:
            raise TuningError(f"batch sizes must be positive integers, got {bad}")
        self.sizes = tuple(sorted(set(sizes)))
        self.made: list[dict[str, Any]] = []
        self.error: str | None = None

    def __call__(self, mod: tvm.IRModule) -> tvm.IRModule:
        syms = symbolic_vars(mod)
        if not self.sizes or len(syms) != 1:
            return mod
        var = syms[0]
        shapes = [getattr(getattr(p.ty, "shape", None), "values", None)
                  for p in mod["main"].params]
        if any(s is None for s in shapes) or not any(s and s[0].same_as(var) for s in shapes):
            return mod  # a parameter of unknown rank, or the one symbolic dim is no batch
        slot = next(i for i, s in enumerate(shapes) if s and s[0].same_as(var))
        names = {gv.name_hint for gv in mod.get_global_vars()}
        made = []
        out = mod
        try:
            for size in self.sizes:
                name = "main_" + bound_suffix({var.name: size})
                if name in names:
                    raise TuningError(f"the module already has a function '{name}'")
                out, gv = add_bound_copy(out, {var.name: size}, name, public=True,
                                         kernels=False)
                static = [[int(d) for d in p.ty.shape.values] for p in out[gv].params]
                made.append({"function": name, "batch": size, "inputs": static,
                             "batch_input": slot})
        except Exception as exc:  # noqa: BLE001 - TVM raises anything; main still runs
            self.error = _last_line(exc)
            return mod
        self.made = made
        return out

    def as_pass(self) -> tvm.transform.Pass:
        return tvm.transform.module_pass(lambda mod, _ctx: self(mod), opt_level=0,
                                         name="LeptonBatchEntries")


def bound_suffix(binding: Mapping[str, int]) -> str:
    """``{"N": 1}`` -> ``"N1"``, ``{"x_dim0": 1}`` -> ``"x_dim0_1"``: the suffix of a bound
    copy's name (non-word characters of a dim's name become ``_``)."""
    parts = []
    for name, value in binding.items():
        name = re.sub(r"[^0-9A-Za-z_]", "_", name)
        parts.append(f"{name}{'_' if name[-1:].isdigit() else ''}{value}")
    return "_".join(parts)


def add_bound_copy(mod: tvm.IRModule, binding: Mapping[str, int], name: str, *,
                   public: bool = False, source: Any = None, kernels: bool = True
                   ) -> tuple[tvm.IRModule, Any]:
    """Add to ``mod`` a copy of ``main`` (or of ``source``) named ``name`` whose symbolic dims
    are bound to the constants in ``binding``; return the new module and the copy's GlobalVar.

    With ``kernels`` (before fusion: tuned builds), the kernels the copy calls with
    ``call_tir`` whose buffers have symbolic shapes are copied too (``<kernel>_<suffix>``),
    specialised to the static shapes of their call sites: TVM 0.27's FuseTIR refuses a
    symbolic kernel called with static shapes ("Inconsistent buffers ... mapped to the same
    relax var"), and static kernels are what tuning needs. Without, the copy calls the same
    kernels as ``main``. A ``public`` copy keeps a ``global_symbol`` (the VM can call it by
    name); otherwise it is private.
    """
    func = mod["main"] if source is None else source
    syms = {v.name: v for v in symbolic_vars(tvm.IRModule({"main": func}))}
    values = {syms[n]: tvm.tirx.IntImm("int64", int(v)) for n, v in binding.items() if n in syms}
    bound = copy_with_new_vars(func.bind_symbolic_vars(values)).without_attr("global_symbol")
    if kernels:
        mutator_ = _call_site_specialiser(mod, bound_suffix(binding))
        bound = mutator_.visit_expr(bound)
        builder = mutator_.builder_
    else:
        builder = relax.BlockBuilder(mod)
    if public:
        bound = bound.with_attr("global_symbol", name)
    gv = builder.add_func(bound, name)
    return builder.get(), gv


def copy_with_new_vars(func: Any) -> Any:
    """``func`` with fresh Relax variables: two functions of one module must not share any."""
    from tvm.relax.utils import copy_with_new_vars as _fresh

    return _fresh(func)


def _with_function(mod: tvm.IRModule, func: Any, name: str) -> tuple[tvm.IRModule, Any]:
    bb = relax.BlockBuilder(mod)
    gv = bb.add_func(func, name)
    return bb.get(), gv


def _call_site_specialiser(mod: tvm.IRModule, suffix: str) -> Any:
    """A PyExprMutator over ``mod`` that points each ``call_tir`` of a kernel with symbolic
    buffer shapes at a copy of that kernel specialised to the call's static shapes."""
    from tvm.relax.expr_functor import PyExprMutator, mutator
    from tvm.tirx.buffer import BufferType

    call_tir = tvm.ir.Op.get("relax.call_tir")
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and _symbolic_buffers(f)}
    made: dict[tuple[str, str], tuple[Any, bool]] = {}
    from tvm.sym import Analyzer

    analyzer = Analyzer()

    def simplify(value: Any) -> Any:
        try:
            return analyzer.simplify(value)
        except (TypeError, ValueError, tvm.TVMError):  # not an integer expression: as it is
            return value

    def static_shape(sinfo: Any) -> list[int] | None:
        shape = getattr(sinfo, "shape", None)
        values = getattr(shape, "values", None)
        if values is None or not all(isinstance(d, tvm.tirx.IntImm) for d in values):
            return None
        return [int(d) for d in values]

    @mutator
    class Specialiser(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if call.op != call_tir or not isinstance(call.args[0], tvm.ir.GlobalVar):
                return call
            kernel = kernels.get(call.args[0].name_hint)
            if kernel is None:
                return call
            args = call.args[1]
            args = list(args.fields) if isinstance(args, relax.Tuple) else [args]
            out = call.ty_args[0]
            outs = list(out.fields) if isinstance(out, relax.TupleType) else [out]
            # what each parameter receives, in order: the arguments (tensors, or scalars such
            # as the batch an int8 encoder's requantization over N * 16 rows takes), the
            # outputs, then the tir_vars
            feed: list[Any] = [static_shape(a.ty) if isinstance(a.ty, relax.TensorType) else a
                               for a in args]
            feed += [static_shape(o) for o in outs]
            feed += list(call.args[2].values) if len(call.args) > 2 else []
            # a compound scalar whose parts are constants here (N * 2 at N = 1) counts as
            # its value: simplified, it is an IntImm like the others
            feed = [v if v is None or isinstance(v, (list, tvm.tirx.IntImm)) else simplify(v)
                    for v in feed]
            params = list(kernel.params)
            if len(feed) != len(params) or any(v is None for v in feed):
                return call  # still symbolic somewhere: left as it is
            scalars: dict[Any, Any] = {}
            for param, value in zip(params, feed, strict=True):
                if isinstance(value, list) != isinstance(param.ty, BufferType):
                    return call
                if not isinstance(value, list):
                    if not isinstance(value, tvm.tirx.IntImm):
                        return call
                    scalars[param] = tvm.tirx.IntImm(_dim_dtype(param), int(value))
            key = (call.args[0].name_hint,
                   repr([v if isinstance(v, list) else int(v) for v in feed]))
            if key not in made:
                # scalars first (buffer dimensions such as N * 16 become constants), then
                # the buffers whose dimensions are still variables
                special = kernel.specialize(scalars) if scalars else kernel
                param_map: dict[Any, Any] = {}
                buffers = [p for p in special.params if isinstance(p.ty, BufferType)]
                for param, shape in zip(buffers, [v for v in feed if isinstance(v, list)],
                                        strict=True):
                    buf = param.ty
                    if all(isinstance(d, tvm.tirx.IntImm) for d in buf.shape):
                        continue
                    dims = [d if isinstance(d, tvm.tirx.IntImm) else
                            tvm.tirx.IntImm(_dim_dtype(d), v)
                            for d, v in zip(buf.shape, shape, strict=True)]
                    param_map[param] = tvm.tirx.decl_buffer(
                        dims, buf.dtype, param.name, elem_offset=buf.elem_offset,
                        data_alignment=buf.data_alignment, offset_factor=buf.offset_factor)
                special = special.specialize(param_map) if param_map else special
                made[key] = (self.builder_.add_func(
                    special, f"{call.args[0].name_hint}_{suffix}"), bool(scalars))
            kernel_gv, bound = made[key]
            # scalars bound into the copy (and so its tir_vars) are no longer passed
            rest = ([relax.Tuple([a for a in args if isinstance(a.ty, relax.TensorType)])]
                    if bound else list(call.args[1:]))
            return relax.Call(call.op, [kernel_gv, *rest], call.attrs, call.ty_args)

    return Specialiser(mod)


def _dim_dtype(dim: Any) -> str:
    """The integer type of a symbolic dimension or scalar parameter (``.dtype`` raises on a
    tirx Var)."""
    return str(getattr(getattr(dim, "ty", None), "dtype", "int64"))


def _symbolic_buffers(kernel: Any) -> bool:
    return any(not isinstance(d, tvm.tirx.IntImm) for p in kernel.params
               for d in getattr(p.ty, "shape", None) or [])


def tune_and_build(
    mod: tvm.IRModule,
    target: tvm.target.Target,
    *,
    trials: int,
    database_dir: Path | None,
    log: Log | None = None,
    buckets: Mapping[str, Sequence[int]] | None = None,
) -> tvm.runtime.Executable:
    """Tune ``mod``'s kernels with MetaSchedule and compile it with the tuned schedules.

    ``trials`` is the number of *new* measurements allowed, shared evenly between the tunable
    kernels (those with a reduction axis and static shapes), plus one measurement of each new
    kernel's default schedule, stored as a record too, so that the build keeps the default
    schedule unless tuning found a faster one. Kernels that already have that share of
    records (failed ones included) in the database are not tuned again, so a second call with
    the same workloads measures nothing. ``trials=0`` only
    applies what the database has. ``database_dir`` defaults to :func:`default_database_dir`.
    ``buckets`` maps symbolic dims of ``main`` to the sizes to specialise and tune for (default:
    every symbolic dim to ``DEFAULT_BUCKETS``; an empty mapping turns specialisation off and
    leaves symbolic kernels untuned). Raises :class:`TuningError` on any failure.
    """
    say: Log = log or (lambda _msg: None)
    if trials < 0:
        raise TuningError(f"trials must be >= 0, got {trials}")
    if not isinstance(target, tvm.target.Target):
        raise TuningError(f"target must be a tvm.target.Target, got {type(target).__name__}")
    if target.kind.name != "llvm":
        raise TuningError(f"tuning supports LLVM (CPU) targets only, not '{target.kind.name}'")
    target = _with_num_cores(target, say)
    db_dir = Path(database_dir) if database_dir is not None else default_database_dir(target)
    try:
        db_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TuningError(f"cannot create the tuning database folder {db_dir}: {exc}") from exc

    if buckets is None:
        buckets = {v.name: DEFAULT_BUCKETS for v in symbolic_vars(mod)}
    if buckets:
        say("specialising " + ", ".join(f"{n} to {list(b)}" for n, b in buckets.items())
            + "; other sizes run untuned kernels")
        try:
            mod = specialize(mod, buckets)
        except TuningError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise TuningError(f"cannot specialise main to {dict(buckets)}: {_last_line(exc)}"
                              ) from exc

    # after specialisation, so the packed int8 kernels of each bucket have static shapes
    from lepton_edge.lowering import x86_int8

    if x86_int8.use_dot_kernels(target):
        # VNNI: the untuned build's kernel choice (pixel kernels for stems, 1x1 and 8-wide
        # convolutions, depthwise / pool planes: hand-scheduled, kept out of MetaSchedule's
        # tasks below; the other convolutions and the matmuls in the [.., 16, 4] layout that
        # MetaSchedule tiles around the intrinsic). AVX2 forced on (LEPTON_X86_INT8_DOT=on):
        # every kernel in that layout.
        intrin = _x86_dot_intrinsic(target)
        vnni = intrin == x86_int8.INTRIN_VNNI
        mod, packed = x86_int8.pack_int8_kernels(mod, target if vnni else None)
        if packed:
            say(f"x86 int8: {len(packed)} packed uint8 x int8 kernel(s), tuned with the "
                f"{intrin} tensor intrinsic" + (" where MetaSchedule can tile them"
                                                 if vnni else ""))
    elif x86_int8.use_dot_kernels(target, untuned=True):
        # AVX2 without VNNI: the untuned build's kernels (int16 `vpmaddwd`, exact
        # `vpmaddubsw`, depthwise planes), which keep their hand-written schedules: MetaSchedule
        # has no space for them, and its generic int8 schedules were slower
        mod, packed = x86_int8.pack_int8_kernels(mod, target)
        if packed:
            say(f"x86 int8: {len(packed)} AVX2 int8 kernel(s) packed; they keep their "
                "default schedules")

    from tvm.s_tir import meta_schedule as ms

    # Records of packed int8 kernels name lepton-edge's tensor intrinsics, and reading the
    # database replays them: registered first, whatever this model is (a float32 model
    # compiled in a fresh process with a database that an int8 one filled failed here,
    # "TensorIntrin ... is not registered", and fell back to onnxruntime)
    x86_int8.register_intrinsics()
    try:
        database = ms.database.JSONDatabase(work_dir=str(db_dir), module_equality="structural")
    except Exception as exc:  # noqa: BLE001 - e.g. a truncated JSON line
        raise TuningError(f"cannot read the tuning database in {db_dir}: {_last_line(exc)}; "
                          "delete the folder to start afresh") from exc
    before = len(database)
    started = time.perf_counter()
    # Prepared once: the tasks are extracted from, and the database applied to, the same
    # module (preparing twice cost a BERT-base-sized model 9-25 s of FoldConstant before
    # relax.fold_constant_calls took that work over).
    prepared = _prepare(mod, target, log)
    say(f"legalized and fused in {time.perf_counter() - started:.1f} s")
    if trials > 0:
        tasks = _tunable_tasks(prepared, target, say)
        _tune(tasks, target, database, trials, say)
    say(f"database {db_dir}: {len(database)} records ({len(database) - before} new)")

    started = time.perf_counter()
    executable = _build(prepared, target, database, db_dir, say)
    say(f"compiled with the tuning database in {time.perf_counter() - started:.1f} s")
    return executable


def _prepare(mod: tvm.IRModule, target: tvm.target.Target, log: Log | None = None
             ) -> tvm.IRModule:
    """Legalize and fuse: the kernels after this are the tuning tasks, and building must run the
    very same passes so that the database keys (structural hashes) match."""
    from tvm.relax import pipeline

    from lepton_edge.lowering.relax import legalize_passes
    from lepton_edge.lowering.schedules import ConvertConvLayout, PackConvWeights, VectorMath

    try:
        with target:
            return tvm.transform.Sequential([
                # the untuned build's convolution layouts (float32 convolutions in NCHWc,
                # other constant filters packed), so a tuned convolution competes with the
                # same kernel's default schedule, not with a slower NCHW one. Matmul weights
                # stay unpacked, as tuned builds always had them (MetaSchedule on the packed
                # matmul kernels has not been tried)
                ConvertConvLayout(target, log),
                PackConvWeights(target, log, matmuls=False),
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
                VectorMath(),  # erf / softmax without libm calls (lowering/schedules.py)
                *pipeline.library_dispatch_passes(target),
                *legalize_passes(),  # TVM's, FoldConstant only if needed
                # Reshapes become VM builtins when lowering: not kernels worth trials.
                relax.transform.RewriteDataflowReshape(),
            ])(mod)
    except Exception as exc:  # noqa: BLE001 - TVM raises anything; name the step
        raise TuningError(f"TVM could not legalize the module for tuning: {_last_line(exc)}"
                          ) from exc


def _tunable_tasks(mod: tvm.IRModule, target: tvm.target.Target, say: Log) -> list[Any]:
    """MetaSchedule's tasks for ``mod``, minus those it cannot tune (symbolic shapes)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        tasks = ms.relax_integration.extract_tasks(mod, target)
    except Exception as exc:  # noqa: BLE001
        raise TuningError(f"MetaSchedule could not extract tasks: {_last_line(exc)}") from exc
    static = [t for t in tasks if not _is_symbolic(t.dispatched[0]["main"])]
    skipped = [t.task_name for t in tasks if _is_symbolic(t.dispatched[0]["main"])]
    if skipped:
        say(f"{len(skipped)} kernel(s) with symbolic shapes or scalar parameters stay untuned: "
            f"{', '.join(skipped)}")
    # The runner fills every buffer with random values: a gather whose indices are such a buffer
    # reads out of bounds and kills the measuring process (then restarted: seconds per trial).
    indirect = [t.task_name for t in static if _has_data_dependent_index(t.dispatched[0]["main"])]
    if indirect:
        say(f"{len(indirect)} kernel(s) with data-dependent indices (gathers) stay untuned: "
            f"{', '.join(indirect)}")
    # MetaSchedule's search stops the whole run on a let-bound expression ("Do not have a
    # default for prim.Let": VectorMath's exp/erf share their intermediates that way, e.g.
    # every softmax): those kernels keep their (vectorized) default schedules.
    let_bound = [t.task_name for t in static if t.task_name not in indirect
                 and _has_let(t.dispatched[0]["main"])]
    if let_bound:
        say(f"{len(let_bound)} kernel(s) with let-bound math (exp, erf) keep the default "
            f"schedules: {', '.join(let_bound)}")
    # The AVX2 int8 kernels and the VNNI pixel / plane kernels of lowering/x86_int8.py (all
    # packed kinds except the plain uint8 ones that _space_generator tiles around the
    # dot-product intrinsic) are scheduled by hand.
    hand = [t.task_name for t in static if t.task_name not in indirect + let_bound
            and _hand_scheduled_int8(t.dispatched[0])]
    if hand:
        from lepton_edge.lowering.x86_int8 import INTRIN_VNNI

        isa = "VNNI" if _x86_dot_intrinsic(target) == INTRIN_VNNI else "AVX2"
        say(f"{len(hand)} {isa} int8 kernel(s) keep their default schedules: "
            f"{', '.join(hand)}")
    excluded = indirect + let_bound + hand
    flat = [t.task_name for t in static if t.task_name not in excluded
            and not _has_reduction(t.dispatched[0]["main"])]
    if flat:
        say(f"{len(flat)} kernel(s) without a reduction keep the default schedules: "
            f"{', '.join(flat)}")
    return [t for t in static if not t.mod.attrs.get("tirx.is_scheduled", False)
            and t.task_name not in excluded and t.task_name not in flat]


# Fields of TIR statements and expressions that hold children (TVM 0.27 has no Python visitor).
_TIR_CHILDREN = ("block", "body", "init", "seq", "value", "indices", "args", "a", "b",
                 "condition", "then_case", "else_case", "true_value", "false_value",
                 "iter_values", "min", "extent")


def _tensor_loads(node: Any) -> list[Any]:
    """Every buffer load under ``node`` (a TIR statement, expression or list of them)."""
    from tvm.ir.expr import TensorLoad

    return _tir_nodes(node, lambda n: isinstance(n, TensorLoad))


def _has_reduction(func: Any) -> bool:
    """Whether any block of the kernel has a reduction axis (matmul, softmax, layer norm).
    Kernels without one (reshapes, transposes, elementwise chains) have almost no schedule
    space: MetaSchedule finds one candidate, then spends every later round of the task
    searching for an unmeasured one in vain (5-7 s each on a BERT-sized model here)."""
    return bool(_tir_nodes(func.body, lambda n: type(n).__name__ == "SBlock" and any(
        int(iv.iter_type) == _COMM_REDUCE for iv in n.iter_vars)))


_COMM_REDUCE = 2  # tvm.tirx.IterVar.CommReduce


def _tir_nodes(node: Any, wanted: Callable[[Any], bool]) -> list[Any]:
    """Every TIR node under ``node`` (a statement, expression or list) that is ``wanted``."""
    found, stack = [], [node]
    while stack:
        cur = stack.pop()
        if cur is None or isinstance(cur, int | float | str):
            continue
        if isinstance(cur, list | tuple) or type(cur).__name__ == "Array":
            stack.extend(cur)
            continue
        if wanted(cur):
            found.append(cur)
        for name in _TIR_CHILDREN:
            try:
                child = getattr(cur, name, None)
            except Exception:  # noqa: BLE001 - some nodes raise on unknown attributes
                child = None
            if child is not None:
                stack.append(child)
    return found


def _has_let(func: Any) -> bool:
    """Whether the kernel has a let-bound expression (``tirx.Let``)."""
    return bool(_tir_nodes(func.body, lambda n: type(n).__name__ == "Let"))


def _has_data_dependent_index(func: Any) -> bool:
    """Whether the kernel indexes a buffer with values loaded from another (Gather, take)."""
    return any(_tensor_loads(list(load.indices)) for load in _tensor_loads(func.body))


def _is_symbolic(func: Any) -> bool:
    """Whether a kernel has a buffer parameter with a non-constant dimension or a scalar
    parameter (TVM 0.27's PrimFunc parameters are buffer-typed Vars; scalar parameters, such as
    the symbolic batch passed to a ``shape_to_tensor`` kernel, have no ``shape``, and
    MetaSchedule's runner cannot make arguments for them: "Unsupported argument type")."""
    for param in func.params:
        shape = getattr(param, "shape", None)
        if shape is None:
            return True
        if any(not isinstance(d, tvm.tirx.IntImm) for d in shape):
            return True
    return False


def _tune(tasks: list[Any], target: tvm.target.Target, database: Any, trials: int, say: Log
          ) -> None:
    """Spend at most ``trials`` new measurements, an even share per task not yet tuned."""
    from tvm.s_tir import meta_schedule as ms

    if not tasks:
        say("no tunable kernels")
        return
    share = max(1, trials // len(tasks))
    tried = _records_per_task(database, tasks)
    pending, budget = [], 0
    for task, have in zip(tasks, tried, strict=True):
        # Failed measurements count: a kernel whose candidates all fail is not measured again
        # on every compile (that made the second compile tune, and fail, again).
        if have < share:
            pending.append(task)
            budget += share - have
    budget = min(budget, trials)
    if not pending:
        say(f"all {len(tasks)} kernels already have {share} record(s) in the database: "
            "nothing to tune")
        return
    cost_model = "xgb" if importlib.util.find_spec("xgboost") else "random"
    say(f"tuning {len(pending)} of {len(tasks)} kernels, {budget} trials "
        f"(up to {share} per kernel, cost model {cost_model})")
    if cost_model == "random":
        say("xgboost is not installed: MetaSchedule picks candidates at random, which needs "
            "more trials for the same speed")

    cores = int(target.attrs["num-cores"])
    per_round = min(share, MAX_TRIALS_PER_ROUND)
    progress = _Progress([t.task_name for t in pending], say)
    with _lean_tensor_intrin_import(), tempfile.TemporaryDirectory(prefix="lepton-tune-") as tmp:
        task_logger = _task_logger(Path(tmp) / "tasks.log")
        contexts = [
            ms.TuneContext(
                mod=task.dispatched[0],
                target=task.target,
                space_generator=_space_generator(task.dispatched[0], task.target),
                search_strategy=ms.search_strategy.EvolutionarySearch(
                    population_size=256,
                    init_min_unmeasured=min(50, 4 * per_round),
                    genetic_num_iters=4 if cost_model == "xgb" else 1,
                ),
                task_name=task.task_name,
                logger=task_logger,
                rand_state=index + 1,
                num_threads=cores,
            ).clone()
            for index, task in enumerate(pending)
        ]
        started = time.perf_counter()
        try:
            runner = ms.runner.LocalRunner(
                timeout_sec=30,
                evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=30),
            )
            fresh = [t for t, have in zip(tasks, tried, strict=True) if have == 0]
            baselines = _measure_default_schedules(fresh, target, database, runner, say)
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=[float(t.weight) for t in pending],
                work_dir=tmp,
                max_trials_global=budget,
                max_trials_per_task=share,
                num_trials_per_iter=per_round,
                builder=InProcessBuilder(),
                runner=runner,
                database=database,
                cost_model=ms.cost_model.CostModel.create(
                    cost_model, **({"num_tuning_cores": cores} if cost_model == "xgb" else {})),
                measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                   progress.callback()],
                task_scheduler="gradient",
            )
            _confirm_against_defaults(baselines, target, database, runner, say)
        except Exception as exc:  # noqa: BLE001
            raise TuningError(f"MetaSchedule tuning failed: {_last_line(exc)}") from exc
        finally:
            task_logger.handlers.clear()
    say(f"tuned {progress.measured} candidates ({progress.failed} failed) "
        f"in {time.perf_counter() - started:.0f} s")
    if (progress.measured and progress.failed == progress.measured
            and not any(_valid_records(database, t.dispatched[0], 1) for t in tasks)):
        raise TuningError(
            "every tuning measurement failed; first error: " + (progress.first_error or "?")
            + " (a target whose mcpu/mattr this CPU lacks crashes the measuring process)")


def _measure_default_schedules(tasks: list[Any], target: tvm.target.Target, database: Any,
                               runner: Any, say: Log) -> dict[str, tuple[Any, Any]]:
    """Measure lepton-edge's default schedule of each kernel and store it as a tuning record.

    The build takes each kernel's best record, so a kernel keeps its default schedule unless
    a tuned candidate is faster. Without this, a small budget made BERT-sized models slower
    than not tuning at all: 18 trials found 54 ms for a 128x768x3072 matmul + GELU whose
    default schedule is several times faster. A default schedule that cannot be recorded
    (a rule refuses, the trace does not serialize, the build fails) is logged and skipped.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from lepton_edge.lowering import schedules
    from lepton_edge.lowering.x86_int8 import int8_rules

    baselines: dict[str, tuple[Any, Any]] = {}
    if os.environ.get("LEPTON_DEFAULT_SCHEDULES", "1") == "0" or not tasks:
        return baselines
    rules = [*int8_rules(target), schedules.schedule_contraction, schedules.schedule_generic]
    started, kept, skipped = time.perf_counter(), [], []
    builder = InProcessBuilder()
    for task in tasks:
        task_mod = task.dispatched[0]
        try:
            sch = None
            for rule in rules:
                candidate = Schedule(task_mod)
                try:
                    if rule(candidate, target):
                        sch = candidate
                        break
                except Exception:  # noqa: BLE001 - a refusing rule: try the next one
                    continue
            if sch is None:
                skipped.append(f"{task.task_name} (no default rule)")
                continue
            built = builder.build([BuilderInput(sch.mod, target)])[0]
            if built.error_msg:
                skipped.append(f"{task.task_name} ({_last_line(built.error_msg)})")
                continue
            args_info = ArgInfo.from_prim_func(task_mod["main"])
            ran = runner.run([RunnerInput(built.artifact_path, "cpu", args_info)])[0].result()
            if ran.error_msg:
                skipped.append(f"{task.task_name} ({_last_line(ran.error_msg)})")
                continue
            database.commit_tuning_record(TuningRecord(
                trace=sch.trace, workload=database.commit_workload(task_mod),
                run_secs=ran.run_secs, target=target, args_info=args_info))
            secs = sum(float(v) for v in ran.run_secs) / max(1, len(ran.run_secs))
            kept.append(f"{task.task_name} {secs * 1e6:.1f} us")
            baselines[task.task_name] = (task, sch)
        except Exception as exc:  # noqa: BLE001 - a baseline we could not record, not a failure
            skipped.append(f"{task.task_name} ({_last_line(exc)})")
    say(f"default schedules measured as the baseline in {time.perf_counter() - started:.0f} s: "
        + ", ".join(kept))
    if skipped:
        say("no default-schedule baseline for: " + "; ".join(skipped))
    return baselines


def _confirm_against_defaults(baselines: dict[str, tuple[Any, Any]], target: tvm.target.Target,
                              database: Any, runner: Any, say: Log) -> None:
    """Re-measure each kernel's best tuned record against its default schedule, head to head.

    The build takes the record with the lowest time, but the default schedule was measured
    once, before tuning, and the candidates at other moments: on a shared machine a
    candidate measured in a quiet second beat a default measured in a busy one (BERT-base:
    tuned build 1.5x slower than untuned). So both are built and run alternately (default,
    tuned, default, tuned); when the default is faster there, it gets a second record whose
    time is the tuned record's stored time scaled by the head-to-head ratio, which ranks it
    first. Failures here leave the database as it is.
    """
    from tvm.s_tir import Schedule
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.database import TuningRecord
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    def mean(secs: Any) -> float:
        return sum(float(v) for v in secs) / max(1, len(secs))

    builder = InProcessBuilder()
    verdicts = []
    for name, (task, base) in baselines.items():
        task_mod = task.dispatched[0]
        try:
            workload = database.commit_workload(task_mod)
            top = database.get_top_k(workload, 1)
            if not top or str(top[0].trace) == str(base.trace):
                continue
            tuned = Schedule(task_mod)
            top[0].trace.apply_to_schedule(tuned, remove_postproc=False)
            built = builder.build([BuilderInput(base.mod, target), BuilderInput(tuned.mod, target)])
            if any(b.error_msg for b in built):
                continue
            args_info = ArgInfo.from_prim_func(task_mod["main"])
            inputs = [RunnerInput(b.artifact_path, "cpu", args_info) for b in built] * 2
            ran = [f.result() for f in runner.run(inputs)]
            if any(r.error_msg for r in ran):
                continue
            base_s = min(mean(ran[0].run_secs), mean(ran[2].run_secs))
            tuned_s = min(mean(ran[1].run_secs), mean(ran[3].run_secs))
            if base_s <= tuned_s:
                scaled = mean(top[0].run_secs) * base_s / tuned_s * 0.999
                database.commit_tuning_record(TuningRecord(
                    trace=base.trace, workload=workload, run_secs=[scaled], target=target,
                    args_info=args_info))
            verdicts.append(f"{name} {'default' if base_s <= tuned_s else 'tuned'} "
                            f"({base_s * 1e6:.0f} vs {tuned_s * 1e6:.0f} us)")
        except Exception as exc:  # noqa: BLE001 - keep the database as it is
            verdicts.append(f"{name} not re-measured ({_last_line(exc)})")
    if verdicts:
        say("default vs best tuned schedule, head to head: " + ", ".join(verdicts))


def _hand_scheduled_int8(task_mod: tvm.IRModule) -> bool:
    """Whether the kernel is one of x86_int8's packed kinds that only its own rules schedule."""
    from lepton_edge.lowering import x86_int8

    kind = x86_int8.packed_kind(tvm.s_tir.Schedule(task_mod["main"]))
    return kind is not None and kind not in ("matmul", "conv2d")


def _x86_dot_intrinsic(target: tvm.target.Target) -> str | None:
    from lepton_edge.lowering import x86_int8

    return x86_int8.dot_intrinsic(target)


def _space_generator(task_mod: tvm.IRModule, target: tvm.target.Target) -> Any:
    """MetaSchedule's default space, except for the packed x86 int8 kernels
    (lowering/x86_int8.py): those are tiled around the uint8 x int8 dot-product intrinsic
    (VNNI, or the exact AVX2 one) and tensorized - MetaSchedule has no x86 VNNI rule of its
    own. No AutoInline: inlining the input packing would hide the intrinsic's operand. (The
    fused epilogue blocks stay separate loops here; the untuned rule computes them per tile.)"""
    from tvm.s_tir import meta_schedule as ms

    from lepton_edge.lowering import x86_int8

    intrin = x86_int8.dot_intrinsic(target)
    if intrin is None or x86_int8.packed_kind(tvm.s_tir.Schedule(task_mod["main"])) is None:
        return "post-order-apply"
    x86_int8.register_intrinsics()
    rules = [
        ms.schedule_rule.MultiLevelTilingWithIntrin(
            intrin, structure="SSRSRS", tile_binds=None, max_innermost_factor=64,
            vector_load_lens=None, reuse_read=None,
            reuse_write=ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")),
        ms.schedule_rule.ParallelizeVectorizeUnroll(
            max_jobs_per_core=16, max_vectorize_extent=16, unroll_max_steps=[0, 16, 64, 512],
            unroll_explicit=True),
        ms.schedule_rule.RandomComputeLocation(),
    ]
    postprocs = [
        ms.postproc.DisallowDynamicLoop(),
        ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(),
        ms.postproc.RewriteTensorize(vectorize_init_loop=False),
    ]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs="llvm")


def _records_per_task(database: Any, tasks: list[Any]) -> list[int]:
    """How many records (measured candidates, failed ones included) each task has."""
    workloads = [database.commit_workload(t.dispatched[0]) if database.has_workload(
        t.dispatched[0]) else None for t in tasks]
    counts = [0] * len(tasks)
    known = [(i, w) for i, w in enumerate(workloads) if w is not None]
    if not known:
        return counts
    for record in database.get_all_tuning_records():
        for i, workload in known:
            if record.workload.same_as(workload):
                counts[i] += 1
                break
    return counts


def _valid_records(database: Any, task_mod: tvm.IRModule, limit: int) -> int:
    """How many successful records (up to ``limit``) the database has for this kernel."""
    if not database.has_workload(task_mod):
        return 0
    return len(database.get_top_k(database.commit_workload(task_mod), limit))


def _build(mod: tvm.IRModule, target: tvm.target.Target, database: Any, db_dir: Path,
           say: Log) -> Any:
    """Apply the database to the prepared module and compile; other kernels get the default
    schedules of lowering/schedules.py."""
    # TVM 0.27's relax.pipeline.dataflow_lower_passes(llvm) raises AttributeError: the CPU
    # backend package does not re-export it. Take both lists from the CPU pipeline module.
    from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

    if _x86_dot_intrinsic(target) is not None:
        from lepton_edge.lowering import x86_int8

        x86_int8.register_intrinsics()  # records of packed int8 kernels replay tensorize
    try:
        with _lean_tensor_intrin_import() if _uses_tensor_intrinsics(db_dir) else _nothing():
            with target, database, tvm.transform.PassContext(opt_level=3):
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
                tuned = _scheduled_kernels(mod)
                # Kernels the database does not cover (other batch sizes, packed int8 kernels
                # not tuned yet) get lepton-edge's default schedules, not TVM's plain loops.
                from lepton_edge.lowering.schedules import apply_default_schedules

                if os.environ.get("LEPTON_DEFAULT_SCHEDULES", "1") != "0":
                    mod = apply_default_schedules(mod, target)
                say(f"kernels: {tuned} from the tuning database, "
                    f"{_kernel_count(mod) - tuned} with default schedules")
                from lepton_edge.lowering.schedules import finalize_passes

                # finalize_passes: TVM's, plus noalias kept next to symbolic shape functions
                lower = tvm.transform.Sequential([*cpu_pipeline.dataflow_lower_passes(target),
                                                  *finalize_passes(target)])
                return tvm.compile(mod, target=target, relax_pipeline=lower)
    except Exception as exc:  # noqa: BLE001
        raise TuningError(f"TVM failed to compile with the tuning database: {_last_line(exc)}"
                          ) from exc


def _kernel_count(mod: tvm.IRModule) -> int:
    return sum(1 for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def _scheduled_kernels(mod: tvm.IRModule) -> int:
    return sum(1 for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
               and f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False)))


def _uses_tensor_intrinsics(database_dir: Path) -> bool:
    """Replaying a record that tensorizes needs TVM's intrinsic registry (slow to import).
    Searching the record file's text is much cheaper than printing every trace."""
    path = database_dir / DATABASE_FILES[1]
    return path.exists() and "tensorize" in path.read_text().lower()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# --- in-process builder ------------------------------------------------------------------------

def _make_builder_class() -> type:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    from tvm.support.tar import tar

    @derived_object
    class _InProcessBuilder(PyBuilder):
        """Builds candidates in the tuning process, one by one.

        Same steps as MetaSchedule's ``default_build``/``default_export`` (drop the weight
        layout-rewrite block, ``tvm.compile`` the PrimFunc, export a tar for the runner), without
        ``LocalBuilder``'s per-batch worker pool whose start-up made rounds ~5x slower.
        """

        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    rt_mod = tvm.compile(mod, target=item.target)
                    path = os.path.join(tempfile.mkdtemp(prefix="lepton-ms-"),
                                        "tvm_tmp_mod." + tar.output_format)
                    rt_mod.export_library(path, fcompile=tar)
                    results.append(BuilderResult(path, None))
                except Exception as exc:  # noqa: BLE001 - a failed candidate, not a failed run
                    results.append(BuilderResult(None, f"in-process build: {_last_line(exc)}"))
            return results

    return _InProcessBuilder


_builder_class: type | None = None


def InProcessBuilder() -> Any:  # noqa: N802 - reads as the class it constructs
    """A MetaSchedule builder that compiles candidates in this process."""
    global _builder_class
    if _builder_class is None:
        _builder_class = _make_builder_class()
    return _builder_class()


# --- helpers -----------------------------------------------------------------------------------

class _Progress:
    """A measure callback that reports each measured batch through ``log``."""

    def __init__(self, names: list[str], say: Log) -> None:
        self.names, self.say = names, say
        self.measured = self.failed = 0
        self.first_error: str | None = None
        self.best: dict[int, float] = {}

    def callback(self) -> Any:
        from tvm.ir.utils import derived_object
        from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

        progress = self

        @derived_object
        class _Callback(PyMeasureCallback):
            def apply(self, task_scheduler: Any, task_id: int, measure_candidates: Any,
                      builder_results: Any, runner_results: Any) -> None:
                progress.record(task_id, builder_results, runner_results)

        return _Callback()

    def record(self, task_id: int, builder_results: Any, runner_results: Any) -> None:
        ok = 0
        for built, ran in zip(builder_results, runner_results, strict=True):
            error = built.error_msg or ran.error_msg
            if error:
                self.failed += 1
                self.first_error = self.first_error or _last_line(error)
                continue
            ok += 1
            secs = sum(float(s) for s in ran.run_secs) / max(1, len(ran.run_secs))
            self.best[task_id] = min(self.best.get(task_id, secs), secs)
        self.measured += len(runner_results)
        best = self.best.get(task_id)
        best_text = f"best {best * 1e6:.1f} us" if best is not None else "no valid candidate"
        self.say(f"  {self.names[task_id]}: {len(runner_results)} measured ({ok} ok), "
                 f"{best_text}")


def _task_logger(path: Path) -> logging.Logger:
    """MetaSchedule's per-task logs go to a file, not to stdout (its default)."""
    logger = logging.getLogger(f"lepton_edge.tuning.ms.{os.getpid()}.{id(path)}")
    logger.handlers.clear()
    logger.addHandler(logging.FileHandler(path))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


# Submodules of tvm.s_tir.tensor_intrin that only GPU/DSP targets use. Importing the package
# imports them all: 72 s here (cuda alone 47 s), and TuneContext imports it unconditionally.
_NON_CPU_INTRINSICS = ("cuda", "rocm", "hexagon", "metal")


@contextmanager
def _lean_tensor_intrin_import() -> Iterator[None]:
    """Import ``tvm.s_tir.tensor_intrin`` without its GPU/DSP intrinsics (CPU tuning only).

    Placeholder modules stand in for those submodules while the package is first imported and
    are removed afterwards, so a later ``from tvm.s_tir.tensor_intrin.cuda import ...`` loads
    the real module. The CPU intrinsics (x86, arm, riscv) are imported as usual.
    """
    package = "tvm.s_tir.tensor_intrin"
    if package in sys.modules:
        yield
        return
    stubs = {f"{package}.{name}": types.ModuleType(f"{package}.{name}")
             for name in _NON_CPU_INTRINSICS if f"{package}.{name}" not in sys.modules}
    sys.modules.update(stubs)
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        pkg = sys.modules.get(package)
        for full in stubs:
            if sys.modules.get(full) is stubs[full]:
                del sys.modules[full]
            name = full.rsplit(".", 1)[1]
            if pkg is not None and getattr(pkg, name, None) is stubs[full]:
                delattr(pkg, name)
    yield


def _with_num_cores(target: tvm.target.Target, say: Log) -> tvm.target.Target:
    """MetaSchedule sizes parallel loops by the target's ``num-cores``; add it if missing."""
    if "num-cores" in target.attrs and int(target.attrs["num-cores"]) > 0:
        return target
    cores = int(os.environ.get("TVM_NUM_THREADS", "0") or 0) or _physical_cores()
    say(f"target has no num-cores: tuning for {cores} (TVM_NUM_THREADS or physical cores)")
    return tvm.target.Target({**_target_dict(target), "num-cores": cores})


def _physical_cores() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return os.cpu_count() or 1


def _target_dict(target: tvm.target.Target) -> dict[str, Any]:
    exported = target.export()
    return {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in exported.items()
            if v not in (None, "", [], {})}


def _last_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]
