"""ONNX nodes whose axes / pads / k / split / shape inputs arrive at run time, on TVM.

TVM 0.27's ONNX importer needs these inputs at compile time ("Only constant axes currently
supported", "Dynamic pads are not supported yet", "TopK k must be a constant", ...).
lowering/onnx_fixups.py folds every such input that is constant; what is left is a real
run-time value (a graph input, or computed from one). This module converts those nodes
itself, for any value the op allows:

* the output *rank* is static (it follows from the static length of the axes/pads tensor),
  the output *dims* are computed at run time by a small TIR kernel that reads the value,
  checks it (an axis out of range, a repeated axis, ...) with TIR asserts, and writes the
  output shape; `R.tensor_to_shape` + `match_cast` turn that into symbolic dims;
* the op itself is a TIR kernel over those symbolic dims.

A value the op does not allow stops the run with a TVM error naming the op and the problem
(the CPU device raises it as a DeviceError); nothing reads out of bounds.

The same way (a small kernel computes the output dims, `match_cast` binds them): Range,
ConstantOfShape and AffineGrid with run-time inputs, and Resize (opset 11+) in every mode with
constant or run-time scales/sizes/roi (TVM 0.27's converter cannot take run-time ones and is
wrong when linear/cubic shrinks an axis, antialiases, or align_corners meets a fractional
output width; ONNX's test data divide by the fractional width scale * length there, which
onnxruntime does not), and Upsample-9 as Resize. Shape of a tensor whose dims were computed
that way is an int64 tensor (TVM's shape value is refused by its elementwise converters).

Ops revised or added after opset 25, which TVM 0.27's importer predates: BitShift-28 (signed
types, arithmetic right shift, shifts < 0 or >= bits), CumProd-26, BitCast-26 and Mod-28 (the
float special cases) are converted here under private names (`<op>_<version>`, see
`_REVISED_CONVERTERS` and lowering/bodies.py's REVISED_OWN); Mod and BitShift of older opsets
use the same converters (TVM's get float Mod's inf/NaN/zero cases and shifts >= bits wrong).

`Importer` is TVM's ONNX graph importer with these converters consulted first; a converter
returns None when its inputs are constants, and TVM's own converter then runs as before.
`_fence_symbolic_dims` then keeps FuseOps from moving a kernel that uses run-time dims ahead
of the match_cast defining them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import onnx
import tvm
from tvm import relax, te, tirx
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter
from tvm.script import tirx as T

from lepton_edge.lowering import narrow

# --------------------------------------------------------------------------- shared parts

_FLOATS = ("float16", "float32", "float64", "bfloat16")
_INTS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def _is_runtime(expr: Any) -> bool:
    """A tensor value known only at run time (not a constant folded before import)."""
    return (expr is not None and isinstance(expr, relax.Expr)
            and not isinstance(expr, tvm.ir.GenericConst)
            and isinstance(expr.ty, relax.TensorType))


def _static_len(expr: Any) -> int | None:
    """Number of elements of a 0-d/1-d tensor when it is static, else None."""
    shape = expr.ty.shape
    if shape is None or not isinstance(shape, relax.ShapeExpr):
        return None
    if len(shape.values) == 0:
        return 1
    if len(shape.values) != 1 or not isinstance(shape.values[0], tirx.IntImm):
        return None
    return int(shape.values[0].value)


def _rank(expr: Any) -> int | None:
    ty = expr.ty
    return None if not isinstance(ty, relax.TensorType) or ty.ndim < 0 else int(ty.ndim)


def _scheduled(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Kernels of scalar loops (no blocks): keep the default schedules and fusion away."""
    return func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)  # opaque


def _as_int64(bb: relax.BlockBuilder, expr: relax.Expr) -> relax.Expr:
    if expr.ty.dtype != "int64":
        expr = bb.emit(relax.op.astype(expr, "int64"))
    return expr


def _dims_tensor(bb: relax.BlockBuilder, data: relax.Expr) -> relax.Expr:
    """int64[rank] tensor of `data`'s dims (static or symbolic), without Python at run time."""
    rank = _rank(data)

    def dims(x: te.Tensor) -> te.Tensor:
        def value(i: Any) -> Any:
            out = tirx.const(0, "int64")
            for axis in reversed(range(rank)):
                out = tirx.Select(i == axis, tirx.Cast("int64", x.shape[axis]), out)
            return out
        return te.compute((rank,), value, name="dims")

    return bb.emit_te(dims, data, primfunc_name_hint="lepton_dims")


def _to_shape(bb: relax.BlockBuilder, tensor: relax.Expr, ndim: int, prefix: str
              ) -> list[tirx.Var]:
    """Symbolic dims holding the run-time int64[ndim] `tensor`'s values (see
    `_fence_symbolic_dims` for what keeps the match_cast ahead of their uses)."""
    shape = bb.emit(relax.op.tensor_to_shape(tensor))
    dims = [tirx.Var(f"{prefix}{i}", "int64") for i in range(ndim)]
    bb.match_cast(shape, relax.ShapeType(dims))
    _RUNTIME_DIMS.extend(dims)
    return dims


# The dims `_to_shape` made during the current import (see `convert_shape`).
_RUNTIME_DIMS: list[tirx.Var] = []


# ------------------------------------------------------------------------------- Reduce*

@T.prim_func(private=True)
def _reduce_shape(dims_h: T.handle, axes_h: T.handle, keep_h: T.handle, sq_h: T.handle):
    r = T.int64()
    n = T.int64()
    m = T.int64()
    dims = T.match_buffer(dims_h, (r,), "int64")
    axes = T.match_buffer(axes_h, (n,), "int64")
    keep = T.match_buffer(keep_h, (r,), "int64")
    sq = T.match_buffer(sq_h, (m,), "int64")
    c = T.alloc_buffer((1,), "int64", scope="local")
    flag = T.alloc_buffer((1,), "int64", scope="local")
    for j in range(n):
        assert axes[j] >= -r and axes[j] < r, (
            "Reduce: an axes value is outside [-rank, rank-1]")
        for k in range(j):
            assert (axes[j] + r) % r != (axes[k] + r) % r, "Reduce: axes repeats an axis"
    c[0] = T.int64(0)
    for i in range(r):
        flag[0] = T.int64(0)
        for j in range(n):
            if (axes[j] + r) % r == i:
                flag[0] = T.int64(1)
        if flag[0] == T.int64(1):
            keep[i] = T.int64(1)
        else:
            keep[i] = dims[i]
            if c[0] < m:
                sq[c[0]] = dims[i]
            c[0] = c[0] + T.int64(1)


def _accumulator(dtype: str) -> str:
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _extreme(dtype: str, largest: bool) -> Any:
    if dtype.startswith("float") or dtype.startswith("bfloat"):
        return tirx.const(math.inf if largest else -math.inf, dtype)
    return tvm.tirx.max_value(dtype) if largest else tvm.tirx.min_value(dtype)


# op -> (element map, reducer, finish(acc, count)); dtype-dependent parts are built lazily.
_REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd",
               "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
