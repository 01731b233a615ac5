"""Channel-blocked (NCHWc) float32 convolutions for the untuned CPU build.

:func:`convert_conv_layout` (the Relax pass ``lowering.schedules.ConvertConvLayout``, first in
:func:`lowering.schedules.cpu_pipeline`) stores the activations around every convertible float32
``relax.nn.conv2d`` as ``[N, C / c, H, W, c]`` (``c`` = the SIMD width in floats, 8 on AVX2)
with TVM's ``relax.transform.ConvertLayout``, which keeps that layout through the ops of
:data:`FOLLOWS_LAYOUT` (bias, ReLU, residual add, Clip, Max / Min, pools) and reductions over
H and W only (a global average pool reads NCHWc directly), so a chain of convolutions pays
one ``layout_transform`` at each end. Every other op (a Flatten, a Softmax, a Resize, a
Concat, a reduction over channels, an instance norm, a product with a ``[N, 1, H, W]``
attention map) gets its operands back in NCHW (:func:`_nchw_barriers`) and runs as imported;
the convolutions around it stay blocked. TVM's ONNX importer turns Clip (ReLU6) into
``call_tir`` kernels and Max / Min into a reduction of a ``stack`` that ConvertLayout cannot
convert; :func:`clips_as_ops` and :func:`stacked_extrema_as_ops` first rewrite them to
``relax.maximum`` / ``relax.minimum``. Each converted
convolution then becomes a kernel of its own (``call_te`` of :func:`conv2d_nchwc_te`, blocks
:data:`CONV_BLOCK` / :data:`DEPTHWISE_BLOCK`, padding in the block :data:`PAD_BLOCK`) whose
filter is packed once at compile time with numpy (:func:`pack_filter`).

Convertible (:func:`convertible`): float32 data and constant filter in NCHW / OIHW, no
dilation, output channels a multiple of ``c``, and either ungrouped (input channels a multiple
of ``c``: NCHWc input; otherwise, as the 3-channel stem of an image model, the input stays NCHW
and each of its values is broadcast) or depthwise (``groups == channels``). Everything else
(grouped convolutions, 10-channel outputs, the integer convolutions of the int8 lowering)
keeps NCHW and the schedules of lowering/schedules.py.

:func:`schedule_nchwc` (a rule of :func:`lowering.schedules.apply_default_schedules`, tried
before the contraction rule; the ScheduleReport names it ``nchwc``) register-tiles the
convolution: an output tile of ``t_c`` channel blocks x ``t_w`` output columns
(:func:`wide_tile_shape`: 4 x 3 = 12 vector accumulators where the channels allow, which with
the ``t_w`` broadcast input values and one filter vector fill AVX2's 16 registers)
accumulates over ``(ic_outer, kh, kw, ic_inner)``, each filter vector loaded once per step
and each input value broadcast, the innermost ``ic_inner`` step unrolled; the fused epilogue
(bias, ReLU / clip, residual add) is applied to the tile before it is stored. When ``t_w``
does not divide the output width the kernel computes a few extra columns (reading the last
input column again) that are never stored (:data:`CROP_BLOCK`; 57 for 56). ``(n, oc_outer,
oh)`` run in parallel. Small output planes (7x7, 14x14; :data:`PLANE_ACCUMULATORS`) are tiled
as one row of ``oh * ow`` pixels (49 -> 50 computed in 4 x 2 tiles, not 7 -> 9 per row) and accumulate the
whole plane in a local array, chunk of input-channel blocks by chunk
(:data:`FILTER_CHUNK_BYTES`), so that each chunk's filter slice is reused from cache, with the
batch inside the channel blocks (tiles of fewer channel blocks when that evens out the
parallel loop: :data:`PLANE_MIN_PARALLEL`). A regular convolution pads image by image (a
fill and a vectorized copy); a depthwise convolution vectorizes along its ``c`` channels,
register-blocks along the output width and builds each channel block's padded plane inside
its parallel loop (with a stride or a large plane it reads its input in place instead, with
a bounds check: :data:`DEPTHWISE_PLANE_BYTES`). :func:`schedule_pool_nchwc`
(``nchwc-pool``) vectorizes TVM's max / average pools on NCHWc tensors along the lanes.

AVX-512 (16 lanes, 32 vector registers; measured on Zen 4, which runs 512-bit FMAs as two
256-bit halves): channel counts that are multiples of 8 but not 16 are zero-padded to the
next multiple of 16 first (:func:`pad_channels`: MobileNetV2's 24-channel layers compute 32,
as onnxruntime does, instead of the whole model running in NCHW8c); the channel block is 16
unless 8 still blocks more of the model's convolutions (:func:`block_lanes`); NCHW16c tiles
hold up to :data:`TILE_ACCUMULATORS_32` accumulators (``registers`` of
:func:`wide_tile_shape`: 4 x 4 on ResNet-18's 56-wide layer), and a small plane whose output
channels are one tile pads each image inside its parallel loop
(:data:`STAGE_PLANE_PADDING`); AVX2 targets keep the tiles and padding described above.

``LEPTON_NCHWC=0`` turns the conversion off (the convolutions keep NCHW and the schedules of
lowering/schedules.py), for A/B runs.

Measured (1 thread, noisy shared machine, fastest calls): ResNet-18's and MobileNetV2's
convolutions reach 70-95% of the FMA peak, 0.96-1.08x onnxruntime's NCHWc Conv kernel
(benchmarks/conv_kernels.py; the depthwise ones are memory-bound); in-model, with the same
inputs, the 4 x 3 tiles, the flat small planes and the in-place strided depthwise reads
took ResNet-18's convolutions from 40.9 to 39.3 ms and MobileNetV2's from 7.7 to 7.2 ms;
whole models 0.98-1.03x (ResNet-18-shaped) and 0.81-0.95x (MobileNetV2-shaped)
onnxruntime's time.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lepton_edge.lowering.int8 import expr_dtype
from lepton_edge.lowering.layout import error_message

#: Names of the TE blocks this module creates (the schedule rule finds its kernels by them).
CONV_BLOCK = "conv2d_nchwc"
DEPTHWISE_BLOCK = "conv2d_nchwc_depthwise"
PAD_BLOCK = "conv2d_nchwc_pad"
#: The copy of the computed columns when the convolution computes a few extra output columns
#: so that its register tiles divide the width (:func:`wide_tile_shape`).
CROP_BLOCK = "conv2d_nchwc_crop"
#: Block annotation of :data:`CONV_BLOCK`: ``[t_c, t_w, flat]``, the register tile the TE was
#: built for (its computed width a multiple of ``t_w``) and whether its output plane is one
#: row of pixels (:func:`conv2d_nchwc_te`); :func:`schedule_nchwc` uses it.
TILE_ANNOTATION = "lepton_nchwc_tile"
#: Most vector accumulators of one output tile (AVX2 has 16 vector registers: the rest hold
#: the broadcast input values and a filter vector).
TILE_ACCUMULATORS = 12
#: Vector registers of the target: AVX2's 16, AVX-512's 32 (:func:`vector_registers`); the
#: register tiles below are sized for them.
REGISTERS = 16
#: With AVX-512's 32 registers, the most vector accumulators of one output tile (the rest
#: hold the broadcast input values and a filter vector; see :func:`wide_tile_shape`).
TILE_ACCUMULATORS_32 = 24
#: A convolution whose output plane times the tile's channel blocks has at most this many
#: pixels is tiled as one row of pixels and accumulates the whole plane in a local array,
#: chunk of input-channel blocks by chunk (see :func:`schedule_nchwc`): 1024 x 8 floats =
#: 32 KB, L1. Measured (1 thread, 1x7 tiles then): ResNet-18's 14x14x256 3x3 layer 2.75 ->
#: 2.4 ms (784 = 196 pixels x 4 blocks), 7x7x512 3.3 -> 3.0 ms; 28x28x128 (1568) no better,
#: 56x56x64 slightly worse; as one row of 51 pixels in 4 x 3 tiles (since then 50 in 4 x 2,
#: measured 2% faster), 7x7x512 3.0 -> 2.6 ms.
PLANE_ACCUMULATORS = 1024
#: The same for 1x1 filters, whose step per input-channel block is short (8 FMAs per pixel)
#: next to reloading the accumulators: 14x14 pointwise layers with 4 blocks (784) measured
#: 6% slower split, 7x7 ones (49 x 1) 8% faster.
PLANE_ACCUMULATORS_POINTWISE = 256
#: A small plane (see :func:`schedule_nchwc`) accumulates its register tiles over chunks of
#: input channel blocks whose filter slice has at most this many bytes (one chunk for a 1x1
#: filter of up to 64 input blocks: measured 5% faster than 32 KB chunks on MobileNetV2's
#: 7x7 320->1280 layer; a 3x3 filter 4 blocks at a time, any size between 1 and all blocks
#: measured alike on ResNet-18's 7x7x512 layer).
FILTER_CHUNK_BYTES = 65536
#: A depthwise convolution with a stride, or whose padded plane of one channel block has more
#: bytes than this, reads its input in place with a bounds check per tap and pixel instead of
#: building a padded copy of each plane: measured (1 thread) MobileNetV2's 112x112x96
#: stride-2 layer 0.24 -> 0.13 ms, 112x112x32 0.15 -> 0.11 ms (a 416 KB plane, out of L2);
#: 56x56x144 (107 KB) 0.19 -> 0.22 and 7x7x960 0.026 -> 0.035 ms slower that way.
DEPTHWISE_PLANE_BYTES = 256 * 1024
#: A small plane (flat) with one tile of output channels pads each image inside its parallel
#: loop, in cache, instead of in a serial pass over the batch before it (AVX-512; the digits
#: CNN's 8x8 16 -> 32 layer at batch 64: 1.4% faster alone, 1 thread; in the model, 1
#: thread, alike; the serial pass is ~3% of the kernel, which 2 threads no longer wait for).
STAGE_PLANE_PADDING = True


def enabled() -> bool:
    return os.environ.get("LEPTON_NCHWC", "1") != "0"


def _shape(expr: Any) -> list[int | None]:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    if shape is None:
        return []
    out: list[int | None] = []
    for dim in shape:
        value = getattr(dim, "value", None)
        out.append(int(value) if value is not None else None)
    return out


def convertible(call: Any, lanes: int) -> str | None:
    """For a float32 NCHW/OIHW conv2d with a constant filter, without dilation, ungrouped or
    depthwise, whose output channels are a multiple of ``lanes``: the data layout it takes,
    ``NCHW{lanes}c`` (input channels a multiple of ``lanes`` too) or ``NCHW`` (an image
    model's 3-channel stem: its input stays NCHW, each value broadcast); else None."""
    from tvm.ir.expr import Constant

    if str(getattr(call.op, "name", "")) != "relax.nn.conv2d" or len(call.args) != 2:
        return None
    x, w = call.args
    attrs = call.attrs
    if not isinstance(w, Constant) or expr_dtype(x) != "float32" or expr_dtype(w) != "float32":
        return None
    if str(attrs.out_dtype) not in ("", "void", "None", "float32"):
        return None
    if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) \
            != ("NCHW", "OIHW", "NCHW"):
        return None
    if any(int(d) != 1 for d in attrs.dilation):
        return None
    xs, ws = _shape(x), _shape(w)
    if len(xs) != 4 or len(ws) != 4 or None in xs[1:] or None in ws:
        return None
    cin, cout, groups = xs[1], ws[0], int(attrs.groups)
    if cout % lanes:
        return None
    blocked = f"NCHW{lanes}c"
    if groups == 1 and ws[1] == cin:
        return blocked if cin % lanes == 0 else "NCHW"
    if groups == cin == cout and ws[1] == 1:
        return blocked
    return None


