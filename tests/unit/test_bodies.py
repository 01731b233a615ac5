"""Ops with bodies of our own (lowering/bodies.py) or rewritten before import
(lowering/onnx_fixups.py), compiled on TVM and checked exactly against onnx's reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import lepton_edge
from lepton_edge.lowering import bodies

rng = np.random.default_rng(5)
NP = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}


def _run_compiled(model: onnx.ModelProto, feeds: dict, tmp_path) -> tuple[list, dict]:
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], golden_count=0)
    session = lepton_edge.runtime.load(art.save(tmp_path / "m.lepton"))
    out = session.run(feeds)
    return [out[o.name] for o in model.graph.output], {
        k: p.device for k, p in session.placement.items()}


def _check(model: onnx.ModelProto, feeds: dict, tmp_path) -> None:
    want = ReferenceEvaluator(model).run(None, feeds)
    got, placement = _run_compiled(model, feeds, tmp_path)
    assert set(placement.values()) == {"cpu:0"}, placement  # on TVM, no fallback
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def _q(shape, elem) -> np.ndarray:
    info = np.iinfo(NP[elem])
    return rng.integers(info.min, info.max + 1, shape).astype(NP[elem])


@pytest.mark.parametrize("elem", [TensorProto.INT8, TensorProto.UINT8])
def test_qlinearconv_per_channel_with_bias(elem: int, tmp_path) -> None:
    x, w = _q((2, 3, 7, 6), elem), _q((4, 3, 3, 2), TensorProto.INT8)
    consts = [numpy_helper.from_array(v, n) for n, v in {
        "xs": np.array(0.02, np.float32), "xz": _q((), elem),
        "w": w, "ws": rng.uniform(0.003, 0.03, 4).astype(np.float32),
        "wz": np.zeros(4, np.int8), "ys": np.array(0.07, np.float32), "yz": _q((), elem),
        "b": rng.integers(-2000, 2000, 4).astype(np.int32)}.items()]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"],
                            ["y"], pads=[1, 0, 1, 1], strides=[2, 1])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", elem, x.shape)],
                              [helper.make_tensor_value_info("y", elem, [2, 4, 4, 6])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    _check(model, {"x": x}, tmp_path)


@pytest.mark.parametrize("elem", [TensorProto.INT8, TensorProto.UINT8])
def test_qlinearmatmul_runtime_operands(elem: int, tmp_path) -> None:
    """Both operands are runtime inputs (an activation x activation product)."""
    a, b = _q((3, 5, 8), elem), _q((8, 6), elem)
    consts = [numpy_helper.from_array(v, n) for n, v in {
        "as": np.array(0.05, np.float32), "az": _q((), elem),
        "bs": np.array(0.011, np.float32), "bz": _q((), elem),
        "ys": np.array(0.9, np.float32), "yz": _q((), elem)}.items()]
    node = helper.make_node("QLinearMatMul", ["a", "as", "az", "b", "bs", "bz", "ys", "yz"],
                            ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", elem, a.shape),
                                            helper.make_tensor_value_info("b", elem, b.shape)],
                              [helper.make_tensor_value_info("y", elem, [3, 5, 6])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    _check(model, {"a": a, "b": b}, tmp_path)


def test_convinteger_per_channel_weight_zero_point(tmp_path) -> None:
    x, w = _q((1, 2, 5, 5), TensorProto.UINT8), _q((3, 2, 2, 2), TensorProto.UINT8)
    consts = [numpy_helper.from_array(np.array([1, 200, 128], np.uint8), "wz"),
              numpy_helper.from_array(np.array(17, np.uint8), "xz"),
              numpy_helper.from_array(w, "w")]
    node = helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 0, 0])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.UINT8, x.shape)], [helper.make_tensor_value_info(
            "y", TensorProto.INT32, [1, 3, 5, 5])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    _check(model, {"x": x}, tmp_path)


@pytest.mark.parametrize("opset", [10, 13])
def test_round_half_even_forms_match_numpy_rint(opset: int, tmp_path) -> None:
    """The Floor-based form used before opset 11 and Round agree with np.rint on ties."""
    y = np.array([-3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.49999999999, 2.5000000001,
                  -3.7, 4.2, 1e12 + 0.5, -(2.0**40) - 0.5, 0.0], np.float64)
    builder = bodies._Builder(helper.make_node("Identity", ["y"], ["r"]))
    out = builder.round_half_even("y", opset)
    graph = helper.make_graph(builder.nodes, "g", [helper.make_tensor_value_info(
        "y", TensorProto.DOUBLE, [len(y)])], [helper.make_tensor_value_info(
            out, TensorProto.DOUBLE, [len(y)])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    (ref,) = ReferenceEvaluator(model).run(None, {"y": y})
    np.testing.assert_array_equal(ref, np.rint(y))
    (got,), _ = _run_compiled(model, {"y": y}, tmp_path)
    np.testing.assert_array_equal(got, np.rint(y))


def test_unknown_types_give_no_body() -> None:
    node = helper.make_node("QLinearConv", [f"i{k}" for k in range(8)], ["y"])
    assert bodies.body(node, 13, {}) is None  # no types: the planner keeps onnxruntime
    assert bodies.body(helper.make_node("Relu", ["x"], ["y"]), 13, {}) is None


def _single(op: str, inputs: list, out_elem: int, out_shape, opset: int, **attrs):
    node = helper.make_node(op, [name for name, _, _ in inputs], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, e, s)
                                            for n, e, s in inputs],
                              [helper.make_tensor_value_info("y", out_elem, out_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization_with_a_zero_slice(p: int, tmp_path) -> None:
    x = rng.standard_normal((3, 4)).astype(np.float32)
    x[1] = 0
    model = _single("LpNormalization", [("x", TensorProto.FLOAT, [3, 4])], TensorProto.FLOAT,
                    [3, 4], 22, axis=1, p=p)
    (got,), placement = _run_compiled(model, {"x": x}, tmp_path)
    assert set(placement.values()) == {"cpu:0"}
    norm = np.linalg.norm(x.astype(np.float64), ord=p, axis=1, keepdims=True)
    want = np.where(norm == 0, 0, x / np.where(norm == 0, 1, norm))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert not np.isnan(got).any()


def test_eyelike_with_a_dtype_attribute(tmp_path) -> None:
    model = _single("EyeLike", [("x", TensorProto.INT32, [3, 5])], TensorProto.DOUBLE, [3, 5],
                    22, dtype=TensorProto.DOUBLE, k=1)
    _check(model, {"x": np.zeros((3, 5), np.int32)}, tmp_path)


@pytest.mark.parametrize("base, exp", [(TensorProto.FLOAT, TensorProto.INT64),
                                       (TensorProto.INT32, TensorProto.FLOAT),
                                       (TensorProto.INT32, TensorProto.INT32)])
def test_pow_with_mixed_or_integer_types(base: int, exp: int, tmp_path) -> None:
    model = _single("Pow", [("x", base, [6]), ("e", exp, [6])], base, [6], 15)
    x = np.array([1, 2, 3, -2, 5, 7]).astype(helper.tensor_dtype_to_np_dtype(base))
    e = np.array([0, 3, 2, 3, 1.5 if exp == TensorProto.FLOAT else 4, 2]).astype(
        helper.tensor_dtype_to_np_dtype(exp))
    _check(model, {"x": x, "e": e}, tmp_path)


def test_rms_normalization_over_every_axis(tmp_path) -> None:
    model = _single("RMSNormalization", [("x", TensorProto.FLOAT, [2, 3]),
                                         ("s", TensorProto.FLOAT, [2, 3])],
                    TensorProto.FLOAT, [2, 3], 23, axis=0)
    x, s = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 3)).astype(
        np.float32)
    (got,), placement = _run_compiled(model, {"x": x, "s": s}, tmp_path)
    assert set(placement.values()) == {"cpu:0"}
    (want,) = ReferenceEvaluator(model).run(None, {"x": x, "s": s})
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_inference_dropout_mask_is_bool_and_all_true(tmp_path) -> None:
    node = helper.make_node("Dropout", ["x", "r"], ["y", "m"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [3, 4]),
                                            helper.make_tensor_value_info("r", TensorProto.FLOAT,
                                                                          [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4]),
                               helper.make_tensor_value_info("m", TensorProto.BOOL, [3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    x[0, 0] = np.nan
    (y, m), placement = _run_compiled(model, {"x": x, "r": np.array(0.5, np.float32)}, tmp_path)
    assert set(placement.values()) == {"cpu:0"}
    np.testing.assert_array_equal(y, x)
    assert m.dtype == np.bool_ and m.all()


def _check_close(model: onnx.ModelProto, feeds: dict, tmp_path, rtol: float = 1e-5) -> None:
    """Compiled on TVM, against onnxruntime (float results: to a tolerance)."""
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    got, placement = _run_compiled(model, feeds, tmp_path)
    assert set(placement.values()) == {"cpu:0"}, placement  # on TVM, no fallback
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6)


def _recurrent_model(op: str, hidden: int, x_shape: list[int], dirs: int, extra: dict,
                     outputs: int, **attrs) -> tuple[onnx.ModelProto, dict]:
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    size = x_shape[-1]
    values = {"x": rng.standard_normal(x_shape).astype(np.float32),
              "w": rng.standard_normal((dirs, gates * hidden, size)).astype(np.float32) * 0.5,
              "r": rng.standard_normal((dirs, gates * hidden, hidden)).astype(np.float32) * 0.5,
              **extra}
    order = ["x", "w", "r", "b", "lens", "h0", "c0", "p"]
    names = [n if n in values else "" for n in order]
    while not names[-1]:
        names.pop()
    node = helper.make_node(op, names, ["y", "y_h", "y_c"][:outputs], hidden_size=hidden,
                            **attrs)
    inputs = [helper.make_tensor_value_info(
        n, TensorProto.INT32 if n == "lens" else TensorProto.FLOAT, values[n].shape)
        for n in names if n]
    steps, batch = x_shape[:2] if not attrs.get("layout") else x_shape[1::-1]
    y = [steps, dirs, batch, hidden] if not attrs.get("layout") else [batch, steps, dirs, hidden]
    state = [dirs, batch, hidden] if not attrs.get("layout") else [batch, dirs, hidden]
    graph = helper.make_graph([node], "g", inputs, [
        helper.make_tensor_value_info(o, TensorProto.FLOAT, y if o == "y" else state)
        for o in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, {n: values[n] for n in names if n}


def test_gru_linear_before_reset_clip_and_initial_state(tmp_path) -> None:
    dirs, hidden = 1, 4
    model, feeds = _recurrent_model(
        "GRU", hidden, [2, 2, 3], dirs, {
            "b": rng.standard_normal((dirs, 6 * hidden)).astype(np.float32),
            "h0": rng.standard_normal((dirs, 2, hidden)).astype(np.float32)},
        2, direction="reverse", linear_before_reset=1, clip=1.5)
    _check_close(model, feeds, tmp_path)


def test_lstm_peepholes_and_sequence_lengths(tmp_path) -> None:
    hidden = 3
    model, feeds = _recurrent_model(
        "LSTM", hidden, [3, 3, 2], 1, {
            "b": rng.standard_normal((1, 8 * hidden)).astype(np.float32),
            "lens": np.array([3, 1, 2], np.int32),
            "h0": rng.standard_normal((1, 3, hidden)).astype(np.float32),
            "c0": rng.standard_normal((1, 3, hidden)).astype(np.float32),
            "p": rng.standard_normal((1, 3 * hidden)).astype(np.float32)}, 3)
    _check_close(model, feeds, tmp_path)


def test_rnn_batch_first_bidirectional(tmp_path) -> None:
    # onnxruntime has no batch-first (layout=1) recurrent ops: against onnx's reference
    model, feeds = _recurrent_model("RNN", 5, [2, 3, 3], 2, {}, 2,
                                    direction="bidirectional", layout=1)
    want = ReferenceEvaluator(model).run(None, feeds)
    got, placement = _run_compiled(model, feeds, tmp_path)
    assert set(placement.values()) == {"cpu:0"}, placement
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_recurrent_ops_without_a_body_stay_off_tvm() -> None:
    """Variable lengths in reverse, activation parameters: no body (onnxruntime runs them)."""
    types = {n: helper.make_tensor_type_proto(TensorProto.FLOAT, s)
             for n, s in {"x": [3, 2, 4], "w": [1, 4, 4], "r": [1, 4, 4]}.items()}
    types["lens"] = helper.make_tensor_type_proto(TensorProto.INT32, [2])
    reverse = helper.make_node("RNN", ["x", "w", "r", "", "lens"], ["y"], hidden_size=4,
                               direction="reverse")
    assert bodies.body(reverse, 14, types) is None
    scaled = helper.make_node("RNN", ["x", "w", "r"], ["y"], hidden_size=4,
                              activations=["LeakyRelu"], activation_alpha=[0.3])
    assert bodies.body(scaled, 14, types) is None
    plain = helper.make_node("RNN", ["x", "w", "r"], ["y"], hidden_size=4)
    assert bodies.body(plain, 14, types) is not None


def test_batchnorm_training_mode_statistics(tmp_path) -> None:
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    stats = {n: rng.uniform(0.5, 1.5, 3).astype(np.float32) for n in ("s", "b", "m", "v")}
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"],
                            ["y", "rm", "rv"], training_mode=1, momentum=0.7, epsilon=1e-3)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)] + [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in stats],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, x.shape if o == "y" else [3])
         for o in node.output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    feeds = {"x": x, **stats}
    want = ReferenceEvaluator(model).run(None, feeds)
    got, placement = _run_compiled(model, feeds, tmp_path)
    assert set(placement.values()) == {"cpu:0"}, placement
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flags", [(1, 0), (0, 1), (0, 0)])
def test_isinf_detect_flags(flags: tuple[int, int], tmp_path) -> None:
    pos, neg = flags
    x = np.array([np.inf, -np.inf, 0.0, np.nan, 3.0, -np.inf], np.float32)
    node = helper.make_node("IsInf", ["x"], ["y"], detect_positive=pos, detect_negative=neg)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [6])], [helper.make_tensor_value_info("y", TensorProto.BOOL,
                                                                        [6])])
    _check(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), {"x": x},
           tmp_path)


def test_expanding_a_revised_op_needs_its_input_types() -> None:
    """Celu-28's body is inlined with its inputs' types; unknown types are a reason, not a
    KeyError at planning time."""
    from onnx import helper as oh

    from lepton_edge.lowering.bodies import expand_revised

    node = oh.make_node("Celu", ["x"], ["y"], name="celu")
    assert expand_revised(node, 28, {}) == (None, "Celu: the types of its inputs are not known")
    nodes, why = expand_revised(node, 28, {"x": oh.make_tensor_type_proto(1, [2, 3])})
    assert why == "" and nodes and all(n.op_type != "Celu" for n in nodes)
