"""Compile-time weight layouts for the untuned CPU build (see lowering/schedules.py).

:func:`pack_matmul_weights` stores the constant right-hand side ``W[K, N]`` of each float32
``relax.matmul`` as column panels ``Wp[N / t, K, t]`` (``t`` = the matmul tile width of the
default schedule, 24 floats on AVX2), permuted once with numpy, and replaces the matmul with
an equivalent kernel (same summation order) that reads ``Wp[n // t, k, n % t]``. Each panel the
register-tiled kernel sweeps is then one contiguous block streamed front to back, where the
``[K, N]`` layout gave a strided panel (one 96-byte piece per 9 KB row) that the kernel copied
at run time; BERT-base's FFN down-projection ran 1.5x slower from a cold cache than from a
warm one that way.

:func:`pack_conv2d_weights` rewrites each floating-point pointwise (1x1) ``relax.nn.conv2d``
(NCHW data, OIHW constant weight, ungrouped) to the same convolution with its weight stored
as ``IHWO`` (``[C_in, 1, 1, C_out]``), permuted once with numpy while compiling. Activations keep
their NCHW layout, so nothing else in the graph changes (fusion of the bias / activation /
residual epilogue included). In the legalized kernel the output channel is then the innermost,
contiguous axis of the weight, and :func:`lowering.schedules.schedule_contraction` vectorizes the
convolution along output channels (a tile of output channels x a few output pixels in
registers, each input value broadcast), as onnxruntime's packed-filter kernels do, instead of
along the output width (7 or 14 wide in late CNN layers) with each filter tap broadcast.

Since lowering/nchwc.py converts float32 convolutions to channel-blocked NCHWc first, this
packing only meets the pointwise convolutions that conversion leaves (``LEPTON_NCHWC=0``, or
output channels that are not a multiple of the vector width). Measured before that, on this
repository's benchmark CNNs (benchmarks/untuned.py, 1 thread, same process as
onnxruntime): packing the pointwise convolutions took MobileNetV2-shaped from 3.1x to 2.4x
onnxruntime; packing the 3x3 convolutions too took ResNet-18-shaped from 1.8x to 6.0x (not
analysed further: the channel-vectorized schedule's loop order and transposed tile
write-back are the suspects), so only 1x1 filters are packed. Integer convolutions (the
int8 lowering), grouped and depthwise convolutions are left as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lepton_edge.lowering.int8 import expr_dtype

#: The kernel layout of a packed convolution weight.
PACKED_KERNEL_LAYOUT = "IHWO"


def error_message(exc: BaseException) -> str:
    """The message of a (TVM) exception: TVM errors end with it after a traceback dump, so
    this is the last non-empty line, at most 500 characters."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def rewrite_calls(mod: Any, rewrite: Any) -> Any:
    """`mod` with every call of its Relax functions replaced by `rewrite(mutator, call)`
    (called after the call's arguments were rewritten; `mutator` gives lookup_binding and
    builder_)."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rewriter(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            return rewrite(self, super().visit_call_(call))

    rewriter = Rewriter(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def pack_conv2d_weights(mod: Any, *, lanes: int = 8) -> tuple[Any, int]:
    """Return ``(module, number of convolutions packed)``.

    A convolution is packed when its data is float32/float64 in NCHW, its weight a constant
    1x1 filter in OIHW, it is not grouped (depthwise kernels vectorize along the width) and its
    output channels are a multiple of ``lanes`` (one SIMD vector)."""
    from tvm import relax
    from tvm.ir.expr import Constant

    packed = 0

    def pack(_mutator: Any, call: Any) -> Any:
        nonlocal packed
        if str(getattr(call.op, "name", "")) != "relax.nn.conv2d" or len(call.args) != 2:
            return call
        x, w = call.args
        attrs = call.attrs
        if not isinstance(w, Constant) or expr_dtype(x) not in ("float32", "float64") \
                or expr_dtype(w) != expr_dtype(x):
            return call
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) \
                != ("NCHW", "OIHW", "NCHW"):
            return call
        weight = w.value.numpy()
        if int(attrs.groups) != 1 or weight.ndim != 4 or weight.shape[2:] != (1, 1) \
                or weight.shape[0] % lanes:
            return call  # see the module docstring for why only pointwise filters
        out_dtype = str(attrs.out_dtype)
        if out_dtype in ("", "void", "None"):
            out_dtype = None  # same as the data
        new = relax.op.nn.conv2d(
            x, relax.const(np.ascontiguousarray(weight.transpose(1, 2, 3, 0))),
            strides=[int(s) for s in attrs.strides],
            padding=[int(p) for p in attrs.padding],
            dilation=[int(d) for d in attrs.dilation], groups=1,
            data_layout="NCHW", kernel_layout=PACKED_KERNEL_LAYOUT, out_layout="NCHW",
            out_dtype=out_dtype)
        packed += 1
        return new

    return rewrite_calls(mod, pack), packed


def narrow_lanes(columns: int, lanes: int, min_lanes: int) -> int:
    """The vector width for ``columns`` output columns: ``lanes``, or half of it (down to
    ``min_lanes``) while the columns are no multiple of it but of the half (AVX-512: a
    1000-class classifier in vectors of 8, AVX2's, not odd pieces). Shared by the weight
    packing (matmul_tile) and the matmul schedules (schedules.MATMUL_MIN_LANES), so that
    panels and vectors agree."""
    while lanes // 2 >= min_lanes and columns % lanes and not columns % (lanes // 2):
        lanes //= 2
    return lanes


def matmul_tile(columns: int, lanes: int, vectors: int, min_lanes: int | None = None
                ) -> int | None:
    """Panel width for a matmul with ``columns`` output columns: the widest multiple of the
    SIMD width (at most ``vectors`` vectors) that divides it, else (``min_lanes`` given) the
    same with the narrower vectors of narrow_lanes, or None."""
    for count in range(vectors, 0, -1):
        if columns % (count * lanes) == 0:
            return count * lanes
    if min_lanes is not None and narrow_lanes(columns, lanes, min_lanes) < lanes:
        return matmul_tile(columns, narrow_lanes(columns, lanes, min_lanes), vectors)
    return None


def pack_matmul_weights(mod: Any, *, lanes: int = 8, vectors: int = 3,
                        min_lanes: int | None = None) -> tuple[Any, int]:
    """Return ``(module, number of matmuls packed)``.

    A ``relax.matmul(x, W)`` is packed when ``W`` is a float32 constant of rank 2, ``x`` a
    float32 tensor of rank >= 2 and :func:`matmul_tile` finds a panel width for N."""
    from tvm import relax, te
    from tvm.ir.expr import Constant

    packed = 0
    #: (original constant, its packed copy): a weight shared by several matmuls is packed once
    done: list[tuple[Any, Any]] = []

    def kernel(x: Any, wp: Any, tile: int) -> Any:
        depth = wp.shape[1]
        k = te.reduce_axis((0, depth), name="k")
        columns = wp.shape[0] * tile
        return te.compute(
            (*x.shape[:-1], columns),
            lambda *i: te.sum(x[(*i[:-1], k)] * wp[i[-1] // tile, k, i[-1] % tile], axis=k),
            name="matmul")

    def pack(mutator: Any, call: Any) -> Any:
        nonlocal packed
        if str(getattr(call.op, "name", "")) != "relax.matmul" or len(call.args) != 2:
            return call
        x, w = call.args
        if isinstance(w, relax.Var):  # bound to a constant (a Gemm's folded transpose)
            w = mutator.lookup_binding(w)
        if not isinstance(w, Constant) or expr_dtype(x) != "float32" or expr_dtype(w) != "float32":
            return call
        out_dtype = str(call.attrs.out_dtype)
        if out_dtype not in ("", "void", "None", "float32"):
            return call
        weight = w.value.numpy()
        ndim = getattr(getattr(x, "ty", None), "ndim", -1)
        if weight.ndim != 2 or ndim is None or int(ndim) < 2:
            return call
        depth, columns = weight.shape
        tile = matmul_tile(columns, lanes, vectors, min_lanes)
        if tile is None or depth == 0:
            return call
        const = next((new for old, new in done if old.same_as(w)), None)
        if const is None:
            const = relax.const(np.ascontiguousarray(
                weight.reshape(depth, columns // tile, tile).transpose(1, 0, 2)))
            done.append((w, const))
        packed += 1
        return mutator.builder_.call_te(kernel, x, const, tile,
                                        primfunc_name_hint="matmul_packed")

    return rewrite_calls(mod, pack), packed