def vector_registers(bits: int) -> int:
    """Vector registers of an x86 target with ``bits``-wide SIMD: 32 with AVX-512, else 16."""
    return 32 if bits >= 512 else REGISTERS


def _max_accumulators(registers: int) -> int:
    return TILE_ACCUMULATORS_32 if registers >= 32 else TILE_ACCUMULATORS


def convert_conv_layout(mod: Any, lanes: int, registers: int = REGISTERS) -> tuple[Any, int]:
    """``(module, number of convolutions converted)``: TVM's ConvertLayout with NCHW{lanes}c
    activations for the :func:`convertible` convolutions only (the operands of any op not
    verified in that layout converted back to NCHW before it), then each of them replaced by
    a :func:`conv2d_nchwc_te` kernel with its filter packed in numpy. Raises
    :class:`NotConvertible`, naming TVM's message, when ConvertLayout itself fails (or, as a
    check of :func:`_nchw_barriers`, would still give an NCHWc tensor to an op outside
    :data:`FOLLOWS_LAYOUT`)."""
    from tvm import relax

    last_op = [""]  # the op ConvertLayout visits (named if its layout inference fails)

    def layout_cb(call: Any) -> Any:
        last_op[0] = str(getattr(call.op, "name", call.op))
        data = convertible(call, lanes)
        if data is not None:
            return {"relax.nn.conv2d": [data, f"OIHW{lanes}o", f"NCHW{lanes}c"]}
        if str(getattr(call.op, "name", "")) == "relax.nn.conv2d":
            # Explicitly NCHW: without a desired layout, ConvertLayout would try to keep its
            # input's NCHWc, which TVM cannot do for this convolution.
            return {"relax.nn.conv2d": ["NCHW", "OIHW", "NCHW"]}
        return {}

    if not _has_convertible(mod, lanes):
        return mod, 0
    original = _nchw_barriers(stacked_extrema_as_ops(clips_as_ops(mod)), lanes)
    try:
        converted = relax.transform.ConvertLayout({}, layout_cb)(original)
        converted = relax.transform.Normalize()(_drop_barriers(converted))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        # TVM's layout inference of some op failed (its FFI raises InternalError, a
        # RuntimeError, or the builtin error named by the C++ check)
        raise NotConvertible(f"TVM's ConvertLayout failed at {last_op[0] or 'an op'}: "
                             f"{error_message(exc)}") from exc
    before = _blocked_inputs(original)
    unsafe = sorted(op for op, count in _blocked_inputs(converted).items()
                    if op not in FOLLOWS_LAYOUT and count > before.get(op, 0))
    if unsafe:
        raise NotConvertible("NCHWc tensors would reach " + ", ".join(unsafe)
                             + " (not verified in that layout)")
    return _legalize(converted, lanes, registers)


def fold_flatten_transforms(mod: Any) -> tuple[Any, int]:
    """``(module, number of matmuls rewritten)``: a classifier that flattens NCHWc activations
    through NCHW, ``matmul(reshape(layout_transform(x), [N, C*H*W]), W)`` with ``x``
    [N, C/c, H, W, c] and a constant ``W`` [C*H*W, K], reads ``x`` in its own order instead
    (``reshape(x, [N, C*H*W])``) against ``W`` with its rows permuted to match at compile time:
    the same products, summed in another order, and no transform pass (one scalar store per
    element into the NCHW copy; the digits CNN's at batch 64: ~9 us of ~245). The transform
    stays where anything else reads its NCHW result."""
    from tvm import relax, tirx
    from tvm.ir.expr import Constant

    from lepton_edge.lowering.layout import rewrite_calls

    count = 0

    def bound(mutator: Any, expr: Any, op: str) -> Any:
        if isinstance(expr, relax.Var):
            expr = mutator.lookup_binding(expr)
        if isinstance(expr, relax.Call) and str(getattr(expr.op, "name", "")) == op:
            return expr
        return None

    def unblocks(transform: Any, lanes: int) -> bool:
        """Whether the transform maps [n, b, h, w, l] to [n, b * lanes + l, h, w] exactly."""
        attrs = transform.attrs
        if getattr(attrs, "pad_value", None) is not None or \
                getattr(attrs, "axis_separators", None) or \
                getattr(attrs, "input_axis_separators", None):
            return False
        index_map = attrs.index_map
        for point in ((0, 0, 0, 0, 0), (1, 2, 3, 4, 5), (2, 1, 0, 3, lanes - 1)):
            # constant indices in, constants out (TVM folds the map's arithmetic)
            got = index_map.map_indices([tirx.IntImm("int64", v) for v in point])
            want = (point[0], point[1] * lanes + point[4], point[2], point[3])
            if len(got) != 4 or any(not isinstance(g, tirx.IntImm) or int(g) != v
                                    for g, v in zip(got, want, strict=True)):
                return False
        return True

    def rewrite(mutator: Any, call: Any) -> Any:
        nonlocal count
        if str(getattr(call.op, "name", "")) != "relax.matmul" or len(call.args) != 2:
            return call
        weight = call.args[1]
        if isinstance(weight, relax.Var):
            weight = mutator.lookup_binding(weight)
        flat = bound(mutator, call.args[0], "relax.reshape")
        if not isinstance(weight, Constant) or flat is None:
            return call
        transform = bound(mutator, flat.args[0], "relax.layout_transform")
        if transform is None:
            return call
        src = transform.args[0]
        blocked = _shape(src)
        unblocked = _shape(transform)
        w = weight.value.numpy()
        if len(blocked) != 5 or None in blocked[1:] or len(unblocked) != 4 or w.ndim != 2 \
                or len(_shape(flat)) != 2 or w.dtype != np.float32:
            return call
        _, blocks, height, width, lanes = blocked
        if not unblocks(transform, lanes) or unblocked[1] != blocks * lanes \
                or w.shape[0] != blocks * lanes * height * width:
            return call
        # row of W for element (b, h, w, l) of the blocked order: channel b * lanes + l
        b, h, x, lane = np.meshgrid(np.arange(blocks), np.arange(height), np.arange(width),
                                    np.arange(lanes), indexing="ij")
        rows = ((b * lanes + lane) * height + h) * width + x
        count += 1
        reshaped = mutator.builder_.emit(relax.op.reshape(src, flat.args[1]))
        return relax.op.matmul(reshaped, relax.const(np.ascontiguousarray(w[rows.ravel()])),
                               out_dtype=call.attrs.out_dtype)

    mod = rewrite_calls(mod, rewrite)
    if count:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, count


