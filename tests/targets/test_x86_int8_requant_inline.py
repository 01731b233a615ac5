"""The requantization epilogue inlined into a pixel conv's last block
(lowering/x86_int8.py `_inline_after_requantize`) with ordinary requantization scales.

requantize_te's float64 form, lrint(acc * m0 * 2^-shift [+ zero point]), is exact only while
nothing rounds between the multiply and lrint other than what float_requantize_ok and
float_zero_point_ok allow for (a multiply-add that LLVM contracts into one FMA rounds once).
Power-of-2 scales make every product exact whatever the code does; here the multipliers
are arbitrary (per output channel, m0 odd in [2^30, 2^31)), the accumulators reach about
2^21 (|acc| * m0 near 2^52), the zero point is folded into the float form and the int8
result is dequantized and clipped in the same block (as a ReLU6 model's last conv is): the
kernel must equal requantize_reference bit for bit, lie within one quantization step of
the float QDQ value, and dequantize as onnxruntime's DequantizeLinear does (float32
(q - zp) * scale)."""

from __future__ import annotations

import numpy as np
import pytest

from lepton_edge.lowering import x86_int8
from lepton_edge.lowering.int8 import (fixed_point_multiplier, float_requantize_ok,
                                       float_zero_point_ok, requantize_reference,
                                       requantize_te)
from lepton_edge.target import host_arch
from tests.targets.test_vnni import extreme_int8, extreme_uint8, host_has_vnni
from tests.targets.test_x86_int8_px import conv_int64

tvm = pytest.importorskip("tvm")
relax = tvm.relax

HASWELL = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
HOST = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
pytestmark = [
    pytest.mark.skipif(host_arch() != "x86_64", reason="x86 kernels need an x86 host"),
    pytest.mark.skipif(not tvm.target.codegen.target_has_features("avx2", HOST),
                       reason="host CPU has no AVX2"),
]
ZP_IN, ZP_OUT, S_OUT = 3, -7, np.float32(0.0473)  # input/output zero points, output scale


def module(x_shape: list, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray,
           dequantize: bool) -> tvm.IRModule:
    """uint8 x -> 1x1 conv2d int32 + bias -> requantize_te (float64, zero point folded) ->
    [dequantize (float32) -> clip to [0, 6]]."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight, "int8"), out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            q = bb.emit_te(requantize_te, y, 0, 0, ZP_OUT, -128, 127, None,
                           relax.const(scale, "float64"), True)
            if dequantize:
                f = bb.emit(relax.op.dequantize(q, relax.const(S_OUT),
                                                relax.const(ZP_OUT, "int8"), axis=1))
                q = bb.emit(relax.op.clip(f, 0, 6))
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


def schedule(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, list[str]]:
    mod, _ = x86_int8.pack_int8_kernels(mod, target)
    mod = relax.transform.LegalizeOps()(mod)
    mod = relax.transform.AnnotateTIROpPattern()(mod)
    mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(mod))
    return x86_int8.schedule_int8_kernels(mod, target)


TARGETS = [pytest.param(HASWELL, id="haswell"),
           pytest.param(HOST, id="host_vnni", marks=pytest.mark.skipif(
               not host_has_vnni(), reason="host CPU has no avx512_vnni"))]


def extreme_case(c_out: int, h: int, w: int) -> tuple:
    """Extreme weights and inputs, 64 input channels: |acc| up to 64 * 255 * 128 ~ 2^21;
    per-channel multipliers put each channel's largest output at 90..270."""
    rng = np.random.default_rng(31)
    weight = extreme_int8((c_out, 64, 1, 1))
    x = extreme_uint8((1, 64, h, w))
    bias = rng.integers(-20000, 20000, (1, c_out, 1, 1)).astype(np.int32)
    acc = conv_int64(x.astype(np.int64), weight.astype(np.int64), [0, 0, 0, 0], [1, 1], 1) \
        + bias
    real = rng.uniform(0.6, 1.8, c_out) * 150 / np.abs(acc).max(axis=(0, 2, 3))
    return weight, x, bias, real