# ops whose result is meaningless (sqrt/log/division) on integers: those stay on TVM's or
# onnxruntime's path
_FLOAT_ONLY = {"ReduceMean", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp"}


def reduce_dtype_ok(op: str, dtype: str) -> bool:
    return dtype in _FLOATS or (dtype in _INTS and op not in _FLOAT_ONLY)


def _max(a: Any, b: Any) -> Any:
    return tirx.Max(a, b)


def _min(a: Any, b: Any) -> Any:
    return tirx.Min(a, b)


def _reduce_kernel(op: str, rank: int, out_dims: list[tirx.Var]
                   ) -> Callable[[te.Tensor], te.Tensor]:
    def kernel(x: te.Tensor) -> te.Tensor:
        dtype = str(x.dtype)
        acc = _accumulator(dtype)
        # window i covers the whole axis where the output dim is 1 and the axis is reduced,
        # one element where the axis is kept: extent = dim - out_dim + 1, index = o + k.
        # A dim that may be 0 gives an empty window; TIR never runs a reduction's init for
        # a zero-trip loop, so such windows run once and read the reducer's identity.
        extents = [x.shape[i] - out_dims[i] + 1 for i in range(rank)]
        maybe_empty = [not (isinstance(x.shape[i], tirx.IntImm) and int(x.shape[i]) > 0)
                       for i in range(rank)]

        def axes() -> list[Any]:
            return [te.reduce_axis((0, tirx.max(extents[i], 1) if maybe_empty[i]
                                    else extents[i]), name=f"k{i}") for i in range(rank)]

        def at(o: tuple[Any, ...], ks: list[Any], identity: Any) -> Any:
            v = x[tuple(o[i] + ks[i] for i in range(rank))]
            v = v if acc == dtype else tirx.Cast(acc, v)
            guards = [ks[i] < extents[i] for i in range(rank) if maybe_empty[i]]
            if not guards:
                return v
            return tirx.if_then_else(tirx.all(*guards), v, identity)

        def reduce_with(combine: Callable[[Any, Any], Any], identity: Any, name: str,
                        element: Callable[[Any], Any] = lambda v: v) -> te.Tensor:
            reducer = te.comm_reducer(combine, lambda t: identity, name=name)

            def body(*o: Any) -> Any:
                ks = axes()
                return reducer(element(at(o, ks, identity)), axis=ks)
            return te.compute(list(out_dims), body, name=name)

        zero, one = tirx.const(0, acc), tirx.const(1, acc)
        if op in ("ReduceMax", "ReduceMin"):
            largest = op == "ReduceMax"
            out = reduce_with(_max if largest else _min, _extreme(acc, not largest),
                              "max" if largest else "min")
        elif op == "ReduceProd":
            out = reduce_with(lambda a, b: a * b, one, "prod")
        elif op == "ReduceLogSumExp":
            hi = reduce_with(_max, _extreme(acc, False), "peak")

            def body(*o: Any) -> Any:
                ks = axes()
                return te.sum(tirx.exp(at(o, ks, hi[o]) - hi[o]), axis=ks)
            total = te.compute(list(out_dims), body, name="sumexp")
            # an infinite peak (an all -inf or empty window, or a +inf) is the answer itself
            out = te.compute(list(out_dims), lambda *o: tirx.Select(
                tirx.isinf(hi[o]), hi[o], hi[o] + tirx.log(total[o])), name="logsumexp")
        else:
            def element(v: Any) -> Any:
                if op == "ReduceL1" and not acc.startswith("uint"):
                    return tirx.abs(v)
                if op in ("ReduceL2", "ReduceSumSquare"):
                    return v * v
                return v
            total = reduce_with(lambda a, b: a + b, zero, "sum", element)
            if op == "ReduceMean":
                count = tirx.const(1, "int64")
                for e in extents:
                    count = count * e
                out = te.compute(list(out_dims), lambda *o: total[o] / tirx.Cast(acc, count),
                                 name="mean")
            elif op == "ReduceL2":
                out = te.compute(list(out_dims), lambda *o: tirx.sqrt(total[o]), name="l2")
            elif op == "ReduceLogSum":
                out = te.compute(list(out_dims), lambda *o: tirx.log(total[o]), name="logsum")
            else:
                out = total
        return _cast_back(out, dtype)
    return kernel


def _cast_back(t: te.Tensor, dtype: str) -> te.Tensor:
    if str(t.dtype) == dtype:
        return t
    return te.compute(t.shape, lambda *o: tirx.Cast(dtype, t[o]), name="cast")


def convert_reduce(bb: relax.BlockBuilder, op: str, inputs: list[Any], attrs: dict[str, Any],
                   opset: int) -> relax.Expr | None:
    """Reduce* (opset 18+, ReduceSum 13+) with a run-time `axes` tensor, else None."""
    if len(inputs) < 2 or not _is_runtime(inputs[1]):
        return None
    data, axes = inputs[0], inputs[1]
    rank, count = _rank(data), _static_len(axes)
    if rank is None or count is None:
        raise ValueError(f"{op}: the axes tensor's length and the data's rank must be static")
    if data.ty.dtype == "bool" and op in ("ReduceMax", "ReduceMin"):  # any / all
        out = convert_reduce(bb, op, [bb.emit(relax.op.astype(data, "uint8")), axes], attrs,
                             opset)
        return relax.op.astype(bb.emit(out), "bool")
    if not reduce_dtype_ok(op, data.ty.dtype):
        raise ValueError(f"{op} on {data.ty.dtype} with run-time axes is not supported")
    keepdims = int(attrs.get("keepdims", 1))
    if count == 0:
        if int(attrs.get("noop_with_empty_axes", 0)):
            return data
        axes = relax.const(list(range(rank)), "int64")  # reduce over everything
        count = rank
    if count > rank:
        raise ValueError(f"{op}: {count} axes for a rank-{rank} input")
    axes = _as_int64(bb, axes)
    dims = _dims_tensor(bb, data)
    shapes = bb.emit(relax.call_tir(
        bb.add_func(_scheduled(_reduce_shape), "lepton_reduce_shape"), [dims, axes],
        [relax.TensorType([rank], "int64"), relax.TensorType([rank - count], "int64")]))
    keep = bb.emit(relax.TupleGetItem(shapes, 0))
    out_dims = _to_shape(bb, keep, rank, "reduce_d")
    reduced = bb.emit_te(_reduce_kernel(op, rank, out_dims), data,
                         primfunc_name_hint=f"lepton_{op.lower()}")
    if keepdims:
        return reduced
    squeezed = bb.emit(relax.TupleGetItem(shapes, 1))
    sq_dims = _to_shape(bb, squeezed, rank - count, "reduce_s")
    return relax.op.reshape(reduced, relax.ShapeExpr(sq_dims))


# -------------------------------------------------------------------------------- CumSum

def _flat(bb: relax.BlockBuilder, data: relax.Expr) -> tuple[relax.Expr, Any]:
    """`data` as a 1-d tensor, and its element count."""
    count = tirx.const(1, "int64")
    for d in data.ty.shape.values:
        count = count * d
    return bb.emit(relax.op.reshape(data, relax.ShapeExpr([count]))), count


def _cumsum_kernel(dtype: str, exclusive: bool, reverse: bool, product: bool = False
                   ) -> tirx.PrimFunc:
    """CumSum (or CumProd, `product`) along a run-time axis of the flattened data."""
    ident = 1 if product else 0
    axis_error = f"{'CumProd' if product else 'CumSum'}: axis is outside [-rank, rank-1]"

    @T.prim_func(private=True)
    def cumsum(x_h: T.handle, dims_h: T.handle, axis_h: T.handle, y_h: T.handle):
        n = T.int64()
        r = T.int64()
        x = T.match_buffer(x_h, (n,), dtype)
        dims = T.match_buffer(dims_h, (r,), "int64")
        axis = T.match_buffer(axis_h, (), "int64")
        y = T.match_buffer(y_h, (n,), dtype)
        a = T.alloc_buffer((1,), "int64", scope="local")
        stride = T.alloc_buffer((1,), "int64", scope="local")
        assert axis[()] >= -r and axis[()] < r, axis_error
        a[0] = (axis[()] + r) % r
        stride[0] = T.int64(1)
        for i in range(r):
            if i > a[0]:
                stride[0] = stride[0] * dims[i]
        for i in range(n):
            # o walks the axis forwards (or backwards): its neighbour is already done
            o = T.if_then_else(reverse, n - 1 - i, i)
            pos = o // stride[0] % dims[a[0]]
            first = T.if_then_else(reverse, pos == dims[a[0]] - 1, pos == 0)
            prev = T.if_then_else(reverse, o + stride[0], o - stride[0])
            if first:
                y[o] = T.if_then_else(exclusive, T.Cast(dtype, ident), x[o])
            elif product:
                y[o] = y[prev] * T.if_then_else(exclusive, x[prev], x[o])
            else:
                y[o] = y[prev] + T.if_then_else(exclusive, x[prev], x[o])
    return _scheduled(cumsum)


def convert_cumsum(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                   opset: int) -> relax.Expr | None:
    """CumSum with a run-time `axis` (any value in [-rank, rank-1]), else None."""
    if len(inputs) < 2 or not _is_runtime(inputs[1]):
        return None
    return _cumulative(bb, inputs[0], inputs[1], attrs, product=False)


def _cumulative(bb: relax.BlockBuilder, data: Any, axis: Any, attrs: dict[str, Any], *,
                product: bool) -> relax.Expr:
    """CumSum / CumProd along a constant or run-time axis (one TIR kernel over the flat data
    and its dims; exclusive / reverse attributes)."""
    op = "CumProd" if product else "CumSum"
    if _rank(data) is None or not isinstance(data.ty.shape, relax.ShapeExpr):
        raise ValueError(f"{op} needs the data's rank")
    if _rank(axis) not in (0, 1) or _static_len(axis) != 1:
        raise ValueError(f"{op}: axis must hold exactly one value")
    axis = _as_int64(bb, axis)
    if _rank(axis) == 1:
        axis = bb.emit(relax.op.reshape(axis, relax.ShapeExpr([])))
    dims = _dims_tensor(bb, data)
    flat, count = _flat(bb, data)
    kernel = _cumsum_kernel(str(data.ty.dtype), bool(attrs.get("exclusive", 0)),
                            bool(attrs.get("reverse", 0)), product=product)
    name = "lepton_cumprod" if product else "lepton_cumsum"
    out = bb.emit(relax.call_tir(bb.add_func(kernel, name), [flat, dims, axis],
                                 relax.TensorType([count], data.ty.dtype)))
    return relax.op.reshape(out, data.ty.shape)


# ------------------------------------------------------------------------------- Reshape

def _reshape_kernel(allowzero: bool) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def reshape_shape(dims_h: T.handle, shape_h: T.handle, out_h: T.handle):
        r = T.int64()
        k = T.int64()
        dims = T.match_buffer(dims_h, (r,), "int64")
        shape = T.match_buffer(shape_h, (k,), "int64")
        out = T.match_buffer(out_h, (k,), "int64")
        total = T.alloc_buffer((1,), "int64", scope="local")
        known = T.alloc_buffer((1,), "int64", scope="local")
        infer = T.alloc_buffer((1,), "int64", scope="local")
        total[0] = T.int64(1)
        for i in range(r):
            total[0] = total[0] * dims[i]
        known[0] = T.int64(1)
        infer[0] = T.int64(-1)
        for j in range(k):
            assert shape[j] >= -1, "Reshape: a shape value is below -1"
            if shape[j] == -1:
                assert infer[0] == -1, "Reshape: more than one -1 in the shape"
                infer[0] = j
                out[j] = T.int64(1)
            elif shape[j] == 0 and not allowzero:
                assert j < r, "Reshape: a 0 copies an input dim that does not exist"
                out[j] = dims[j]
            else:
                out[j] = shape[j]
            known[0] = known[0] * out[j]
        if infer[0] >= 0:
            assert known[0] != 0 and total[0] % known[0] == 0, (
                "Reshape: no size for the -1 dim matches the input's element count")
            out[infer[0]] = total[0] // known[0]
        else:
            assert known[0] == total[0], (
                "Reshape: the new shape's element count differs from the input's")
    return _scheduled(reshape_shape)


def convert_reshape(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                    opset: int) -> relax.Expr | None:
    """Reshape with a run-time `shape` tensor (0 / -1 / allowzero as ONNX says), else None."""
    if len(inputs) < 2 or not _is_runtime(inputs[1]):
        return None
    data, shape = inputs[0], inputs[1]
    if not isinstance(data.ty, relax.TensorType):
        return None  # a shape value: TVM's converter
    ndim = _static_len(shape)
    if _rank(data) is None or ndim is None or _rank(shape) != 1:
        raise ValueError("Reshape with a run-time shape needs the data's rank and the shape's "
                         "length")
    kernel = _reshape_kernel(bool(attrs.get("allowzero", 0)))
    out_shape = bb.emit(relax.call_tir(
        bb.add_func(kernel, "lepton_reshape_shape"), [_dims_tensor(bb, data),
                                                      _as_int64(bb, shape)],
        relax.TensorType([ndim], "int64")))
    return relax.op.reshape(data, relax.ShapeExpr(_to_shape(bb, out_shape, ndim, "reshape_d")))


# ----------------------------------------------------------------------------------- Pad

def _pad_kernel(wraps: bool, reflect: bool) -> tirx.PrimFunc:
    """Full-rank pads [before..., after...] and output dims from (pads, axes), checked."""
    @T.prim_func(private=True)
    def pad_shape(dims_h: T.handle, pads_h: T.handle, axes_h: T.handle, full_h: T.handle,
                  out_h: T.handle):
        r = T.int64()
        n = T.int64()
        m = T.int64()
        dims = T.match_buffer(dims_h, (r,), "int64")
        pads = T.match_buffer(pads_h, (m,), "int64")
        axes = T.match_buffer(axes_h, (n,), "int64")
        full = T.match_buffer(full_h, (r * 2,), "int64")
        out = T.match_buffer(out_h, (r,), "int64")
        assert m == n * 2, "Pad: pads must hold 2 values per padded axis"
        for i in range(r * 2):
            full[i] = T.int64(0)
        for j in range(n):
            assert axes[j] >= -r and axes[j] < r, "Pad: an axes value is outside [-rank, rank-1]"
            for k in range(j):
                assert (axes[j] + r) % r != (axes[k] + r) % r, "Pad: axes repeats an axis"
            full[(axes[j] + r) % r] = pads[j]
            full[(axes[j] + r) % r + r] = pads[j + n]
        for i in range(r):
            out[i] = dims[i] + full[i] + full[i + r]
            assert out[i] >= 0, "Pad: negative pads remove more than the whole axis"
            # edge/reflect/wrap pad what is left after cropping (negative pads) first
            if wraps:
                assert out[i] == 0 or dims[i] - T.max(-full[i], T.int64(0)) - T.max(
                    -full[i + r], T.int64(0)) > 0, (
                    "Pad: edge/reflect/wrap padding of an empty (or fully cropped) axis")
            if reflect:
                assert T.max(full[i], full[i + r]) < dims[i] - T.max(
                    -full[i], T.int64(0)) - T.max(-full[i + r], T.int64(0)), (
                    "Pad: reflect pads must be smaller than the axis")
    return _scheduled(pad_shape)


def _pad_compute(mode: str, rank: int, out_dims: list[tirx.Var]) -> Callable[..., te.Tensor]:
    def kernel(x: te.Tensor, full: te.Tensor, value: te.Tensor | None = None) -> te.Tensor:
        def body(*o: Any) -> Any:
            index, inside = [], []
            zero = tirx.const(0, "int64")
            for i in range(rank):
                if mode != "constant":  # the axis after cropping: [lo, lo + d)
                    lo = tirx.Max(-full[i], zero)
                    d = x.shape[i] - lo - tirx.Max(-full[i + rank], zero)
                    j = o[i] - tirx.Max(full[i], zero)
                else:
                    d = x.shape[i]
                    j = o[i] - full[i]
                if mode == "constant":
                    inside.append(tirx.all(j >= 0, j < d))
                    index.append(tirx.Select(tirx.all(j >= 0, j < d), j, tirx.const(0, "int64")))
                elif mode == "edge":
                    index.append(tirx.Max(tirx.Min(j, d - 1), tirx.const(0, "int64")))
                elif mode == "wrap":
                    index.append(tirx.floormod(j, d))
                else:  # reflect: period 2(d-1); a length-1 axis repeats its element
                    period = tirx.Max(d * 2 - 2, tirx.const(1, "int64"))
                    k = tirx.floormod(j, period)
                    index.append(tirx.Select(d == 1, tirx.const(0, "int64"),
                                             tirx.Select(k < d, k, period - k)))
            if mode != "constant":
                return x[tuple(index[i] + tirx.Max(-full[i], zero) for i in range(rank))]
            return tirx.if_then_else(tirx.all(*inside), x[tuple(index)], value[()])
        return te.compute(list(out_dims), body, name="pad")
    return kernel


def convert_pad(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                opset: int) -> relax.Expr | None:
    """Pad (opset 11+) whose pads, constant_value or axes is a run-time tensor, else None."""
    if opset < 11 or not any(_is_runtime(inputs[i]) for i in range(1, len(inputs))):
        return None
    data = inputs[0]
    rank = _rank(data)
    if rank is None:
        raise ValueError("Pad with run-time pads needs the data's rank")
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else str(mode)
    if mode not in ("constant", "edge", "reflect", "wrap"):
        raise ValueError(f"Pad: unknown mode {mode!r}")
    pads = _as_int64(bb, inputs[1])
    axes = inputs[3] if len(inputs) > 3 and inputs[3] is not None else relax.const(
        list(range(rank)), "int64")
    axes = _as_int64(bb, axes)
    dims = _dims_tensor(bb, data)
    result = bb.emit(relax.call_tir(
        bb.add_func(_pad_kernel(mode != "constant", mode == "reflect"), "lepton_pad_shape"), [dims, pads, axes],
        [relax.TensorType([2 * rank], "int64"), relax.TensorType([rank], "int64")]))
    full = bb.emit(relax.TupleGetItem(result, 0))
    out_dims = _to_shape(bb, bb.emit(relax.TupleGetItem(result, 1)), rank, "pad_d")
    args = [data, full]
    if mode == "constant":
        value = inputs[2] if len(inputs) > 2 and inputs[2] is not None else relax.const(
            0, data.ty.dtype)
        if value.ty.dtype != data.ty.dtype:
            value = bb.emit(relax.op.astype(value, data.ty.dtype))
        if _rank(value) != 0:
            value = bb.emit(relax.op.reshape(value, relax.ShapeExpr([])))
        args.append(value)
    return bb.emit_te(_pad_compute(mode, rank, out_dims), *args,
                      primfunc_name_hint="lepton_pad")


# ---------------------------------------------------------------------------------- TopK

def _topk_kernel(dtype: str, largest: bool) -> tirx.PrimFunc:
    """Selection, k passes over each row: the j-th pick is the best element that comes
    after pick j-1 in the order (value, then lower index first): ONNX's tie rule."""
    @T.prim_func(private=True)
    def topk(x_h: T.handle, k_h: T.handle, v_h: T.handle, i_h: T.handle):
        rows = T.int64()
        length = T.int64()
        k = T.int64()
        x = T.match_buffer(x_h, (rows, length), dtype)
        k_in = T.match_buffer(k_h, (1,), "int64")
        values = T.match_buffer(v_h, (rows, k), dtype)
        indices = T.match_buffer(i_h, (rows, k), "int64")
        # k (the output dim) is the value clipped to [0, length]: any other value is refused
        assert k_in[0] == k, "TopK: k is negative or larger than the axis"
        best = T.alloc_buffer((1,), "int64", scope="local")
        for row, j in T.grid(rows, k):
            best[0] = T.int64(-1)
            for i in range(length):
                later = T.if_then_else(
                    j == 0, True,
                    T.if_then_else(largest, x[row, i] < values[row, j - 1],
                                   x[row, i] > values[row, j - 1])
                    or (x[row, i] == values[row, j - 1] and i > indices[row, j - 1]))
                if later:
                    if best[0] < 0:
                        best[0] = i
                    elif T.if_then_else(largest, x[row, i] > x[row, best[0]],
                                        x[row, i] < x[row, best[0]]):
                        best[0] = i
            # only NaNs (unordered) can leave a pick empty: refuse rather than read x[-1]
            assert best[0] >= 0, "TopK: the row holds NaN values this kernel cannot order"
            values[row, j] = x[row, best[0]]
            indices[row, j] = best[0]
    return _scheduled(topk)


def convert_topk(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                 opset: int) -> relax.Expr | None:
    """TopK (opset 10+) with a run-time k, else None. Sorted output (also for sorted=0,
    which lets the order be any)."""
    if len(inputs) < 2 or not _is_runtime(inputs[1]):
        return None
    data, k = inputs[0], inputs[1]
    rank = _rank(data)
    if rank is None or rank == 0 or not isinstance(data.ty.shape, relax.ShapeExpr):
        raise ValueError("TopK with a run-time k needs the data's rank")
    if _static_len(k) != 1:
        raise ValueError("TopK: k must hold exactly one value")
    axis = int(attrs.get("axis", -1))
    if not -rank <= axis < rank:
        raise ValueError(f"TopK: axis {axis} is outside [-{rank}, {rank - 1}]")
    axis %= rank
    dims = list(data.ty.shape.values)
    perm = [i for i in range(rank) if i != axis] + [axis]
    moved = data if axis == rank - 1 else bb.emit(relax.op.permute_dims(data, perm))
    rows = tirx.const(1, "int64")
    for i in perm[:-1]:
        rows = rows * dims[i]
    flat = bb.emit(relax.op.reshape(moved, relax.ShapeExpr([rows, dims[axis]])))
    k = _as_int64(bb, k)
    if _rank(k) == 0:
        k = bb.emit(relax.op.reshape(k, relax.ShapeExpr([1])))
    length = dims[axis]
    if not isinstance(length, tirx.IntImm):
        raise ValueError("TopK with a run-time k needs a static axis length")
    clipped = bb.emit(relax.op.clip(k, 0, int(length)))
    (kv,) = _to_shape(bb, clipped, 1, "topk_k")
    dtype = str(data.ty.dtype)
    result = bb.emit(relax.call_tir(
        bb.add_func(_topk_kernel(dtype, bool(attrs.get("largest", 1))), "lepton_topk"),
        [flat, k],
        [relax.TensorType([rows, kv], dtype), relax.TensorType([rows, kv], "int64")]))
    outs = []
    for index in range(2):
        part = bb.emit(relax.TupleGetItem(result, index))
        part = bb.emit(relax.op.reshape(part, relax.ShapeExpr(
            [dims[i] for i in perm[:-1]] + [kv])))
        if axis != rank - 1:
            inverse = [perm.index(i) for i in range(rank)]
            part = bb.emit(relax.op.permute_dims(part, inverse))
        outs.append(part)
    return relax.Tuple(outs)


# --------------------------------------------------------------------------------- Split

def _split_kernel(axis: int) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def split_sizes(dims_h: T.handle, split_h: T.handle, sizes_h: T.handle, offs_h: T.handle):
        r = T.int64()
        m = T.int64()
        dims = T.match_buffer(dims_h, (r,), "int64")
        split = T.match_buffer(split_h, (m,), "int64")
        sizes = T.match_buffer(sizes_h, (m,), "int64")
        offsets = T.match_buffer(offs_h, (m,), "int64")
        total = T.alloc_buffer((1,), "int64", scope="local")
        total[0] = T.int64(0)
        for i in range(m):
            assert split[i] >= 0, "Split: a split size is negative"
            offsets[i] = total[0]
            sizes[i] = split[i]
            total[0] = total[0] + split[i]
        assert total[0] == dims[axis], "Split: the split sizes do not add up to the axis"
    return _scheduled(split_sizes)


def convert_split(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                  opset: int) -> relax.Expr | None:
    """Split (opset 13+) with a run-time `split` tensor, else None."""
    if opset < 13 or len(inputs) < 2 or not _is_runtime(inputs[1]):
        return None
    data, split = inputs[0], inputs[1]
    rank, count = _rank(data), _static_len(split)
    if rank is None or count is None or count == 0:
        raise ValueError("Split with run-time sizes needs the data's rank and the number of "
                         "outputs")
    axis = int(attrs.get("axis", 0))
    if not -rank <= axis < rank:
        raise ValueError(f"Split: axis {axis} is outside [-{rank}, {rank - 1}]")
    axis %= rank
    result = bb.emit(relax.call_tir(
        bb.add_func(_split_kernel(axis), "lepton_split_sizes"),
        [_dims_tensor(bb, data), _as_int64(bb, split)],
        [relax.TensorType([count], "int64"), relax.TensorType([count], "int64")]))
    sizes = _to_shape(bb, bb.emit(relax.TupleGetItem(result, 0)), count, "split_d")
    offsets = bb.emit(relax.TupleGetItem(result, 1))
    outs = []
    for i in range(count):
        def part(x: te.Tensor, offs: te.Tensor, _i: int = i) -> te.Tensor:
            shape = [sizes[_i] if d == axis else x.shape[d] for d in range(rank)]
            return te.compute(shape, lambda *o: x[tuple(
                o[d] + offs[_i] if d == axis else o[d] for d in range(rank))], name="split")
        outs.append(bb.emit_te(part, data, offsets, primfunc_name_hint="lepton_split"))
    return relax.Tuple(outs)


# -------------------------------------------------------------------------------- Expand

@T.prim_func(private=True)
def _expand_shape(dims_h: T.handle, shape_h: T.handle, out_h: T.handle):
    r = T.int64()
    k = T.int64()
    m = T.int64()
    dims = T.match_buffer(dims_h, (r,), "int64")
    shape = T.match_buffer(shape_h, (k,), "int64")
    out = T.match_buffer(out_h, (m,), "int64")
    # numpy broadcasting of the input's dims with the shape, both aligned to the right
    for i in range(m):
        if i - (m - r) >= 0 and i - (m - k) >= 0:
            assert shape[i - (m - k)] >= 0, "Expand: a shape value is negative"
            assert dims[i - (m - r)] == shape[i - (m - k)] or dims[i - (m - r)] == 1 or shape[
                i - (m - k)] == 1, "Expand: the shape does not broadcast with the input"
            out[i] = T.if_then_else(dims[i - (m - r)] == 1, shape[i - (m - k)],
                                    dims[i - (m - r)])
        elif i - (m - r) >= 0:
            out[i] = dims[i - (m - r)]
        else:
            assert shape[i - (m - k)] >= 0, "Expand: a shape value is negative"
            out[i] = shape[i - (m - k)]


def convert_expand(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                   opset: int) -> relax.Expr | None:
    """Expand with a run-time `shape` tensor, else None (a constant shape: TVM's converter)."""
    if len(inputs) < 2 or isinstance(inputs[1], tvm.ir.GenericConst):
        return None
    data, shape = inputs[0], inputs[1]
    if not _is_runtime(shape) or not isinstance(data.ty, relax.TensorType):
        # a shape value made by Shape ops: TVM 0.27 expands it to the wrong shape
        raise ValueError("Expand takes its shape at run time as a shape value; TVM 0.27 "
                         "expands to the wrong shape then")
    rank, count = _rank(data), _static_len(shape)
    if rank is None or count is None or _rank(shape) != 1:
        raise ValueError("Expand with a run-time shape needs the data's rank and the shape's "
                         "length")
    ndim = max(rank, count)
    out_shape = bb.emit(relax.call_tir(
        bb.add_func(_scheduled(_expand_shape), "lepton_expand_shape"),
        [_dims_tensor(bb, data), _as_int64(bb, shape)], relax.TensorType([ndim], "int64")))
    out_dims = _to_shape(bb, out_shape, ndim, "expand_d")

    def expand(x: te.Tensor) -> te.Tensor:
        def body(*o: Any) -> Any:
            index = []
            for i in range(rank):
                d = x.shape[i]
                index.append(tirx.Select(d == 1, tirx.const(0, "int64"), o[ndim - rank + i]))
            return x[tuple(index)]
        return te.compute(list(out_dims), body, name="expand")

    return bb.emit_te(expand, data, primfunc_name_hint="lepton_expand")


# -------------------------------------------------------------------------------- Resize
#
# Resize (opset 11+) as separable 1-d passes, one per resized axis, in float64 like ONNX's
# reference: each output position along the axis maps to a source coordinate (the
# coordinate_transformation_mode), whose neighbours are weighted (nearest / linear / cubic,
# antialiased or not, exclude_outside), indices clamped to the axis (edge padding). TVM 0.27's
# converter cannot take run-time scales/sizes/roi and is wrong for linear/cubic downsampling,
# antialias and align_corners with a fractional output width; this one follows the spec in
# every mode. Output dims come from the scales/sizes (computed here when they are constants,
# by a small TIR kernel when they arrive at run time).

_RESIZE_COORD = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
                 "asymmetric", "tf_crop_and_resize", "tf_half_pixel_for_nn")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _text(attrs: dict[str, Any], name: str, default: str) -> str:
    value = attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def _const_value(expr: Any) -> Any:
    import numpy as np

    if expr is None:
        return None
    if isinstance(expr, tvm.ir.GenericConst):
        return np.asarray(expr.value.numpy())
    return None


