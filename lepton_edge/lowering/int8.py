"""Integer lowering of QDQ patterns: int8 x int8 -> int32 accumulate -> fixed-point requantize.

TVM's ONNX importer runs a QDQ model as float fake-quant: weights are dequantized to fp32
and conv/matmul run in fp32. This pass finds

    quantize( [relu|clip]( [add(bias)]( conv2d|matmul( dequantize(x_q), W ) ) ) )

where W is a constant int8 weight with symmetric (zero) zero points, dequantized per tensor
or per output channel (possibly transposed), and x_q, the input scale/zero point and the
output scale/zero point are scalars, and rewrites it to

    x_u   = x_q + 128 (as uint8)                                     activations shifted
    acc   = conv2d|matmul(pad(x_u, x_zp + 128), W_q, out_dtype=int32)  uint8 x int8 -> int32
          + (bias_q - (x_zp + 128) * sum(W_q))                         folded at compile time
    y_q   = clip(rne((acc * m0) >> shift) + y_zp, lo, hi)             fixed-point requantize

The shift to uint8 changes nothing in the integer result (x_u - (x_zp + 128) = x_q - x_zp),
but uint8 x int8 is what the CPU dot-product instructions multiply (x86 VNNI `vpdpbusd`,
see lowering/x86_int8.py). It is done for matmul and non-grouped conv2d with constant
weights (the kernels that have a dot-product schedule); grouped/depthwise conv2d stays
int8 x int8. `unsigned_activations=False` turns it off. Activation x activation matmuls
(attention) subtract both zero points first, in int16: (a - za) @ (b - zb), no corrections.

with M = x_scale * w_scale / y_scale = m0 * 2^-shift (m0 a 31-bit mantissa) and rne the
round-half-to-even that ONNX QuantizeLinear uses. The requantization is one TE block
(requantize_te), so that it fuses into the kernel's output tile. quantize(dequantize(x))
with the same scalar scale and zero point, possibly with reshapes/transposes between, becomes
the int8 data movement alone (exact). Anything else stays as it was (still correct, as
float); the pass reports each quantize it left alone and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def fixed_point_multiplier(multiplier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split positive real multipliers M into int64 (m0, shift) with M ~= m0 * 2**-shift.

    m0 is in [2**30, 2**31), so an int32 accumulator times m0 fits in int64.
    """
    flat = np.asarray(multiplier, dtype=np.float64).ravel()
    m0 = np.empty(flat.shape, np.int64)
    shift = np.empty(flat.shape, np.int64)
    for i, value in enumerate(flat):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"requantization multiplier must be positive, got {value}")
        mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, [0.5, 1)
        q = round(mantissa * 2**31)
        if q == 2**31:
            q //= 2
            exponent += 1
        m0[i], shift[i] = q, 31 - exponent
        if not 1 <= shift[i] <= 62:
            raise ValueError(f"requantization multiplier {value} is out of range")
    shape = np.shape(multiplier)
    return m0.reshape(shape), shift.reshape(shape)


def requantize_reference(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, zero_point: int,
                         low: int = -128, high: int = 127) -> np.ndarray:
    """The numpy definition of the requantization the compiled code performs (bit-exact)."""
    prod = acc.astype(np.int64) * m0
    q = prod >> shift
    rem = prod - (q << shift)
    half = np.left_shift(np.int64(1), shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).astype(np.int64)
    return np.clip(q + zero_point, low, high).astype(np.int8)


