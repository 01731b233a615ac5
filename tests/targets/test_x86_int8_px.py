"""AVX2 (no VNNI) int8 convolutions of lowering/x86_int8.py, bit-exact against numpy.

* conv2d: pixel-vectorized int16 kernels (`vpmaddwd`: 8 output pixels x 2 input channels
  times a broadcast weight pair), the zero-point pad in front folded into the packing pass;
  and, for wide KxK convs with more than 4 input channels (use_pixel_kernel false), the
  NCHW[c2] int16 kernel (8 output channels x 2 input channels per `vpmaddwd`);
* depthwise conv2d: each channel staged as flattened planes (zero-point pad folded in,
  strides split into phases), the taps a 1-D convolution over them in whole vectors;
* the 32-bit requantization (lowering/int8.py requantize_te with every shift >= 33).

Each kernel is compared with numpy int64 math on extreme values (0/255 or -128/127 inputs,
-128/127 weights), with the requantization epilogue fused the way the CPU build fuses it.
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.lowering import x86_int8
from lepton_edge.lowering.int8 import fixed_point_multiplier, requantize_reference, requantize_te
from lepton_edge.target import host_arch
from tests.targets.test_vnni import conv_int64, extreme_int8, extreme_uint8

tvm = pytest.importorskip("tvm")
relax = tvm.relax

HASWELL = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
pytestmark = [
    pytest.mark.skipif(host_arch() != "x86_64", reason="x86 kernels need an x86 host"),
    pytest.mark.skipif(
        not tvm.target.codegen.target_has_features(
            "avx2", tvm.target.Target({"kind": "llvm",
                                       "mcpu": tvm.target.codegen.llvm_get_system_cpu()})),
        reason="host CPU has no AVX2"),
]
rng = np.random.default_rng(17)
N = tvm.tirx.Var("N", "int64")


def conv_module(x_shape: list, weight: np.ndarray, *, dtype: str = "uint8",
                strides=(1, 1), dilation=(1, 1), pad=(0, 0, 0, 0), pad_value: int = 0,
                shift: int | None = None) -> tvm.IRModule:
    """x -> [pad (top, left, bottom, right) with pad_value] -> conv2d int32 [-> >> shift,
    clip, int8: an epilogue that fuses into the kernel]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, dtype))
    groups = weight.shape[0] if weight.shape[1] == 1 and dtype == "int8" else 1
    with bb.function("main", [x]):
        with bb.dataflow():
            src = x
            if any(pad):
                src = bb.emit(relax.op.nn.pad(
                    x, [0, 0, 0, 0, pad[0], pad[2], pad[1], pad[3]], "constant",
                    float(pad_value)))
            y = bb.emit(relax.op.nn.conv2d(src, relax.const(weight, "int8"), strides=strides,
                                           dilation=dilation, groups=groups,
                                           out_dtype="int32"))
            if shift is not None:
                y = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(
                    y, relax.const(shift, "int32")), -128, 127), "int8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def pack_fuse_schedule(mod: tvm.IRModule, target: tvm.target.Target = HASWELL
                       ) -> tuple[tvm.IRModule, list[str], list[str]]:
    """Pack for `target` (AVX2 by default), fuse as the CPU build does (legalize, fuse),
    schedule with our rules: (module, packing notes, one line per scheduled kernel)."""
    mod, packed = x86_int8.pack_int8_kernels(mod, target)
    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    mod, lines = x86_int8.schedule_int8_kernels(mod, target)
    return mod, packed, lines


def only_kernel(mod: tvm.IRModule) -> tvm.tirx.PrimFunc:
    """The one kernel (PrimFunc) of a scheduled module."""
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def build(mod: tvm.IRModule) -> tuple[object, list[str], list[str]]:
    """pack_fuse_schedule(mod), compiled for AVX2."""
    mod, packed, lines = pack_fuse_schedule(mod)
    return tvm.compile(mod, target=HASWELL), packed, lines


def run(executable: object, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def reference(x: np.ndarray, weight: np.ndarray, strides, dilation, pad, pad_value: int,
              groups: int, shift: int | None) -> np.ndarray:
    x = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])],
               constant_values=pad_value)
    d = dilation[0]
    o, i, kh, kw = weight.shape
    w = np.zeros((o, i, (kh - 1) * d + 1, (kw - 1) * d + 1), np.int64)
    w[:, :, ::d, ::d] = weight
    out = conv_int64(x, w, [0, 0, 0, 0], list(strides), groups)
    if shift is not None:
        out = np.clip(out >> shift, -128, 127).astype(np.int8)
    return out