def near_tie_case(c_out: int, h: int, w: int) -> tuple:
    """Accumulators chosen, per channel, among all it can take (-113000..113891) as the
    h * w whose scaled value lies closest to a half-integer (none exactly on one): about
    within 2^-16 or so, so that computing the product in float32 flips some results
    (asserted). Output channel o reads input channels 8o..8o+7 with weights 127 (x7), 1."""
    k, pixels, rng = 8, h * w, np.random.default_rng(5)
    weight = np.zeros((c_out, k * c_out, 1, 1), np.int8)
    for o in range(c_out):
        weight[o, k * o:k * o + k - 1] = 127
        weight[o, k * o + k - 1] = 1
    bias = np.full((1, c_out, 1, 1), -113000, np.int32)
    real = rng.uniform(0.6, 1.8, c_out) * 150 / 113950
    m0, shift = fixed_point_multiplier(real)
    values = np.arange(0, 127 * (7 * 255 + 1), dtype=np.int64)  # acc - bias
    x = np.zeros((1, k * c_out, h, w), np.uint8)
    for o in range(c_out):
        sh = int(shift[o])
        rem = ((values - 113000) * int(m0[o])) % (1 << sh)  # fraction * 2^shift
        near = np.argsort(np.abs(rem - (1 << (sh - 1))))[:pixels]
        big, small = values[near] // 127, values[near] % 127  # acc - bias = 127 big + small
        for j in range(k - 1):
            part = np.minimum(big, 255)
            x[0, k * o + j] = part.reshape(h, w)
            big = big - part
        assert not big.any()
        x[0, k * o + k - 1] = small.reshape(h, w)
    return weight, x, bias, real


TARGETS = [pytest.param(HASWELL, id="haswell"),
           pytest.param(HOST, id="host_vnni", marks=pytest.mark.skipif(
               not host_has_vnni(), reason="host CPU has no avx512_vnni"))]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dequantize", [False, True])
@pytest.mark.parametrize("case", [extreme_case, near_tie_case], ids=["extreme", "near_ties"])
def test_inlined_requantize_with_ordinary_scales(target: tvm.target.Target, dequantize: bool,
                                                 case: object) -> None:
    c_out, h, w = 24, 3, 16  # rows of 16: _inline_after_requantize inlines
    weight, x, bias, real = case(c_out, h, w)
    acc = conv_int64(x.astype(np.int64), weight.astype(np.int64), [0, 0, 0, 0], [1, 1], 1) \
        + bias
    m0, shift = fixed_point_multiplier(real)
    assert np.all(m0 != 2 ** 30), "ordinary (not power-of-2) multipliers"
    bound = np.abs(weight.astype(np.int64)).sum(axis=(1, 2, 3)) * 255 + np.abs(bias.ravel())
    assert float_requantize_ok(bound, m0, shift, tie_free=True)
    assert float_zero_point_ok(bound, m0, shift)
    scale = (m0.astype(np.float64) * np.exp2(-shift.astype(np.float64))).reshape(1, c_out, 1, 1)
    if case is near_tie_case:  # the data has teeth: float32 math gets some of them wrong
        f32 = np.clip(np.rint(acc.astype(np.float32) * scale.astype(np.float32)) + ZP_OUT,
                      -128, 127)
        assert (f32 != requantize_reference(acc, m0.reshape(1, c_out, 1, 1),
                                            shift.reshape(1, c_out, 1, 1), ZP_OUT)).sum() >= 4

    mod, lines = schedule(module(list(x.shape), weight, bias, scale, dequantize), target)
    assert len(lines) == 1 and "conv2d_px" in lines[0], lines
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = tvm.s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    # the bias add, then one block: requantize [, dequantize, clip] inlined into the last
    assert names[-2] == "T_add", names
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x)).numpy()

    want = requantize_reference(acc, m0.reshape(1, c_out, 1, 1), shift.reshape(1, c_out, 1, 1),
                                ZP_OUT)
    # the float QDQ value: within one quantization step (the multiplier's 2^-31 error)
    qdq = np.clip(np.rint(acc * real.reshape(1, c_out, 1, 1)) + ZP_OUT, -128, 127)
    assert np.abs(want.astype(np.int64) - qdq).max() <= 1
    assert np.abs(acc * scale).max() > 200, "the outputs reach past the int8 range"
    if not dequantize:
        np.testing.assert_array_equal(got, want)
        return
    deq = np.clip((want.astype(np.float32) - np.float32(ZP_OUT)) * S_OUT, 0, 6)
    np.testing.assert_array_equal(got, deq)


def test_float32_scale_table_is_refused() -> None:
    """relax.const of a float64 array without dtype="float64" makes a float32 constant; the
    float64 form would widen it silently and lose exactness (the near-tie case above fails
    with one): requantize_te refuses it."""
    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType([1, 2, 1, 4], "int32"))
    with bb.function("main", [acc]):
        with bb.dataflow():
            with pytest.raises(Exception, match="scale64 must be float64"):
                bb.emit_te(requantize_te, acc, 0, 0, 0, scale64=relax.const(
                    np.full((1, 2, 1, 1), 0.01)))
            out = bb.emit_output(acc)
        bb.emit_func_output(out)