class NotConvertible(Exception):
    """The module cannot keep NCHWc between its convolutions (the caller compiles it in
    NCHW, which is always correct, and logs why)."""


#: Ops that may take the NCHWc tensors between convolutions (tests/targets/test_nchwc.py
#: compares models with each of them to onnxruntime); any other op gets its operands back in
#: NCHW (:func:`_nchw_barriers`).
FOLLOWS_LAYOUT = frozenset({
    "relax.nn.conv2d", "relax.layout_transform", "relax.add", "relax.subtract",
    "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum", "relax.nn.relu",
    "relax.sigmoid", "relax.tanh", "relax.abs", "relax.nn.max_pool2d", "relax.nn.avg_pool2d"})


#: Reductions that may take an NCHWc tensor when they reduce over H and W only.
SPATIAL_REDUCTIONS = frozenset({"relax.mean", "relax.sum", "relax.max", "relax.min"})


def _spatial_axes(call: Any) -> bool:
    """True when the reduction ``call`` of a rank-4 (NCHW) or rank-5 (NCHWc) tensor reduces
    over some of its H and W axes only (not the channels, channel blocks or lanes)."""
    axes = getattr(call.attrs, "axis", None)
    rank = len(_shape(call.args[0])) if call.args else 0
    if axes is None or rank not in (4, 5):
        return False
    normalized = {int(a) % rank for a in axes}
    return bool(normalized) and normalized <= {2, 3}


#: Elementwise ops of :data:`FOLLOWS_LAYOUT` whose tensor operands broadcast against each other.
ELEMENTWISE = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum",
    "relax.minimum"})
#: The identity op (no layout inference in TVM, so ConvertLayout hands it NCHW) that
#: :func:`_nchw_barriers` puts before the operands of an op not verified in NCHWc.
_BARRIER = "relax.builtin.stop_lift_params"


def _needs_nchw(call: Any, lanes: int) -> bool:
    """True when ``call`` must read its 4-d operands in NCHW: an op outside
    :data:`FOLLOWS_LAYOUT` (other than a spatial reduction), or an elementwise op with a
    variable operand that cannot be channel-blocked alongside (a ``[N, 1, H, W]`` map, a
    channel count not a multiple of ``lanes``, another rank)."""
    from tvm.ir.expr import Constant

    name = str(getattr(call.op, "name", ""))
    if name in ("relax.call_tir", _BARRIER) or not name.startswith("relax."):
        return False
    if name in SPATIAL_REDUCTIONS and _spatial_axes(call):
        return False
    if name not in FOLLOWS_LAYOUT:
        return True
    if name not in ELEMENTWISE:
        return False
    for arg in call.args:
        if isinstance(arg, Constant):
            continue
        shape = _shape(arg)
        if len(shape) == 0:
            continue
        if len(shape) != 4 or shape[1] is None or shape[1] % lanes:
            return True
    return False


def _nchw_barriers(mod: Any, lanes: int) -> Any:
    """``mod`` with each variable 4-d float32 operand of a :func:`_needs_nchw` call wrapped in
    :data:`_BARRIER`, so that ConvertLayout converts it back to NCHW there (removed again by
    :func:`_drop_barriers`): the op computes in NCHW as imported, the rest stays blocked."""
    from tvm import relax
    from tvm.ir.expr import Constant

    from lepton_edge.lowering.layout import rewrite_calls

    def wrap(mutator: Any, arg: Any) -> Any:
        if isinstance(arg, relax.Tuple):
            return relax.Tuple([wrap(mutator, field) for field in arg.fields])
        if isinstance(arg, Constant) or len(_shape(arg)) != 4 or expr_dtype(arg) != "float32":
            return arg
        return mutator.builder_.emit(relax.op.builtin.stop_lift_params(arg))

    def channel_constant(arg: Any, channels: int) -> Any:
        """A constant operand (else ``arg``) that broadcasts over NCHW as ``[1, C, h, w]`` (h, w each 1 or
        the full size), so that ConvertLayout blocks it too (a transform of a constant,
        folded while compiling) instead of computing the op in NCHW."""
        value = arg.value.numpy()
        if value.size <= 1 or value.ndim > 4:
            return arg
        value = value.reshape((1,) * (4 - value.ndim) + value.shape)
        if value.shape[0] != 1 or value.shape[1] not in (1, channels):
            return arg
        return relax.const(np.ascontiguousarray(
            np.broadcast_to(value, (1, channels, *value.shape[2:]))))

    def rewrite(mutator: Any, call: Any) -> Any:
        if not _needs_nchw(call, lanes):
            if str(getattr(call.op, "name", "")) not in ELEMENTWISE:
                return call
            blocked = [_shape(a)[1] for a in call.args
                       if not isinstance(a, Constant) and len(_shape(a)) == 4]
            if not blocked:
                return call
            args = [channel_constant(a, blocked[0]) if isinstance(a, Constant) else a
                    for a in call.args]
            if all(new.same_as(old) for new, old in zip(args, call.args)):
                return call
            return relax.Call(call.op, args, call.attrs, call.ty_args)
        args = [wrap(mutator, arg) for arg in call.args]
        if all(new.same_as(old) for new, old in zip(args, call.args)):
            return call
        return relax.Call(call.op, args, call.attrs, call.ty_args)

    return rewrite_calls(mod, rewrite)


def _drop_barriers(mod: Any) -> Any:
    from tvm import relax

    from lepton_edge.lowering.layout import rewrite_calls

    def rewrite(_mutator: Any, call: Any) -> Any:
        return call.args[0] if str(getattr(call.op, "name", "")) == _BARRIER else call

    return relax.transform.CanonicalizeBindings()(rewrite_calls(mod, rewrite))


