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
