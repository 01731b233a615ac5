"""AVX2 (no VNNI) int8 kernels of lowering/x86_int8.py: int16 `vpmaddwd` kernels, bit-exact.

For an AVX2 target without VNNI, pack_int8_kernels(mod, target) widens constant weights to
int16 at compile time (matmul [N/8, K/2, 8, 2]; conv2d: the pixel-vectorized kernel, or the
NCHW[c2] kernel for wide KxK convs with more than 4 input channels: both tested in
tests/targets/test_x86_int8_px.py) and the kernel widens its uint8 activations once; every
8 x 2 block is one `vpmaddwd` (INTRIN_I16). Compared with numpy int64 math on extreme values (0/255
activations, -128/127 weights).
"""

from __future__ import annotations

import numpy as np
import pytest

import lepton_edge
from lepton_edge.lowering import x86_int8
from lepton_edge.target import host_arch
from tests.targets.test_int8_lowering import CASES, qdq_model, reference
from tests.targets.test_vnni import (
    CASCADELAKE, CONVS, HOST, MATMULS, dilated_conv_int64, disassembly, extreme_int8,
    extreme_uint8, run,
    single_op_module,
)

tvm = pytest.importorskip("tvm")
relax = tvm.relax

HASWELL = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
pytestmark = [
    pytest.mark.skipif(host_arch() != "x86_64", reason="x86 kernels need an x86 host"),
    pytest.mark.skipif(not tvm.target.codegen.target_has_features("avx2", HOST),
                       reason="host CPU has no AVX2"),
]
rng = np.random.default_rng(5)


def build_i16(mod: tvm.IRModule) -> tuple[object, list[str], list[str]]:
    """Pack for the host as an AVX2 target (AVX2 code runs on any AVX2 host, VNNI or not)."""
    mod, packed = x86_int8.pack_int8_kernels(mod, HASWELL)
    mod, scheduled = x86_int8.schedule_int8_kernels(mod, HASWELL)
    return tvm.compile(mod, target=HASWELL), packed, scheduled


def test_layout_follows_the_target() -> None:
    weight = extreme_int8((24, 16))
    mod = single_op_module("matmul", [4, 24], weight)
    assert x86_int8.pack_int8_kernels(mod, HASWELL)[1] == [
        "matmul K=24 N=16: packed int16 [2, 12, 8, 2] (a weight pair could saturate "
        "vpmaddubsw)"]
    for target in (CASCADELAKE, None):  # VNNI, or no target: the uint8 x int8 layout
        assert x86_int8.pack_int8_kernels(mod, target)[1] == [
            "matmul K=24 N=16: packed int8 [1, 6, 16, 4]"]
    # 7-bit weights on AVX2: the uint8 layout, for `vpmaddubsw` (tests/targets/test_x86_int8_u8.py)
    mod7 = single_op_module("matmul", [4, 24], (weight // 2).astype(np.int8))
    assert x86_int8.pack_int8_kernels(mod7, HASWELL)[1] == [
        "matmul K=24 N=16: packed uint8 vpmaddubsw [1, 6, 16, 4] (weight pairs bounded: exact)"]
    packed = x86_int8.pack_matmul_weight_i16(weight)
    assert packed.dtype == np.int16
    np.testing.assert_array_equal(packed[1, 5], weight[10:12, 8:16].T)  # [n % 8, k % 2]


@pytest.mark.parametrize("case", list(MATMULS) + ["seq_first"])
def test_int16_matmul_is_bit_exact(case: str) -> None:
    if case == "seq_first":  # (seq, N, d): the row tile goes on the static seq axis
        x_shape, w_shape, batch = [12, tvm.tirx.Var("N", "int64"), 20], (20, 24), 1
    else:
        x_shape, w_shape, batch = MATMULS[case]
    weight = extreme_int8(w_shape)
    executable, packed, scheduled = build_i16(single_op_module("matmul", x_shape, weight))
    assert "packed int16" in packed[0]
    assert scheduled == ["int8_matmul_packed: x86_int8_matmul_i16_avx2"]
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    np.testing.assert_array_equal(run(executable, x), x.astype(np.int64) @ weight.astype(np.int64))


@pytest.mark.parametrize("case", list(CONVS))
def test_int16_conv2d_is_bit_exact(case: str) -> None:
    x_shape, w_shape, attrs, batch = CONVS[case]
    weight = extreme_int8(w_shape)
    executable, packed, scheduled = build_i16(single_op_module("conv", x_shape, weight, **attrs))
    assert "pixel-vectorized int16" in packed[0]  # test_x86_int8_px.py: more shapes
    assert scheduled == ["int8_conv2d_px: x86_int8_conv2d_px_avx2"]
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    want = dilated_conv_int64(x, weight, attrs)
    np.testing.assert_array_equal(run(executable, x), want)


def test_one_channel_conv_stays_generic_on_avx2() -> None:
    mod = single_op_module("conv", [1, 1, 6, 6], extreme_int8((8, 1, 3, 3)))
    assert x86_int8.pack_int8_kernels(mod, HASWELL)[1] == [
        "conv2d: one input channel; generic code"]
    assert "packed" in x86_int8.pack_int8_kernels(mod, CASCADELAKE)[1][0]


def test_untuned_avx2_builds_pack_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(x86_int8.DOT_ENV, raising=False)
    assert x86_int8.use_dot_kernels(HASWELL, untuned=True)
    assert not x86_int8.use_dot_kernels(HASWELL)  # tuned builds: MetaSchedule's int8 space
    monkeypatch.setenv(x86_int8.DOT_ENV, "off")
    assert not x86_int8.use_dot_kernels(HASWELL, untuned=True)


@pytest.mark.parametrize("case", ["matmul", "matmul_per_tensor", "gemm_relu", "conv"])
def test_default_compile_is_bit_exact(case: str, build, monkeypatch: pytest.MonkeyPatch) -> None:
    """lepton_edge.compile with the default policy: int16 matmuls (`vpmaddwd`, no `vphaddd`
    lane fix-up) and uint8 dot-product convs on an AVX2 host, fused with the requantization."""
    if x86_int8.dot_intrinsic(HOST) != x86_int8.INTRIN_AVX2:
        pytest.skip("host has VNNI: its default build uses the VNNI layout")
    monkeypatch.delenv(x86_int8.DOT_ENV, raising=False)
    model, p = qdq_model(**CASES[case])
    path, session = build(lepton_edge.load(model))
    text, meta = disassembly(path)
    want = "pixel-vectorized int16" if case == "conv" else "packed int16"
    assert len(meta["int8_dot_kernels"]) == 1 and want in meta["int8_dot_kernels"][0], meta
    assert "vpmaddwd" in text
    shape = [3 if isinstance(d, str) else d for d in session.inputs[0].shape]
    x_q = rng.integers(-128, 128, shape).astype(np.int8)
    x_q[rng.random(shape) < 0.3] = 127
    np.testing.assert_array_equal(session.run({"x_q": x_q})["y_q"], reference(x_q, p))