def _blocked_inputs(mod: Any) -> dict[str, int]:
    """Per op name: how many of its tensor arguments have rank 5 (NCHWc after conversion)."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    counts: dict[str, int] = {}

    @visitor
    class Count(PyExprVisitor):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> None:
            name = str(getattr(call.op, "name", ""))
            if name in SPATIAL_REDUCTIONS and _spatial_axes(call):
                name = ""  # a global pool (mean over H and W): the lanes stay channels
            if name and name != "relax.call_tir":
                for arg in call.args:
                    fields = arg.fields if isinstance(arg, relax.Tuple) else [arg]
                    for field in fields:
                        if len(_shape(field)) == 5:
                            counts[name] = counts.get(name, 0) + 1
            super().visit_call_(call)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            Count().visit_expr(func)
    return counts


def _scalar(mutator: Any, expr: Any) -> float | None:
    """The value of a 0-d float32 constant, also through the frontend's NaN guard of a Clip
    bound (``where(isnan(c), inf, c)``); None if it is not one."""
    from tvm import relax
    from tvm.ir.expr import Constant

    for _ in range(4):
        if not isinstance(expr, relax.Var):
            break
        bound = mutator.lookup_binding(expr)
        if bound is None:
            return None
        expr = bound
    if isinstance(expr, Constant):
        value = expr.value.numpy()
        return float(value) if value.shape == () and value.dtype == np.float32 else None
    if isinstance(expr, relax.Call) and str(getattr(expr.op, "name", "")) == "relax.where":
        cond, a, b = expr.args
        if isinstance(cond, relax.Var):
            cond = mutator.lookup_binding(cond)
        if not (isinstance(cond, relax.Call)
                and str(getattr(cond.op, "name", "")) == "relax.isnan"):
            return None
        checked, va, vb = (_scalar(mutator, e) for e in (cond.args[0], a, b))
        if checked is None or va is None or vb is None:
            return None
        return va if np.isnan(checked) else vb
    return None


def clips_as_ops(mod: Any) -> Any:
    """TVM's ONNX frontend imports Clip as ``call_tir`` of topi ``maximum`` / ``minimum``
    kernels (with the bound as a 0-d tensor), which ConvertLayout cannot see through (each
    ReLU6 of MobileNetV2 would cost two layout transforms): rewrite those with a constant
    float32 bound to ``relax.maximum`` / ``relax.minimum`` of the constant."""
    from tvm import relax, tirx

    from lepton_edge.lowering.layout import rewrite_calls

    kinds: dict[str, str] = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            text = func.script(show_meta=False)
            for kind in ("maximum", "minimum"):
                if f'T.sblock("T_{kind}")' in text and text.count("with T.sblock(") == 2:
                    kinds[gvar.name_hint] = kind

    def rewrite(mutator: Any, call: Any) -> Any:
        if str(getattr(call.op, "name", "")) != "relax.call_tir":
            return call
        kind = kinds.get(getattr(call.args[0], "name_hint", ""))
        args = call.args[1]
        if kind is None or not isinstance(args, relax.Tuple) or len(args.fields) != 2:
            return call
        x, bound = args.fields
        value = _scalar(mutator, bound)
        if value is None or expr_dtype(x) != "float32" or np.isnan(value):
            return call
        op = relax.op.maximum if kind == "maximum" else relax.op.minimum
        return op(x, relax.const(np.float32(value)))

    if not kinds:
        return mod
    mod = rewrite_calls(mod, rewrite)
    return relax.transform.DeadCodeElimination()(mod)


def stacked_extrema_as_ops(mod: Any) -> Any:
    """TVM's ONNX frontend imports Max / Min of several tensors as ``max`` / ``min`` over
    axis 0 of a ``stack`` of their ``broadcast_to`` copies, which ConvertLayout cannot convert
    (its layout inference of that reduction fails): rewrite it to a chain of
    ``relax.maximum`` / ``relax.minimum`` of the tensors themselves (the same numbers, with
    numpy broadcasting to the same shape), which keep the NCHWc layout."""
    from tvm import relax

    from lepton_edge.lowering.layout import rewrite_calls

    def bound(mutator: Any, expr: Any) -> Any:
        value = mutator.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return value if isinstance(value, relax.Call) else None

    def rewrite(mutator: Any, call: Any) -> Any:
        name = str(getattr(call.op, "name", ""))
        if name not in ("relax.max", "relax.min") or bool(call.attrs.keepdims) \
                or [int(a) for a in (call.attrs.axis or [])] != [0]:
            return call
        stacked = bound(mutator, call.args[0])
        if stacked is None or str(getattr(stacked.op, "name", "")) != "relax.stack" \
                or int(stacked.attrs.axis) != 0:
            return call
        fields = stacked.args[0].fields if isinstance(stacked.args[0], relax.Tuple) else None
        if not fields:
            return call
        operands = []
        for field in fields:
            copy = bound(mutator, field)
            if copy is not None and str(getattr(copy.op, "name", "")) == "relax.broadcast_to":
                field = copy.args[0]
            operands.append(field)
        if len(operands) < 2:
            return call
        op = relax.op.maximum if name == "relax.max" else relax.op.minimum
        result = operands[0]
        for operand in operands[1:]:
            result = mutator.builder_.emit(op(result, operand))
        # the same type (shape and dtype) as the reduction's, else keep it (the unused
        # bindings are removed below)
        return result if str(result.ty) == str(call.ty) else call

    # (the reduction's variable becomes an alias of the chain's result: ConvertLayout would
    # give an alias the initial layout)
    mod = relax.transform.CanonicalizeBindings()(rewrite_calls(mod, rewrite))
    return relax.transform.DeadCodeElimination()(mod)


def _has_convertible(mod: Any, lanes: int) -> bool:
    return _convertible_count(mod, lanes) > 0


def _convertible_count(mod: Any, lanes: int) -> int:
    """How many of the module's convolutions are :func:`convertible` with ``lanes``."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    found = [0]

    @visitor
    class Find(PyExprVisitor):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> None:
            if convertible(call, lanes) is not None:
                found[0] += 1
            super().visit_call_(call)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            Find().visit_expr(func)
    return found[0]


#: The narrowest channel block :func:`block_lanes` falls back to (AVX2's 8 floats).
MIN_BLOCK_LANES = 8


def block_lanes(mod: Any, lanes: int) -> int:
    """The channel block ``c`` of the module's NCHWc convolutions: the SIMD width ``lanes``,
    or half of it (down to :data:`MIN_BLOCK_LANES`) while that converts more convolutions.
    With AVX-512 (16 lanes) a model with 24-channel layers (MobileNetV2: 56x56x24) would keep
    those in NCHW with the slow generic schedules (measured 6.6 ms of a 15 ms call at 1
    thread for one 144 -> 24 layer); in NCHW8c all its convolutions are blocked, and 8-lane
    vectors cost little on Zen 4, whose 512-bit FMAs run as two 256-bit halves (MobileNetV2
    1 thread 1.28x -> 1.09x onnxruntime's time; ResNet-18, all multiples of 16, measured 6%
    slower in NCHW8c than NCHW16c, so 16 stays where it converts as much)."""
    best, count = lanes, _convertible_count(mod, lanes)
    half = lanes // 2
    while half >= MIN_BLOCK_LANES:
        more = _convertible_count(mod, half)
        if more > count:
            best, count = half, more
        half //= 2
    return best


#: Zero-pad channel counts that are multiples of 8 but not of the SIMD width (AVX-512: 24 ->
#: 32) before choosing the channel block (:func:`pad_channels`).
PAD_CHANNELS = True
#: Elementwise ops whose zero-padded channels stay finite (so that the zero filter taps of a
#: convolution reading them add nothing): :func:`pad_channels` lets them compute on the
#: padded tensor (division is not one: 0 / 0).
PAD_ELEMENTWISE = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum"})
PAD_UNARY = frozenset({"relax.nn.relu", "relax.sigmoid", "relax.tanh", "relax.abs"})


