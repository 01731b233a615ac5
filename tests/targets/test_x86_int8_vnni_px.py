"""VNNI targets (lowering/x86_int8.py): which int8 kernel each conv gets, and bit-exactness.

A VNNI build gives depthwise convs (and int8 max pooling) the AVX2 flattened-plane kernel
(its rule keeps the name x86_int8_depthwise_avx2: plain AVX2 vector code; rows of column
stride 1 at least DWP_MIN_WIDTH wide its tap-pair variant, one `vpmaddwd` per two taps x 8
outputs, x86_int8_depthwise_pairs_avx2), and stems, 1x1 convs and KxK convs with 8-wide
output rows the pixel-vectorized kernel's uint8 layout for any weight (INTRIN_PX_VNNI: one
256-bit `vpdpbusd` per 8 output pixels x 4 input channels, tiles px_tile_vnni); the other
convs keep the NCHW[c4] kernel (INTRIN_VNNI). The
packing and scheduling are checked for the cascadelake target on any x86 host; the kernels
run (bit-exact against numpy int64 math, weights -128..127, which `vpmaddubsw` would
saturate) only on a VNNI host.
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.lowering import x86_int8
from lepton_edge.target import host_arch
from tests.targets.test_vnni import HOST, extreme_int8, extreme_uint8, host_has_vnni
from tests.targets.test_x86_int8_px import conv_module, pack_fuse_schedule, reference, run

tvm = pytest.importorskip("tvm")
relax = tvm.relax

pytestmark = pytest.mark.skipif(host_arch() != "x86_64", reason="x86 kernels need an x86 host")
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
needs_vnni = pytest.mark.skipif(not host_has_vnni(), reason="host CPU has no avx512_vnni")
rng = np.random.default_rng(23)
N = tvm.tirx.Var("N", "int64")


def test_vnni_kernel_choice() -> None:
    """Per conv shape, the kernel a VNNI build packs and the rule that schedules it."""
    cases = [  # x shape, weight shape, dtype, packed note, rule
        ([1, 3, 12, 12], (16, 3, 3, 3), "uint8", "pixel-vectorized uint8 vpdpbusd",
         "x86_int8_conv2d_px_u8_vnni"),
        ([1, 32, 9, 9], (24, 32, 1, 1), "uint8", "pixel-vectorized uint8 vpdpbusd",
         "x86_int8_conv2d_px_u8_vnni"),
        ([1, 144, 9, 9], (24, 144, 1, 1), "uint8", "pixel-vectorized uint8 vpdpbusd",
         "x86_int8_conv2d_px_u8_vnni"),
        ([1, 16, 9, 9], (32, 16, 3, 3), "uint8", "NCHW[c4] input", "x86_int8_conv2d_vnni"),
        # KxK with rows of exactly one vector (the digits CNN's 8x8): the pixel kernel
        ([1, 16, 10, 10], (32, 16, 3, 3), "uint8", "tile 4 channels x 4 rows x 8 pixels",
         "x86_int8_conv2d_px_u8_vnni"),
        ([1, 16, 9, 9], (16, 1, 3, 3), "int8", "depthwise conv2d", "x86_int8_depthwise_avx2"),
        ([1, 16, 30, 30], (16, 1, 3, 3), "int8", "tap pairs (vpmaddwd)",
         "x86_int8_depthwise_pairs_avx2"),
    ]
    for x_shape, w_shape, dtype, note, rule in cases:
        mod = conv_module(x_shape, extreme_int8(w_shape), dtype=dtype, shift=7)
        _, packed, lines = pack_fuse_schedule(mod, CASCADELAKE)
        assert len(packed) == 1 and note in packed[0], (w_shape, packed)
        assert len(lines) == 1 and lines[0].endswith(rule), (w_shape, lines)
    # AVX2 without VNNI keeps its own choice: the int16 pixel kernel for 8-bit weights
    mod = conv_module([1, 32, 9, 9], extreme_int8((24, 32, 1, 1)))
    packed = x86_int8.pack_int8_kernels(mod, {"kind": "llvm", "mcpu": "haswell"})[1]
    assert "pixel-vectorized int16" in packed[0], packed
    mod = conv_module([1, 16, 30, 30], extreme_int8((16, 1, 3, 3)), dtype="int8")
    packed = x86_int8.pack_int8_kernels(mod, {"kind": "llvm", "mcpu": "haswell"})[1]
    assert packed[0].startswith("depthwise conv2d") and "tap pairs" not in packed[0], packed


def test_vnni_pixel_tile_covers_or_divides_rows() -> None:
    """px_tile_vnni: 16 accumulators where they fit; a tile's columns divide the row or
    cover it whole (a ragged split leaves a predicated epilogue that TVM emits lane by
    lane); else the least padded work."""
    assert x86_int8.px_tile_vnni(96, 112, 112) == (8, 2, 1)
    assert x86_int8.px_tile_vnni(64, 14, 14) == (8, 1, 2)  # 16 columns cover 14
    assert x86_int8.px_tile_vnni(32, 28, 28) == (4, 1, 4)  # 32 columns cover 28
    assert x86_int8.px_tile_vnni(160, 7, 7) == (16, 1, 1)  # 7 rows: no padded row
    assert x86_int8.px_tile_vnni(32, 8, 8) == (8, 2, 1)
    assert x86_int8.px_tile_vnni(32, 8, 8, deep=True) == (4, 4, 1)  # KxK, > 4 channels
    for oc, oh, ow in ((96, 112, 112), (64, 14, 14), (32, 28, 28), (24, 56, 56), (20, 7, 7)):
        r, vy, vx = x86_int8.px_tile_vnni(oc, oh, ow)
        assert ow % (8 * vx) == 0 or 8 * vx >= ow, (oc, oh, ow)


def test_vnni_int8_max_pool_is_packed() -> None:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 8, 12, 12], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(
                x, (3, 3), (2, 2), (1, 1, 1, 1))))
        bb.emit_func_output(out)
    _, packed, lines = pack_fuse_schedule(bb.get(), CASCADELAKE)
    assert len(packed) == 1 and packed[0].startswith("max_pool2d"), packed
    assert len(lines) == 1 and lines[0].endswith("x86_int8_depthwise_avx2"), lines


# x shape, (out channels, kernel), strides, pad (top, left, bottom, right), batch
PX_CONVS = {
    "1x1_16_wide": ([1, 16, 7, 16], (24, 1), (1, 1), (0, 0, 0, 0), None),
    "1x1_stride2_odd_channels_symbolic_batch": ([N, 9, 9, 11], (7, 1), (2, 2), (0, 0, 0, 0),
                                                2),
    "3x3_stem_stride2_pad": ([1, 3, 13, 18], (20, 3), (2, 2), (1, 1, 1, 1), None),
    "3x3_8_wide_c16_pad_symbolic_batch": ([N, 16, 6, 8], (36, 3), (1, 1), (1, 1, 1, 1), 3),
}


@needs_vnni
@pytest.mark.parametrize("case", list(PX_CONVS))
@pytest.mark.parametrize("fused", [False, True])
def test_vnni_pixel_conv2d_is_bit_exact(case: str, fused: bool) -> None:
    x_shape, (oc, k), strides, pad, batch = PX_CONVS[case]
    weight = extreme_int8((oc, x_shape[1], k, k))
    shift = 9 if fused else None
    mod = conv_module(x_shape, weight, strides=strides, pad=pad, pad_value=201, shift=shift)
    mod, packed, lines = pack_fuse_schedule(mod, HOST)
    assert "pixel-vectorized uint8 vpdpbusd" in packed[0], packed
    assert lines[0].endswith("x86_int8_conv2d_px_u8_vnni"), lines
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    want = reference(x, weight, strides, (1, 1), pad, 201, 1, shift)
    np.testing.assert_array_equal(run(tvm.compile(mod, target=HOST), x), want)


# x shape, kernel, strides, pad, batch, (paired by default, paired when allowed): the
# `vpmaddwd` tap-pair kernel for column stride 1 and rows >= DWP_MIN_WIDTH wide
# (use_depthwise_pairs) when dw_tile_pairs pads the rows to whole vectors by at most 1/8;
# "allowed": use_depthwise_pairs forced true (the kernel's column stride 2 path)
DW_CONVS = {
    "3x3_stride2_pad_16_wide": ([1, 5, 32, 32], 3, (2, 2), (1, 1, 1, 1), None, (False, False)),
    "3x3_pad_7_wide_symbolic_batch": ([N, 17, 7, 7], 3, (1, 1), (1, 1, 1, 1), 2,
                                      (False, False)),
    "3x3_pad_14_wide": ([1, 19, 14, 14], 3, (1, 1), (1, 1, 1, 1), None, (False, True)),
    "3x3_pad_56_wide": ([1, 3, 9, 56], 3, (1, 1), (1, 1, 1, 1), None, (True, True)),
    "3x3_stride2_to_14_wide_symbolic_batch": ([N, 7, 28, 28], 3, (2, 2), (1, 1, 1, 1), 2,
                                              (False, True)),
    "3x3_stride2_to_28_uneven_pad": ([1, 6, 17, 56], 3, (2, 2), (0, 0, 1, 1), None,
                                     (False, True)),
    "5x5_stride2_pitch_32": ([1, 3, 20, 60], 5, (2, 2), (2, 2, 2, 2), None, (False, True)),
    "5x5_pad_27_wide": ([1, 2, 9, 27], 5, (1, 1), (2, 2, 2, 2), None, (True, True)),
}


@needs_vnni
@pytest.mark.parametrize("case", list(DW_CONVS))
@pytest.mark.parametrize("allow", [False, True])
def test_vnni_depthwise_conv2d_is_bit_exact(case: str, allow: bool,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    x_shape, k, strides, pad, batch, expect = DW_CONVS[case]
    paired = expect[allow]
    if allow:
        monkeypatch.setattr(x86_int8, "use_depthwise_pairs", lambda *_: True)
    c = x_shape[1]
    weight = extreme_int8((c, 1, k, k))
    mod = conv_module(x_shape, weight, dtype="int8", strides=strides, pad=pad,
                      pad_value=-3, shift=5)
    mod, packed, lines = pack_fuse_schedule(mod, HOST)
    assert packed[0].startswith("depthwise conv2d") and "folded" in packed[0], packed
    assert ("tap pairs" in packed[0]) == paired, packed
    rule = "x86_int8_depthwise_pairs_avx2" if paired else "x86_int8_depthwise_avx2"
    assert lines[0].endswith(rule), lines
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = rng.integers(-128, 128, shape).astype(np.int8)
    x[rng.random(shape) < 0.3] = -128
    want = reference(x, weight, strides, (1, 1), pad, -3, c, 5)
    np.testing.assert_array_equal(run(tvm.compile(mod, target=HOST), x), want)
