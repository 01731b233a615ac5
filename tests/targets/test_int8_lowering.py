"""QDQ -> integer kernels: bit-exact against a numpy model of the same integer math.

Each model takes int8 input and returns int8 output, so the comparison is exact: the
reference computes acc = sum((x_q - x_zp) * w_q) + bias_q in int64 and requantizes with
the fixed-point multiplier. Against onnxruntime (ONNX's float QDQ semantics) the difference
is at most one quantization step.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.reference import reference_session
from tests.conftest import spec_output
from lepton_edge.lowering.int8 import (
    fixed_point_multiplier, lower_qdq_to_integer, requantize_reference, requantize_te,
)

rng = np.random.default_rng(7)


def test_fixed_point_multiplier_is_accurate() -> None:
    values = np.array([1e-6, 3.3e-4, 0.0123, 0.5, 0.999999, 1.0, 7.5, 1000.0])
    m0, shift = fixed_point_multiplier(values)
    assert np.all((m0 >= 2**30) & (m0 < 2**31))
    approx = m0.astype(np.float64) * np.power(2.0, -shift.astype(np.float64))
    assert np.all(np.abs(approx - values) <= values * 2.0**-30)
    with pytest.raises(ValueError, match="positive"):
        fixed_point_multiplier(np.array([0.0]))


def test_requantize_rounds_half_to_even_like_quantizelinear() -> None:
    m0, shift = fixed_point_multiplier(np.array(0.5))
    acc = np.array([1, 3, 5, -1, -3, -5, 7, 1000])
    got = requantize_reference(acc, m0, shift, 0)
    assert got.tolist() == [0, 2, 2, 0, -2, -2, 4, 127]  # 0.5->0, 1.5->2, 2.5->2, ... clipped


@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_requantize_equals_reference(per_channel: bool) -> None:
    """requantize_te (one block, prod bound once, m0 widened from int32) against the numpy
    definition: extreme accumulators, exact ties, shifts below and above 32, clipping."""
    import tvm
    from tvm import te

    c = 6
    multipliers = np.array([0.5, 3.1e-3, 0.75, 1.7e-6, 0.99, 0.0123])
    if not per_channel:
        multipliers = multipliers[1:2]
    m0, shift = fixed_point_multiplier(multipliers)
    assert shift.min() < 32 < shift.max() or not per_channel
    acc = rng.integers(-2**31, 2**31, (5, c, 7), dtype=np.int64)
    acc[0] = rng.integers(-3000, 3000, (c, 7))
    acc[1, :, :4] = [[-2**31, 2**31 - 1, 3, -3]] * c  # extremes and 0.5-ties (M = 0.5)
    acc[2] = (np.arange(c * 7).reshape(c, 7) - 21) * 3
    acc = acc.astype(np.int32)
    shape = (1, -1, 1) if per_channel else ()
    x = te.placeholder(acc.shape, "int32", "acc")
    if per_channel:
        m0_t = te.placeholder((1, c, 1), "int32", "m0")
        shift_t = te.placeholder((1, c, 1), "int64", "shift")
        out = requantize_te(x, m0_t, shift_t, -3, -100, 120)
        args = [x, m0_t, shift_t, out]
        feeds = [acc, m0.astype(np.int32).reshape(shape), shift.reshape(shape)]
    else:
        out = requantize_te(x, int(m0[0]), int(shift[0]), -3, -100, 120)
        args, feeds = [x, out], [acc]
    func = te.create_prim_func(args)
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("requantize")
    sch.vectorize(sch.get_loops(block)[-1])  # vector code, as in the scheduled kernels
    host = {"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())}
    lib = tvm.compile(sch.mod, target=tvm.target.Target(host))
    tensors = [tvm.runtime.tensor(f) for f in feeds]
    got = tvm.runtime.tensor(np.zeros(acc.shape, np.int8))
    lib["main"](*tensors, got)
    want = requantize_reference(acc, m0.reshape(shape), shift.reshape(shape), -3, -100, 120)
    np.testing.assert_array_equal(got.numpy(), want)


def conv_int64(x: np.ndarray, w: np.ndarray, pads: list[int], strides: list[int],
               groups: int) -> np.ndarray:
    """Direct int64 NCHW convolution (reference, independent of the compiled code)."""
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = (h - kh) // strides[0] + 1, (wd - kw) // strides[1] + 1
    out = np.zeros((n, o, oh, ow), np.int64)
    og = o // groups
    for g in range(groups):
        xs = x[:, g * cg:(g + 1) * cg]
        for i in range(oh):
            for j in range(ow):
                patch = xs[:, :, i * strides[0]:i * strides[0] + kh,
                           j * strides[1]:j * strides[1] + kw]
                out[:, g * og:(g + 1) * og, i, j] = np.einsum(
                    "nchw,ochw->no", patch, w[g * og:(g + 1) * og])
    return out


def qdq_model(kind: str, *, groups: int = 1, relu: bool = False, per_channel: bool = True,
              weight_zp: int = 0) -> tuple[onnx.ModelProto, dict]:
    """int8 in -> DQ -> Conv/MatMul/Gemm (+bias) [-> Relu] -> Q -> int8 out."""
    sx, zx, sy, zy = 0.02, -7, 0.05, 3
    if kind == "conv":
        c, o = 4 * groups if groups > 1 else 3, 4 * groups if groups > 1 else 6
        w_shape, x_shape, axis = (o, c // groups, 3, 3), ["N", c, 7, 7], 0
        y_shape = ["N", o, 4, 4]
    else:
        c, o = 24, 10
        w_shape = (o, c) if kind == "gemm" else (c, o)
        axis = 0 if kind == "gemm" else 1
        x_shape, y_shape = ["N", c], ["N", o]
    w_q = rng.integers(-127, 128, w_shape).astype(np.int8)
    sw = (rng.uniform(0.005, 0.02, o) if per_channel else np.array(0.01)).astype(np.float32)
    b_q = rng.integers(-2000, 2000, o).astype(np.int32)
    sb = (np.float32(sx) * sw).astype(np.float32) * np.ones(o, np.float32)
    inits = [
        numpy_helper.from_array(np.array(sx, np.float32), "sx"),
        numpy_helper.from_array(np.array(zx, np.int8), "zx"),
        numpy_helper.from_array(np.array(sy, np.float32), "sy"),
        numpy_helper.from_array(np.array(zy, np.int8), "zy"),
        numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(sw, "sw"),
        numpy_helper.from_array(np.full(sw.shape, weight_zp, np.int8), "zw"),
        numpy_helper.from_array(b_q, "b_q"), numpy_helper.from_array(sb, "sb"),
        numpy_helper.from_array(np.zeros(o, np.int32), "zb"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x"]),
        helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w"],
                         **({"axis": axis} if per_channel else {})),
        helper.make_node("DequantizeLinear", ["b_q", "sb", "zb"], ["b"], axis=0),
    ]
    if kind == "conv":
        nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["acc"], pads=[1, 1, 1, 1],
                                      strides=[2, 2], group=groups))
    elif kind == "gemm":
        nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["acc"], transB=1))
    else:
        nodes += [helper.make_node("MatMul", ["x", "w"], ["mm"]),
                  helper.make_node("Add", ["mm", "b"], ["acc"])]
    last = "acc"
    if relu:
        nodes.append(helper.make_node("Relu", ["acc"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["y_q"]))
    graph = helper.make_graph(
        nodes, f"qdq_{kind}", [helper.make_tensor_value_info("x_q", TensorProto.INT8, x_shape)],
        [helper.make_tensor_value_info("y_q", TensorProto.INT8, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    params = dict(sx=sx, zx=zx, sy=sy, zy=zy, w_q=w_q, sw=sw, b_q=b_q, groups=groups,
                  relu=relu, kind=kind)
    return model, params


def reference(x_q: np.ndarray, p: dict) -> np.ndarray:
    x = x_q.astype(np.int64) - p["zx"]
    w = p["w_q"].astype(np.int64)
    if p["kind"] == "conv":
        acc = conv_int64(x, w, [1, 1, 1, 1], [2, 2], p["groups"]) + p["b_q"][None, :, None, None]
        shape = (1, -1, 1, 1)
    else:
        acc = x @ (w.T if p["kind"] == "gemm" else w) + p["b_q"][None, :]
        shape = (1, -1)
    multiplier = np.float32(p["sx"]) * np.broadcast_to(p["sw"], p["b_q"].shape).astype(
        np.float64) / np.float64(np.float32(p["sy"]))
    m0, shift = fixed_point_multiplier(multiplier)
    low = p["zy"] if p["relu"] else -128
    return requantize_reference(acc, m0.reshape(shape), shift.reshape(shape), p["zy"], low)


def ort_spec(model: onnx.ModelProto, x_q: np.ndarray) -> np.ndarray:
    return spec_output(model, {"x_q": x_q})


CASES = {
    "conv": dict(kind="conv"),
    "conv_relu": dict(kind="conv", relu=True),
    "depthwise_conv": dict(kind="conv", groups=4),
    "matmul": dict(kind="matmul"),
    "matmul_per_tensor": dict(kind="matmul", per_channel=False),
    "gemm_relu": dict(kind="gemm", relu=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_integer_kernel_is_bit_exact(case: str, build) -> None:
    model, p = qdq_model(**CASES[case])
    from tvm.relax.frontend.onnx import from_onnx

    lowered, report = lower_qdq_to_integer(from_onnx(model, keep_params_in_input=False))
    assert len(report.lowered) == 1 and not report.kept_float, report
    text = lowered.script(show_meta=False)
    assert 'out_dtype="int32"' in text and "R.dequantize" not in text
    _, session = build(lepton_edge.load(model))
    meta = session.manifest["subgraphs"][0]["builds"][0]["meta"]
    assert len(meta["int8_kernels"]) == 1
    shape = [2 if isinstance(d, str) else d for d in session.inputs[0].shape]
    x_q = rng.integers(-128, 128, shape).astype(np.int8)
    got = session.run({"x_q": x_q})["y_q"]
    want = reference(x_q, p)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, want)
    assert np.abs(got.astype(int) - ort_spec(model, x_q).astype(int)).max() <= 1


def test_float_requantize_only_when_asked_and_bounded() -> None:
    """x86 builds (float_requantize=True) get the float64 requantization when the
    accumulator bound allows it; the default (other targets: FPGA) keeps integers. The
    compiled CPU builds above run it: their results are the bit-exact references."""
    from tvm.relax.frontend.onnx import from_onnx

    from lepton_edge.lowering.int8 import float_requantize_ok

    model, _ = qdq_model("conv")
    mod = from_onnx(model, keep_params_in_input=False)
    plain, _ = lower_qdq_to_integer(mod)
    fast, _ = lower_qdq_to_integer(mod, float_requantize=True)
    assert "float64" not in plain.script(show_meta=False)
    assert "float64" in fast.script(show_meta=False)
    m0, shift = fixed_point_multiplier(np.array([0.9, 1e-3]))
    assert float_requantize_ok(np.array([2**21, 2**21]), m0, shift)
    assert not float_requantize_ok(np.array([2**21, 2**30]), m0, shift)  # past 2^53
    # a bound past int32 (a very long reduction): capped at 2^31, no int64 wrap-around
    assert not float_requantize_ok(np.array([2**33]), np.array([2**31 - 1]), np.array([40]))
    # ... which the tie-free rule accepts (shift <= 44), but not at shift 45
    assert float_requantize_ok(np.array([2**33]), np.array([2**31 - 1]), np.array([40]),
                               tie_free=True)
    assert not float_requantize_ok(np.array([2**33]), np.array([2**31 - 1]), np.array([45]),
                                   tie_free=True)


def test_float_requantize_rules_at_their_limits() -> None:
    """float_requantize_ok(tie_free=True) and float_zero_point_ok at the edges of their
    conditions: exact product or (no tie reachable and shift <= 44); the zero point in
    float64 only without ties, shift <= 45 (exact product) or <= 43 (two roundings)."""
    from lepton_edge.lowering.int8 import float_requantize_ok, float_zero_point_ok

    odd = np.array([2**31 - 1])  # m0 odd: a product is exact iff |acc| < 2^53 / m0 ~ 2^22
    small, large = np.array([2**21]), np.array([2**24])  # exact / not exact
    for shift in (43, 44, 45):
        sh = np.array([shift])
        assert float_requantize_ok(small, odd, sh, tie_free=True)
        assert float_requantize_ok(large, odd, sh, tie_free=True) == (shift <= 44)
        assert float_zero_point_ok(small, odd, sh) == (shift <= 45)
        assert float_zero_point_ok(large, odd, sh) == (shift <= 43)
    # m0 = 3 * 2^29: ties at acc = odd multiples of 2^(shift - 1 - 29)
    m0, sh = np.array([3 * 2**29]), np.array([40])
    assert float_requantize_ok(np.array([2**10 - 1]), m0, sh)  # exact: ties are fine
    assert float_zero_point_ok(np.array([2**10 - 1]), m0, sh)  # no tie below 2^10
    assert not float_zero_point_ok(np.array([2**10]), m0, sh)  # acc = 1024: x = 1.5
    # a reachable tie (acc = 2^30, m0 = (2^23 - 1) * 2^8) with an inexact product (2^31 *
    # odd(m0) >= 2^53): not the float form; one step below the tie it is
    m0 = np.array([2**31 - 2**8])
    assert not float_requantize_ok(np.array([2**31]), m0, np.array([39]), tie_free=True)
    assert float_requantize_ok(np.array([2**30 - 1]), m0, np.array([39]), tie_free=True)
    # |acc * M| >= 2^30 does not fit int32 after rounding
    assert not float_requantize_ok(np.array([2**31]), odd, np.array([31]), tie_free=True)


def _near_ties(m0: int, shift: int, limit: int, count: int) -> np.ndarray:
    """The `count` accumulators in (0, limit] whose x = acc * m0 * 2^-shift lies closest to a
    half-integer (either side), and their negatives: where rounding decides the result."""
    acc = np.arange(1, limit + 1, dtype=np.int64)
    rem = (acc * m0) & ((1 << shift) - 1)
    distance = np.abs(rem - (1 << (shift - 1)))
    best = acc[np.argsort(distance, kind="stable")[:count]]
    return np.concatenate([best, -best])


@pytest.mark.parametrize("fold", [False, True])
def test_float_requantize_forms_are_bit_exact(fold: bool) -> None:
    """requantize_te's float64 form, with the zero point added after rounding (int32) or
    before it (in float64, fold_zero_point), compiled for the host both vectorized (8 lanes:
    the epilogue's packs) and as scalar code (row tails), against requantize_reference on
    channels at the rules' limits: exact products with exact ties (not folded), inexact
    products at shift 44 / 43, the accumulator bounds, the nearest near-ties, zero points
    -128, -3, 0, 7, 127 and relu-style lower clips."""
    import tvm
    from tvm import te

    from lepton_edge.lowering.int8 import float_requantize_ok, float_zero_point_ok

    # per channel: multiplier M = m0 * 2^-shift and the accumulator bound
    m0 = np.array([3 * 2**29, 2**31 - 1, 1_500_000_001, 2**30 + 12345, 1_234_567_891, 2**30])
    shift = np.array([33, 44, 43, 40, 39, 31])
    bound = np.array([2**12, 2**24, 2**23, 2**20, 2**22, 2**10])
    if fold:  # no reachable ties (channel 0: at odd multiples of 8; 5: M = 0.5, any odd)
        bound[0], shift[1], m0[5] = 2**3 - 1, 43, 2**31 - 1
    c = m0.size
    assert float_requantize_ok(bound, m0, shift, tie_free=True)
    assert float_zero_point_ok(bound, m0, shift) == fold
    columns = 96
    acc = rng.integers(-1, 2, (c, columns), dtype=np.int64) * bound[:, None]  # +-bound, 0
    for ch in range(c):
        x_limit = int(min(bound[ch], (600 << int(shift[ch])) // int(m0[ch])))
        acc[ch, :32] = rng.integers(-x_limit, x_limit + 1, 32)
        near = _near_ties(int(m0[ch]), int(shift[ch]), x_limit, 24)
        acc[ch, 32:32 + near.size] = near
        half = 1 << int(shift[ch] - 1)
        step = half // np.gcd(int(m0[ch]), half)  # exact ties, where reachable
        ties = [t for t in (step, 3 * step, -step, -5 * step) if t <= bound[ch]]
        acc[ch, 80:80 + len(ties)] = ties
    acc = np.clip(acc, -bound[:, None], bound[:, None])
    rem = (np.abs(acc) * m0[:, None]) & ((1 << shift[:, None]) - 1)
    assert np.any(rem == 1 << (shift[:, None] - 1)) != fold  # exact ties where allowed
    acc = np.stack([acc, -acc]).astype(np.int32)  # (2, c, columns)
    scale = m0.astype(np.float64) * np.exp2(-shift.astype(np.float64))
    host = tvm.target.Target({"kind": "llvm",
                              "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
    for zp, low, high in ((-128, -128, 127), (-3, -3, 127), (0, -128, 127), (7, -100, 120),
                          (127, -128, 127)):
        x = te.placeholder(acc.shape, "int32", "acc")
        scale_t = te.placeholder((1, c, 1), "float64", "scale")
        out = requantize_te(x, 0, 0, zp, low, high, scale64=scale_t, fold_zero_point=fold)
        want = requantize_reference(acc, m0.reshape(1, -1, 1), shift.reshape(1, -1, 1), zp,
                                    low, high)
        for vector in (True, False):
            sch = tvm.s_tir.Schedule(te.create_prim_func([x, scale_t, out]))
            if vector:
                loop = sch.get_loops(sch.get_sblock("requantize"))[-1]
                sch.vectorize(sch.split(loop, [None, 8])[1])
            lib = tvm.compile(sch.mod, target=host)
            got = tvm.runtime.tensor(np.zeros(acc.shape, np.int8))
            lib["main"](tvm.runtime.tensor(acc), tvm.runtime.tensor(scale.reshape(1, c, 1)),
                        got)
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"zp {zp}, {vector=}")


def test_unrecognised_pattern_stays_float_and_correct(build) -> None:
    model, _ = qdq_model("matmul", weight_zp=5)  # asymmetric weights: not lowered
    _, session = build(lepton_edge.load(model))
    meta = session.manifest["subgraphs"][0]["builds"][0]["meta"]
    assert meta["int8_kernels"] == []
    assert "weight zero point is not 0" in meta["qdq_kept_float"][0]
    x_q = rng.integers(-128, 128, (3, 24)).astype(np.int8)
    got = session.run({"x_q": x_q})["y_q"]
    assert np.abs(got.astype(int) - ort_spec(model, x_q).astype(int)).max() <= 1


def qdq_cnn() -> tuple[onnx.ModelProto, list[dict]]:
    """int8 in -> [Conv+Relu] -> [depthwise Conv] -> MaxPool -> Flatten -> [Gemm] -> int8 out.

    Each bracketed layer is DQ -> op (+bias) -> Q; MaxPool/Flatten sit between DQ and Q with
    the same scale, so they are exact on the int8 values."""
    layers = [  # kind, in channels, out channels, groups, relu, in scale/zp, out scale/zp
        dict(name="c1", kind="conv", cin=2, cout=4, groups=1, relu=True,
             sx=0.02, zx=-5, sy=0.04, zy=-128),
        dict(name="c2", kind="conv", cin=4, cout=4, groups=4, relu=False,
             sx=0.04, zx=-128, sy=0.03, zy=2),
        dict(name="fc", kind="gemm", cin=4 * 4 * 4, cout=5, groups=1, relu=False,
             sx=0.03, zx=2, sy=0.1, zy=0),
    ]
    nodes, inits = [], []
    current = "x_q"
    for layer in layers:
        n = layer["name"]
        shape = ((layer["cout"], layer["cin"] // layer["groups"], 3, 3)
                 if layer["kind"] == "conv" else (layer["cout"], layer["cin"]))
        layer["w_q"] = rng.integers(-127, 128, shape).astype(np.int8)
        layer["sw"] = rng.uniform(0.005, 0.02, layer["cout"]).astype(np.float32)
        layer["b_q"] = rng.integers(-500, 500, layer["cout"]).astype(np.int32)
        sb = np.float32(layer["sx"]) * layer["sw"]
        for key, value in ((f"{n}_sx", np.array(layer["sx"], np.float32)),
                           (f"{n}_zx", np.array(layer["zx"], np.int8)),
                           (f"{n}_sy", np.array(layer["sy"], np.float32)),
                           (f"{n}_zy", np.array(layer["zy"], np.int8)),
                           (f"{n}_w", layer["w_q"]), (f"{n}_sw", layer["sw"]),
                           (f"{n}_zw", np.zeros(layer["cout"], np.int8)),
                           (f"{n}_b", layer["b_q"]), (f"{n}_sb", sb.astype(np.float32)),
                           (f"{n}_zb", np.zeros(layer["cout"], np.int32))):
            inits.append(numpy_helper.from_array(value, key))
        nodes += [
            helper.make_node("DequantizeLinear", [current, f"{n}_sx", f"{n}_zx"], [f"{n}_x"]),
            helper.make_node("DequantizeLinear", [f"{n}_w", f"{n}_sw", f"{n}_zw"], [f"{n}_wf"],
                             axis=0),
            helper.make_node("DequantizeLinear", [f"{n}_b", f"{n}_sb", f"{n}_zb"], [f"{n}_bf"],
                             axis=0),
        ]
        if layer["kind"] == "conv":
            nodes.append(helper.make_node("Conv", [f"{n}_x", f"{n}_wf", f"{n}_bf"], [f"{n}_a"],
                                          pads=[1, 1, 1, 1], group=layer["groups"]))
        else:
            nodes.append(helper.make_node("Gemm", [f"{n}_x", f"{n}_wf", f"{n}_bf"], [f"{n}_a"],
                                          transB=1))
        out = f"{n}_a"
        if layer["relu"]:
            nodes.append(helper.make_node("Relu", [out], [f"{n}_r"]))
            out = f"{n}_r"
        nodes.append(helper.make_node("QuantizeLinear", [out, f"{n}_sy", f"{n}_zy"],
                                      [f"{n}_q"]))
        current = f"{n}_q"
        if n == "c2":  # MaxPool then Flatten on the dequantized values, requantized alike
            nodes += [
                helper.make_node("DequantizeLinear", [current, "c2_sy", "c2_zy"], ["p_in"]),
                helper.make_node("MaxPool", ["p_in"], ["p_out"], kernel_shape=[2, 2],
                                 strides=[2, 2]),
                helper.make_node("Flatten", ["p_out"], ["f_out"]),
                helper.make_node("QuantizeLinear", ["f_out", "c2_sy", "c2_zy"], ["f_q"]),
            ]
            current = "f_q"
    graph = helper.make_graph(
        nodes, "qdq_cnn", [helper.make_tensor_value_info("x_q", TensorProto.INT8,
                                                         ["N", 2, 8, 8])],
        [helper.make_tensor_value_info(current, TensorProto.INT8, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), layers


def requant_layer(acc: np.ndarray, layer: dict, shape: tuple[int, ...]) -> np.ndarray:
    multiplier = (np.float32(layer["sx"]) * layer["sw"].astype(np.float64)
                  / np.float64(np.float32(layer["sy"])))
    m0, shift = fixed_point_multiplier(multiplier)
    low = layer["zy"] if layer["relu"] else -128
    return requantize_reference(acc, m0.reshape(shape), shift.reshape(shape), layer["zy"], low)


def cnn_reference(x_q: np.ndarray, layers: list[dict]) -> np.ndarray:
    h = x_q
    for layer in layers[:2]:
        acc = conv_int64(h.astype(np.int64) - layer["zx"], layer["w_q"].astype(np.int64),
                         [1, 1, 1, 1], [1, 1], layer["groups"])
        h = requant_layer(acc + layer["b_q"][None, :, None, None], layer, (1, -1, 1, 1))
    n, c, hh, ww = h.shape
    h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5)).reshape(n, -1)  # int8 max
    fc = layers[2]
    acc = (h.astype(np.int64) - fc["zx"]) @ fc["w_q"].astype(np.int64).T + fc["b_q"]
    return requant_layer(acc, fc, (1, -1))


def test_small_cnn_is_bit_exact(build) -> None:
    model, layers = qdq_cnn()
    _, session = build(lepton_edge.load(model))
    meta = session.manifest["subgraphs"][0]["builds"][0]["meta"]
    assert [k.split(" ")[0] for k in meta["int8_kernels"]] == ["conv2d", "conv2d", "matmul"]
    x_q = rng.integers(-128, 128, (3, 2, 8, 8)).astype(np.int8)
    got = session.run({"x_q": x_q})[model.graph.output[0].name]
    np.testing.assert_array_equal(got, cnn_reference(x_q, layers))
    assert np.abs(got.astype(int) - ort_spec(model, x_q).astype(int)).max() <= 1


def test_activation_by_activation_matmul_is_bit_exact(build) -> None:
    """Attention-style a @ b with both operands int8 activations (two zero points)."""
    sa, za, sb, zb, sy, zy = 0.03, 5, 0.02, -9, 0.4, -3
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in (
        ("sa", sa, np.float32), ("za", za, np.int8), ("sb", sb, np.float32),
        ("zb", zb, np.int8), ("sy", sy, np.float32), ("zy", zy, np.int8))]
    nodes = [helper.make_node("DequantizeLinear", ["a_q", "sa", "za"], ["a"]),
             helper.make_node("DequantizeLinear", ["b_q", "sb", "zb"], ["b"]),
             helper.make_node("MatMul", ["a", "b"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["y_q"])]
    graph = helper.make_graph(
        nodes, "qdq_aa", [helper.make_tensor_value_info("a_q", TensorProto.INT8, ["N", 4, 12]),
                          helper.make_tensor_value_info("b_q", TensorProto.INT8, ["N", 12, 5])],
        [helper.make_tensor_value_info("y_q", TensorProto.INT8, ["N", 4, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, session = build(lepton_edge.load(model))
    kernels = session.manifest["subgraphs"][0]["builds"][0]["meta"]["int8_kernels"]
    assert kernels == ["matmul -> int8 x int8 -> int32 (activation x activation)"]
    a_q = rng.integers(-128, 128, (3, 4, 12)).astype(np.int8)
    b_q = rng.integers(-128, 128, (3, 12, 5)).astype(np.int8)
    acc = (a_q.astype(np.int64) - za) @ (b_q.astype(np.int64) - zb)
    m0, shift = fixed_point_multiplier(np.float64(np.float32(sa)) * np.float64(np.float32(sb))
                                       / np.float64(np.float32(sy)))
    want = requantize_reference(acc, m0, shift, zy)
    got = session.run({"a_q": a_q, "b_q": b_q})["y_q"]
    np.testing.assert_array_equal(got, want)


def test_float_output_matmul_runs_in_integers(build) -> None:
    """DQ -> MatMul with no QuantizeLinear after it: int32 accumulation, one float scale."""
    model, _ = qdq_model("matmul")
    graph = model.graph
    quant = [n for n in graph.node if n.op_type == "QuantizeLinear"][0]
    graph.node.remove(quant)
    graph.output.pop()
    graph.output.append(helper.make_tensor_value_info("acc", TensorProto.FLOAT, ["N", 10]))
    _, session = build(lepton_edge.load(model))
    kernels = session.manifest["subgraphs"][0]["builds"][0]["meta"]["int8_kernels"]
    assert kernels == ["matmul -> int8 x int8 -> int32"]
    x_q = rng.integers(-128, 128, (4, 24)).astype(np.int8)
    got = session.run({"x_q": x_q})["acc"]
    want = ort_spec(model, x_q)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_requantized_data_movement_is_integer_and_exact(build) -> None:
    """Q(Transpose(DQ(x))) and Q(Reshape(DQ(.))) with the same scale and zero point are int8
    data movement (no float); a Q with another scale stays float (reported)."""
    s, z = 0.037, -4
    inits = [numpy_helper.from_array(np.array(s, np.float32), "s"),
             numpy_helper.from_array(np.array(z, np.int8), "z"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s2"),
             numpy_helper.from_array(np.array([-1, 12], np.int64), "shape")]
    nodes = [helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x"]),
             helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("QuantizeLinear", ["t", "s", "z"], ["t_q"]),
             helper.make_node("DequantizeLinear", ["t_q", "s", "z"], ["t_f"]),
             helper.make_node("Reshape", ["t_f", "shape"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["y_q"]),
             helper.make_node("QuantizeLinear", ["r", "s2", "z"], ["y2_q"])]
    graph = helper.make_graph(
        nodes, "qdq_move", [helper.make_tensor_value_info("x_q", TensorProto.INT8, [2, 3, 4])],
        [helper.make_tensor_value_info("y_q", TensorProto.INT8, [2, 12]),
         helper.make_tensor_value_info("y2_q", TensorProto.INT8, [2, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from tvm.relax.frontend.onnx import from_onnx

    _, report = lower_qdq_to_integer(from_onnx(model, keep_params_in_input=False))
    assert len(report.kept_float) == 1 and "reshape" in report.kept_float[0], report
    _, session = build(lepton_edge.load(model))
    x_q = rng.integers(-128, 128, (2, 3, 4)).astype(np.int8)
    got = session.run({"x_q": x_q})
    np.testing.assert_array_equal(got["y_q"], x_q.transpose(0, 2, 1).reshape(2, 12))
    want_float_path = reference_session(model).run(["y2_q"], {"x_q": x_q})[0]
    np.testing.assert_array_equal(got["y2_q"], want_float_path)



def test_requantized_max_pool_runs_on_int8(build) -> None:
    """Q(MaxPool(DQ(x))) with the same scale and zero point (ResNet's stem pool: 3x3, stride
    2, padded) pools the int8 values themselves: no float pass, bit-exact (the int8 pad,
    -128, never wins over a value, as -inf does not in float)."""
    s, z = 0.021, -3
    inits = [numpy_helper.from_array(np.array(s, np.float32), "s"),
             numpy_helper.from_array(np.array(z, np.int8), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x"]),
             helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1]),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["y_q"])]
    graph = helper.make_graph(
        nodes, "qdq_pool", [helper.make_tensor_value_info("x_q", TensorProto.INT8,
                                                          ["N", 3, 9, 8])],
        [helper.make_tensor_value_info("y_q", TensorProto.INT8, ["N", 3, 5, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from tvm.relax.frontend.onnx import from_onnx

    lowered, report = lower_qdq_to_integer(from_onnx(model, keep_params_in_input=False))
    assert report.kept_float == [], report
    text = lowered.script()
    assert "R.nn.max_pool2d" in text and "float32" not in text
    _, session = build(lepton_edge.load(model))
    assert [p.target for p in session.placement.values()] == ["cpu"]
    x_q = rng.integers(-128, 128, (2, 3, 9, 8)).astype(np.int8)
    x_q[0, 0] = -128  # a plane of the minimum: its pooled output is -128, as in float
    x_q[1, :, 0, :] = -128
    got = session.run({"x_q": x_q})["y_q"]
    padded = np.pad(x_q.astype(np.int64), [(0, 0), (0, 0), (1, 1), (1, 1)],
                    constant_values=-1000)
    want = np.stack([[padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(2, 3))
                      for j in range(4)] for i in range(5)]).transpose(2, 3, 0, 1)
    np.testing.assert_array_equal(got, want.astype(np.int8))
    np.testing.assert_array_equal(got, reference_session(model).run(["y_q"], {"x_q": x_q})[0])


def mobilenet_block() -> tuple[onnx.ModelProto, list[dict]]:
    """int8 in [N, 288, 12, 12] -> [1x1 288->16] -> [1x1 16->32 +Relu] -> [3x3 depthwise
    +Relu] -> [1x1 32->16] -> Add(first layer's output) -> int8 out, each bracket DQ -> Conv
    (+bias) -> Q. Relu layers quantize with zero point -128 (as calibrated ReLU6 outputs do),
    the others with odd zero points; the first layer's reduction is long (288 channels,
    weights +-127), past the exact float64 product. 12-wide rows: 8-lane vectors and tails."""
    specs = [  # name, in, out, groups, kernel, relu, in scale/zp, out scale/zp
        ("l0", 288, 16, 1, 1, False, 0.02, -5, 0.15, 3),
        ("l1", 16, 32, 1, 1, True, 0.15, 3, 0.9, -128),
        ("l2", 32, 32, 32, 3, True, 0.9, -128, 0.5, -128),
        ("l3", 32, 16, 1, 1, False, 0.5, -128, 1.5, 5),
    ]
    nodes, inits, layers = [], [], []
    current = "x_q"
    for name, cin, cout, groups, k, relu, sx, zx, sy, zy in specs:
        w_q = rng.integers(-127, 128, (cout, cin // groups, k, k)).astype(np.int8)
        if name == "l0":
            w_q = np.where(rng.random(w_q.shape) < 0.5, -127, 127).astype(np.int8)
        layer = dict(name=name, groups=groups, k=k, relu=relu, sx=sx, zx=zx, sy=sy, zy=zy,
                     w_q=w_q, sw=rng.uniform(0.002, 0.006, cout).astype(np.float32),
                     b_q=rng.integers(-3000, 3000, cout).astype(np.int32))
        layers.append(layer)
        for key, value in ((f"{name}_sx", np.array(sx, np.float32)),
                           (f"{name}_zx", np.array(zx, np.int8)),
                           (f"{name}_sy", np.array(sy, np.float32)),
                           (f"{name}_zy", np.array(zy, np.int8)),
                           (f"{name}_w", w_q), (f"{name}_sw", layer["sw"]),
                           (f"{name}_zw", np.zeros(cout, np.int8)), (f"{name}_b", layer["b_q"]),
                           (f"{name}_sb", (np.float32(sx) * layer["sw"]).astype(np.float32)),
                           (f"{name}_zb", np.zeros(cout, np.int32))):
            inits.append(numpy_helper.from_array(value, key))
        nodes += [
            helper.make_node("DequantizeLinear", [current, f"{name}_sx", f"{name}_zx"],
                             [f"{name}_x"]),
            helper.make_node("DequantizeLinear", [f"{name}_w", f"{name}_sw", f"{name}_zw"],
                             [f"{name}_wf"], axis=0),
            helper.make_node("DequantizeLinear", [f"{name}_b", f"{name}_sb", f"{name}_zb"],
                             [f"{name}_bf"], axis=0),
            helper.make_node("Conv", [f"{name}_x", f"{name}_wf", f"{name}_bf"], [f"{name}_a"],
                             pads=[k // 2] * 4, group=groups),
        ]
        out = f"{name}_a"
        if relu:
            nodes.append(helper.make_node("Relu", [out], [f"{name}_r"]))
            out = f"{name}_r"
        nodes.append(helper.make_node("QuantizeLinear", [out, f"{name}_sy", f"{name}_zy"],
                                      [f"{name}_q"]))
        current = f"{name}_q"
    inits += [numpy_helper.from_array(np.array(1.25, np.float32), "sum_s"),
              numpy_helper.from_array(np.array(-2, np.int8), "sum_z")]
    nodes += [helper.make_node("DequantizeLinear", ["l0_q", "l0_sy", "l0_zy"], ["skip"]),
              helper.make_node("DequantizeLinear", ["l3_q", "l3_sy", "l3_zy"], ["proj"]),
              helper.make_node("Add", ["proj", "skip"], ["sum"]),
              helper.make_node("QuantizeLinear", ["sum", "sum_s", "sum_z"], ["y_q"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.INT8, ["N", c, 12, 12])
               for n, c in (("l0_q", 16), ("l3_q", 16), ("y_q", 16))]
    graph = helper.make_graph(
        nodes, "qdq_mobilenet_block",
        [helper.make_tensor_value_info("x_q", TensorProto.INT8, ["N", 288, 12, 12])],
        outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), layers


def test_mobilenet_block_is_bit_exact(build) -> None:
    """A MobileNetV2-shaped int8 block on the x86 build: every conv runs the float64
    requantization with the zero point added before rounding (the first one past the exact
    product: the tie-free rule), bit-exact against numpy integer math; the residual Add
    (float, as the ONNX graph says) and the whole block within one step of onnxruntime with
    graph optimizations off, equal nearly everywhere."""
    from tvm.relax.frontend.onnx import from_onnx

    from lepton_edge.lowering.int8 import float_requantize_ok

    model, layers = mobilenet_block()
    lowered, report = lower_qdq_to_integer(from_onnx(model, keep_params_in_input=False),
                                           float_requantize=True)
    text = lowered.script(show_meta=False)
    assert len(report.lowered) == 4 and len(report.kept_float) == 1, report  # the Add
    # every conv the float64 form (l1 and l2 share one function), each with its zero point
    # added in float64, none the integer form (its 64-bit product)
    assert text.count("def requantize") == text.count("llvm.lrint") == 3
    assert text.count("+ T.float64(") == 3 and 'T.Cast("int64"' not in text
    x_q = rng.integers(-128, 128, (2, 288, 12, 12)).astype(np.int8)
    x_q[0, :, 0, :] = np.where(layers[0]["w_q"][0, :, 0, 0] > 0, 127, -128)[:, None]
    bound = 255 * np.abs(layers[0]["w_q"].astype(np.int64)).reshape(16, -1).sum(axis=1)
    m0, shift = fixed_point_multiplier(np.float32(0.02) * layers[0]["sw"].astype(np.float64)
                                       / np.float64(np.float32(0.15)))
    assert not float_requantize_ok(bound, m0, shift)  # only by the tie-free rule
    _, session = build(lepton_edge.load(model))
    got = session.run({"x_q": x_q})
    h = x_q
    for layer in layers:
        pad = [layer["k"] // 2] * 4
        acc = conv_int64(h.astype(np.int64) - layer["zx"], layer["w_q"].astype(np.int64), pad,
                         [1, 1], layer["groups"]) + layer["b_q"][None, :, None, None]
        h = requant_layer(acc, layer, (1, -1, 1, 1))
        if layer["name"] == "l0":
            assert np.abs(acc).max() > 2**22  # far past 2^53 / odd(m0)
            np.testing.assert_array_equal(got["l0_q"], h)
            assert 0.02 < np.mean(np.abs(h.astype(int)) == 127 + (h < 0)) < 0.5  # some clip
    np.testing.assert_array_equal(got["l3_q"], h)
    want = reference_session(model).run(None, {"x_q": x_q})
    for name, ref in zip(("l0_q", "l3_q", "y_q"), want):
        diff = np.abs(got[name].astype(int) - ref.astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01, name