# x shape, (out channels, kernel), strides, dilation, pad (top, left, bottom, right), batch
CONVS = {
    "1x1": ([1, 16, 14, 14], (24, 1), (1, 1), (1, 1), (0, 0, 0, 0), None),
    "1x1_stride2_odd_channels": ([1, 9, 9, 11], (7, 1), (2, 2), (1, 1), (0, 0, 0, 0), None),
    "3x3_pad_symbolic_batch": ([N, 5, 9, 5], (17, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2),
    "3x3_stride2_pad": ([1, 6, 13, 10], (10, 3), (2, 2), (1, 1), (1, 1, 1, 1), None),
    "7x7_stride2_c3": ([1, 3, 20, 20], (16, 7), (2, 2), (1, 1), (3, 3, 3, 3), None),
    "3x3_dilated_uneven_pad": ([1, 8, 11, 8], (20, 3), (1, 1), (2, 2), (0, 1, 2, 0), None),
    "3x3_c33_5x5": ([1, 33, 5, 5], (17, 3), (1, 1), (1, 1), (1, 1, 1, 1), None),
}


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("fused", [False, True])
def test_pixel_conv2d_is_bit_exact(case: str, fused: bool) -> None:
    x_shape, (oc, k), strides, dilation, pad, batch = CONVS[case]
    weight = extreme_int8((oc, x_shape[1], k, k))
    shift = 9 if fused else None
    mod = conv_module(x_shape, weight, strides=strides, dilation=dilation, pad=pad,
                      pad_value=201, shift=shift)
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and "pixel-vectorized int16" in packed[0], packed
    assert ("folded" in packed[0]) == any(pad), packed
    assert len(scheduled) == 1 and scheduled[0].endswith("x86_int8_conv2d_px_avx2"), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    want = reference(x, weight, strides, dilation, pad, 201, 1, shift)
    np.testing.assert_array_equal(run(executable, x), want)


def test_wide_3x3_conv_keeps_the_c2_kernel() -> None:
    """KxK convs with more than 4 input channels whose row width gives the NCHW[c2] kernel
    (output channels along the vector) a tile of >= 6 accumulators: that kernel, measured
    faster there (7-wide rows too, with a 1 x 7 tile); the pad stays a pass."""
    assert x86_int8.use_pixel_kernel((64, 64, 1, 1), 56)
    assert not x86_int8.use_pixel_kernel((512, 512, 3, 3), 7)
    assert x86_int8.use_pixel_kernel((64, 64, 3, 3), 5)  # a 1 x 5 c2 tile
    assert x86_int8.use_pixel_kernel((32, 16, 3, 3), 6)  # 6-wide rows: not measured
    assert x86_int8.c2_tile(2, 4) == (2, 4)  # 8 accumulators, but 4-wide rows: not measured
    assert x86_int8.use_pixel_kernel((16, 16, 3, 3), 4)


def test_int16_1x1_kernel_rule() -> None:
    """int16 1x1 convs: the pixel kernel, except with >= 64 input channels at 20-32 wide
    (the NCHW[c2] kernel, measured faster at 28 wide: MobileNetV2's 144 -> 32 and
    192 -> 32); a stem's few channels always the pixel kernel."""
    assert not x86_int8.use_pixel_kernel((32, 144, 1, 1), 28)
    assert not x86_int8.use_pixel_kernel((32, 64, 1, 1), 20)
    assert x86_int8.use_pixel_kernel((192, 32, 1, 1), 28)  # 32 input channels
    assert x86_int8.use_pixel_kernel((32, 144, 1, 1), 14)
    assert x86_int8.use_pixel_kernel((24, 144, 1, 1), 56)
    assert x86_int8.use_pixel_kernel((32, 144, 1, 1), 33)
    assert x86_int8.use_pixel_kernel((32, 3, 1, 1), 28)
    assert x86_int8.use_pixel_kernel((64, 3, 7, 7), 112)
    assert not x86_int8.use_pixel_kernel((128, 128, 3, 3), 28)
    assert x86_int8.c2_tile(64, 7) == (1, 7)
    assert x86_int8.c2_tile(32, 14) == (1, 7)
    assert x86_int8.c2_tile(32, 28) == (2, 4)
    assert x86_int8.c2_tile(3, 12) == (1, 6)  # 3 blocks: no pairs
    weight = extreme_int8((12, 10, 3, 3))
    mod = conv_module([N, 10, 12, 12], weight, pad=(1, 1, 1, 1), pad_value=77, shift=8)
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and "NCHW[c2] input, packed int16" in packed[0], packed
    assert any(s.endswith("x86_int8_conv2d_i16_avx2") for s in scheduled), scheduled
    x = extreme_uint8((2, 10, 12, 12))
    want = reference(x, weight, (1, 1), (1, 1), (1, 1, 1, 1), 77, 1, 8)
    np.testing.assert_array_equal(run(executable, x), want)


# The NCHW[c2] kernel's cases (> 4 input channels, KxK > 1, rows >= 7 wide): x shape,
# (out channels, kernel), strides, dilation, pad (top, left, bottom, right), batch, shift
C2_CONVS = {
    "stride2_pad": ([1, 10, 19, 21], (12, 3), (2, 2), (1, 1), (1, 1, 1, 1), None, 9),
    "dilated_pad": ([1, 6, 14, 13], (20, 3), (1, 1), (2, 2), (2, 2, 2, 2), None, None),
    "uneven_pad_odd_channels": ([1, 9, 10, 12], (9, 3), (1, 1), (1, 1), (0, 1, 2, 0), None,
                                8),
    "symbolic_batch_strided_dilated": ([N, 8, 21, 20], (16, 3), (2, 1), (2, 2),
                                       (1, 2, 0, 1), 2, 10),
    "5x5_stride2": ([1, 7, 20, 22], (8, 5), (2, 2), (1, 1), (2, 2, 2, 2), None, None),
    "7_wide_symbolic_batch": ([N, 5, 9, 7], (17, 3), (1, 1), (1, 1), (1, 1, 1, 1), 2, 9),
    "c33_7_wide": ([1, 33, 7, 7], (17, 3), (1, 1), (1, 1), (1, 1, 1, 1), None, None),
    "stride2_to_7_wide": ([1, 16, 14, 14], (24, 3), (2, 2), (1, 1), (0, 0, 1, 1), None, 8),
    # 1x1 with >= 64 input channels at 20-32 wide (I16_C2_1X1): odd output channels,
    # a stride (the 1x1 reads every other pixel) and a symbolic batch
    "1x1_28_wide_odd_channels": ([1, 66, 3, 28], (21, 1), (1, 1), (1, 1), (0, 0, 0, 0),
                                 None, 9),
    "1x1_stride2_to_24_wide_symbolic_batch": ([N, 72, 5, 47], (16, 1), (2, 2), (1, 1),
                                              (0, 0, 0, 0), 2, None),
}


@pytest.mark.parametrize("case", list(C2_CONVS))
def test_c2_conv2d_is_bit_exact(case: str) -> None:
    """The NCHW[c2] int16 kernel (still ResNet-18's wide 3x3 layers) with strides, dilation,
    uneven zero-point padding (a pad pass of its own), a symbolic batch, a fused epilogue."""
    x_shape, (oc, k), strides, dilation, pad, batch, shift = C2_CONVS[case]
    weight = extreme_int8((oc, x_shape[1], k, k))
    width = (x_shape[3] + pad[1] + pad[3] - (k - 1) * dilation[1] - 1) // strides[1] + 1
    assert not x86_int8.use_pixel_kernel(weight.shape, width)  # really a c2 case
    mod = conv_module(x_shape, weight, strides=strides, dilation=dilation, pad=pad,
                      pad_value=201, shift=shift)
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and "NCHW[c2] input, packed int16" in packed[0], packed
    assert any(s.endswith("x86_int8_conv2d_i16_avx2") for s in scheduled), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    want = reference(x, weight, strides, dilation, pad, 201, 1, shift)
    np.testing.assert_array_equal(run(executable, x), want)


def test_folded_pad_leaves_no_pad_kernel() -> None:
    mod = conv_module([1, 8, 5, 5], extreme_int8((8, 8, 3, 3)), pad=(1, 1, 1, 1),
                      pad_value=128)
    packed_mod, _ = x86_int8.pack_int8_kernels(mod, HASWELL)
    assert "R.nn.pad" not in packed_mod.script()
    assert "R.nn.pad" in mod.script()


def test_pixel_tile_prefers_unpadded_work() -> None:
    # 7-wide rows: one vector of 8 per row; 8 channels x 1 row (4 x 2 rows would pad 7 -> 8)
    assert x86_int8.px_tile(512, 7, 7) == (8, 1, 1)
    assert x86_int8.px_tile(64, 56, 56) == (4, 2, 1)
    packed = x86_int8.pack_conv2d_weight_px(np.arange(2 * 3 * 4, dtype=np.int8).reshape(
        2, 3, 2, 2), 4)
    assert packed.dtype == np.int16 and packed.shape == (1, 2, 2, 2, 4, 2)
    # [oc block, ic pair, ky, kx, oc % 4, ic % 2]; channels past 2 / 3 are zero
    assert packed[0, 0, 1, 0].tolist() == [[2, 6], [14, 18], [0, 0], [0, 0]]
    assert packed[0, 1, 0, 0].tolist() == [[8, 0], [20, 0], [0, 0], [0, 0]]


# x shape, kernel, strides, dilation, batch
DEPTHWISE = {
    "3x3": ([1, 16, 10, 12], 3, (1, 1), (1, 1), None),
    "3x3_stride2_symbolic_batch": ([N, 5, 9, 9], 3, (2, 2), (1, 1), 2),
    "3x3_dilated_odd_width": ([1, 7, 11, 13], 3, (1, 1), (2, 2), None),
    "5x5_wide": ([1, 3, 6, 68], 5, (1, 1), (1, 1), None),
    "3x3_dilated_stride2": ([1, 9, 15, 16], 3, (2, 2), (2, 2), None),
    "1x1_channels_scaled": ([1, 4, 5, 3], 1, (1, 1), (1, 1), None),
    # column stride 2, pitch 16 (14 + 2: dilation reach), only the even column phase staged:
    # INTRIN_SPLIT2 declines, the plain phase split runs
    "3x3_dilated_stride2_pitch_16": ([1, 3, 12, 31], 3, (2, 2), (2, 2), None),
}


@pytest.mark.parametrize("case", list(DEPTHWISE))
@pytest.mark.parametrize("fused", [False, True])
def test_depthwise_conv2d_is_bit_exact(case: str, fused: bool) -> None:
    x_shape, k, strides, dilation, batch = DEPTHWISE[case]
    c = x_shape[1]
    weight = extreme_int8((c, 1, k, k))
    shift = 5 if fused else None
    mod = conv_module(x_shape, weight, dtype="int8", strides=strides, dilation=dilation,
                      shift=shift)
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and packed[0].startswith("depthwise conv2d"), packed
    assert len(scheduled) == 1 and scheduled[0].endswith("x86_int8_depthwise_avx2"), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x[rng.random(shape) < 0.3] = -128
    want = reference(x, weight, strides, dilation, (0, 0, 0, 0), 0, c, shift)
    np.testing.assert_array_equal(run(executable, x), want)


# x shape, kernel, strides, pad (top, left, bottom, right), batch: the zero-point pad is
# folded into the kernel's per-channel staging (flattened planes, strides split in phases)
DEPTHWISE_PADDED = {
    "3x3_stride2": ([1, 16, 32, 32], 3, (2, 2), (1, 1, 1, 1), None),
    "3x3_stride2_odd_width_11_channels": ([1, 11, 19, 21], 3, (2, 2), (1, 1, 1, 1), None),
    "3x3_stride2_uneven_pad_symbolic_batch": ([N, 5, 18, 17], 3, (2, 2), (0, 1, 1, 2), 3),
    "5x5_stride2_rows_only": ([1, 9, 17, 33], 5, (2, 1), (2, 2, 2, 2), None),
    "3x3_14_wide_19_channels": ([1, 19, 14, 14], 3, (1, 1), (1, 1, 1, 1), None),
    "3x3_7_wide_symbolic_batch": ([N, 17, 7, 7], 3, (1, 1), (1, 1, 1, 1), 2),
    "3x3_stride2_to_7_wide": ([1, 24, 14, 14], 3, (2, 2), (0, 0, 1, 1), None),
    "3x3_columns_only_stride": ([1, 6, 10, 23], 3, (1, 2), (1, 0, 2, 1), None),
    "5x5_wide_uneven_pad": ([1, 3, 12, 70], 5, (1, 1), (2, 1, 0, 3), None),
    # strided with wide rows (staged planes of pitch 31 and 28)
    "3x3_stride2_wide_rows": ([1, 3, 12, 60], 3, (2, 2), (1, 1, 1, 1), None),
    "5x5_stride3_wide_symbolic_batch": ([N, 2, 11, 80], 5, (3, 3), (2, 1, 2, 3), 2),
    # phase split rows of pitch 46 (> DW_SPLIT_VECTOR: left to LLVM) and 8 (vectorized)
    "3x3_stride2_pitch_46": ([1, 3, 9, 90], 3, (2, 2), (1, 1, 1, 1), None),
    "3x3_stride2_to_7_wide_pad": ([1, 21, 14, 14], 3, (2, 2), (1, 1, 1, 1), None),
    # column stride 2 with pitch 16 / 32: the INTRIN_SPLIT2 phase split (odd channel counts,
    # uneven pad, rows not strided, a 5x5 reaching two columns, the last staged row full)
    "3x3_stride2_pitch_16_13_channels": ([1, 13, 28, 29], 3, (2, 2), (1, 1, 1, 1), None),
    "3x3_stride2_pitch_32_uneven_pad_symbolic_batch": ([N, 7, 11, 57], 3, (2, 2),
                                                       (0, 0, 1, 1), 2),
    "3x3_columns_only_stride_pitch_16": ([1, 5, 9, 30], 3, (1, 2), (1, 1, 1, 1), None),
    "5x5_stride2_pitch_32": ([1, 6, 10, 60], 5, (2, 2), (2, 2, 2, 2), None),
}


@pytest.mark.parametrize("case", list(DEPTHWISE_PADDED))
@pytest.mark.parametrize("fused", [False, True])
def test_depthwise_folded_pad_is_bit_exact(case: str, fused: bool) -> None:
    x_shape, k, strides, pad, batch = DEPTHWISE_PADDED[case]
    c = x_shape[1]
    weight = extreme_int8((c, 1, k, k))
    shift = 5 if fused else None
    mod = conv_module(x_shape, weight, dtype="int8", strides=strides, pad=pad, pad_value=-7,
                      shift=shift)
    packed_mod, _ = x86_int8.pack_int8_kernels(mod, HASWELL)
    assert "R.nn.pad" not in packed_mod.script()
    executable, packed, scheduled = build(mod)
    assert len(packed) == 1 and packed[0].startswith("depthwise conv2d"), packed
    assert packed[0].endswith(f"pad {list(pad)} folded"), packed
    assert len(scheduled) == 1 and scheduled[0].endswith("x86_int8_depthwise_avx2"), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x[rng.random(shape) < 0.3] = -128
    want = reference(x, weight, strides, (1, 1), pad, -7, c, shift)
    np.testing.assert_array_equal(run(executable, x), want)


# x shape, pool size, strides, dilation, pad (top, left, bottom, right), batch
MAX_POOLS = {
    "3x3_stride2_pad": ([1, 5, 16, 16], (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), None),
    "2x2_stride2_odd_size_symbolic_batch": ([N, 3, 9, 11], (2, 2), (2, 2), (1, 1),
                                            (0, 0, 0, 0), 2),
    "3x3_stride1_uneven_pad": ([1, 4, 7, 10], (3, 3), (1, 1), (1, 1), (0, 1, 2, 1), None),
    "3x2_dilated_rows_stride": ([1, 2, 13, 9], (3, 2), (2, 1), (2, 1), (1, 0, 1, 1), None),
    "3x3_stride2_pitch_16": ([1, 5, 12, 29], (3, 3), (2, 2), (1, 1), (1, 1, 1, 1), None),
}


@pytest.mark.parametrize("case", list(MAX_POOLS))
@pytest.mark.parametrize("fused", [False, True])
def test_int8_max_pool_is_bit_exact(case: str, fused: bool) -> None:
    """int8 NCHW max pooling on the depthwise kernel's staged planes (padding -128 folded
    in), alone or with a fused elementwise consumer (the uint8 shift the next conv needs)."""
    x_shape, pool, strides, dilation, pad, batch = MAX_POOLS[case]
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x_shape, "int8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.max_pool2d(xv, pool, strides, pad, dilation))
            if fused:
                y = bb.emit(relax.op.astype(relax.op.add(relax.op.astype(y, "int16"),
                                                         relax.const(128, "int16")), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    executable, packed, scheduled = build(bb.get())
    assert len(packed) == 1 and packed[0].startswith("max_pool2d"), packed
    assert len(scheduled) == 1 and scheduled[0].endswith("x86_int8_depthwise_avx2"), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x[rng.random(shape) < 0.3] = -128
    x[0, 0] = -128  # a whole plane of the minimum: the padding must not change it
    padded = np.pad(x.astype(np.int64), [(0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])],
                    constant_values=-1000)
    (kh, kw), (sh, sw), (dh, dw) = pool, strides, dilation
    oh = (padded.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (padded.shape[3] - (kw - 1) * dw - 1) // sw + 1
    want = np.full((*shape[:2], oh, ow), -1000, np.int64)
    for ry in range(kh):
        for rx in range(kw):
            want = np.maximum(want, padded[:, :, ry * dh:ry * dh + (oh - 1) * sh + 1:sh,
                                           rx * dw:rx * dw + (ow - 1) * sw + 1:sw])
    want = want.astype(np.int8)
    if fused:
        want = (want.astype(np.int16) + 128).astype(np.uint8)
    np.testing.assert_array_equal(run(executable, x), want)


def test_depthwise_tile_is_whole_vectors_of_whole_rows() -> None:
    """Tiles of whole output rows of a flattened plane: R * pitch a multiple of 8, the pitch
    long enough for the filter's reach, the rows covering the output, little padded work."""
    assert x86_int8.dw_tile(14, 14, 3) == (7, 16, 2)  # 112 outputs, 2 tiles
    assert x86_int8.dw_tile(112, 112, 3) == (1, 120, 112)
    assert x86_int8.dw_tile(56, 56, 3, 2) == (4, 64, 14)  # stride 2: pitch >= 57, split
    assert x86_int8.dw_tile(7, 7, 3) == (8, 9, 1)  # one tile of 9 vectors, a row dropped
    for oh, ow, kw, sw, dw in [(7, 7, 3, 1, 1), (9, 10, 5, 1, 1), (28, 28, 3, 2, 1),
                               (13, 6, 3, 1, 2), (1, 1, 3, 1, 1), (30, 41, 7, 3, 1)]:
        rows, pitch, tiles = x86_int8.dw_tile(oh, ow, kw, sw, dw)
        assert pitch >= ow + (kw - 1) * dw // sw and rows * pitch % 8 == 0
        assert rows * tiles >= oh > rows * (tiles - 1)
        assert rows == 1 or rows * pitch <= x86_int8.DW_FLAT_OUTPUTS * (
            2 if sw == 2 and pitch > x86_int8.DW_SPLIT_VECTOR else 1)
        assert tiles * rows * pitch <= 2 * _ceil8(oh * (ow + (kw - 1) * dw // sw))


def test_strided_depthwise_staging_tests_no_pixel() -> None:
    """A strided kernel stages its padded plane first (pad fill, then the in-bound rows
    copied in vectors) and splits the phases from it with no bounds test per pixel."""
    mod = conv_module([1, 4, 20, 20], extreme_int8((4, 1, 3, 3)), dtype="int8",
                      strides=(2, 2), pad=(1, 1, 1, 1), pad_value=3, shift=5)
    mod, _, lines = pack_fuse_schedule(mod)
    assert len(lines) == 1 and lines[0].endswith("x86_int8_depthwise_avx2"), lines
    func = only_kernel(mod)
    sch = tvm.s_tir.Schedule(func)
    for name in ("pack_dw", x86_int8.DW_PADDED):  # the padded plane's border decomposed
        block = sch.get(sch.get_sblock(name))
        assert "if_then_else" not in str(block.body), name
    for name in (x86_int8.DW_PADDED, x86_int8.DW_PADDED + "_pad_const", "pack_dw"):
        inner = sch.get(sch.get_loops(sch.get_sblock(name))[-1])
        assert inner.kind == tvm.tirx.ForKind.VECTORIZED, name  # pack_dw: pitch 10 <= 32


def test_strided_depthwise_phase_split_vectorized_only_when_short() -> None:
    """The phase split (pack_dw) of column stride 2: INTRIN_SPLIT2 (one load, two shuffles
    per 32 columns) when dw_tile rounds the pitch up to a multiple of 16, at most
    DW_SPLIT_MAX (at most 1/8 more columns); else TVM's vectors for rows of at most
    DW_SPLIT_VECTOR columns; longer ones plain loops for LLVM's loop vectorizer."""
    # width: output columns 10, 15, 30, 32, 56, 64 (pitch >= ow + 1)
    for width, split, vectorized in ((20, False, True), (30, True, False),
                                     (60, True, False), (64, False, False),
                                     (112, True, False), (128, False, False)):
        mod = conv_module([1, 2, 8, width], extreme_int8((2, 1, 3, 3)), dtype="int8",
                          strides=(2, 2), pad=(1, 1, 1, 1), pad_value=3, shift=5)
        mod, _, lines = pack_fuse_schedule(mod)
        assert lines[0].endswith("x86_int8_depthwise_avx2"), lines
        func = only_kernel(mod)
        pitch = x86_int8.dw_tile(4, width // 2, 3, 2)[1]
        assert (pitch % x86_int8.DW_SPLIT_LANES == 0) == split, (width, pitch)
        assert ("T.Shuffle" in func.script()) == split, width
        if split:
            assert pitch < width // 2 + 1 + x86_int8.DW_SPLIT_LANES, (width, pitch)
            continue
        sch = tvm.s_tir.Schedule(func)
        inner = sch.get(sch.get_loops(sch.get_sblock("pack_dw"))[-1])
        assert (pitch <= x86_int8.DW_SPLIT_VECTOR) == vectorized, (width, pitch)
        assert (inner.kind == tvm.tirx.ForKind.VECTORIZED) == vectorized, (width, pitch)


def test_split_pitch_rule() -> None:
    """dw_tile: at column stride 2 a pitch that is a multiple of 16, at most DW_SPLIT_MAX,
    when that adds at most 1/8 columns (past DW_SPLIT_VECTOR with tiles of up to twice
    DW_FLAT_OUTPUTS)."""
    assert x86_int8.dw_tile(28, 28, 3, 2)[1] == 32  # 29 -> 32 (MobileNetV2 144 x 56 x 56)
    assert x86_int8.dw_tile(14, 14, 3, 2)[1] == 16  # 15 -> 16
    assert x86_int8.dw_tile(56, 56, 3, 2) == (4, 64, 14)  # 57 -> 64: 4-row tiles
    assert x86_int8.dw_tile(64, 64, 3, 2)[1] < 80  # 65 -> 80 > DW_SPLIT_MAX: not split
    assert x86_int8.dw_tile(7, 7, 3, 2)[1] == 8  # 8 -> 16 would double the work
    assert x86_int8.dw_tile(14, 12, 3, 2)[1] % 16  # 13 -> 16: more than 1/8 more
    assert x86_int8.dw_tile(28, 28, 3)[1] == 30  # stride 1: the least pitch, as before


def _ceil8(value: int) -> int:
    return -(-value // 8) * 8


def _put_ties(acc: np.ndarray, m0: np.ndarray, shift: np.ndarray, per_channel: bool, *,
              limit: int) -> None:
    """Write exact ties (acc * m0 = (2k + 1) * 2^(shift - 1), |acc| <= limit) into acc[2]."""
    for ch in range(m0.size):
        half = 1 << int(shift[ch] - 1)
        step = half // np.gcd(int(m0[ch]), half)
        ties = np.array([(2 * k + 1) * step for k in range(-32, 32)
                         if abs((2 * k + 1) * step) <= limit], np.int64)
        acc[2, ch if per_channel else slice(None), :ties.size] = ties


def _assert_requantize_matches(args: list, feeds: list, acc: np.ndarray, m0: np.ndarray,
                               shift: np.ndarray, shape: tuple) -> None:
    """Build the vectorized requantize kernel for AVX2 and compare with the numpy definition."""
    from tvm import te

    sch = tvm.s_tir.Schedule(te.create_prim_func(args))
    sch.vectorize(sch.get_loops(sch.get_sblock("requantize"))[-1])
    lib = tvm.compile(sch.mod, target=HASWELL)
    got = tvm.runtime.tensor(np.zeros(acc.shape, np.int8))
    lib["main"](*[tvm.runtime.tensor(f) for f in feeds], got)
    want = requantize_reference(acc, m0.reshape(shape), shift.reshape(shape), -3, -100, 120)
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("per_channel", [False, True])
def test_32bit_requantize_equals_reference(per_channel: bool) -> None:
    """Every shift >= 33 (multipliers below 1/4): 32-bit rounding after the 64-bit product,
    against the numpy definition on extreme accumulators and exact ties."""
    from tvm import te

    multipliers = np.array([0.2499, 3.1e-3, 0.2, 1.7e-6, 2.3e-9, 0.0123, 0.126])
    if not per_channel:
        multipliers = multipliers[1:2]
    m0, shift = fixed_point_multiplier(multipliers)
    assert shift.min() >= 33
    c = 7
    acc = rng.integers(-2**31, 2**31, (5, c, 64), dtype=np.int64)
    acc[0] = rng.integers(-3000, 3000, (c, 64))
    acc[1, :, :4] = [[-2**31, 2**31 - 1, 3, -3]] * c
    _put_ties(acc, m0, shift, per_channel, limit=2**31 - 1)
    acc = acc.astype(np.int32)
    shape = (1, -1, 1) if per_channel else ()
    x = te.placeholder(acc.shape, "int32", "acc")
    if per_channel:
        m0_t = te.placeholder((1, c, 1), "int32", "m0")
        shift_t = te.placeholder((1, c, 1), "int64", "shift")
        out = requantize_te(x, m0_t, shift_t, -3, -100, 120, min_shift=int(shift.min()))
        args = [x, m0_t, shift_t, out]
        feeds = [acc, m0.astype(np.int32).reshape(shape), shift.reshape(shape)]
    else:
        out = requantize_te(x, int(m0[0]), int(shift[0]), -3, -100, 120)
        args, feeds = [x, out], [acc]
    _assert_requantize_matches(args, feeds, acc, m0, shift, shape)


@pytest.mark.parametrize("per_channel", [False, True])
def test_float64_requantize_equals_reference(per_channel: bool) -> None:
    """The float64 form (x86 builds, accumulators bounded: float_requantize_ok) against the
    numpy definition at the bound, on random accumulators and on exact ties."""
    from tvm import te

    from lepton_edge.lowering.int8 import float_requantize_ok

    multipliers = np.array([0.2499, 3.1e-3, 0.7, 1.7e-6, 2.3e-9, 0.0123, 1.9])
    if not per_channel:
        multipliers = multipliers[1:2]
    m0, shift = fixed_point_multiplier(multipliers)
    c = 7
    bound = np.full(multipliers.size, 2**21)
    assert float_requantize_ok(bound, m0, shift)
    assert not float_requantize_ok(np.full(multipliers.size, 2**23), m0, shift)
    acc = rng.integers(-2**21, 2**21 + 1, (5, c, 64), dtype=np.int64)
    acc[1, :, :4] = [[-2**21, 2**21, 3, -3]] * c
    _put_ties(acc, m0, shift, per_channel, limit=2**21)
    acc = acc.astype(np.int32)
    shape = (1, -1, 1) if per_channel else ()
    scale = m0.astype(np.float64) * np.exp2(-shift.astype(np.float64))
    x = te.placeholder(acc.shape, "int32", "acc")
    if per_channel:
        scale_t = te.placeholder((1, c, 1), "float64", "scale")
        out = requantize_te(x, 0, 0, -3, -100, 120, scale64=scale_t)
        args, feeds = [x, scale_t, out], [acc, scale.reshape(shape)]
    else:
        out = requantize_te(x, 0, 0, -3, -100, 120, scale64=float(scale[0]))
        args, feeds = [x, out], [acc]
    _assert_requantize_matches(args, feeds, acc, m0, shift, shape)


def test_matmul_runs_whole_column_panels_per_parallel_iteration() -> None:
    """The int16 matmul: parallel over column panels (all rows of one panel per iteration:
    one accumulator allocation each), bit-exact with a symbolic batch. (24 rows: a sample's
    393 K multiply-adds reach the int16 kernels' parallel threshold, 2 x PARALLEL_MIN_WORK.)"""
    k, n = 64, 256
    weight = extreme_int8((k, n))
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([N, 24, k], "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(weight, "int8"), out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod, _ = x86_int8.pack_int8_kernels(bb.get(), HASWELL)
    mod = relax.transform.LegalizeOps()(mod)
    mod, scheduled = x86_int8.schedule_int8_kernels(mod, HASWELL)
    assert len(scheduled) == 1 and scheduled[0].endswith("x86_int8_matmul_i16_avx2")
    text = "".join(f.script() for f in mod.functions.values()
                   if isinstance(f, tvm.tirx.PrimFunc))
    # 256 columns = 16 panels of 2 x 8, per batch element, in parallel; in each, the
    # 24 rows = 6 tiles of 4 in a serial loop
    assert "T.parallel(N * T.int64(16))" in text, text
    assert "for i1_0 in range(T.int64(6)):" in text, text
    executable = tvm.compile(mod, target=HASWELL)
    a = extreme_uint8((2, 24, k))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a)).numpy()
    np.testing.assert_array_equal(got, a.astype(np.int64) @ weight.astype(np.int64))


@pytest.mark.parametrize("form", ["float64", "int64"])
def test_depthwise_requantize_and_uint8_shift_inlined(form: str) -> None:
    """The depthwise kernel's epilogue as an int8 model has it: bias, requantize_te (float64
    or integer form), then the int8 -> uint8 shift for the next conv (cast, add 128, cast).
    The requantization and the shift are inlined into the last block (one pass per tile);
    bit-exact against requantize_reference."""
    c, h = 10, 7
    weight = extreme_int8((c, 1, 3, 3))
    bias = rng.integers(-3000, 3000, (1, c, 1, 1)).astype(np.int32)
    m0, shift = fixed_point_multiplier(rng.uniform(1e-4, 3e-3, c))
    scale = (m0.astype(np.float64) * np.exp2(-shift.astype(np.float64))).reshape(1, c, 1, 1)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([1, c, h, h], "int8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            padded = bb.emit(relax.op.nn.pad(xv, [0, 0, 0, 0, 1, 1, 1, 1], "constant", 0.0))
            y = bb.emit(relax.op.nn.conv2d(padded, relax.const(weight, "int8"), groups=c,
                                           out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            if form == "float64":
                q = bb.emit_te(requantize_te, y, 0, 0, 5, scale64=relax.const(scale, "float64"))
            else:
                q = bb.emit_te(requantize_te, y, relax.const(m0.astype(np.int32).reshape(
                    1, c, 1, 1)), relax.const(shift.reshape(1, c, 1, 1)), 5,
                    min_shift=int(shift.min()))
            u = bb.emit(relax.op.astype(relax.op.add(relax.op.astype(q, "int16"),
                                                     relax.const(128, "int16")), "uint8"))
            out = bb.emit_output(u)
        bb.emit_func_output(out)
    mod, packed, lines = pack_fuse_schedule(bb.get())
    assert len(lines) == 1 and lines[0].endswith("x86_int8_depthwise_avx2"), lines
    func = only_kernel(mod)
    sch = tvm.s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    # the bias add stays a block of its own (int32, see _epilogue_per_tile); then one block
    assert names[-2] == "T_add" and not any(n.startswith("requantize") for n in names), names
    x = rng.integers(-128, 128, (1, c, h, h)).astype(np.int8)
    acc = reference(x, weight, (1, 1), (1, 1), (1, 1, 1, 1), 0, c, None) + bias
    want = (requantize_reference(acc, m0.reshape(1, c, 1, 1), shift.reshape(1, c, 1, 1), 5)
            .astype(np.int16) + 128).astype(np.uint8)
    vm = relax.VirtualMachine(tvm.compile(mod, target=HASWELL), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), want)
