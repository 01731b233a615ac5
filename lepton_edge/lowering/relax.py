"""ONNX subgraph -> Relax IRModule -> compiled shared library, with TVM 0.27's API.

Every TVM compiler API name lepton-edge uses lives here (and in the targets' compile files),
so a TVM upgrade is one small change. The runtime side uses only `tvm.runtime`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from lepton_edge.errors import TargetError
from lepton_edge.lowering.layout import error_message


def supported_onnx_ops() -> frozenset[str]:
    """The ONNX op types TVM's Relax ONNX importer has a converter for."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())  # noqa: SLF001 - no public listing


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def system_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver3", "skylake-avx512")."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def import_onnx(proto: onnx.ModelProto) -> Any:
    """Import a standalone ONNX (sub)graph into a Relax IRModule, weights as constants."""
    from lepton_edge.lowering import dynamic_ops, narrow, onnx_fixups

    try:
        # fold constant shape arithmetic, replace ops TVM lacks or gets wrong (onnx_fixups.py)
        proto = onnx_fixups.apply(proto)
        # float8/float4/int4/int2 tensors as uint8 bytes, their conversions our own (narrow.py)
        proto = narrow.to_bytes(proto)
        # TVM's importer, plus converters for axes/pads/k/... given at run time (dynamic_ops.py)
        mod = dynamic_ops.from_onnx(proto)
    except Exception as exc:  # noqa: BLE001 - the importer raises anything; name it for the user
        raise TargetError(f"TVM could not import the graph: {error_message(exc)}") from exc
    return fold_constant_calls(mod)


def _numpy_folds() -> dict[str, Any]:
    """Relax op -> numpy evaluation (args, attrs) -> array, or None where it would not be
    exact or not what Relax computes (mixed dtypes, out-of-range indices)."""
    import numpy as np

    def same_dtype(f: Any, bool_out: bool = False) -> Any:
        def fold(a: list[Any], _attrs: Any) -> Any:
            if a[0].dtype != a[1].dtype:
                return None  # Relax's binary ops take one dtype; TVM decides otherwise
            out = f(a[0], a[1])
            return out if out.dtype == (np.bool_ if bool_out else a[0].dtype) else None
        return fold

    def where(a: list[Any], _attrs: Any) -> Any:
        return np.where(a[0], a[1], a[2]) if a[1].dtype == a[2].dtype else None

    def transpose(a: list[Any], attrs: Any) -> Any:
        return np.transpose(a[0], None if attrs.axes is None else [int(x) for x in attrs.axes])

    def take(a: list[Any], attrs: Any) -> Any:
        data, indices = a
        axis = int(attrs.axis) if attrs.axis is not None else None
        size = data.size if axis is None else data.shape[axis]
        if indices.dtype.kind not in "iu" or ((indices < 0) | (indices >= size)).any():
            return None
        return np.take(data, indices, axis=axis)

    folds = {f"relax.{k}": same_dtype(f) for k, f in (
        ("add", np.add), ("subtract", np.subtract), ("multiply", np.multiply))}
    folds.update({f"relax.{k}": same_dtype(f, bool_out=True) for k, f in (
        ("less", np.less), ("less_equal", np.less_equal), ("greater", np.greater),
        ("greater_equal", np.greater_equal), ("equal", np.equal), ("not_equal", np.not_equal),
        ("logical_and", np.logical_and), ("logical_or", np.logical_or))})
    folds.update({"relax.where": where, "relax.permute_dims": transpose, "relax.take": take})
    return folds


def fold_constant_calls(mod: Any) -> Any:
    """Relax calls whose arguments are all constants (or variables bound to constants),
    evaluated with numpy: data movement, comparisons, integer and IEEE add/subtract/multiply,
    select, and shape_to_tensor of a static shape. All exact. Also drops zero-extent constant
    concat operands (see Fold.without_empty_constants).

    TVM's FoldConstant would compile and run one kernel per such call after legalization:
    a BERT-base graph's 12 transposed Gemm weights, 36 Gather index checks and 36 static
    shape_to_tensor + take pairs cost it 5-10 s of every compile (also when tuning records
    are only applied). Other calls stay for it (see legalize_passes).
    """
    import numpy as np
    import tvm
    from tvm import relax as rx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    folds = _numpy_folds()

    @mutator
    class Fold(PyExprMutator):  # type: ignore[misc]
        def constant(self, expr: Any) -> Any:
            """`expr` if it is a constant, the constant a variable is bound to, or None."""
            if isinstance(expr, rx.Var):
                expr = self.lookup_binding(expr)
            return expr if isinstance(expr, tvm.ir.GenericConst) else None

        def without_empty_constants(self, call: Any) -> Any:
            """Concat operands that are constants of extent 0 along the axis, dropped: TVM
            0.27 writes a zero-size constant into the executable but cannot load it back
            ("Invalid DLTensor file format"); e.g. CausalConvWithState's body with kernel
            size 1 concatenates an empty (B, C, 0) padding."""
            if call.attrs.axis is None or not isinstance(call.args[0], rx.Tuple):
                return call
            axis = int(call.attrs.axis)

            def empty(field: Any) -> bool:
                const = self.constant(field)
                shape = const.value.shape if const is not None else ()
                return bool(shape) and int(shape[axis % len(shape)]) == 0

            fields = list(call.args[0].fields)
            kept = [f for f in fields if not empty(f)]
            if not kept or len(kept) == len(fields):
                return call
            return rx.op.concat(rx.Tuple(kept), axis=axis)

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not call.args:
                return call
            if call.op.name == "relax.concat":
                return self.without_empty_constants(call)
            if call.op.name == "relax.shape_to_tensor":
                arg = call.args[0]
                values = arg.values if isinstance(arg, rx.ShapeExpr) else getattr(
                    getattr(arg, "ty", None), "values", None)  # a Var of a known shape
                dims = [getattr(d, "value", None) for d in values or ()]
                if values is None or not all(isinstance(d, int) for d in dims):
                    return call
                return rx.const(np.array(dims, np.int64), "int64")
            fold = folds.get(call.op.name)
            consts = [self.constant(a) for a in call.args]
            if fold is None or any(c is None for c in consts):
                return call
            value = fold([c.value.numpy() for c in consts], call.attrs)
            if value is None:
                return call
            value = np.asarray(value)
            return rx.const(value, str(value.dtype))

    for gvar, func in list(mod.functions.items()):
        if isinstance(func, rx.Function):
            mod[gvar] = Fold(mod).visit_expr(func)
    return mod