def requantize_te(acc: Any, m0: Any, shift: Any, zero_point: int, low: int = -128,
                  high: int = 127, min_shift: int | None = None, scale64: Any = None,
                  fold_zero_point: bool = False) -> Any:
    """The TE form of requantize_reference (bit-exact): int32 tensor `acc` -> int8.

    m0/shift are Python ints (per tensor) or te tensors (m0 int32, shift int64) that
    broadcast against acc from the right with the same rank (per channel, e.g. (C,) or
    (1, C, 1, 1)). Round half to even without comparisons:
    q = (prod + 2^(shift-1) - 1 + ((prod >> shift) & 1)) >> shift; with prod = Q * 2^shift + r
    the sum carries into Q exactly when r > half, or r == half and Q is odd. |prod| < 2^62.
    One block, prod bound once (a Let), and m0 widened from int32 so that LLVM multiplies
    32 x 32 -> 64 bits (vpmuldq) instead of emulating a 64-bit multiply.

    `min_shift` (a promise: every shift is at least that) >= 33, the usual case (every
    multiplier m0 * 2^-shift below 2^-2: m0 is in [2^30, 2^31)), selects 32-bit arithmetic
    after the multiply: with h = prod >> 32 (|h| < 2^30), t = shift - 32 >= 1 and
    l = prod mod 2^32, the same rounding is
    q = (h + 2^(t-1) - [l == 0 and (h >> t) even]) >> t: the bits below 2^32 only decide exact
    ties. AVX2 has no 64-bit arithmetic shift, minimum or maximum; this way only the
    multiply and the extraction of h and l work on 64-bit lanes.

    `scale64` (a Python float or a float64 te tensor like m0: m0 * 2^-shift, exact) selects
    the float64 form, q = lrint(acc * scale64) (llvm.lrint: one vcvtpd2dq per 4 lanes on
    x86): bit-exact when every |acc| * odd(m0) < 2^53 (the product is then exact; lrint
    rounds half to even in the default rounding mode). It assumes that mode,
    round-to-nearest-even (x86 MXCSR's default): a caller that changes the floating-point
    rounding mode around the kernel changes the results. LLVM targets only. The caller
    checks that bound and |acc * scale64| < 2^30 (float_requantize_ok); on AVX2 it takes
    fewer vector instructions than the integer forms.

    `fold_zero_point` (float form only; the caller checks float_zero_point_ok) adds the zero
    point in float64 before rounding, q = lrint(acc * scale64 + zero_point), so that what is
    left is a clip of the rounded value to [low, high], which LLVM narrows to int8 with the
    saturating packs (vpackssdw, vpacksswb). With the zero point added after rounding, as
    in the reference, LLVM moves the add past the clip, and the shifted bounds are no
    longer the int8 range: it narrows with shuffles instead (15 vector instructions per 8
    outputs on AVX2 against 10; 1x1 convs with a nonzero zero point measured 0.82-0.96x the
    time, one thread, Zen 3)."""
    from tvm import te, tirx

    i64 = "int64"
    one = tirx.const(1, i64)
    ndim = len(acc.shape)

    def at(table: Any, index: tuple) -> Any:
        lead = ndim - len(table.shape)
        return table[tuple(0 if int(d) == 1 else index[lead + n]
                           for n, d in enumerate(table.shape))]

    i32 = "int32"
    shift_min = shift if isinstance(shift, int) else min_shift

    def body32(*index: Any) -> Any:
        if isinstance(m0, int):
            mult, t = tirx.const(m0, i64), tirx.const(shift - 32, i32)
        else:
            # t is in [1, 30] (the promise); saying so keeps TVM's bound analysis, which
            # otherwise drops the clip below, from assuming any shift
            t = at(shift, index).astype(i32) - 32
            mult, t = at(m0, index).astype(i64), tirx.max(tirx.min(t, 30), 1)
        prod = tirx.Var("prod", i64)  # one product (one multiplier in an FPGA build)
        hi, lo = tirx.Var("hi", i32), tirx.Var("lo", i32)
        # 1 for an exact tie that rounds down (l == 0, even quotient): integer arithmetic,
        # not a boolean `and` (TVM's bound analysis fails on Let vars under one)
        one = tirx.const(1, i32)
        tie_down = (lo == tirx.const(0, i32)).astype(i32) & (one - ((hi >> t) & one))
        q = (hi + (one << (t - 1)) - tie_down) >> t
        q = tirx.max(tirx.min(q + tirx.const(zero_point, i32), tirx.const(high, i32)),
                     tirx.const(low, i32))
        q = tirx.Let(hi, (prod >> tirx.const(32, i64)).astype(i32),
                     tirx.Let(lo, prod.astype(i32), q))
        return tirx.Let(prod, acc[index].astype(i64) * mult, q).astype("int8")

    def body(*index: Any) -> Any:
        if isinstance(m0, int):
            mult, sh = tirx.const(m0, i64), tirx.const(shift, i64)
            rnd = tirx.const((1 << (shift - 1)) - 1, i64)
        else:
            mult, sh = at(m0, index).astype(i64), at(shift, index)
            rnd = (one << (sh - one)) - one
        prod = tirx.Var("prod", i64)
        q = (prod + rnd + ((prod >> sh) & one)) >> sh
        q = tirx.max(tirx.min(q + tirx.const(zero_point, i64), tirx.const(high, i64)),
                     tirx.const(low, i64))
        return tirx.Let(prod, acc[index].astype(i64) * mult, q).astype("int8")

    def body64(*index: Any) -> Any:
        scale = (tirx.const(scale64, "float64") if isinstance(scale64, float)
                 else at(scale64, index))
        x = acc[index].astype("float64") * scale
        if fold_zero_point and zero_point:
            # exact (float_zero_point_ok); LLVM contracts it into one FMA, also exact
            x = x + tirx.const(float(zero_point), "float64")
            q = tirx.call_llvm_pure_intrin("int32", "llvm.lrint", x)
        else:  # |q| < 2^30 (float_requantize_ok): the zero point and the clip in int32
            q = tirx.call_llvm_pure_intrin("int32", "llvm.lrint", x) \
                + tirx.const(zero_point, "int32")
        return tirx.max(tirx.min(q, tirx.const(high, "int32")),
                        tirx.const(low, "int32")).astype("int8")

    if scale64 is not None:
        if not isinstance(scale64, float) and str(scale64.dtype) != "float64":
            # a float32 table (relax.const of a float64 array without dtype="float64" makes
            # one) would be widened silently: no longer exact
            raise ValueError(f"requantize_te: scale64 must be float64, got {scale64.dtype}")
        return te.compute(acc.shape, body64, name="requantize")
    fast = shift_min is not None and int(shift_min) >= 33
    return te.compute(acc.shape, body32 if fast else body, name="requantize")