def _padded_count(channels: int, lanes: int) -> int | None:
    """The padded channel count of a ``channels``-channel tensor for NCHW{lanes}c blocks: the
    next multiple of ``lanes`` when ``channels`` is a multiple of :data:`MIN_BLOCK_LANES`
    but not of ``lanes`` (24 -> 32 with 16 lanes), else None."""
    if lanes <= MIN_BLOCK_LANES or channels % MIN_BLOCK_LANES or channels % lanes == 0:
        return None
    return -(-channels // lanes) * lanes


def pad_channels(mod: Any, lanes: int) -> tuple[Any, int]:
    """``(module, convolutions padded)``: each float32 convolution whose output channels are
    a multiple of 8 but not of ``lanes`` (MobileNetV2's 24-channel layers with AVX-512's 16)
    computes zero-padded output channels instead (its filter padded with zero filters: 24 ->
    32), so that it and the convolutions reading it can be blocked in NCHW{lanes}c (as
    onnxruntime does). The padded tensor flows through :data:`PAD_ELEMENTWISE` ops (their
    constant operands padded with zeros; their padded channels stay finite) and
    :data:`PAD_UNARY` ops and into convolutions, whose filters get zero input channels (a
    depthwise one is padded along); any other use reads the original channels (a
    ``strided_slice``). The original module (and 0) when none is padded or when the result
    would change a function's output type."""
    from tvm import relax
    from tvm.ir.expr import Constant
    from tvm.relax.expr_functor import PyExprMutator, mutator

    padded: dict[Any, int] = {}  # emitted padded var -> its original channel count
    count = [0]

    def original(mutator: Any, arg: Any) -> int | None:
        """The original channel count when ``arg`` is a padded tensor, else None."""
        if not isinstance(arg, relax.Var):
            return None
        if arg in padded:
            return padded[arg]
        bound = mutator.lookup_binding(arg)
        return padded.get(bound) if isinstance(bound, relax.Var) else None

    def sliced(mutator: Any, arg: Any) -> Any:
        channels = original(mutator, arg)
        if channels is None:
            return arg
        return mutator.builder_.emit(relax.op.strided_slice(arg, [1], [0], [channels]))

    def emit_padded(mutator: Any, call: Any, channels: int) -> Any:
        var = mutator.builder_.emit(call)
        padded[var] = channels
        return var

    def pad_axis(value: np.ndarray, axis: int, size: int) -> np.ndarray:
        widths = [(0, 0)] * value.ndim
        widths[axis] = (0, size - value.shape[axis])
        return np.pad(value, widths)

    def conv(mutator: Any, call: Any) -> Any:
        x, w = call.args
        attrs = call.attrs
        cin = original(mutator, x)
        plain = isinstance(w, Constant) and expr_dtype(w) == expr_dtype(x) == "float32" \
            and str(attrs.out_dtype) in ("", "void", "None", "float32") \
            and (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) \
            == ("NCHW", "OIHW", "NCHW") and all(int(d) == 1 for d in attrs.dilation)
        if not plain:
            return call if cin is None else relax.Call(
                call.op, [sliced(mutator, x), w], attrs, call.ty_args)
        weight = w.value.numpy()
        groups, cout = int(attrs.groups), weight.shape[0]
        if cin is not None:
            size = int(_shape(x)[1])
            if groups == 1 and weight.shape[1] == cin:
                weight = pad_axis(weight, 1, size)
            elif groups == cin == cout and weight.shape[1] == 1:
                # depthwise: padded along (zero filters)
                count[0] += 1
                return emit_padded(mutator, _conv2d(x, pad_axis(weight, 0, size), attrs,
                                                    size), cout)
            else:
                x = sliced(mutator, x)
        target = _padded_count(cout, lanes)
        if target is None or groups != 1:
            if cin is None:
                return call
            return _conv2d(x, weight, attrs, groups)
        count[0] += 1
        return emit_padded(mutator, _conv2d(x, pad_axis(weight, 0, target), attrs, groups),
                           cout)

    def rewrite(mutator: Any, call: Any) -> Any:
        name = str(getattr(call.op, "name", ""))
        if name == "relax.nn.conv2d" and len(call.args) == 2:
            return conv(mutator, call)
        channels = [original(mutator, a) for a in call.args]
        found = [c for c in channels if c is not None]
        if not found and not any(
                original(mutator, f) is not None for a in call.args
                if isinstance(a, relax.Tuple) for f in a.fields):
            return call
        if name in PAD_UNARY and len(call.args) == 1 and found:
            return emit_padded(mutator, call, found[0])
        if name in PAD_ELEMENTWISE and len(set(found)) == 1:
            size = next(int(_shape(a)[1]) for a, c in zip(call.args, channels) if c is not None)
            args = []
            for arg, c in zip(call.args, channels):
                if c is None:
                    arg = _pad_operand(mutator, arg, found[0], size)
                    if arg is None:
                        break
                args.append(arg)
            else:
                return emit_padded(mutator, relax.Call(call.op, args, call.attrs, call.ty_args),
                                   found[0])
        fields = []
        for arg in call.args:
            if isinstance(arg, relax.Tuple):
                arg = relax.Tuple([sliced(mutator, f) for f in arg.fields])
            fields.append(sliced(mutator, arg))
        return relax.Call(call.op, fields, call.attrs, call.ty_args)

    if lanes <= MIN_BLOCK_LANES:
        return mod, 0

    @mutator
    class Padder(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            # the arguments rewritten first, the call not normalized before ``rewrite`` (a
            # padded argument fails the type inference of the original call)
            args = [self.visit_expr(arg) for arg in call.args]
            return rewrite(self, relax.Call(call.op, args, call.attrs, call.ty_args))

        def visit_tuple_(self, tup: Any) -> Any:
            # a tuple (a model's outputs, a Concat's operands) holds the original channels
            return relax.Tuple([sliced(self, self.visit_expr(f)) for f in tup.fields])

    source = mod
    # ReLU6 as maximum / minimum ops (TVM imports a Clip as call_tir kernels)
    mod = stacked_extrema_as_ops(clips_as_ops(mod))
    padder = Padder(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            padder.builder_.update_func(gvar, padder.visit_expr(func))
    result = padder.builder_.get()
    if not count[0]:
        return source, 0
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function) and \
                str(func.ret_ty) != str(result[gvar].ret_ty):
            return source, 0
    result = relax.transform.CanonicalizeBindings()(result)
    return relax.transform.DeadCodeElimination()(result), count[0]


def _conv2d(x: Any, weight: np.ndarray, attrs: Any, groups: int) -> Any:
    """``relax.nn.conv2d`` of ``x`` and the constant ``weight`` with ``attrs`` (NCHW / OIHW)
    but ``groups``."""
    from tvm import relax

    return relax.op.nn.conv2d(
        x, relax.const(np.ascontiguousarray(weight)),
        strides=[int(v) for v in attrs.strides], padding=[int(v) for v in attrs.padding],
        dilation=[int(v) for v in attrs.dilation], groups=groups, out_dtype="float32")


def _pad_operand(mutator: Any, arg: Any, channels: int, size: int) -> Any:
    """An elementwise op's operand next to a tensor padded from ``channels`` to ``size``
    channels: one broadcast along the channels (1 channel, or rank below 3) as is; a
    constant with ``channels`` channels (at axis 1 of NCHW), also through a ``reshape`` (an
    imported bias), padded with zeros; a small variable of that shape ``[.., C, 1, 1]``
    padded with zeros at run time; None for anything else (a full activation)."""
    from tvm import relax
    from tvm.ir.expr import Constant

    shape = _shape(arg)
    if len(shape) < 3 or shape[-3] == 1:
        return arg
    if shape[-3] != channels:
        return None
    value = None
    if isinstance(arg, Constant):
        value = arg.value.numpy()
    elif isinstance(arg, relax.Var) and None not in shape:
        bound = mutator.lookup_binding(arg)
        if isinstance(bound, relax.Call) and str(getattr(bound.op, "name", "")) \
                == "relax.reshape" and isinstance(bound.args[0], Constant):
            value = bound.args[0].value.numpy().reshape(shape)
    if value is not None:
        widths = [(0, 0)] * value.ndim
        widths[-3] = (0, size - channels)
        return relax.const(np.ascontiguousarray(np.pad(value, widths)))
    if None in shape or any(d != 1 for i, d in enumerate(shape) if i != len(shape) - 3):
        return None
    widths = [0] * (2 * len(shape))
    widths[2 * (len(shape) - 3) + 1] = size - channels
    return mutator.builder_.emit(relax.op.nn.pad(arg, widths))


def pack_filter(weight: np.ndarray, lanes: int, depthwise: bool, blocked: bool = True
                ) -> np.ndarray:
    """OIHW filter -> ``[O/c, I/c, KH, KW, c_in, c_out]`` (depthwise: ``[C/c, KH, KW, c]``;
    not ``blocked``, for an NCHW input: ``[O/c, I, KH, KW, c]``)."""
    o, i, kh, kw = weight.shape
    if not blocked:
        return np.ascontiguousarray(weight.reshape(o // lanes, lanes, i, kh, kw)
                                    .transpose(0, 2, 3, 4, 1))
    if depthwise:
        return np.ascontiguousarray(
            weight.reshape(o // lanes, lanes, kh, kw).transpose(0, 2, 3, 1))
    return np.ascontiguousarray(weight.reshape(o // lanes, lanes, i // lanes, lanes, kh, kw)
                                .transpose(0, 2, 4, 5, 3, 1))


def conv2d_nchwc_te(x: Any, w: Any, strides: tuple[int, int],
                    padding: tuple[int, int, int, int], depthwise: bool,
                    registers: int = REGISTERS) -> Any:
    """TE of the channel-blocked convolution: ``x`` [N, C/c, H, W, c], ``w`` packed by
    :func:`pack_filter`; the padding is its own block (:data:`PAD_BLOCK`)."""
    from tvm import te, tirx

    blocked = len(x.shape) == 5
    if blocked:
        n, cb, h, wd, lanes = x.shape
    else:
        n, cb, h, wd = x.shape
    top, left, bottom, right = padding
    sh, sw = strides
    if depthwise:
        ocb, kh, kw, lanes = w.shape
    elif blocked:
        ocb, _, kh, kw, _, _ = w.shape
    else:
        ocb, _, kh, kw, lanes = w.shape
    kh, kw = int(kh), int(kw)
    ph, pw = h + top + bottom, wd + left + right
    oh = (ph - kh) // sh + 1
    ow = (pw - kw) // sw + 1
    if top or left or bottom or right:
        def pad_value(b: Any, c: Any, y: Any, xx: Any, *i: Any) -> Any:
            inside = tirx.all(y >= top, y < h + top, xx >= left, xx < wd + left)
            return tirx.if_then_else(inside, x[(b, c, y - top, xx - left, *i)],
                                     tirx.const(0.0, x.dtype))
        xp = te.compute((n, cb, ph, pw, *x.shape[4:]), pad_value, name=PAD_BLOCK)
    else:
        xp = x
    ry = te.reduce_axis((0, kh), name="ry")
    rx = te.reduce_axis((0, kw), name="rx")
    if depthwise and xp is not x and (sh > 1 or sw > 1
                                      or ph * pw * int(lanes) * 4 > DEPTHWISE_PLANE_BYTES):
        # Read the input in place, zero outside it (a branch per tap and pixel, predictable),
        # instead of a padded copy (see DEPTHWISE_PLANE_BYTES).
        def masked(b: Any, c: Any, y: Any, xx: Any, i: Any) -> Any:
            y, xx = y - top, xx - left
            inside = tirx.all(y >= 0, y < h, xx >= 0, xx < wd)
            return tirx.if_then_else(inside, x[b, c, y, xx, i], tirx.const(0.0, x.dtype))

        return te.compute(
            (n, ocb, oh, ow, lanes),
            lambda b, c, y, xx, i: te.sum(masked(b, c, y * sh + ry, xx * sw + rx, i)
                                          * w[c, ry, rx, i], axis=[ry, rx]),
            name=DEPTHWISE_BLOCK)
    if depthwise:
        return te.compute(
            (n, ocb, oh, ow, lanes),
            lambda b, c, y, xx, i: te.sum(xp[b, c, y * sh + ry, xx * sw + rx, i]
                                          * w[c, ry, rx, i], axis=[ry, rx]),
            name=DEPTHWISE_BLOCK)
    # Register tiles of t_w output columns: when t_w does not divide the width, the kernel
    # computes the next multiple of t_w columns (the extra ones read the last input column,
    # clamped, and are never stored: CROP_BLOCK copies the real ones). A small output plane
    # (accumulated chunk of input channel blocks by chunk in schedule_nchwc, at most
    # PLANE_ACCUMULATORS pixels x t_c blocks) is tiled as one row of oh * ow pixels (the
    # extra pixels repeat the last one).
    rco = te.reduce_axis((0, cb), name="rco")
    taps = (lambda rci: [rco, ry, rx, rci]) if blocked else (lambda _: [rco, ry, rx])

    def read(b: Any, y: Any, xx: Any, rci: Any) -> Any:
        return xp[b, rco, y, xx, rci] if blocked else xp[b, rco, y, xx]

    def weight(c: Any, rci: Any, o: Any) -> Any:
        return w[c, rco, ry, rx, rci, o] if blocked else w[c, rco, ry, rx, o]

    rci = te.reduce_axis((0, lanes), name="rci") if blocked else None
    pixels = int(oh) * int(ow)
    t_c, t_w, flat, computed = output_tiling(int(ocb), int(oh), int(ow), kh * kw, blocked,
                                             registers)
    attrs = {TILE_ANNOTATION: [t_c, t_w, int(flat)]}
    if flat:
        def pixel(p: Any) -> tuple[Any, Any]:
            q = p if computed == pixels else tirx.min(p, pixels - 1)
            return q // ow * sh, q % ow * sw

        conv = te.compute(
            (n, ocb, computed, lanes),
            lambda b, c, p, o: te.sum(
                read(b, pixel(p)[0] + ry, pixel(p)[1] + rx, rci) * weight(c, rci, o),
                axis=taps(rci)),
            name=CONV_BLOCK, attrs=attrs)
        return te.compute((n, ocb, oh, ow, lanes),
                          lambda b, c, y, xx, i: conv[b, c, y * ow + xx, i], name=CROP_BLOCK)

    def column(xx: Any, kx: Any) -> Any:
        return xx * sw + kx if computed == ow else tirx.min(xx * sw + kx, pw - 1)

    conv = te.compute(
        (n, ocb, oh, computed, lanes),
        lambda b, c, y, xx, o: te.sum(read(b, y * sh + ry, column(xx, rx), rci)
                                      * weight(c, rci, o), axis=taps(rci)),
        name=CONV_BLOCK, attrs=attrs)
    if computed == ow:
        return conv
    return te.compute((n, ocb, oh, ow, lanes), lambda *i: conv(*i), name=CROP_BLOCK)


#: A small output plane (one row of pixels accumulated chunk by chunk of input channels) runs
#: its channel tiles (times the batch) in parallel: at batch 1, an odd count below this
#: leaves a thread idle for a large part of the kernel (MobileNetV2's 7x7 layers with 160
#: output channels: 20 blocks in 5 tiles of 4, 3 + 2 on two threads), so the tiles then take
#: fewer channel blocks (10 tiles of 2) when that gives an even count. Measured (same
#: process, fastest of 200 calls, a busy machine): 960 -> 160 and 576 -> 160 at 7x7, 2
#: threads 0.82-0.99x the time of 5 tiles of 4 (0.82: the expected 5 / 6 when the second
#: core was free), 1 thread 0.98-1.02x.
PLANE_MIN_PARALLEL = 16


def _unbalanced(tiles: int) -> bool:
    return tiles < PLANE_MIN_PARALLEL and tiles % 2 == 1


def output_tiling(blocks: int, oh: int, ow: int, taps: int, blocked: bool,
                  registers: int = REGISTERS) -> tuple[int, int, bool, int]:
    """``(t_c, t_w, flat, computed)`` of a regular convolution with ``blocks`` output channel
    blocks, an ``oh`` x ``ow`` output and ``taps`` filter positions: flat (a blocked input
    whose plane fits :data:`PLANE_ACCUMULATORS`, or :data:`PLANE_ACCUMULATORS_POINTWISE` for
    a 1x1 filter) tiles the ``oh * ow`` pixels as one row, else each output row; ``computed``
    pixels or columns (a multiple of ``t_w``)."""
    pixels = oh * ow
    limit = PLANE_ACCUMULATORS_POINTWISE if taps == 1 else PLANE_ACCUMULATORS
    t_c, t_w = wide_tile_shape(blocks, pixels, plane=True, registers=registers)
    if blocked and -(-pixels // t_w) * t_w * t_c <= limit:
        if _unbalanced(blocks // t_c):
            # (see PLANE_MIN_PARALLEL) tiles of fewer channel blocks, if that balances the
            # parallel loop (not of 1 block: t_w broadcasts per filter vector, the slowest)
            even = tuple(t for t in (2, 3, 4)
                         if t < t_c and not blocks % t and not _unbalanced(blocks // t))
            if even:
                t_c, t_w = wide_tile_shape(blocks, pixels, plane=True, channel_tiles=even,
                                           registers=registers)
        return t_c, t_w, True, -(-pixels // t_w) * t_w
    # an NCHW input (a stem, few input channels): AVX2's tiles (with 32 registers, 2 x 8
    # instead of 2 x 4 tiles measured 10% slower on MobileNetV2's 3x3 stride-2 stem)
    t_c, t_w = wide_tile_shape(blocks, ow, registers=registers if blocked else REGISTERS)
    return t_c, t_w, False, -(-ow // t_w) * t_w


def _legalize(mod: Any, lanes: int, registers: int = REGISTERS) -> tuple[Any, int]:
    """Replace every conv2d in NCHW{lanes}c (from ConvertLayout) by a call_te of
    :func:`conv2d_nchwc_te` with the filter packed from the original OIHW constant."""
    from tvm import relax
    from tvm.ir.expr import Constant

    from lepton_edge.lowering.layout import rewrite_calls

    count = 0
    layout = f"NCHW{lanes}c"

    def original_filter(mutator: Any, w: Any) -> np.ndarray | None:
        if isinstance(w, relax.Var):
            w = mutator.lookup_binding(w)
        if isinstance(w, relax.Call) and str(getattr(w.op, "name", "")) \
                == "relax.layout_transform" and isinstance(w.args[0], Constant):
            return w.args[0].value.numpy()
        return None

    def rewrite(mutator: Any, call: Any) -> Any:
        nonlocal count
        if str(getattr(call.op, "name", "")) != "relax.nn.conv2d":
            return call
        attrs = call.attrs
        if str(attrs.out_layout) != layout:
            return call
        weight = original_filter(mutator, call.args[1])
        if weight is None:
            raise ValueError("NCHWc convolution without a constant filter")
        depthwise = int(attrs.groups) != 1
        blocked = str(attrs.data_layout) == layout
        packed = relax.const(pack_filter(weight, lanes, depthwise, blocked))
        count += 1
        return mutator.builder_.call_te(
            conv2d_nchwc_te, call.args[0], packed,
            tuple(int(s) for s in attrs.strides), tuple(int(p) for p in attrs.padding),
            depthwise, registers, primfunc_name_hint=DEPTHWISE_BLOCK if depthwise else CONV_BLOCK)

    mod = rewrite_calls(mod, rewrite)
    mod = relax.transform.DeadCodeElimination()(mod)
    return mod, count


# --- schedule ----------------------------------------------------------------------------------

def tile_shape(blocks: int, width: int, *, depthwise: bool = False,
               registers: int = REGISTERS) -> tuple[int, int]:
    """``(t_c, t_w)``: channel blocks x output columns of one register tile (depthwise
    convolutions; regular ones use :func:`wide_tile_shape`). ``t_c`` divides ``blocks``
    (at most 4), ``t_w`` divides ``width``; the accumulators plus one register per
    filter vector and one for the broadcast input fit the 16 vector registers of AVX2
    (``t_c * t_w + t_c + 1 <= 16``, at most :data:`TILE_ACCUMULATORS`). Preferred: at least 8
    accumulators (two FMA units x 4 cycles of latency), then the fewest loads per FMA
    (``(t_c + t_w) / (t_c * t_w)``), then the most accumulators. A depthwise convolution has
    one channel block per tile."""
    best: tuple[Any, ...] | None = None
    for t_c in ((1,) if depthwise else (1, 2, 3, 4)):
        if blocks % t_c:
            continue
        for t_w in range(1, width + 1):
            acc = t_c * t_w
            if width % t_w or acc > _max_accumulators(registers) \
                    or acc + t_c + 1 > registers:
                continue
            key = (acc >= 8, -(t_c + t_w) / acc, acc, -t_c)
            if best is None or key > best[0]:
                best = (key, t_c, t_w)
    assert best is not None  # (1, 1) always fits
    return best[1], best[2]


def wide_tile_shape(blocks: int, width: int, *, plane: bool = False,
                    channel_tiles: tuple[int, ...] = (1, 2, 3, 4),
                    registers: int = REGISTERS) -> tuple[int, int]:
    """``(t_c, t_w)`` of a regular convolution's register tile, ``t_w`` not necessarily a
    divisor of ``width`` (the kernel then computes ``ceil(width / t_w) * t_w`` columns, see
    :func:`conv2d_nchwc_te`). Per step of the unrolled input channel the tile loads ``t_c``
    filter vectors and broadcasts ``t_w`` input values (kept in registers across the channel
    blocks), each filter vector used by ``t_w`` FMAs in a row: the accumulators, the ``t_w``
    broadcasts and one filter vector fit AVX2's 16 registers (``t_c * t_w + t_w + 1 <= 16``,
    at most :data:`TILE_ACCUMULATORS`; 3 x 4 and 2 x 6 spill, 2 x 6 measured 40% slower than
    4 x 3): 4 x 3 (12 accumulators, 7 loads per 12 FMAs) measured 15% faster than 2 x 4 on a
    48-wide 64-channel 3x3 layer, 2-4% on ResNet-18's 56-wide one (computing 57 columns),
    while computing 15 columns for 14 or 30 for 28 lost 2-7% to 4 x 2 / 2 x 4 tiles. Chosen:
    the most FMAs per cycle estimated as ``useful columns / computed columns x min(1, acc /
    8) x (1 - 0.3 x (loads per FMA - 7 / 12))`` (8 accumulators hide the FMA latency; fewer
    loads per FMA leave the load ports free; 0.3 fitted to those measurements), then the
    fewest loads per FMA. A ``plane`` (a small output plane as one row of pixels, reloading
    its accumulators per chunk of input channels) ignores the loads and then prefers the
    most channel blocks: 4 x 2 measured 2% faster than 4 x 3 on ResNet-18's 7x7 (50 pixels
    computed, not 51) and 14x14 (196, not 198) layers, 2-9% faster than 2 x 5 on the 7x7.
    ``t_c`` is one of ``channel_tiles``. With ``registers=32`` (AVX-512) the same choice
    within 32 registers and :data:`TILE_ACCUMULATORS_32` accumulators (4 x 4 on a 56-wide
    layer, 2 x 7 on a 7x7 plane: 3-14% faster than the 16-register tiles on ResNet-18's and
    MobileNetV2's NCHW16c layers, 1 thread, Zen 4; 20 or 28 accumulators measured alike)."""
    best: tuple[Any, ...] | None = None
    for t_c in channel_tiles:
        if blocks % t_c:
            continue
        most = _max_accumulators(registers)
        for t_w in range(1, min(width, most) + 1):
            acc = t_c * t_w
            if acc > most or acc + t_w + 1 > registers:
                continue
            loads = (t_c + t_w) / acc
            useful = width / (-(-width // t_w) * t_w)
            rate = useful * min(1.0, acc / 8) * (1 - (0 if plane else 0.3) * (loads - 7 / 12))
            key = (round(rate, 4), t_c, acc) if plane else (round(rate, 4), -loads, -t_c)
            if best is None or key > best[0]:
                best = (key, t_c, t_w)
    assert best is not None  # (1, 1) always fits
    return best[1], best[2]


def schedule_nchwc(sch: Any, target: Any) -> bool:
    """Schedule rule for the kernels of :func:`conv2d_nchwc_te` (see the module docstring);
    False for any other kernel."""
    from lepton_edge.lowering import schedules as s

    names = []
    for rv in sch.get_child_blocks(sch.get_sblock(sch.mod["main"].body.block.name_hint)):
        names.append(sch.get(rv).name_hint)
    kind = next((n for n in names if n in (CONV_BLOCK, DEPTHWISE_BLOCK)), None)
    if kind is None:
        return False
    depthwise = kind == DEPTHWISE_BLOCK
    main = sch.get_sblock(kind)
    # Epilogue stages that write intermediates are inlined into their consumers, so one
    # epilogue block joins the tile's write-back.
    s._inline_epilogue_stages(sch, main)
    main = sch.get_sblock(kind)
    # Padding, a fill of the border and a vectorized copy (no condition in the convolution's
    # loops). Depthwise: each channel block reads one input channel block, whose padded plane
    # is built inside the parallel loop over (n, channel block), in cache (measured 2.4x
    # faster than a separate pass, 56x56x144). A regular convolution reads every input
    # channel for each output block (building the padded input per output block measured
    # 5-10% slower): it pads image by image, one pass per image before the parallel loop
    # over (channel block, row) (with a batch of 8, 10% faster than one pass over the whole
    # batch, which leaves the cache before the convolution reads it); the small planes that
    # run the batch inside the channel blocks pad the whole batch in one pass.
    padded = any(sch.get(rv).name_hint == PAD_BLOCK for rv in sch.get_producers(main))
    loops = sch.get_loops(main)
    extents = [s._const(sch.get(lp).extent) for lp in loops]
    tile = sch.get(main).annotations.get(TILE_ANNOTATION)
    # flat: the output plane as one row of pixels [N, C/c, oh * ow, c] (conv2d_nchwc_te)
    flat = tile is not None and bool(int(tile[2]))
    blocks, width = extents[1], extents[2 if flat else 3]
    if blocks is None or width is None:
        return False
    work = s._work(sch.get(lp).extent for lp in loops)
    if tile is not None:
        t_c, t_w = int(tile[0]), int(tile[1])
        sch.unannotate(main, TILE_ANNOTATION)
        if blocks % t_c or width % t_w:
            return False
    else:
        t_c, t_w = tile_shape(blocks, width, depthwise=depthwise)
    # Small output planes (flat, see conv2d_nchwc_te): the loop over chunks of input channel
    # blocks runs outside the plane, so that each chunk's filter slice is reused from cache
    # over every pixel; the plane's accumulators live in a small local array and each tile's
    # are reloaded once per chunk. The batch runs inside the channel blocks, so a filter
    # (9.4 MB in ResNet-18's last layers) is read once per call, not once per image.
    split_channels = flat
    staged = padded and depthwise
    per_image = padded and not depthwise and not split_channels
    # a small plane whose output channels are one tile: each image padded inside the
    # parallel loop over (channel tile, n), by the thread that convolves it
    # (AVX-512 only; measured 1.4% faster on the digits CNN's 8x8 16 -> 32 layer, batch 64)
    plane_staged = STAGE_PLANE_PADDING and padded and flat and not depthwise \
        and blocks == t_c and s.vector_bits(target) >= 512
    if not staged and not per_image and not plane_staged:
        s._split_padding(sch, main)
    writeback = sch.cache_write(main, 0, "local")
    loops = sch.get_loops(main)
    if depthwise:
        b, c, y, x, lane, ry, rx = loops
        x_o, x_i = sch.split(x, [None, t_w])
        sch.reorder(b, c, y, x_o, ry, rx, x_i, lane)
        reduce_loops, inner = [ry, rx], [x_i]
    else:
        if flat:
            b, c, x, lane, *reduce_loops = loops  # rco, ry, rx, rci
            y = None
        else:
            b, c, y, x, lane, *reduce_loops = loops  # rco, ry, rx[, rci]
        if len(reduce_loops) == 3:
            # NCHW input (a stem): input channels innermost, so that the unrolled step
            # broadcasts distinct input values (see below)
            reduce_loops = [reduce_loops[1], reduce_loops[2], reduce_loops[0]]
        c_o, c_i = sch.split(c, [None, t_c])
        x_o, x_i = sch.split(x, [None, t_w])
        if split_channels:
            rco = reduce_loops[0]
            taps = int(np.prod([s._const(sch.get(lp).extent) for lp in reduce_loops[1:]]))
            lanes = s._const(sch.get(lane).extent)
            # one input block's filter slice: taps x t_c output blocks x lanes x lanes float32
            chunk = _divisor_at_most(s._const(sch.get(rco).extent),
                                     FILTER_CHUNK_BYTES // (taps * t_c * lanes * lanes * 4))
            if chunk > 1:
                rco, rco_i = sch.split(rco, [None, chunk])
                reduce_loops = [rco, rco_i, *reduce_loops[1:]]
            sch.reorder(c_o, b, rco, x_o, *reduce_loops[1:], c_i, x_i, lane)
        else:
            sch.reorder(b, c_o, y, x_o, *reduce_loops, c_i, x_i, lane)
        c = c_o
        inner = [c_i, x_i]
    # (n, channel block, row) in parallel (padded image by image: the batch loop outermost,
    # serial); a staged depthwise convolution runs its rows inside the loop over (n, channel
    # block) that first builds the padded plane.
    outer = [c, y] if per_image else [b, c, y]
    if depthwise or not split_channels:
        fused = sch.fuse(b, c) if staged else sch.fuse(*outer)
    else:
        fused = sch.fuse(c, b)  # (channel block, n): see split_channels above
    anchor = fused if flat else x_o
    sch.reverse_compute_at(writeback, anchor, preserve_unit_loops=False)
    s._inline_consumers(sch, writeback)
    if (flat and sch.get_consumers(writeback)) or _cropped(sch, writeback, width):
        # Extra columns (see conv2d_nchwc_te): the copy (and epilogue) of the real columns
        # reads the tile's accumulators directly, under the same loop, with a condition on
        # the column (false only in the last tile of a row).
        consumer = sch.get_consumers(writeback)[0]
        sch.compute_inline(writeback)
        sch.reverse_compute_at(consumer, anchor, preserve_unit_loops=False)
        s._inline_consumers(sch, consumer)
        writeback = consumer
    # A symbolic batch of small images, scheduled for large batches (the parallel variant of
    # schedules._with_parallel_variant): whole images in parallel, each padded by the thread
    # that convolves it (the padded buffer holds every image), not the pool woken per image.
    batch_parallel = False
    if per_image and s._const(sch.get(b).extent) is None and s._symbolic_factor() > 1:
        batch_parallel = work / s._symbolic_factor() < s.PARALLEL_MIN_WORK <= work
    if per_image:
        s._stage_per_channel(sch, main, PAD_BLOCK, b, 1)
        if work >= s.PARALLEL_MIN_WORK and not batch_parallel:
            for rv in sch.get_producers(main):
                pad_loops = sch.get_loops(rv)
                if len(pad_loops) > 1 and s._const(sch.get(pad_loops[1]).extent):
                    sch.parallel(pad_loops[1])  # the padded copy's channel blocks
    # Only the innermost reduction loop is unrolled (input channels): unrolling a filter
    # column loop too lets LLVM reuse the broadcast of an input pixel across columns of the
    # tile, which keeps dozens of broadcasts alive and spills them to the stack (measured:
    # 149 spills and 54% of the FMA peak on ResNet-18's 7x7x512 layer).
    last = reduce_loops[-1]
    extent = s._const(sch.get(last).extent)
    if not depthwise and extent is not None and extent <= 8:
        sch.unroll(last)
    for lp in inner:
        sch.unroll(lp)
    sch.vectorize(lane)
    if batch_parallel:
        sch.parallel(b)
    elif work >= s.PARALLEL_MIN_WORK:
        sch.parallel(fused)
    # (a ScheduleError here reaches the ScheduleReport's refused list, see
    # schedules._schedule_one)
    sch.decompose_reduction(main, reduce_loops[0])
    s._vectorize_innermost(sch, writeback, below=anchor, unroll_rest=True)
    if staged or plane_staged:
        s._stage_per_channel(sch, main, PAD_BLOCK, fused, 1)
    s._schedule_rest(sch, s.vector_bits(target))
    return True


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, limit)) + 1) if n % d == 0)


def _cropped(sch: Any, writeback: Any, width: int) -> bool:
    """True when the only consumer of the convolution's write-back keeps fewer than its
    ``width`` output columns (the :data:`CROP_BLOCK` copy, possibly inlined into an
    epilogue)."""
    consumers = sch.get_consumers(writeback)
    if len(consumers) != 1:
        return False
    from lepton_edge.lowering import schedules as s

    writes = sch.get(consumers[0]).writes
    return len(writes) == 1 and len(writes[0].source.shape) == 5 \
        and s._const(writes[0].source.shape[3]) not in (None, width)


def schedule_pool_nchwc(sch: Any, target: Any) -> bool:
    """Schedule rule for TVM's pooling kernels (max / average, block ``pool_*``) on NCHWc
    tensors, which the generic rule leaves with the channel lanes outside the window loops:
    the window is reduced with the ``c`` lanes as one vector (a local accumulator, written
    back with any epilogue such as the average's division), the padding inlined (its
    condition depends on the pixel, not on the lane), ``(n, channel block, row)`` in
    parallel. False for any other kernel."""
    from lepton_edge.lowering import schedules as s

    bits = s.vector_bits(target)
    lanes = bits // 32
    blocks = s._blocks(sch)
    if blocks is None:
        return False
    reductions = [b for b in blocks if b.is_reduction]
    if len(reductions) != 1:
        return False
    pool = reductions[0]
    block = sch.get(pool.rv)
    name = block.name_hint
    if not name.startswith("pool_") or not pool.kinds.startswith("SSSSS") \
            or "S" in pool.kinds[5:] or len(block.writes) != 1:
        return False
    out = block.writes[0].source
    if len(out.shape) != 5:
        return False
    # NCHW{lanes}c, or a narrower block (NCHW8c on AVX-512: block_lanes)
    block_lanes_ = s._const(out.shape[4])
    if block_lanes_ is None or block_lanes_ < 4 or lanes % block_lanes_ \
            or s._const(pool.iters[4].dom.extent) != block_lanes_:
        return False
    for b in blocks:
        if b is not pool and s._feeds(sch, b.rv, pool.rv):
            sch.compute_inline(b.rv)
    main = sch.get_sblock(name)
    work = s._work(sch.get(lp).extent for lp in sch.get_loops(main))
    writeback = sch.cache_write(main, 0, "local")
    b, c, y, x, lane, *window = sch.get_loops(main)
    sch.reorder(b, c, y, x, *window, lane)
    fused = sch.fuse(b, c, y)
    sch.reverse_compute_at(writeback, x, preserve_unit_loops=False)
    s._inline_consumers(sch, writeback)
    sch.vectorize(lane)
    if work >= s.PARALLEL_MIN_WORK:
        sch.parallel(fused)
    if window:
        sch.decompose_reduction(main, window[0])
    s._vectorize_innermost(sch, writeback, below=x, unroll_rest=True)
    s._schedule_rest(sch, bits)
    return True