def _resize_taps(mode: str, antialias: bool, scale: float) -> int:
    """Taps per output position (the reference's coefficient count)."""
    if mode == "cubic" or (mode == "linear" and antialias):
        if not antialias:
            return 4
        support = 2.0 if mode == "cubic" else 1.0
        start = math.floor(-support / min(scale, 1.0)) + 1
        return 2 - 2 * start
    return 2


def _resize_params_kernel(use_sizes: bool, policy: str, mode: str, antialias: bool,
                          roi_dtype: str, vals_dtype: str) -> tirx.PrimFunc:
    support = 2.0 if mode == "cubic" else 1.0
    fixed_taps = 4 if mode == "cubic" else 2
    keep_ratio = policy != "stretch"
    not_larger = policy == "not_larger"

    @T.prim_func(private=True)
    def resize_params(dims_h: T.handle, axes_h: T.handle, vals_h: T.handle, roi_h: T.handle,
                      out_h: T.handle, taps_h: T.handle, par_h: T.handle):
        r = T.int64()
        k = T.int64()
        m = T.int64()
        q = T.int64()
        dims = T.match_buffer(dims_h, (r,), "int64")
        axes = T.match_buffer(axes_h, (k,), "int64")
        vals = T.match_buffer(vals_h, (m,), vals_dtype)
        roi = T.match_buffer(roi_h, (q,), roi_dtype)
        out = T.match_buffer(out_h, (r,), "int64")
        taps = T.match_buffer(taps_h, (r,), "int64")
        par = T.match_buffer(par_h, (r * 3,), "float64")
        pick = T.alloc_buffer((1,), "float64", scope="local")
        assert m == k, "Resize: scales/sizes must hold one value per resized axis"
        assert q == 0 or q == k * 2, "Resize: roi must hold 2 values per resized axis"
        for i in range(r):
            out[i] = dims[i]
            par[i] = T.float64(1)
            par[r + i] = T.float64(0)
            par[r * 2 + i] = T.float64(1)
        for j in range(k):
            if use_sizes:
                assert vals[j] >= 0, "Resize: a sizes value is negative"
                assert dims[axes[j]] > 0, "Resize: sizes given for an empty axis"
                out[axes[j]] = T.Cast("int64", vals[j])
                par[axes[j]] = T.Cast("float64", vals[j]) / T.Cast("float64", dims[axes[j]])
            else:
                assert vals[j] > T.Cast(vals_dtype, 0), "Resize: a scales value is not positive"
                par[axes[j]] = T.Cast("float64", vals[j])
                out[axes[j]] = T.Cast("int64", T.floor(
                    T.Cast("float64", vals[j]) * T.Cast("float64", dims[axes[j]])))
            if q > 0:
                par[r + axes[j]] = T.Cast("float64", roi[j])
                par[r * 2 + axes[j]] = T.Cast("float64", roi[k + j])
        if keep_ratio:
            pick[0] = par[axes[0]]
            for j in range(k):
                if not_larger:
                    pick[0] = T.min(pick[0], par[axes[j]])
                else:
                    pick[0] = T.max(pick[0], par[axes[j]])
            for j in range(k):
                par[axes[j]] = pick[0]
                out[axes[j]] = T.Cast("int64", T.floor(
                    pick[0] * T.Cast("float64", dims[axes[j]]) + T.float64(0.5)))
        for i in range(r):
            if antialias:
                taps[i] = T.int64(2) - T.int64(2) * (T.Cast("int64", T.floor(
                    T.float64(-support) / T.min(par[i], T.float64(1)))) + T.int64(1))
            else:
                taps[i] = T.int64(fixed_taps)
    return _scheduled(resize_params)


