"""AVX2 (no VNNI) exact `vpmaddubsw` int8 kernels of lowering/x86_int8.py (INTRIN_U8S7; for
stems and narrow 1x1 convs the pixel-vectorized kernel's uint8 variant, INTRIN_PX_U8S7).

`vpmaddubsw` sums a0 * w0 + a1 * w1 (uint8 activations, int8 weights) into a saturating
int16. pack_int8_kernels gives a kernel the uint8 layout and INTRIN_U8S7 only when its
constant weight passes maddubs_exact (no pair can leave int16 for any input), and marks
its "dot" block (MADDUBS_ATTR); every other weight keeps the int16 `vpmaddwd` kernels. The
kernels are compared bit-exactly with numpy int64 math at the bound (pairs +64/+64 and
-64/-64 with activations 255: 255 * 128 = 32640), and a 7-bit QDQ model compiled for the
host with onnxruntime (graph optimizations off: the QDQ semantics).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.lowering import x86_int8
# HASWELL and the host conditions (x86, AVX2) of the other AVX2 kernel tests
from tests.targets.test_int8_avx2 import HASWELL, pytestmark  # noqa: F401
from tests.targets.test_int8_lowering import reference
from tests.targets.test_vnni import HOST, disassembly, run, single_op_module
from tests.targets.test_x86_int8_px import build, conv_module, only_kernel, pack_fuse_schedule
from tests.targets.test_x86_int8_px import reference as conv_reference

tvm = pytest.importorskip("tvm")
relax = tvm.relax

rng = np.random.default_rng(23)


def weight7(shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Random int8 in [-64, 64] with the worst pairs (along `axis`, as the uint8 layout pairs
    them): +64/+64 and -64/-64 (255 * 128 = 32640 fits int16) and 127/-128 (opposite signs)."""
    w = rng.integers(-64, 65, shape).astype(np.int8)
    w = np.moveaxis(w, axis, 0)  # a view: the writes below land in `w`'s original order
    w[0:2, 0] = 64
    w[0:2, 1] = -64
    if w.shape[0] >= 4:
        w[2, 2], w[3, 2] = 127, -128
        w[2, 3], w[3, 3] = -128, 127
    return np.moveaxis(w, 0, axis)


def saturating_uint8(shape: tuple[int, ...]) -> np.ndarray:
    """uint8 with many 255s (the largest pair sums) and 0s."""
    x = rng.integers(0, 256, shape).astype(np.uint8)
    mask = rng.random(shape)
    x[mask < 0.4] = 255
    x[mask > 0.9] = 0
    return x


def one_scheduled_kernel(mod: object, note: str, rule: str) -> tuple[object, object, object]:
    """pack_fuse_schedule(mod) for a module with one int8 kernel, which must be packed as
    `note` says and scheduled by `rule`: (the module, its kernel, a Schedule of the kernel)."""
    mod, packed, lines = pack_fuse_schedule(mod)
    assert len(packed) == 1 and note in packed[0], packed
    assert len(lines) == 1 and lines[0].endswith(f": {rule}"), lines
    func = only_kernel(mod)
    return mod, func, tvm.s_tir.Schedule(func)


def test_maddubs_exact_bounds() -> None:
    def matmul_pair(a: int, b: int, rows: tuple[int, int] = (0, 1), k: int = 8) -> bool:
        w = np.zeros((k, 3), np.int8)
        w[rows[0], 1], w[rows[1], 1] = a, b
        return x86_int8.maddubs_exact(w)

    assert matmul_pair(64, 64) and matmul_pair(-64, -64)
    assert matmul_pair(127, -128) and matmul_pair(-128, 127)  # opposite signs never saturate
    assert matmul_pair(128 - 1, 1) and matmul_pair(-128, 0)  # 255 * 128 = 32640
    assert not matmul_pair(64, 65)  # 255 * 129 = 32895 > 32767
    assert not matmul_pair(-64, -65)  # -32895 < -32768
    assert not matmul_pair(127, 127)
    assert matmul_pair(127, 127, rows=(1, 2))  # rows 1 and 2 are in different pairs
    assert not matmul_pair(127, 127, rows=(2, 3))
    assert not matmul_pair(100, 100, rows=(6, 7))
    odd = np.zeros((5, 2), np.int8)
    odd[4] = 127  # K padded to 6: its partner is a zero
    assert x86_int8.maddubs_exact(odd)
    assert x86_int8.maddubs_exact(np.full((24, 7), 64, np.int8))
    assert x86_int8.maddubs_exact(np.full((24, 7), -64, np.int8))
    assert not x86_int8.maddubs_exact(np.full((24, 7), -65, np.int8))

    conv = np.zeros((4, 6, 3, 3), np.int8)
    conv[1, 0, 1, 1] = conv[1, 1, 1, 2] = 100  # same pair of channels, different taps
    conv[2, 1, 0, 0] = conv[2, 2, 0, 0] = 100  # channels 1 and 2: different pairs
    assert x86_int8.maddubs_exact(conv)
    conv[3, 4, 2, 2] = conv[3, 5, 2, 2] = 100  # channels 4 and 5 at one tap
    assert not x86_int8.maddubs_exact(conv)
    assert not x86_int8.maddubs_exact(np.zeros((4, 4), np.int16))  # not an int8 weight