def _has_constant_call(mod: Any) -> bool:
    """Whether some call in a Relax function has only constant arguments (call_tir: its
    tensor arguments), i.e. whether FoldConstant has anything to do."""
    import tvm
    from tvm import relax as rx
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    found = []

    @visitor
    class Find(PyExprVisitor):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> None:
            args = list(call.args)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir":
                args = list(args[1].fields) if isinstance(args[1], rx.Tuple) else args[1:2]
            elif not args:
                args = [None]
            if all(isinstance(a, tvm.ir.GenericConst) for a in args):
                found.append(call)
            super().visit_call_(call)

    for func in mod.functions.values():
        if isinstance(func, rx.Function) and not found:
            Find().visit_expr(func)
    return bool(found)


def legalize_passes() -> list[Any]:
    """TVM's CPU legalization passes, FoldConstant run only when it has something to fold:
    on a module with nothing to fold it still takes seconds per 100 MB of weights (5 s for
    BERT-base here, every compile)."""
    import tvm
    from tvm import relax as rx

    @tvm.transform.module_pass(opt_level=0, name="LeptonFoldConstantIfAny")
    def fold_if_any(mod: Any, _ctx: Any) -> Any:
        return rx.transform.FoldConstant()(mod) if _has_constant_call(mod) else mod

    return [rx.transform.LegalizeOps(), rx.transform.AnnotateTIROpPattern(), fold_if_any,
            rx.transform.FuseOps(), rx.transform.FuseTIR()]


def lower_int8(mod: Any, *, float_requantize: bool = False) -> tuple[Any, Any]:
    """Rewrite recognised QDQ patterns to integer kernels (see lowering/int8.py)."""
    from lepton_edge.lowering.int8 import lower_qdq_to_integer

    try:
        return lower_qdq_to_integer(mod, float_requantize=float_requantize)
    except Exception as exc:  # noqa: BLE001 - a pass bug must not pass silently
        raise TargetError(f"int8 lowering failed: {error_message(exc)}") from exc


def build_llvm_library(
    mod: Any, target: dict[str, Any], cross_compiler: str | None = None, *,
    tune_trials: int | None = None, tuning_db: str | None = None,
    log: Any = None, report: Any = None, batch_entries: Any = None,
) -> bytes:
    """Compile a Relax module for an LLVM target and return the exported shared library.
    An untuned build fills `report` (schedules.ScheduleReport) with each kernel's rule, and
    adds `batch_entries`' (tuning.BatchEntries) static entry functions after fusion.

    With `tune_trials` (0 = only apply the database) the kernels are tuned with MetaSchedule
    against the persistent database `tuning_db` (default ~/.cache/lepton-edge/tuning/...).
    """
    import tvm
    from tvm.support import cc

    if tune_trials is not None:
        from pathlib import Path as _Path

        from lepton_edge.lowering.tuning import tune_and_build

        executable = tune_and_build(mod, tvm.target.Target(target), trials=tune_trials,
                                    database_dir=_Path(tuning_db) if tuning_db else None,
                                    log=log)
    else:
        try:
            executable = _compile_untuned(mod, tvm.target.Target(target), log, report,
                                          batch_entries)
        except Exception as exc:  # noqa: BLE001
            raise TargetError(f"TVM failed to compile for {target}: {error_message(exc)}"
                              ) from exc
    with tempfile.TemporaryDirectory(prefix="lepton-build-") as tmp:
        path = Path(tmp) / "lib.so"
        fcompile = cc.cross_compiler(cross_compiler) if cross_compiler else None
        try:
            if fcompile is None:
                executable.export_library(str(path))
            else:
                executable.export_library(str(path), fcompile=fcompile)
        except Exception as exc:  # noqa: BLE001
            raise TargetError(f"linking the shared library failed: {error_message(exc)}") from exc
        return path.read_bytes()


def _compile_untuned(mod: Any, target: Any, log: Any, report: Any = None,
                     batch_entries: Any = None) -> Any:
    """Compile without tuning: TVM's CPU pipeline plus lepton-edge's default schedules
    (lowering/schedules.py), unless LEPTON_DEFAULT_SCHEDULES=0 asks for TVM's plain loops."""
    import os

    import tvm

    if os.environ.get("LEPTON_DEFAULT_SCHEDULES", "1") == "0":
        return tvm.compile(mod, target=target)
    from lepton_edge.lowering.schedules import cpu_pipeline

    after = [batch_entries.as_pass()] if batch_entries is not None else []
    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(
        target, log=log, report=report, after_fusion=after))