def _resize_axis(cfg: dict[str, Any], axis: int, n_out: Any, taps_: Any
                 ) -> Callable[..., te.Tensor]:
    """One 1-d resize pass along `axis` of a float64 tensor."""
    mode, coord, f64 = cfg["mode"], cfg["coord"], "float64"

    def kernel(x: te.Tensor, par: te.Tensor, _taps: te.Tensor | None = None) -> te.Tensor:
        # `_taps` (shape [taps]) only binds a run-time tap count to a kernel argument
        taps = taps_ if _taps is None else _taps.shape[0]
        rank = len(x.shape)
        n_in = x.shape[axis]
        scale = par[axis]
        in_f = tirx.Cast(f64, n_in)
        out_f = scale * in_f  # the reference's (fractional) output width
        one, half = tirx.const(1.0, f64), tirx.const(0.5, f64)

        def source(o: Any) -> Any:
            y = tirx.Cast(f64, o)
            if coord == "align_corners":
                return tirx.Select(out_f == one, tirx.const(0.0, f64),
                                   y * (in_f - one) / (out_f - one))
            if coord == "asymmetric":
                return y / scale
            if coord == "tf_half_pixel_for_nn":
                return (y + half) / scale
            if coord == "tf_crop_and_resize":
                start, end = par[rank + axis], par[2 * rank + axis]
                width = end - start
                if cfg["roi_f32"]:
                    width = tirx.Cast(f64, tirx.Cast("float32", end) - tirx.Cast("float32",
                                                                                  start))
                return tirx.Select(out_f == one, width * (in_f - one) / tirx.const(2.0, f64),
                                   y * width * (in_f - one) / (out_f - one)) + start * (
                                       in_f - one)
            if coord == "pytorch_half_pixel":
                return tirx.Select(out_f == one, -half, (y + half) / scale - half)
            if coord == "half_pixel_symmetric":
                adjust = tirx.Cast(f64, n_out) / out_f
                offset = in_f / tirx.const(2.0, f64) * (one - adjust)
                return offset + (y + half) / scale - half
            return (y + half) / scale - half  # half_pixel

        src = te.compute((n_out,), source, name="resize_src")

        def base(o: Any) -> tuple[Any, Any]:
            """(index left of the source coordinate, ratio in (0, 1])."""
            s = src[o]
            low = tirx.floor(s)
            exact = s == low
            left = tirx.Cast("int64", low) - tirx.Select(exact, tirx.const(1, "int64"),
                                                         tirx.const(0, "int64"))
            return left, tirx.Select(exact, one, s - low)

        def clamp(i: Any) -> Any:
            return tirx.Max(tirx.Min(i, n_in - 1), tirx.const(0, "int64"))

        def at(o: tuple[Any, ...], i: Any) -> Any:
            return x[tuple(i if d == axis else o[d] for d in range(rank))]

        if mode == "nearest":
            nearest = cfg["nearest"]

            def pick(*o: Any) -> Any:
                left, ratio = base(o[axis])
                up = {"round_prefer_floor": ratio > half, "round_prefer_ceil": ratio >= half,
                      "floor": ratio == one, "ceil": tirx.const(True, "bool")}[nearest]
                return at(o, clamp(left + tirx.Select(up, tirx.const(1, "int64"),
                                                      tirx.const(0, "int64"))))
            out = te.compute([n_out if d == axis else x.shape[d] for d in range(rank)], pick,
                             name="resize_nearest")
        else:
            a = tirx.const(float(cfg["cubic_a"]), f64)
            antialias = cfg["antialias"]
            shrink = tirx.Min(scale, one)

            def cubic(d: Any) -> Any:  # the cubic kernel at |d| <= 2 (antialias form)
                d = tirx.abs(d)
                d2 = d * d
                d3 = d * d2
                return tirx.Select(d <= one, (a + 2) * d3 - (a + 3) * d2 + one, tirx.Select(
                    d < tirx.const(2.0, f64), a * d3 - a * 5 * d2 + a * 8 * d - a * 4,
                    tirx.const(0.0, f64)))

            def coeff(o: Any, k: Any) -> Any:
                left, ratio = base(o)
                i = k + 1 - taps // 2  # offset of tap k from `left`
                fi = tirx.Cast(f64, i)
                if mode == "linear" and not antialias:
                    w = tirx.Select(k == 0, one - ratio, ratio)
                elif mode == "linear":
                    w = tirx.Max(tirx.Min(one - tirx.abs((fi - ratio) * shrink), one),
                                 tirx.const(0.0, f64))
                elif antialias:
                    w = cubic(shrink * (fi - ratio))
                else:
                    r1, r0 = ratio + one, one - ratio
                    w = tirx.Select(k == 0, ((a * r1 - a * 5) * r1 + a * 8) * r1 - a * 4,
                                    tirx.Select(k == 1, ((a + 2) * ratio - (a + 3)) * ratio
                                                * ratio + one,
                                                tirx.Select(k == 2, ((a + 2) * r0 - (a + 3))
                                                            * r0 * r0 + one,
                                                            ((a * (r0 + one) - a * 5) * (
                                                                r0 + one) + a * 8) * (
                                                                r0 + one) - a * 4)))
                if cfg["exclude_outside"]:
                    w = tirx.Select(tirx.all(left + i >= 0, left + i < n_in), w,
                                    tirx.const(0.0, f64))
                return w

            taps64 = tirx.IntImm("int64", taps) if isinstance(taps, int) else taps
            weights = te.compute((n_out, taps64), coeff, name="resize_w")
            if antialias or cfg["exclude_outside"]:
                kk = te.reduce_axis((0, taps64), name="kk")
                total = te.compute((n_out,), lambda o: te.sum(weights[o, kk], axis=kk),
                                   name="resize_wsum")
                weights = te.compute((n_out, taps64), lambda o, k: weights[o, k] / tirx.Select(
                    total[o] == tirx.const(0.0, f64), one, total[o]), name="resize_wn")

            def mix(*o: Any) -> Any:
                k = te.reduce_axis((0, taps64), name="k")
                left, _ = base(o[axis])
                w = weights[o[axis], k]
                w = w if x.dtype == f64 else tirx.Cast(x.dtype, w)
                return te.sum(w * at(o, clamp(left + k + 1 - taps // 2)), axis=k)
            out = te.compute([n_out if d == axis else x.shape[d] for d in range(rank)], mix,
                             name="resize_mix")
        if coord == "tf_crop_and_resize":
            fill = tirx.const(float(cfg["extrapolation"]), out.dtype)
            out_ = out
            out = te.compute(out_.shape, lambda *o: tirx.Select(tirx.any(
                src[o[axis]] < tirx.const(0.0, f64), src[o[axis]] > in_f - one), fill,
                out_[o]), name="resize_fill")
        return out
    return kernel


def convert_resize(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                   opset: int) -> relax.Expr | None:
    """Resize (opset 11+), every mode, constant or run-time scales/sizes/roi (TVM's converter
    is left only opset 10 and non-numeric linear/cubic)."""
    import numpy as np

    if opset < 11:
        return None
    data = inputs[0]
    extra = [inputs[i] if len(inputs) > i else None for i in (1, 2, 3)]
    roi, scales, sizes = extra
    mode = _text(attrs, "mode", "nearest")
    dtype = str(data.ty.dtype)
    if mode != "nearest" and dtype not in _FLOATS + _INTS:
        return None
    if _rank(data) is None or not isinstance(data.ty.shape, relax.ShapeExpr):
        raise ValueError("Resize needs the data's rank")
    rank = _rank(data)
    coord = _text(attrs, "coordinate_transformation_mode", "half_pixel")
    nearest = _text(attrs, "nearest_mode", "round_prefer_floor")
    policy = _text(attrs, "keep_aspect_ratio_policy", "stretch")
    antialias = bool(attrs.get("antialias", 0)) and mode != "nearest"
    if coord not in _RESIZE_COORD or nearest not in _NEAREST or mode not in (
            "nearest", "linear", "cubic") or policy not in ("stretch", "not_larger",
                                                            "not_smaller"):
        raise ValueError(f"Resize: unsupported mode {mode}/{coord}/{nearest}/{policy}")
    axes = [int(a) for a in attrs.get("axes", range(rank))]
    if any(not -rank <= a < rank for a in axes):
        raise ValueError(f"Resize: an axes value is outside [-{rank}, {rank - 1}]")
    axes = [a % rank for a in axes]
    if len(set(axes)) != len(axes):
        raise ValueError("Resize: axes repeats an axis")

    def given(v: Any) -> bool:
        return v is not None and _static_len(v) != 0
    use_sizes = given(sizes)
    vals = sizes if use_sizes else scales
    if vals is None or not given(vals) or (use_sizes and given(scales)):
        raise ValueError("Resize needs exactly one of scales and sizes")
    if coord != "tf_crop_and_resize" or not given(roi):
        roi = None
    cfg = {"mode": mode, "coord": coord, "nearest": nearest, "antialias": antialias,
           "cubic_a": float(attrs.get("cubic_coeff_a", -0.75)),
           "exclude_outside": bool(attrs.get("exclude_outside", 0)),
           "extrapolation": float(attrs.get("extrapolation_value", 0.0)),
           "roi_f32": roi is not None and str(roi.ty.dtype) == "float32"}
    static_dims = list(data.ty.shape.values)
    consts = [_const_value(v) for v in (vals, roi)]
    resized: list[int] = list(axes)
    if consts[0] is not None and consts[0].size == len(axes) and not use_sizes:
        # an axis scaled by exactly 1 with the whole roi is left as it is (its dim may be
        # symbolic: a run-time batch)
        whole = [True] * len(axes) if consts[1] is None or roi is None else [
            consts[1].reshape(-1)[j] == 0 and consts[1].reshape(-1)[len(axes) + j] == 1
            for j in range(len(axes))]
        resized = [a for j, a in enumerate(axes)
                   if not (consts[0].reshape(-1)[j] == 1 and whole[j])]
    known = all(isinstance(static_dims[a], tirx.IntImm) for a in resized)
    if known and consts[0] is not None and (roi is None or consts[1] is not None):
        # everything is known now: the reference's arithmetic in numpy
        dims: list[Any] = [int(d) if isinstance(d, tirx.IntImm) else d for d in static_dims]
        par = np.ones(3 * rank)
        par[rank:2 * rank] = 0.0
        out = list(dims)
        values = consts[0].reshape(-1)
        if len(values) != len(axes):
            raise ValueError("Resize: scales/sizes must hold one value per resized axis")
        for j, a in enumerate(axes):
            if a not in resized:
                continue
            if use_sizes:
                out[a] = int(values[j])
                par[a] = float(values[j]) / dims[a]
            else:
                par[a] = float(values[j])
                out[a] = int(np.float64(values[j]) * dims[a])
        if policy != "stretch":
            pick = (min if policy == "not_larger" else max)(par[a] for a in axes)
            for a in axes:
                par[a] = pick
                out[a] = int(pick * dims[a] + 0.5)
        if roi is not None:
            rv = consts[1].reshape(-1).astype(np.float64)
            for j, a in enumerate(axes):
                par[rank + a], par[2 * rank + a] = rv[j], rv[len(axes) + j]
        params = relax.const(par, "float64")
        identity = [a not in resized or (par[a] == 1.0 and out[a] == dims[a] and (
            roi is None or (par[rank + a] == 0.0 and par[2 * rank + a] == 1.0)))
            for a in range(rank)]
        out_dims: list[Any] = [tirx.IntImm("int64", d) if isinstance(d, int) else d
                               for d in out]
        taps: list[Any] = [_resize_taps(mode, antialias, par[a]) for a in range(rank)]
    else:
        vals = bb.emit(relax.op.astype(vals, "float32")) if not use_sizes and str(
            vals.ty.dtype) not in ("float32", "float64") else vals
        vals = _as_int64(bb, vals) if use_sizes else vals
        if _rank(vals) != 1:
            vals = bb.emit(relax.op.reshape(vals, relax.ShapeExpr([len(axes)])))
        roi_in = roi if roi is not None else relax.const(np.zeros(0, np.float32), "float32")
        if str(roi_in.ty.dtype) not in ("float32", "float64"):
            roi_in = bb.emit(relax.op.astype(roi_in, "float64"))
        kernel = _resize_params_kernel(use_sizes, policy, mode, antialias,
                                       str(roi_in.ty.dtype), str(vals.ty.dtype))
        result = bb.emit(relax.call_tir(
            bb.add_func(kernel, "lepton_resize_params"),
            [_dims_tensor(bb, data), relax.const(np.array(axes, np.int64), "int64"), vals, roi_in],
            [relax.TensorType([rank], "int64"), relax.TensorType([rank], "int64"),
             relax.TensorType([3 * rank], "float64")]))
        out_dims = _to_shape(bb, bb.emit(relax.TupleGetItem(result, 0)), rank, "resize_d")
        if antialias:
            taps = _to_shape(bb, bb.emit(relax.TupleGetItem(result, 1)), rank, "resize_t")
        else:
            taps = [4 if mode == "cubic" else 2] * rank
        params = bb.emit(relax.TupleGetItem(result, 2))
        identity = [False] * rank
    # linear/cubic mix in float32 for float32/16 data (the weights are float64: the result
    # stays within a few float32 ulps of the reference's float64), in float64 otherwise (an
    # integer result must round exactly like the reference)
    work = "float32" if dtype in ("float32", "float16", "bfloat16") else "float64"
    if mode == "nearest":
        x = data  # a gather: any element type, no arithmetic
    else:
        x = data if dtype == work else bb.emit(relax.op.astype(data, work))
    for a in axes:
        if identity[a]:
            continue  # the reference skips such axes too
        bind = [] if isinstance(taps[a], int) else [
            bb.emit(relax.op.zeros(relax.ShapeExpr([taps[a]]), "int8"))]
        x = bb.emit_te(_resize_axis(cfg, a, out_dims[a], taps[a]), x, params, *bind,
                       primfunc_name_hint=f"lepton_resize_{mode}")
    if mode == "nearest" or dtype == work:
        return x
    return bb.emit_te(_saturate(dtype), x, primfunc_name_hint="lepton_resize_cast")


def convert_upsample(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                     opset: int) -> relax.Expr | None:
    """Upsample-9 (scales as an input): Resize with asymmetric coordinates, nearest taking the
    floor (what onnxruntime and ONNX's reference compute). Upsample-7 (scales attribute)
    stays with TVM's converter."""
    if opset < 9 or len(inputs) < 2 or inputs[1] is None:
        return None
    mode = _text(attrs, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise ValueError(f"Upsample: unknown mode {mode!r}")
    resize_attrs = {"mode": mode, "coordinate_transformation_mode": "asymmetric",
                    "nearest_mode": "floor"}
    return convert_resize(bb, [inputs[0], None, inputs[1], None], resize_attrs, 11)


def _saturate(dtype: str) -> Callable[[te.Tensor], te.Tensor]:
    """float32/64 -> `dtype` as ONNX's reference Resize does: integers rounded half to even,
    every type clipped to its range (NaN stays NaN)."""
    def cast(x: te.Tensor) -> te.Tensor:
        lo, hi = tvm.tirx.min_value(dtype), tvm.tirx.max_value(dtype)
        lo, hi = tirx.Cast(x.dtype, lo), tirx.Cast(x.dtype, hi)

        def body(*o: Any) -> Any:
            v = x[o]
            if dtype not in _FLOATS:
                v = tirx.nearbyint(v)
            return tirx.Cast(dtype, tirx.Select(v > hi, hi, tirx.Select(v < lo, lo, v)))
        return te.compute(x.shape, body, name="saturate")
    return cast


# --------------------------------------------------------------------------------- Range

def _range_kernels(dtype: str) -> tuple[tirx.PrimFunc, tirx.PrimFunc]:
    floating = dtype in _FLOATS

    @T.prim_func(private=True)
    def range_len(start_h: T.handle, limit_h: T.handle, delta_h: T.handle, n_h: T.handle):
        start = T.match_buffer(start_h, (), dtype)
        limit = T.match_buffer(limit_h, (), dtype)
        delta = T.match_buffer(delta_h, (), dtype)
        n = T.match_buffer(n_h, (1,), "int64")
        assert delta[()] != T.Cast(dtype, 0), "Range: delta is 0"
        if floating:
            n[0] = T.max(T.Cast("int64", T.ceil(
                (T.Cast("float64", limit[()]) - T.Cast("float64", start[()]))
                / T.Cast("float64", delta[()]))), T.int64(0))
        else:  # exact integer ceil((limit - start) / delta)
            n[0] = T.max(T.floordiv(T.Cast("int64", limit[()]) - T.Cast("int64", start[()])
                                    + T.Cast("int64", delta[()])
                                    - T.if_then_else(delta[()] > T.Cast(dtype, 0),
                                                     T.int64(1), T.int64(-1)),
                                    T.Cast("int64", delta[()])), T.int64(0))

    @T.prim_func(private=True)
    def range_fill(start_h: T.handle, delta_h: T.handle, n_h: T.handle, out_h: T.handle):
        n = T.int64()
        count = T.match_buffer(n_h, (1,), "int64")
        start = T.match_buffer(start_h, (), dtype)
        delta = T.match_buffer(delta_h, (), dtype)
        out = T.match_buffer(out_h, (n,), dtype)
        assert count[0] == n, "Range: the output length differs from the computed one"
        for i in range(n):
            out[i] = start[()] + T.Cast(dtype, i) * delta[()]
    return _scheduled(range_len), _scheduled(range_fill)


def convert_range(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                  opset: int) -> relax.Expr | None:
    """Range whose start, limit or delta is a run-time value, else None (float16/bfloat16:
    refused). The length is ONNX's max(ceil((limit - start) / delta), 0), in float64 for
    floats and exactly for integers."""
    if len(inputs) < 3 or not any(_is_runtime(v) for v in inputs[:3]):
        return None
    dtype = str(inputs[0].ty.dtype)
    if dtype not in _FLOATS + _INTS or dtype in ("float16", "bfloat16"):
        raise ValueError(f"Range on {dtype} with run-time inputs is not supported")
    if any(not isinstance(v.ty, relax.TensorType) or _static_len(v) != 1
           for v in inputs[:3]):
        return None  # an input of unknown shape: TVM's converter
    scalars = []
    for v in inputs[:3]:
        if str(v.ty.dtype) != dtype:
            v = bb.emit(relax.op.astype(v, dtype))
        if _rank(v) != 0:
            v = bb.emit(relax.op.reshape(v, relax.ShapeExpr([])))
        scalars.append(v)
    length, fill = _range_kernels(dtype)
    count = bb.emit(relax.call_tir(bb.add_func(length, "lepton_range_len"), scalars,
                                   relax.TensorType([1], "int64")))
    (n,) = _to_shape(bb, count, 1, "range_n")
    return relax.call_tir(bb.add_func(fill, "lepton_range"), [scalars[0], scalars[2], count],
                          relax.TensorType([n], dtype))


# ------------------------------------------------------------------------ ConstantOfShape

def convert_constant_of_shape(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                              opset: int) -> relax.Expr | None:
    """ConstantOfShape with a run-time shape tensor, else None."""
    import numpy as np
    from onnx import numpy_helper

    if not inputs or not _is_runtime(inputs[0]):
        return None
    shape = inputs[0]
    rank = _static_len(shape)
    if rank is None or _rank(shape) != 1:
        return None  # TVM's converter (an output of unknown rank)
    value = attrs.get("value")
    if value is None:
        value = np.zeros(1, np.float32)
    elif isinstance(value, onnx.TensorProto):
        value = numpy_helper.to_array(value)
    value = np.asarray(value).reshape(-1)
    if value.size != 1:
        raise ValueError("ConstantOfShape: value must hold one element")
    # a negative value fails the run when the VM allocates the output
    dims = _to_shape(bb, _as_int64(bb, shape), rank, "const_d")
    fill = relax.const(value.reshape(()), str(value.dtype))
    return bb.emit_te(lambda v: te.compute(list(dims), lambda *_: v[()], name="fill"), fill,
                      primfunc_name_hint="lepton_constant_of_shape")


# ---------------------------------------------------------------------------- AffineGrid

def convert_affine_grid(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                        opset: int) -> relax.Expr | None:
    """AffineGrid with a run-time `size`, else None. The base grid is ONNX's (arange in
    float64), the product with theta in float64; N is theta's."""
    if len(inputs) < 2 or not _is_runtime(inputs[1]):
        return None
    theta, size = inputs
    count = _static_len(size)
    if count not in (4, 5) or _rank(theta) != 3 or not isinstance(theta.ty.shape,
                                                                   relax.ShapeExpr):
        raise ValueError("AffineGrid with a run-time size needs a 4- or 5-value size and a "
                         "rank-3 theta")
    spatial = count - 2
    n = theta.ty.shape.values[0]
    dims = _to_shape(bb, _as_int64(bb, size), count, "grid_d")[2:]
    align = bool(attrs.get("align_corners", 0))
    dtype = str(theta.ty.dtype)
    f64 = "float64"

    def grid(th: te.Tensor) -> te.Tensor:
        def base(i: Any, length: Any) -> Any:
            ln = tirx.Cast(f64, length)
            if align:
                step = tirx.const(2.0, f64) / (ln - tirx.const(1.0, f64))
                return tirx.Select(length == 1, tirx.const(-1.0, f64),
                                   tirx.const(-1.0, f64) + tirx.Cast(f64, i) * step)
            step = tirx.const(2.0, f64) / ln
            return tirx.const(-1.0, f64) + step / tirx.const(2.0, f64) + tirx.Cast(
                f64, i) * step

        def body(b: Any, *rest: Any) -> Any:
            idx, j = rest[:-1], rest[-1]
            # homogeneous coordinates: x (last axis) first, then y (, z), then 1
            coords = [base(idx[spatial - 1 - c], dims[spatial - 1 - c]) for c in range(spatial)]
            total = tirx.Cast(f64, th[b, j, spatial])
            for c in range(spatial):
                total = total + tirx.Cast(f64, th[b, j, c]) * coords[c]
            return tirx.Cast(dtype, total)
        return te.compute([n, *dims, spatial], body, name="affine_grid")

    return bb.emit_te(grid, theta, primfunc_name_hint="lepton_affine_grid")


# --------------------------------------------------------------------------------- Shape

def convert_shape(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                  opset: int) -> relax.Expr | None:
    """Shape of a tensor whose dims were computed at run time by a converter here (a Pad with
    run-time pads, ...): an int64 tensor, not TVM's shape value, which its elementwise
    converters refuse ("cannot handle ShapeExpr inputs"). Other tensors: TVM's converter."""
    import numpy as np

    data = inputs[0]
    if not isinstance(data.ty, relax.TensorType) or not isinstance(data.ty.shape,
                                                                   relax.ShapeExpr):
        return None
    values = list(data.ty.shape.values)
    if not any(isinstance(d, tirx.Var) and any(d.same_as(v) for v in _RUNTIME_DIMS)
               for d in values):
        return None
    rank = len(values)
    start, end = int(attrs.get("start", 0)), attrs.get("end")
    end = rank if end is None else int(end)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    dims = _dims_tensor(bb, data)
    if (start, end) == (0, rank):
        return dims
    if end <= start:
        return relax.const(np.zeros(0, np.int64), "int64")
    return relax.op.strided_slice(dims, axes=[0], begin=[start], end=[end])


# ------------------------------------------------- ops revised or added after opset 25
# plan.py renames these nodes to `<op>_<version>` in the private domain PRIVATE_DOMAIN when
# it relabels a newer-opset subgraph to MAX_OPSET for TVM's importer (see
# lowering/bodies.py's REVISED_OWN), so the converters here see the newer op's semantics.

def convert_cumprod(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                    opset: int) -> relax.Expr:
    """CumProd-26 (exclusive, reverse; a constant or run-time axis in [-rank, rank-1])."""
    return _cumulative(bb, inputs[0], inputs[1], attrs, product=True)


def convert_bitshift(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                     opset: int) -> relax.Expr:
    """BitShift-28: signed types shift arithmetically to the right; a shift amount < 0 or
    >= the type's bits gives the sign fill alone (-1 for a right shift of a negative x, else
    0). The amount is clamped before shifting (LLVM's shift by >= bits is undefined)."""
    x, y = inputs
    dtype = str(x.ty.dtype)
    if dtype not in _INTS:
        raise ValueError(f"BitShift is defined for integer types, not {dtype}")
    bits = tvm.DataType(dtype).bits
    direction = attrs.get("direction", b"")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"BitShift: direction must be LEFT or RIGHT, got {direction!r}")
    zero = relax.const(0, dtype)
    valid = bb.emit(relax.op.logical_and(relax.op.greater_equal(y, zero),
                                         relax.op.less(y, relax.const(bits, dtype))))
    amount = bb.emit(relax.op.where(valid, y, zero))
    if direction == "LEFT":
        shifted = bb.emit(relax.op.left_shift(x, amount))
        fill: relax.Expr = zero
    else:
        shifted = bb.emit(relax.op.right_shift(x, amount))  # ashr for signed types
        fill = zero if dtype.startswith("u") else bb.emit(relax.op.where(
            relax.op.less(x, zero), relax.const(-1, dtype), zero))
    return relax.op.where(valid, shifted, fill)


def convert_bitcast(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                    opset: int) -> relax.Expr:
    """BitCast-26 between types of one width (the bytes as they are; bool is one byte)."""
    from onnx import helper

    data = inputs[0]
    src = str(data.ty.dtype)
    to = str(helper.tensor_dtype_to_np_dtype(int(attrs["to"])))  # "bfloat16" via ml_dtypes
    src_bits = 8 if src == "bool" else tvm.DataType(src).bits
    dst_bits = 8 if to == "bool" else tvm.DataType(to).bits
    if src_bits != dst_bits:
        raise ValueError(f"BitCast: {src} and {to} differ in width ({src_bits} vs {dst_bits} "
                         "bits)")
    if src == to:
        return data

    def body(x: te.Tensor) -> te.Tensor:
        def value(*i: Any) -> Any:
            v = x[i]
            if src == "bool":  # stored as one byte, 0 or 1
                return tirx.Cast(to, v)
            if to == "bool":  # from int8/uint8: any set bit reads as true
                return v != tirx.const(0, src)
            return tirx.reinterpret(to, v)
        return te.compute(x.shape, value, name="bitcast")

    return bb.emit_te(body, data, primfunc_name_hint="lepton_bitcast")


def convert_mod(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                opset: int) -> relax.Expr:
    """Mod-28. fmod=1: A - trunc(A / B) * B (C's fmod for floats); fmod=0: A - floor(A / B) * B
    with the spec's float cases (a zero result takes B's sign, x - y carried over when the
    signs differ, as Python's float %). float16/bfloat16 are computed in float32, where fmod
    is exact. Integer B == 0 gives 0 (as numpy; the spec leaves it open, and x86 would trap),
    and so does B == -1 (x % -1 is 0; INT_MIN % -1 would trap)."""
    a, b = inputs
    dtype = str(a.ty.dtype)
    fmod = int(attrs.get("fmod", 0))
    shape = bb.normalize(relax.op.add(a, b)).ty.shape
    if not isinstance(shape, relax.ShapeExpr):
        raise ValueError("Mod needs the broadcast rank of its inputs")
    out_shape = list(shape.values)

    def body(x: te.Tensor, y: te.Tensor) -> te.Tensor:
        from tvm import topi

        x = topi.broadcast_to(x, out_shape)
        y = topi.broadcast_to(y, out_shape)
        if dtype in _INTS:
            def integer(*i: Any) -> Any:
                p, q = x[i], y[i]
                zero = tirx.const(0, dtype)
                bad = q == zero
                if not dtype.startswith("u"):
                    bad = tirx.Or(bad, q == tirx.const(-1, dtype))
                safe = tirx.Select(bad, tirx.const(1, dtype), q)
                r = tirx.truncmod(p, safe) if fmod else tirx.floormod(p, safe)
                return tirx.Select(bad, zero, r)
            return te.compute(out_shape, integer, name="mod")
        work = "float32" if dtype in ("float16", "bfloat16") else dtype

        def floating(*i: Any) -> Any:
            p, q = tirx.Cast(work, x[i]), tirx.Cast(work, y[i])
            r = tirx.truncmod(p, q)  # LLVM frem: C fmod, exact
            if not fmod:
                zero = tirx.const(0, work)
                r = tirx.Select(r == zero, tirx.copysign(zero, q),
                                tirx.Select(tirx.Or(tirx.And(r < zero, q > zero),
                                                    tirx.And(r > zero, q < zero)), r + q, r))
            return tirx.Cast(dtype, r)
        return te.compute(out_shape, floating, name="mod")

    return bb.emit_te(body, a, b, primfunc_name_hint="lepton_mod")


# op -> (the opset whose semantics the converter implements, converter); the private op
# names plan.py gives these nodes are `<op>_<version>`.
_REVISED_CONVERTERS: dict[str, tuple[int, Callable[..., relax.Expr]]] = {
    "CumProd": (26, convert_cumprod),
    "BitShift": (28, convert_bitshift),
    "BitCast": (26, convert_bitcast),
    "Mod": (28, convert_mod),
}


# ----------------------------------------------------------------------------- importer

def _on_tensors(convert: Callable[..., relax.Expr]) -> Callable[..., relax.Expr | None]:
    """`convert` for tensor operands; None (TVM's own converter) when an operand is a shape
    value (PrimValue / ShapeExpr: symbolic-dim arithmetic such as N % 8, which TVM's importer
    keeps as integer expressions)."""
    def converter(bb: relax.BlockBuilder, inputs: list[Any], attrs: dict[str, Any],
                  opset: int) -> relax.Expr | None:
        if not all(isinstance(getattr(x, "ty", None), relax.TensorType) for x in inputs):
            return None
        return convert(bb, inputs, attrs, opset)
    return converter


_CONVERTERS: dict[str, Callable[..., relax.Expr | None]] = {
    **{op: (lambda bb, inputs, attrs, opset, _op=op: convert_reduce(bb, _op, inputs, attrs,
                                                                     opset))
       for op in _REDUCE_OPS},
    "CumSum": convert_cumsum,
    "Reshape": convert_reshape,
    "Pad": convert_pad,
    "TopK": convert_topk,
    "Split": convert_split,
    "Expand": convert_expand,
    "Resize": convert_resize,
    "Upsample": convert_upsample,
    "Range": convert_range,
    "ConstantOfShape": convert_constant_of_shape,
    "AffineGrid": convert_affine_grid,
    "Shape": convert_shape,
    "Cast": narrow.convert_cast,  # encodes to float8/float4/int4/int2 (narrow.to_bytes)
    **{f"{op}_{version}": convert for op, (version, convert) in _REVISED_CONVERTERS.items()},
    # Mod before 28 is a subset of Mod-28 (float fmod=0 was not allowed); TVM 0.27's gets the
    # float inf/NaN/zero cases wrong and traps on an integer x % 0
    "Mod": _on_tensors(convert_mod),
    # BitShift before 28 (unsigned only) is the same for shifts < bits; TVM 0.27's returns
    # LLVM's undefined value for a shift >= bits, this one Bitshift-28's 0
    "BitShift": _on_tensors(convert_bitshift),
}


class Importer(ONNXGraphImporter):
    """TVM's ONNX importer, with lepton-edge's run-time-input converters consulted first
    (and the only ones for the private op names of revised ops, see _REVISED_CONVERTERS)."""

    def _check_for_unsupported_ops(self, graph: Any) -> None:
        own = [n for n in graph.node if n.op_type in _CONVERTERS]
        if not own:
            return super()._check_for_unsupported_ops(graph)
        rest = onnx.GraphProto()
        rest.node.extend(n for n in graph.node if n.op_type not in _CONVERTERS)
        return super()._check_for_unsupported_ops(rest)

    def _convert_operator(self, op_name: str, inputs: list[relax.Expr], attrs: dict,
                          opset: int) -> relax.Expr:
        converter = _CONVERTERS.get(op_name)
        if converter is not None:
            out = converter(self.bb, inputs, attrs, opset)
            if out is not None:
                return self.bb.normalize(out) if isinstance(out, relax.Expr) else out
        return super()._convert_operator(op_name, inputs, attrs, opset)


def from_onnx(model: Any) -> tvm.IRModule:
    """Like tvm.relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    # TVM's importer reads a declared 0 dim as unknown; an empty 1-d int64 input (the empty
    # axes of a Reduce) must stay length 0 so its converter knows the output rank.
    empty = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        dims = list(t.shape.dim) if t.HasField("shape") else None
        if (t.elem_type == onnx.TensorProto.INT64 and dims is not None and len(dims) == 1
                and dims[0].HasField("dim_value") and dims[0].dim_value == 0):
            empty[value.name] = [0]
    _RUNTIME_DIMS.clear()
    try:
        mod = Importer(empty, "float32", keep_params_in_input=False).from_onnx(model.graph,
                                                                              opset)
    finally:
        _RUNTIME_DIMS.clear()
    return _fence_symbolic_dims(mod)


def _fence_symbolic_dims(mod: tvm.IRModule) -> tvm.IRModule:
    """Stop FuseOps from fusing across the match_casts that define run-time dims.

    FuseOps emits a fused group where its first member was and orders the rest by the values
    they use, not by symbolic vars: a group joining an op before such a match_cast with ops
    whose shapes use its dims (e.g. Size -> Div before a Range, the Div's result multiplied
    with the Range's output after it) lands before the match_cast, and the build fails
    ("range_n0 has not been computed"). Each value defined before the match_cast and used
    after it is re-bound right after it (`v' = match_cast(v, type of v)`, no copy), which
    FuseOps does not fuse through."""
    from tvm.relax.expr_functor import PyExprMutator, mutator

    crossing: dict[Any, list[Any]] = {}
    func = mod["main"]
    for block in func.body.blocks:
        bindings = list(block.bindings)
        defined_at = {b.var: i for i, b in enumerate(bindings)}
        used_at: dict[Any, list[int]] = {}
        for i, b in enumerate(bindings):
            for v in relax.analysis.free_vars(b.value):
                used_at.setdefault(v, []).append(i)
        for p, b in enumerate(bindings):
            if not (isinstance(b, relax.MatchCast) and isinstance(b.ty,
                                                                    relax.ShapeType)):
                continue
            crossing[b.var] = [v for v, i in defined_at.items() if i < p and isinstance(
                v.ty, relax.TensorType) and any(u > p for u in used_at.get(v, []))]
    if not any(crossing.values()):
        return mod

    @mutator
    class Fence(PyExprMutator):
        def visit_match_cast_(self, binding: relax.MatchCast) -> None:
            super().visit_match_cast_(binding)
            for v in crossing.get(binding.var, []):
                fenced = self.builder_.match_cast(self.visit_expr(v), v.ty)
                self.set_var_remap(v, fenced)

    fence = Fence(mod)
    mod["main"] = fence.visit_expr(func)
    return mod