# x shape, weight shape, batch for a symbolic row count
MATMULS = {
    "aligned": ([tvm.tirx.Var("N", "int64"), 64], (64, 48), 5),
    "unaligned_k_n": ([3, 18], (18, 21), None),
    "batched_3d": ([2, 7, 40], (40, 32), None),
}


@pytest.mark.parametrize("case", list(MATMULS))
def test_u8s7_matmul_is_bit_exact(case: str) -> None:
    x_shape, w_shape, batch = MATMULS[case]
    weight = weight7(w_shape, 0)
    assert x86_int8.maddubs_exact(weight)
    executable, packed, scheduled = build(single_op_module("matmul", x_shape, weight))
    assert len(packed) == 1 and "packed uint8 vpmaddubsw" in packed[0], packed
    assert "weight pairs bounded: exact" in packed[0]
    assert scheduled == ["int8_matmul_packed: x86_int8_matmul_u8s7_avx2"], scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = saturating_uint8(shape)
    x[..., 0, :] = 255  # a row of 255s meets the +64/+64 and -64/-64 columns
    np.testing.assert_array_equal(run(executable, x),
                                  x.astype(np.int64) @ weight.astype(np.int64))


# x shape, (out channels, kernel), strides, pad (top, left, bottom, right), fused shift
CONVS = {
    "3x3_pad": ([1, 12, 9, 10], (20, 3), (1, 1), (1, 1, 1, 1), None),
    "3x3_stride2_odd_channels_fused": ([1, 10, 11, 11], (17, 3), (2, 2), (1, 1, 1, 1), 9),
    "1x1_stride2_wide_input": ([1, 130, 9, 9], (24, 1), (2, 2), (0, 0, 0, 0), None),
    "7_wide_narrow_tile_fused": ([1, 16, 7, 7], (48, 3), (1, 1), (1, 1, 1, 1), 10),
}
# the pixel-vectorized uint8 kernel's cases: x shape, (out channels, kernel), strides,
# dilation, pad
PX_CONVS = {
    "1x1": ([1, 16, 14, 14], (24, 1), (1, 1), (1, 1), (0, 0, 0, 0)),
    "1x1_stride2_odd_channels": ([1, 41, 9, 11], (7, 1), (2, 2), (1, 1), (0, 0, 0, 0)),
    "7x7_stem_3_channels": ([1, 3, 20, 20], (16, 7), (2, 2), (1, 1), (3, 3, 3, 3)),
    "3x3_stem_dilated_uneven_pad": ([1, 4, 11, 8], (20, 3), (1, 1), (2, 2), (0, 1, 2, 0)),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_u8s7_conv2d_is_bit_exact(case: str) -> None:
    x_shape, (oc, k), strides, pad, shift = CONVS[case]
    weight = weight7((oc, x_shape[1], k, k), 1)
    assert x86_int8.maddubs_exact(weight)
    mod = conv_module(x_shape, weight, strides=strides, pad=pad, pad_value=255, shift=shift)
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and "packed uint8 vpmaddubsw" in packed[0], packed
    assert len(scheduled) == 1 and scheduled[0].endswith(": x86_int8_conv2d_u8s7_avx2")
    assert scheduled[0].startswith("fused_") == (shift is not None), scheduled
    x = saturating_uint8(tuple(x_shape))
    x[:, :, :2] = 255
    want = conv_reference(x, weight, strides, (1, 1), pad, 255, 1, shift)
    np.testing.assert_array_equal(run(executable, x), want)


def test_pair_just_over_the_bound_keeps_int16() -> None:
    weight = weight7((32, 16), 0)
    weight[4, 5], weight[5, 5] = 64, 65  # one pair: 255 * 129 > 32767
    assert not x86_int8.maddubs_exact(weight)
    executable, packed, scheduled = build(single_op_module("matmul", [4, 32], weight))
    assert packed == ["matmul K=32 N=16: packed int16 [2, 16, 8, 2] "
                      "(a weight pair could saturate vpmaddubsw)"]
    assert scheduled == ["int8_matmul_packed: x86_int8_matmul_i16_avx2"]
    x = saturating_uint8((4, 32))
    x[0] = 255
    np.testing.assert_array_equal(run(executable, x), x.astype(np.int64) @ weight.astype(np.int64))
    conv = weight7((8, 12, 3, 3), 1)
    conv[3, 6, 1, 1] = conv[3, 7, 1, 1] = -65
    _, packed = x86_int8.pack_int8_kernels(single_op_module("conv", [1, 12, 8, 8], conv),
                                           HASWELL)
    assert "int16" in packed[0] and "could saturate vpmaddubsw" in packed[0], packed


@pytest.mark.parametrize("case", list(PX_CONVS))
@pytest.mark.parametrize("fused", [False, True])
def test_u8s7_pixel_conv2d_is_bit_exact(case: str, fused: bool) -> None:
    """Stems and narrow 1x1 convs (u8s7_conv_kernel "px"): the pixel-vectorized kernel's
    uint8 variant, its zero-point pad folded into the packing, pad value 255."""
    x_shape, (oc, k), strides, dilation, pad = PX_CONVS[case]
    weight = weight7((oc, x_shape[1], k, k), 1)
    assert x86_int8.u8s7_conv_kernel(weight.shape) == "px"
    shift = 9 if fused else None
    mod = conv_module(x_shape, weight, strides=strides, dilation=dilation, pad=pad,
                      pad_value=255, shift=shift)
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and "pixel-vectorized uint8 vpmaddubsw" in packed[0], packed
    assert "weight pairs bounded: exact" in packed[0]
    assert len(scheduled) == 1 and scheduled[0].endswith(": x86_int8_conv2d_px_u8s7_avx2")
    x = saturating_uint8(tuple(x_shape))
    x[:, :, :2] = 255
    want = conv_reference(x, weight, strides, dilation, pad, 255, 1, shift)
    np.testing.assert_array_equal(run(executable, x), want)


def test_maddubs_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """LEPTON_X86_INT8_MADDUBS=off keeps the int16 kernels for bounded weights too (for
    comparisons), saying so; an unknown value is a TargetError naming the choices."""
    from lepton_edge.errors import TargetError

    mod = single_op_module("matmul", [4, 24], weight7((24, 16), 0))
    monkeypatch.setenv(x86_int8.MADDUBS_ENV, "off")
    assert x86_int8.pack_int8_kernels(mod, HASWELL)[1] == [
        "matmul K=24 N=16: packed int16 [2, 12, 8, 2] (LEPTON_X86_INT8_MADDUBS=off)"]
    monkeypatch.setenv(x86_int8.MADDUBS_ENV, "yes")
    with pytest.raises(TargetError, match="use auto or off"):
        x86_int8.pack_int8_kernels(mod, HASWELL)
    monkeypatch.setenv(x86_int8.MADDUBS_ENV, "auto")
    assert "uint8 vpmaddubsw" in x86_int8.pack_int8_kernels(mod, HASWELL)[1][0]


def test_rule_needs_the_annotation() -> None:
    """The uint8 layout alone (packed without a target, as tuned AVX2 builds do, for
    unchecked weights) never gets INTRIN_U8S7; an annotated kernel never gets the others."""
    weight = weight7((32, 32), 0)
    rules = {r.__name__: r for r in x86_int8.int8_rules(HASWELL)}
    u8s7 = rules["x86_int8_matmul_u8s7_avx2"]
    plain = rules["x86_int8_matmul_avx2"]
    unchecked, _ = x86_int8.pack_int8_kernels(single_op_module("matmul", [4, 32], weight))
    checked, _ = x86_int8.pack_int8_kernels(single_op_module("matmul", [4, 32], weight),
                                            HASWELL)
    for mod, kind, refuses, takes in ((unchecked, "matmul", u8s7, plain),
                                      (checked, "matmul_u8s7", plain, u8s7)):
        func = next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        sch = tvm.s_tir.Schedule(func)
        assert x86_int8.packed_kind(sch) == kind
        assert not refuses(sch, HASWELL)
        tvm.ir.assert_structural_equal(sch.mod["main"], func)  # untouched
        assert takes(sch, HASWELL)
    _, scheduled = x86_int8.schedule_int8_kernels(unchecked, HASWELL)
    assert scheduled == ["int8_matmul_packed: x86_int8_matmul_avx2"]


def test_uint8_pixel_kernel_only_after_the_check() -> None:
    """The pixel kernel's uint8 variant is built only for a checked weight: an int8 packed
    weight without exact=True is refused, and with it the block carries the annotation."""
    from tvm import te

    x = te.placeholder((1, 8, 4, 4), "uint8", name="x")
    wp = te.placeholder((1, 2, 1, 1, 4, 4), "int8", name="wp")
    args = (x, wp, 4, (1, 1), (1, 1), (0, 0, 0, 0), 0, (4, 1, 1))
    with pytest.raises(ValueError, match="maddubs_exact"):
        x86_int8._te_conv2d_px(*args)
    dot = x86_int8._te_conv2d_px(*args, True).op.input_tensors[0].op
    assert dot.name == x86_int8.PX_BLOCK and x86_int8.MADDUBS_ATTR in dot.attrs


def qdq_model(w_q: np.ndarray, kind: str) -> tuple[onnx.ModelProto, dict]:
    """int8 in -> DQ -> Conv (pads 1, stride 2) / MatMul, + bias -> Relu -> Q -> int8 out,
    per-channel weights `w_q` (as tests/targets/test_int8_lowering.py's models, whose
    `reference` gives the exact integer result)."""
    sx, zx, sy, zy = 0.02, -7, 0.05, 3
    o = w_q.shape[0] if kind == "conv" else w_q.shape[1]
    sw = rng.uniform(0.005, 0.02, o).astype(np.float32)
    b_q = rng.integers(-2000, 2000, o).astype(np.int32)
    sb = (np.float32(sx) * sw).astype(np.float32)
    if kind == "conv":
        c, h = w_q.shape[1], 9
        x_shape, y_shape, axis = ["N", c, h, h], ["N", o, (h - 1) // 2 + 1, (h - 1) // 2 + 1], 0
        op = [helper.make_node("Conv", ["x", "w", "b"], ["acc"], pads=[1, 1, 1, 1],
                               strides=[2, 2])]
    else:
        x_shape, y_shape, axis = ["N", w_q.shape[0]], ["N", o], 1
        op = [helper.make_node("MatMul", ["x", "w"], ["mm"]),
              helper.make_node("Add", ["mm", "b"], ["acc"])]
    inits = [numpy_helper.from_array(np.array(v, dt), n) for v, dt, n in (
        (sx, np.float32, "sx"), (zx, np.int8, "zx"), (sy, np.float32, "sy"),
        (zy, np.int8, "zy"))]
    inits += [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(sw, "sw"),
              numpy_helper.from_array(np.zeros(o, np.int8), "zw"),
              numpy_helper.from_array(b_q, "b_q"), numpy_helper.from_array(sb, "sb"),
              numpy_helper.from_array(np.zeros(o, np.int32), "zb")]
    nodes = [helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x"]),
             helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w"], axis=axis),
             helper.make_node("DequantizeLinear", ["b_q", "sb", "zb"], ["b"], axis=0),
             *op, helper.make_node("Relu", ["acc"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["y_q"])]
    graph = helper.make_graph(
        nodes, f"qdq7_{kind}", [helper.make_tensor_value_info("x_q", TensorProto.INT8, x_shape)],
        [helper.make_tensor_value_info("y_q", TensorProto.INT8, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, dict(sx=sx, zx=zx, sy=sy, zy=zy, w_q=w_q, sw=sw, b_q=b_q, groups=1,
                       relu=True, kind=kind)


def ort_qdq(model: onnx.ModelProto, x_q: np.ndarray) -> np.ndarray:
    """onnxruntime with graph optimizations off: DequantizeLinear, float op, QuantizeLinear."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x_q": x_q})[0]


@pytest.mark.parametrize("kind", ["conv", "matmul"])
@pytest.mark.parametrize("bits", [7, 8])
def test_qdq_model_on_the_host(kind: str, bits: int, build) -> None:
    """A 7-bit QDQ model compiled for the host (AVX2 without VNNI) runs INTRIN_U8S7 in the
    CPU build (`vpmaddubsw` in its code); the same model with one 8-bit pair over the bound
    keeps the int16 kernel. Both exact against the integer reference; onnxruntime's QDQ
    semantics (float, optimizations off) within one quantization step, equal almost always."""
    if x86_int8.dot_intrinsic(HOST) != x86_int8.INTRIN_AVX2:
        pytest.skip("host has VNNI: its default build uses the VNNI kernels")
    w_q = weight7((32, 12, 3, 3), 1) if kind == "conv" else weight7((40, 24), 0)
    if bits == 8:
        if kind == "conv":
            w_q[5, 6:8] = 100  # output channel 5, input channels 6 and 7: 255 * 200 > 32767
        else:
            w_q[6:8, 4] = 100
        assert not x86_int8.maddubs_exact(w_q)
    model, p = qdq_model(w_q, kind)
    path, session = build(lepton_edge.load(model), fallback=False)
    text, meta = disassembly(path)
    notes = meta["int8_dot_kernels"]
    assert len(notes) == 1, notes
    if bits == 7:
        assert "uint8 vpmaddubsw" in notes[0] and "exact" in notes[0], notes
        assert "vpmaddubsw" in text
    else:
        assert "int16" in notes[0] and "could saturate" in notes[0], notes
        assert "vpmaddubsw" not in text
    shape = [4 if isinstance(d, str) else d for d in session.inputs[0].shape]
    x_q = rng.integers(-128, 128, shape).astype(np.int8)
    x_q[rng.random(shape) < 0.4] = 127  # x - zx = 134: the largest activations
    got = session.run({"x_q": x_q})["y_q"]
    np.testing.assert_array_equal(got, reference(x_q, p))
    ort = ort_qdq(model, x_q)
    diff = np.abs(got.astype(int) - ort.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_u8s7_conv2d_residual_epilogue_runs_per_tile() -> None:
    """A fused elementwise input of the epilogue (a residual's dequantize in a QDQ model:
    here r << 4) is inlined, so the whole epilogue runs per output tile, from the
    accumulators, rather than as passes of its own over the output; bit-exact."""
    x_shape, r_shape = [1, 128, 7, 14], [1, 32, 7, 14]
    weight = weight7((32, 128, 1, 1), 1)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    r = relax.Var("r", relax.TensorType(r_shape, "int8"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight, "int8"), out_dtype="int32"))
            res = bb.emit(relax.op.left_shift(relax.op.astype(r, "int32"),
                                              relax.const(4, "int32")))
            y = bb.emit(relax.op.add(y, res))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(
                y, relax.const(7, "int32")), -128, 127), "int8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod, func, sch = one_scheduled_kernel(bb.get(), "packed uint8 vpmaddubsw",
                                          "x86_int8_conv2d_u8s7_avx2")
    top = []  # the outermost loop of every block: the input packing, then the tiled kernel
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        loop = sch.get(sch.get_loops(block)[0])
        if not any(loop.same_as(t) for t in top):
            top.append(loop)
    # the kernel (401 K multiply-adds) in parallel, the packing (12.5 K bytes) not: it is
    # below PARALLEL_MIN_WORK (x86_int8._worth_parallel)
    assert [t.kind for t in top] == [tvm.tirx.ForKind.SERIAL, tvm.tirx.ForKind.PARALLEL], \
        func.script()
    xv, rv = saturating_uint8(tuple(x_shape)), rng.integers(-128, 128, r_shape).astype(np.int8)
    acc = conv_reference(xv, weight, (1, 1), (1, 1), (0, 0, 0, 0), 0, 1, None)
    want = np.clip((acc + (rv.astype(np.int64) << 4)) >> 7, -128, 127).astype(np.int8)
    vm = relax.VirtualMachine(tvm.compile(mod, target=HASWELL), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(rv)).numpy()
    np.testing.assert_array_equal(got, want)


def test_pixel_conv2d_residual_epilogue_stays_vectorized() -> None:
    """The pixel kernel's epilogue as a QDQ residual projection has it (bias, float64
    requantization, dequantize, + the dequantized residual input, quantize), all in the
    output block: its tile loops stay loops (unrolled, TVM vectorized only the first copy
    and emitted the others lane by lane: 2x slower), the row vectorized; bit-exact (scales
    powers of 2: exact in float32 however LLVM contracts)."""
    from lepton_edge.lowering.int8 import requantize_te

    x_shape, r_shape = [1, 48, 6, 16], [1, 20, 6, 16]
    weight = weight7((20, 48, 1, 1), 1)
    scale = rng.integers(200, 1000, 20).astype(np.float64) * 2.0 ** -19
    f32 = lambda v: relax.const(v, "float32")  # noqa: E731
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    r = relax.Var("r", relax.TensorType(r_shape, "int8"))
    with bb.function("main", [x, r]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight, "int8"), out_dtype="int32"))
            y = bb.emit(bb.call_te(requantize_te, y, 0, 0, 3, -128, 127, None,
                                   relax.const(scale.reshape(1, 20, 1, 1), "float64"), True,
                                   primfunc_name_hint="requantize"))
            a = relax.op.multiply(relax.op.subtract(relax.op.astype(y, "float32"), f32(3.0)),
                                  f32(0.0625))
            b = relax.op.multiply(relax.op.subtract(relax.op.astype(r, "float32"), f32(-5.0)),
                                  f32(0.125))
            q = relax.op.round(relax.op.divide(relax.op.add(a, b), f32(0.125)))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.add(q, f32(1.0)), -128, 127),
                                        "int8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod, func, sch = one_scheduled_kernel(bb.get(), "pixel-vectorized uint8 vpmaddubsw",
                                          "x86_int8_conv2d_px_u8s7_avx2")
    last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    (residual,) = [p for p in func.params if p.name == "r"]
    assert any(rd.source.same_as(residual) for rd in sch.get(last).reads), func.script()
    kinds = [sch.get(lp).kind for lp in sch.get_loops(last)]
    assert kinds[-1] == tvm.tirx.ForKind.VECTORIZED, kinds
    assert tvm.tirx.ForKind.UNROLLED not in kinds, kinds
    xv, rv = saturating_uint8(tuple(x_shape)), rng.integers(-128, 128, r_shape).astype(np.int8)
    acc = conv_reference(xv, weight, (1, 1), (1, 1), (0, 0, 0, 0), 0, 1, None)
    qv = np.clip(np.rint(acc * scale.reshape(1, 20, 1, 1) + 3), -128, 127)
    s32 = ((qv.astype(np.float32) - np.float32(3)) * np.float32(0.0625)
           + (rv.astype(np.float32) + np.float32(5)) * np.float32(0.125)) / np.float32(0.125)
    want = np.clip(np.rint(s32) + 1, -128, 127).astype(np.int8)
    assert 0 < (np.abs(want.astype(int)) >= 127).mean() < 0.5  # the clip reached, not always
    vm = relax.VirtualMachine(tvm.compile(mod, target=HASWELL), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xv), tvm.runtime.tensor(rv)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("width", [7, 14, 16])
def test_u8s7_conv2d_epilogue_after_requantize_is_one_block(width: int) -> None:
    """The c4 kernel's epilogue as a QDQ model's last conv has it (bias, float64
    requantization per channel, dequantize, ReLU6 clip): the requantization and every step
    after it inlined into the output block (one pass per output row, no intermediate
    buffers) for rows under 8 or a multiple of 8 wide; 14-wide rows keep a loop per step
    (which LLVM vectorizes); 40 output channels (2.5 blocks of 16); bit-exact."""
    from lepton_edge.lowering.int8 import requantize_te

    x_shape, oc = [1, 132, 3, width], 40
    weight = weight7((oc, 132, 1, 1), 1)
    bias = rng.integers(-3000, 3000, oc).astype(np.int32)
    # scale k * 2^-19 (k < 2^10): acc * scale exact in float64, whatever LLVM contracts
    scale = rng.integers(200, 1000, oc).astype(np.float64) * 2.0 ** -19
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight, "int8"), out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, oc, 1, 1), "int32")))
            y = bb.emit(bb.call_te(requantize_te, y, 0, 0, 3, -128, 127, None,
                                   relax.const(scale.reshape(1, oc, 1, 1), "float64"), True,
                                   primfunc_name_hint="requantize"))
            y = bb.emit(relax.op.multiply(relax.op.subtract(
                relax.op.astype(y, "float32"), relax.const(3.0, "float32")),
                relax.const(0.0625, "float32")))
            y = bb.emit(relax.op.minimum(relax.op.maximum(y, relax.const(0.0, "float32")),
                                         relax.const(6.0, "float32")))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod, func, sch = one_scheduled_kernel(bb.get(), "packed uint8 vpmaddubsw",
                                          "x86_int8_conv2d_u8s7_avx2")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    after = names[max(i for i, n in enumerate(names) if n.startswith("dot")) + 1:]
    if width == 14:
        assert after[:2] == ["T_add", "requantize"] and len(after) == 7, names
    else:
        assert after == ["T_add", "T_minimum"], names  # the bias add: a pass per row before
    xv = saturating_uint8(tuple(x_shape))
    acc = conv_reference(xv, weight, (1, 1), (1, 1), (0, 0, 0, 0), 0, 1, None)
    acc = acc + bias.reshape(1, oc, 1, 1)
    q = np.clip(np.rint(acc * scale.reshape(1, oc, 1, 1) + 3), -128, 127)
    want = np.minimum(np.maximum((q.astype(np.float32) - np.float32(3)) * np.float32(0.0625),
                                 np.float32(0)), np.float32(6))
    vm = relax.VirtualMachine(tvm.compile(mod, target=HASWELL), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xv)).numpy()
    assert 0 < (got > 0).mean() < 1 and 0 < (got == 6).mean() < 1  # both clip bounds
    assert 0 < (np.abs(q) == 128).mean() and 0 < (q == 127).mean()  # int8 clip too
    np.testing.assert_array_equal(got, want)


# input channels, output channels, kernel, pad (top, left, bottom, right), weight bits
SHIFTED = {
    "1x1_odd_channels": (13, 20, 1, (0, 0, 0, 0), 7),
    "3x3_stem_pad_folded_too": (3, 8, 3, (1, 1, 1, 1), 7),
    "1x1_int16_kernel": (12, 16, 1, (0, 0, 0, 0), 8),
}


def shifted_conv_module(case: str, chain_add: int = 128) -> tuple[tvm.IRModule, np.ndarray]:
    """int8 x_q -> uint8 x_q + 128 (lowering/int8.py's shift: astype, add, astype) ->
    [pad with the shifted zero point 121] -> conv2d int32."""
    c, o, k, pad, bits = SHIFTED[case]
    weight = weight7((o, c, k, k), 1)
    if bits == 8:
        weight[3, 4:6] = 100  # a pair over the bound: the int16 pixel kernel
        assert not x86_int8.maddubs_exact(weight)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, c, 9, 11], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            u = bb.emit(relax.op.astype(relax.op.add(relax.op.astype(x, "int16"), relax.const(
                chain_add, "int16")), "uint8"))
            if any(pad):
                u = bb.emit(relax.op.nn.pad(u, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]],
                                            "constant", 121.0))
            y = bb.emit(relax.op.nn.conv2d(u, relax.const(weight, "int8"), out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), weight


@pytest.mark.parametrize("case", list(SHIFTED))
def test_uint8_shift_folded_into_pixel_packing(case: str) -> None:
    """The exact int8 -> uint8 shift in front of a pixel-kernel conv (a block input in a
    QDQ model) runs in the conv's packing pass: no kernel of its own (nor a step in the
    producer's epilogue); bit-exact against numpy on (x + 128) with int8 extremes."""
    mod, weight = shifted_conv_module(case)
    mod, packed, lines = pack_fuse_schedule(mod)
    assert len(packed) == 1 and "uint8 shift folded" in packed[0], packed
    kind = "px_u8s7" if SHIFTED[case][4] == 7 else "px"
    assert len(lines) == 1 and lines[0].endswith(f"x86_int8_conv2d_{kind}_avx2"), lines
    funcs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1 and str(funcs[0].params[0].ty.dtype) == "int8", funcs
    xv = rng.integers(-128, 128, (1, SHIFTED[case][0], 9, 11)).astype(np.int8)
    xv[..., :2] = 127
    xv[..., -2:] = -128
    u = (xv.astype(np.int16) + 128).astype(np.uint8)
    want = conv_reference(u, weight, (1, 1), (1, 1), SHIFTED[case][3], 121, 1, None)
    vm = relax.VirtualMachine(tvm.compile(mod, target=HASWELL), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(xv)).numpy(), want)


def test_other_adds_are_not_folded() -> None:
    """Only the exact shift (+128) is folded: + 127 stays an elementwise kernel."""
    mod, _ = shifted_conv_module("1x1_odd_channels", chain_add=127)
    _, packed = x86_int8.pack_int8_kernels(mod, HASWELL)
    assert len(packed) == 1 and "shift folded" not in packed[0], packed


def test_dot_kernel_notes_say_what_ran(build, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build's int8_dot_kernels notes name the kernel only when an int8 rule scheduled
    it: with every int8 schedule refusing (the rule's dry run fails), the packed conv runs
    in other loops, its note says so (no "vpmaddubsw" in it or in the code), and the
    result stays exact."""
    if x86_int8.dot_intrinsic(HOST) != x86_int8.INTRIN_AVX2:
        pytest.skip("host has VNNI: its default build uses the VNNI kernels")

    def refuse(sch, intrin) -> None:
        raise RuntimeError("refused for the test")

    monkeypatch.setattr(x86_int8, "_SCHEDULES", dict.fromkeys(x86_int8._SCHEDULES, refuse))
    model, p = qdq_model(weight7((32, 12, 3, 3), 1), "conv")
    path, session = build(lepton_edge.load(model), fallback=False)
    text, meta = disassembly(path)
    notes = meta["int8_dot_kernels"]
    assert len(notes) == 1 and notes[0].startswith("conv2d [32, 12, 3, 3]: packed, but no "
                                                   "int8 dot-product schedule"), notes
    assert "vpmaddubsw" not in notes[0] and "vpmaddubsw" not in text
    x_q = rng.integers(-128, 128, (2, 12, 9, 9)).astype(np.int8)
    np.testing.assert_array_equal(session.run({"x_q": x_q})["y_q"], reference(x_q, p))


def test_scheduled_notes_match_kernels_by_name() -> None:
    notes = ["conv2d A: packed", "conv2d: grouped; generic code", "conv2d B: packed",
             "depthwise conv2d C: planes", "matmul D: packed"]
    kernels = ["int8_conv2d_px4", "", "int8_conv2d_px", "int8_depthwise", "int8_matmul_packed"]
    rules = {"fused_int8_conv2d_px41_add1": "generic",  # px41, not px4
             "fused_dequantize_int8_conv2d_px4_add2": "int8:x86_int8_conv2d_px_u8s7_avx2",
             "fused_int8_conv2d_px4_add3_cast": "int8:x86_int8_conv2d_px_u8s7_avx2",
             "fused_int8_conv2d_px_add4": "int8:x86_int8_conv2d_px_u8s7_avx2",
             "fused_int8_depthwise_add5": "int8:x86_int8_depthwise_avx2",
             "int8_depthwise": "generic"}  # one of its two functions unscheduled
    got = x86_int8.scheduled_notes(notes, kernels, rules)
    assert got[:3] == notes[:3]
    assert got[3] == ("depthwise conv2d C: packed, but no int8 dot-product schedule applied "
                      "(generic): plain loops, not the kernel packed for")
    assert got[4].startswith("matmul D: packed, but no int8") and "(no default schedule)" \
        in got[4]  # not among the scheduled functions (LEPTON_DEFAULT_SCHEDULES=0)