def _float_facts(bound: np.ndarray, m0: np.ndarray, shift: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per channel, for accumulators |acc| <= bound (capped at 2^31, an int32): whether
    acc * m0 * 2^-shift is exact in float64 (|acc| * odd(m0) < 2^53), whether it is never a
    tie (in Z + 1/2: acc * m0 divisible by 2^(shift - 1), so |acc| >= 2^(shift - 1 - v2(m0))),
    whether it stays below 2^30 in magnitude (the rounded value fits int32), and the shift."""
    m = np.asarray(m0, np.int64).ravel()
    sh = np.broadcast_to(np.asarray(shift, np.int64).ravel(), m.shape)
    # |acc| <= 2^31 whatever the bound (an int32 accumulator): capped, top * odd fits int64
    top = np.minimum(np.broadcast_to(np.asarray(bound, np.int64).ravel(), m.shape), 2**31)
    low_bit = (m & -m).clip(min=1)
    tie_at = sh - 1 - np.log2(low_bit).astype(np.int64)  # ties need |acc| >= 2^tie_at
    tie_free = (tie_at >= 32) | (top < np.left_shift(1, tie_at.clip(0, 62)))
    fits = top.astype(np.float64) * m * np.exp2(-sh.astype(np.float64)) < 2**30
    valid = (top >= 0) & (m > 0)
    return valid & (top * (m // low_bit) < 2**53), valid & tie_free, valid & fits, sh


def float_requantize_ok(bound: np.ndarray, m0: np.ndarray, shift: np.ndarray, *,
                        tie_free: bool = False) -> bool:
    """Whether requantize_te's float64 form, lrint(fl(acc * s)) with s = m0 * 2^-shift (a
    float64, exact), equals the reference for accumulators |acc| <= `bound` (per output
    channel, broadcast against m0 and shift). Every |acc * s| must be below 2^30 (the
    rounded value then fits int32), and per channel either (2. only with `tie_free`, which
    the lowering passes)

    1. the product is exact (|acc| * odd(m0) < 2^53): lrint rounds x = acc * s half to
       even, as the reference does; or
    2. no x is a tie (|acc| < 2^(shift - 1 - v2(m0))) and shift <= 44: x is a multiple of
       2^-shift, and so is its distance to the nearest half-integer h, which is nonzero.
       While |x| < 2^9, rounding x to float64 moves it by at most 2^-45 < 2^-shift, so not
       onto h, and never across it (h is a float64 and rounding is monotone): lrint gives
       floor(x + 1/2), the reference's value. Where |x| >= 2^9, fl(x) is too (2^9 is a
       float64), and both results are beyond +-384, clipped to the same bound whatever the
       zero point (|zero point| <= 128).
    2. covers the long reductions (1x1 convs over 576-960 channels: bounds ~2^24) where
       the product is not exact. Precondition of the clip argument: int8 outputs
    (|zero point| <= 128), the only ones lowered here; the margin (results beyond +-257)
    would also cover uint8 zero points up to 255."""
    exact, no_ties, fits, sh = _float_facts(bound, m0, shift)
    return bool(np.all(fits & (exact | (no_ties & (sh <= 44) & tie_free))))


def float_zero_point_ok(bound: np.ndarray, m0: np.ndarray, shift: np.ndarray) -> bool:
    """Whether requantize_te's float form may also add the zero point z in float64 before
    rounding, lrint(fl(fl(x) + z)) with x = acc * m0 * 2^-shift (float_requantize_ok holds),
    for accumulators |acc| <= `bound`: equal to the reference's rne(x) + z when, per channel,
    no x is a tie (rne(x + z) != rne(x) + z at ties for odd z) and

    * the product is exact and shift <= 45: y = x + z is rounded once; its distance to any
      half-integer h is a nonzero multiple of 2^-shift, and while |y| < 2^8 rounding moves
      it by at most 2^-46: not onto h, never across (monotone, h a float64), so lrint gives
      floor(y + 1/2) = rne(x) + z. Where |y| >= 2^8, fl(y) is too, and both results clip
      to the same bound; or
    * shift <= 43 (two roundings): while |x| < 2^9 they move y by at most
      2^-45 + 2^-44 < 2^-shift, and the composition is still monotone; beyond, both results
      are beyond +-384 and clip alike.
    A multiply-add that LLVM contracts into one FMA rounds once: covered by both cases."""
    exact, tie_free, fits, sh = _float_facts(bound, m0, shift)
    return bool(np.all(fits & tie_free & (sh <= np.where(exact, 45, 43))))


#: ops that only move or relabel elements: they commute with a per-tensor (de)quantize
_MOVEMENT_OPS = ("relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze",
                 "relax.flatten")


@dataclass
class LoweringReport:
    lowered: list[str] = field(default_factory=list)  # "conv2d -> int8" per rewritten quantize
    kept_float: list[str] = field(default_factory=list)  # "why" per quantize left as float


class _NotLowerable(Exception):
    pass


def _name(var: Any) -> str:
    return str(getattr(var, "name", None) or getattr(var, "name_hint", "") or "v")


def expr_dtype(expr: Any) -> str:
    """The dtype of a Relax expression ("" when it has none: a tuple, unknown)."""
    for attr in ("ty", "struct_info", "checked_type"):
        info = getattr(expr, attr, None)
        if info is not None and getattr(info, "dtype", None) is not None:
            return str(info.dtype)
    return ""


def lower_qdq_to_integer(mod: Any, *, unsigned_activations: bool = True,
                         float_requantize: bool = False) -> tuple[Any, LoweringReport]:
    """Rewrite the recognised QDQ patterns of every Relax function in `mod` to integer code.

    With `unsigned_activations` the activations of matmul and non-grouped conv2d kernels
    with constant weights are shifted to uint8 (x + 128) and the zero-point correction is
    adjusted, so the kernels are uint8 x int8 -> int32 (bit-identical results).
    With `float_requantize` (x86 builds) a requantization whose accumulators are bounded
    tightly enough (conv/matmul with constant weights: float_requantize_ok with its
    tie-free rule) uses the float64 form of requantize_te, also bit-exact, and adds the
    zero point before rounding where float_zero_point_ok proves that exact too."""
    from tvm import relax
    from tvm.ir.expr import Constant  # TVM 0.27 moved relax.Constant into tvm.ir
    from tvm.relax.expr_functor import PyExprMutator, mutator

    report = LoweringReport()

    def op_name(expr: Any) -> str:
        if isinstance(expr, relax.Call) and hasattr(expr.op, "name"):
            return str(expr.op.name)
        return ""

    def const(expr: Any) -> np.ndarray:
        if isinstance(expr, Constant) and hasattr(expr.value, "numpy"):
            return expr.value.numpy()
        raise _NotLowerable(f"{type(expr).__name__} where a constant was expected")

    @mutator
    class Rewriter(PyExprMutator):  # type: ignore[misc]
        def emit_like(self, var: Any, value: Any) -> Any:
            """Bind `value` like `var`: a dataflow block's output stays an output var (a
            DataflowVar there is undefined after the block, which FuseOps trips on)."""
            name = _name(var) + "_int"
            if isinstance(var, relax.DataflowVar) or not self.builder_.current_block_is_dataflow():
                return self.builder_.emit(value, name)
            return self.builder_.emit_output(value, name)

        def resolve(self, expr: Any) -> Any:
            """Follow dataflow vars to the call that produced them."""
            while isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is None:
                    return expr
                expr = bound
            return expr

        def visit_var_binding_(self, binding: Any) -> None:
            value = binding.value
            if self.float_outputs and op_name(value) in ("relax.nn.conv2d", "relax.matmul") \
                    and expr_dtype(binding.var) == "float32" \
                    and op_name(self.resolve(value.args[0])) == "relax.dequantize":
                try:
                    new_value = self.lower_float_output(value)
                except _NotLowerable as why:
                    report.kept_float.append(f"{op_name(value).removeprefix('relax.')} of "
                                             f"dequantized inputs: {why}; runs in float")
                else:
                    new_var = self.emit_like(binding.var, new_value)
                    self.set_var_remap(binding.var, new_var)
                    return
                super().visit_var_binding_(binding)
                return
            if not self.float_outputs and op_name(value) == "relax.quantize":
                try:
                    new_value = self.lower(value)
                except _NotLowerable as why:
                    report.kept_float.append(str(why))
                else:
                    new_var = self.emit_like(binding.var, new_value)
                    self.set_var_remap(binding.var, new_var)
                    return
            super().visit_var_binding_(binding)

        # -------------------------------------------------------------- matching
        def lower(self, quant: Any) -> Any:
            if str(quant.attrs.out_dtype) != "int8":
                raise _NotLowerable(f"output dtype {quant.attrs.out_dtype} is not int8")
            y_scale = const(quant.args[1])
            y_zp = const(quant.args[2])
            if y_scale.size != 1 or y_zp.size != 1:
                raise _NotLowerable("per-channel output quantization")
            expr = self.resolve(quant.args[0])
            low, high = -128, 127
            y_scale_f, y_zp_i = float(y_scale.ravel()[0]), int(y_zp.ravel()[0])
            moved = self.requantized_copy(expr, y_scale_f, y_zp_i)
            if moved is not None:
                return moved
            if op_name(expr) == "relax.nn.relu":
                low = max(low, y_zp_i)
                expr = self.resolve(expr.args[0])
            elif op_name(expr) == "relax.clip":
                lo_v, hi_v = (float(const(a).ravel()[0]) if isinstance(a, Constant)
                              else float(a.value) for a in expr.args[1:3])
                low = max(low, int(np.clip(round(lo_v / y_scale_f) + y_zp_i, -128, 127)))
                high = min(high, int(np.clip(round(hi_v / y_scale_f) + y_zp_i, -128, 127)))
                expr = self.resolve(expr.args[0])
            bias = None
            if op_name(expr) == "relax.add":
                a, b = (self.resolve(x) for x in expr.args)
                if op_name(a) in ("relax.nn.conv2d", "relax.matmul"):
                    expr, bias = a, b
                elif op_name(b) in ("relax.nn.conv2d", "relax.matmul"):
                    expr, bias = b, a
                else:
                    raise _NotLowerable("add without a conv2d/matmul operand")
            kind = op_name(expr)
            if kind not in ("relax.nn.conv2d", "relax.matmul"):
                what = kind.removeprefix("relax.") if kind else "a model input"
                raise _NotLowerable(f"QuantizeLinear of {what}: no integer kernel for it, "
                                    "runs as float fake-quant")
            try:
                return self.lower_core(kind, expr, bias, y_scale_f, y_zp_i, low, high)
            except _NotLowerable as why:
                raise _NotLowerable(f"QuantizeLinear of {kind.removeprefix('relax.')}: {why}; "
                                    "runs as float fake-quant") from None

        def requantized_copy(self, expr: Any, scale: float, zp: int) -> Any:
            """quantize(movement*(dequantize(x))) with the same scalar scale and zero point
            is movement*(x): the int8 values are only moved (exact, as in ONNX: an integer
            times s divided by s rounds back to itself). Max pooling counts as a movement:
            dequantize is increasing, so the max of dequantized values is the dequantized
            max, and its int8 padding (the dtype's minimum, -128) never wins over a real
            value, as -inf does not in float. Else None."""
            moves = []
            while op_name(expr) in _MOVEMENT_OPS or op_name(expr) == "relax.nn.max_pool2d":
                moves.append(expr)
                expr = self.resolve(expr.args[0])
            if op_name(expr) != "relax.dequantize" or expr_dtype(expr.args[0]) != "int8":
                return None
            scale_in, zp_in = expr.args[1:3]
            if not (isinstance(scale_in, Constant) and isinstance(zp_in, Constant)):
                return None
            scale_v, zp_v = const(scale_in), const(zp_in)
            if scale_v.size != 1 or zp_v.size != 1 or int(zp_v.ravel()[0]) != zp \
                    or np.float32(scale_v.ravel()[0]) != np.float32(scale):
                return None
            value = self.visit_expr(expr.args[0])
            for move in reversed(moves):
                value = self.builder_.emit(relax.Call(move.op, [value, *move.args[1:]],
                                                      move.attrs, move.ty_args))
            return value

        def lower_core(self, kind: str, expr: Any, bias: Any, y_scale_f: float, y_zp_i: int,
                       low: int, high: int) -> Any:
            self.bound = None
            acc, acc_scale, bshape = self.accumulate(kind, expr, bias)
            m0, shift = fixed_point_multiplier(acc_scale / y_scale_f)
            return self.requantize(acc, m0.reshape(bshape), shift.reshape(bshape), y_zp_i,
                                   low, high, self.bound)

        def accumulate(self, kind: str, expr: Any, bias: Any) -> tuple[Any, np.ndarray, tuple]:
            """int32 accumulator of conv2d/matmul over dequantized int8 operands, with the
            zero-point (and bias) corrections; returns it, its real scale and its shape."""
            x_q, x_scale, x_zp = self.activation(expr.args[0])
            try:
                w_q, w_scale = self.weight(expr.args[1], kind)
            except _NotLowerable as why:
                if kind != "relax.matmul" or "not a dequantized constant" not in str(why):
                    raise
                if bias is not None:
                    raise _NotLowerable("bias on an activation x activation matmul") from None
                return self.activation_matmul(x_q, x_scale, x_zp, expr.args[1])
            out_channels = w_q.shape[0] if kind == "relax.nn.conv2d" else w_q.shape[-1]
            if unsigned_activations and (kind == "relax.matmul"
                                         or int(expr.attrs.groups) == 1):
                x_q, x_zp = self.to_uint8(x_q), x_zp + 128
            w_scale = np.broadcast_to(w_scale.astype(np.float64), (out_channels,))
            acc_scale = x_scale * w_scale
            bias_q = np.zeros(out_channels, np.int64)
            if bias is not None:
                bias_f = self.bias(bias, out_channels)
                bias_q = np.round(bias_f.astype(np.float64) / acc_scale).astype(np.int64)
            if kind == "relax.nn.conv2d":
                acc, w_sum = self.conv2d(expr, x_q, x_zp, w_q)
                bshape: tuple = (1, out_channels, 1, 1)
            else:
                acc = self.builder_.emit(relax.op.matmul(x_q, relax.const(w_q, "int8"),
                                                         out_dtype="int32"))
                w_sum = w_q.astype(np.int64).sum(axis=0)
                bshape = (out_channels,)
            correction = bias_q - int(x_zp) * w_sum
            # |acc| bound per output channel: |x_q| <= 255 (uint8) or 128 (int8)
            x_abs = 128 if expr_dtype(x_q) == "int8" else 255
            w_abs = (np.abs(w_q.astype(np.int64)).reshape(out_channels, -1).sum(axis=1)
                     if kind == "relax.nn.conv2d" else np.abs(w_q.astype(np.int64)).sum(axis=0))
            self.bound = x_abs * w_abs + np.abs(correction)
            if np.abs(correction).max(initial=0) >= 2**31:
                raise _NotLowerable("bias correction overflows int32")
            acc = self.builder_.emit(relax.op.add(
                acc, relax.const(correction.astype(np.int32).reshape(bshape), "int32")))
            # The report names the quantized math (int8 model), whichever operand signedness
            # the kernel uses after the exact uint8 shift.
            report.lowered.append(f"{kind.split('.')[-1]} -> int8 x int8 -> int32")
            return acc, acc_scale, bshape

        def to_uint8(self, x_q: Any) -> Any:
            """x_q + 128 as uint8 (int8 -> uint8 with the same order, exact)."""
            op = relax.op
            return self.builder_.emit(op.astype(
                op.add(op.astype(x_q, "int16"), relax.const(128, "int16")), "uint8"))

        def activation_matmul(self, a_q: Any, a_scale: float, a_zp: int, other: Any
                              ) -> tuple[Any, np.ndarray, tuple]:
            """a @ b with both operands dequantized int8 activations (attention's QK^T, AV):
            sum (a - za)(b - zb), the zero points subtracted in int16 before the matmul."""
            node = self.resolve(other)
            transpose = None
            if op_name(node) == "relax.permute_dims":
                transpose = node.attrs.axes
                node = self.resolve(node.args[0])
            if op_name(node) != "relax.dequantize":
                raise _NotLowerable("the second operand is not dequantized int8")
            b_q, b_scale, b_zp = self.activation(node)
            if transpose is not None:
                b_q = self.builder_.emit(relax.op.permute_dims(b_q, transpose))
            shape = getattr(getattr(a_q, "ty", None), "shape", None)
            values = getattr(shape, "values", None)
            if not values or not hasattr(values[-1], "value"):
                raise _NotLowerable("the reduction length is not static")
            if int(values[-1].value) * 255 * 255 >= 2**31:
                raise _NotLowerable("the reduction is too long for an int32 accumulator")
            # (a - za) @ (b - zb) with the zero points subtracted first, in int16 (|a - za|
            # <= 255): no row/column-sum corrections, so the matmul kernel's epilogue is a
            # plain chain (each step read once) that the schedules fuse into the output tile;
            # the subtractions fuse into a neighbouring elementwise kernel.
            op, emit = relax.op, self.builder_.emit
            if a_zp or b_zp:
                a_q = emit(op.subtract(op.astype(a_q, "int16"), relax.const(a_zp, "int16")))
                b_q = emit(op.subtract(op.astype(b_q, "int16"), relax.const(b_zp, "int16")))
            acc = emit(op.matmul(a_q, b_q, out_dtype="int32"))
            report.lowered.append("matmul -> int8 x int8 -> int32 (activation x activation)")
            return acc, np.array([a_scale * b_scale]), (1,)

        def lower_float_output(self, call: Any) -> Any:
            """conv2d/matmul of dequantized int8 operands whose result stays float (no
            QuantizeLinear after it): integer accumulation, then one multiply by the scale."""
            kind = op_name(call)
            acc, acc_scale, bshape = self.accumulate(kind, call, None)
            return relax.op.multiply(relax.op.astype(acc, "float32"),
                                     relax.const(acc_scale.astype(np.float32).reshape(bshape),
                                                 "float32"))

        def activation(self, expr: Any) -> tuple[Any, float, int]:
            deq = self.resolve(expr)
            if op_name(deq) != "relax.dequantize":
                raise _NotLowerable("the activation input is not dequantized int8")
            scale, zp = const(deq.args[1]), const(deq.args[2])
            if scale.size != 1 or zp.size != 1:
                raise _NotLowerable("per-channel activation quantization")
            source = deq.args[0]
            dtype = expr_dtype(source)
            if dtype != "int8":
                raise _NotLowerable(f"activation is {dtype}, not int8")
            return self.visit_expr(source), float(scale.ravel()[0]), int(zp.ravel()[0])

        def weight(self, expr: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
            node = self.resolve(expr)
            transpose = None
            if op_name(node) == "relax.permute_dims":
                transpose = node.attrs.axes
                node = self.resolve(node.args[0])
            if op_name(node) != "relax.dequantize" or not isinstance(node.args[0], Constant):
                raise _NotLowerable("the weight is not a dequantized constant")
            w_q = const(node.args[0])
            scale, zp = const(node.args[1]), const(node.args[2])
            if w_q.dtype != np.int8:
                raise _NotLowerable(f"weight is {w_q.dtype}, not int8")
            if np.any(zp != 0):
                raise _NotLowerable("weight zero point is not 0 (asymmetric weights)")
            axis = int(node.attrs.axis)
            if scale.size > 1:
                out_axis = 0 if kind == "relax.nn.conv2d" else (
                    0 if transpose is not None else w_q.ndim - 1)
                if axis % w_q.ndim != out_axis:
                    raise _NotLowerable("weight scales are not per output channel")
            if transpose is not None:
                w_q = np.transpose(w_q, [int(a) for a in transpose])
            if kind == "relax.matmul" and w_q.ndim != 2:
                raise _NotLowerable("matmul weight is not 2-D")
            return np.ascontiguousarray(w_q), scale.ravel()

        def bias(self, expr: Any, channels: int) -> np.ndarray:
            node = self.resolve(expr)
            if op_name(node) == "relax.reshape":
                node = self.resolve(node.args[0])
            if isinstance(node, Constant):
                values = const(node).astype(np.float64)
            elif op_name(node) == "relax.dequantize":
                q = const(node.args[0]).astype(np.float64)
                scale = const(node.args[1]).astype(np.float64)
                zp = const(node.args[2]).astype(np.float64)
                values = (q - zp) * scale
            else:
                raise _NotLowerable("the bias is not a constant")
            values = values.ravel()
            if values.size not in (1, channels):
                raise _NotLowerable("bias is not per output channel")
            return np.broadcast_to(values, (channels,))

        # -------------------------------------------------------------- emitting
        def conv2d(self, conv: Any, x_q: Any, x_zp: int, w_q: np.ndarray) -> tuple[Any, Any]:
            attrs = conv.attrs
            if (str(attrs.data_layout), str(attrs.kernel_layout)) != ("NCHW", "OIHW"):
                raise _NotLowerable("conv2d layout is not NCHW/OIHW")
            pad = [int(p) for p in attrs.padding]  # top, left, bottom, right
            if any(pad):
                # pad with the zero point: padding then represents real 0.0, as in ONNX
                x_q = self.builder_.emit(relax.op.nn.pad(
                    x_q, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], "constant",
                    float(x_zp)))
            acc = self.builder_.emit(relax.op.nn.conv2d(
                x_q, relax.const(w_q, "int8"), strides=attrs.strides, padding=[0, 0, 0, 0],
                dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32"))
            return acc, w_q.astype(np.int64).reshape(w_q.shape[0], -1).sum(axis=1)

        def requantize(self, acc: Any, m0: np.ndarray, shift: np.ndarray, zp: int, low: int,
                       high: int, bound: np.ndarray | None = None) -> Any:
            """One elementwise kernel, requantize_te (a single TIR block: FuseOps fuses it
            into the conv/matmul's epilogue, and the schedules compute it per output tile)."""
            if float_requantize and bound is not None \
                    and float_requantize_ok(bound, m0, shift, tie_free=True):
                scale = m0.astype(np.float64) * np.exp2(-shift.astype(np.float64))
                scale_arg: Any = (float(scale.ravel()[0]) if np.all(scale == scale.ravel()[0])
                                  else relax.const(scale, "float64"))
                fold = bool(zp) and float_zero_point_ok(bound, m0, shift)
                return self.builder_.call_te(requantize_te, acc, 0, 0, zp, low, high, None,
                                             scale_arg, fold, primfunc_name_hint="requantize")
            if np.all(m0 == m0.ravel()[0]) and np.all(shift == shift.ravel()[0]):
                m0_arg: Any = int(m0.ravel()[0])
                shift_arg: Any = int(shift.ravel()[0])
            else:  # m0 < 2^31 (fixed_point_multiplier): int32 tables
                m0_arg = relax.const(m0.astype(np.int32), "int32")
                shift_arg = relax.const(shift.astype(np.int64), "int64")
            return self.builder_.call_te(requantize_te, acc, m0_arg, shift_arg, zp, low, high,
                                         int(shift.min()), primfunc_name_hint="requantize")

    # Pass 1 lowers whole DQ -> op -> Q patterns; pass 2 the conv/matmuls over dequantized
    # int8 operands whose result stays float (attention matmuls, final layers).
    for float_outputs in (False, True):
        rewriter = Rewriter(mod)
        rewriter.float_outputs = float_outputs
        for gvar, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
        mod = relax.transform.DeadCodeElimination()(rewriter.builder_.get())
    return mod, report
