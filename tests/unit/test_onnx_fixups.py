"""lowering/onnx_fixups.py: each rewrite checked against onnx's reference / onnxruntime.

Every test builds a small ONNX graph, imports it through `relax.import_onnx` (which applies
the fixups), compiles it with TVM for the host, and compares TVM's output with onnx's
reference evaluator (or float64 numpy) on the same inputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from lepton_edge.errors import TargetError
from lepton_edge.lowering import onnx_fixups
from lepton_edge.lowering import relax as lowering


def _model(nodes, inputs, outputs, opset=17, inits=()):
    graph = h.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


def _run_tvm(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    executable = tvm.compile(lowering.import_onnx(model), target="llvm")
    vm = relax.VirtualMachine(executable, tvm.cpu())
    names = [i.name for i in model.graph.input]
    out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names])
    outs = [out] if hasattr(out, "numpy") else list(out)
    return [o.numpy() for o in outs]


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]


def _vi(name, elem, shape):
    return h.make_tensor_value_info(name, elem, shape)


def test_constant_value_forms_import_and_compute():
    nodes = [h.make_node("Constant", [], ["c"], value_floats=[1.5, -2.0, 3.0]),
             h.make_node("Constant", [], ["k"], value_int=2),
             h.make_node("Cast", ["k"], ["kf"], to=T.FLOAT),
             h.make_node("Mul", ["x", "c"], ["m"]), h.make_node("Add", ["m", "kf"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 3])], [_vi("y", T.FLOAT, [2, 3])])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(_run_tvm(model, {"x": x})[0], _reference(model, {"x": x})[0])


def test_shape_arithmetic_folds_but_graph_inputs_stay_inputs():
    # Reshape(x, [Shape(x)[0] * Shape(x)[1], -1]): the usual exporter pattern
    nodes = [h.make_node("Shape", ["x"], ["s"]),
             h.make_node("Gather", ["s", "i0"], ["d0"], axis=0),
             h.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             h.make_node("Mul", ["d0", "d1"], ["d01"]),
             h.make_node("Concat", ["d01", "minus1"], ["shape"], axis=0),
             h.make_node("Reshape", ["x", "shape"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([1], np.int64), "i1"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1")]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 3, 4])], [_vi("y", T.FLOAT, [6, 4])],
                   inits=inits)
    fixed = onnx_fixups.apply(model)
    assert [n.op_type for n in fixed.graph.node] == ["Reshape"]
    assert [i.name for i in fixed.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_array_equal(_run_tvm(model, {"x": x})[0], x.reshape(6, 4))


def test_runtime_shape_input_is_not_frozen():
    nodes = [h.make_node("Reshape", ["x", "shape"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 3]), _vi("shape", T.INT64, [2])],
                   [_vi("y", T.FLOAT, None)])
    fixed = onnx_fixups.apply(model)
    assert "shape" in [i.name for i in fixed.graph.input]
    assert "shape" not in [t.name for t in fixed.graph.initializer]


def test_quantized_weights_are_not_folded_to_float():
    # DequantizeLinear(int8 weight) must reach lowering/int8.py, not become a float constant
    nodes = [h.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"]),
             h.make_node("MatMul", ["x", "wf"], ["y"])]
    inits = [numpy_helper.from_array(np.arange(6, dtype=np.int8).reshape(3, 2), "w"),
             numpy_helper.from_array(np.array(0.5, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z")]
    model = _model(nodes, [_vi("x", T.FLOAT, [1, 3])], [_vi("y", T.FLOAT, [1, 2])],
                   inits=inits)
    assert [n.op_type for n in onnx_fixups.apply(model).graph.node] == [
        "DequantizeLinear", "MatMul"]


def test_expand_with_a_runtime_shape_tensor_computes_numpy_broadcasting():
    # a shape tensor given at run time: lowering/dynamic_ops.py converts it
    nodes = [h.make_node("Expand", ["x", "shape"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [3, 1]), _vi("shape", T.INT64, [3])],
                   [_vi("y", T.FLOAT, [None, None, None])])
    x = np.arange(3, dtype=np.float32).reshape(3, 1)
    for shape in ([2, 1, 4], [1, 3, 1], [2, 3, 0]):
        feeds = {"x": x, "shape": np.array(shape, np.int64)}
        np.testing.assert_array_equal(_run_tvm(model, feeds)[0], _reference(model, feeds)[0])
    with pytest.raises(Exception, match="does not broadcast"):  # noqa: B017 - a TVM error
        _run_tvm(model, {"x": x, "shape": np.array([1, 2, 4], np.int64)})


def test_expand_with_a_shape_value_from_shape_ops_is_refused_with_a_reason():
    # Shape(z) reaches TVM's importer as a shape value, which TVM 0.27 expands wrongly
    nodes = [h.make_node("Shape", ["z"], ["shape"]), h.make_node("Expand", ["x", "shape"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [3, 1]), _vi("z", T.FLOAT, ["N", 3, 4])],
                   [_vi("y", T.FLOAT, ["N", 3, 4])])
    with pytest.raises(TargetError, match="takes its shape at run time"):
        lowering.import_onnx(model)


def test_swish_and_celu_are_expanded_into_their_function_body():
    # neither op has a TVM converter; both have an ONNX function body
    nodes = [h.make_node("Celu", ["x"], ["c"], alpha=0.7), h.make_node("Swish", ["c"], ["y"])]
    model = _model(nodes, [_vi("x", T.FLOAT, [4, 5])], [_vi("y", T.FLOAT, [4, 5])], opset=25)
    assert not {"Celu", "Swish"} & {n.op_type for n in onnx_fixups.apply(model).graph.node}
    x = np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32) * 3
    np.testing.assert_allclose(_run_tvm(model, {"x": x})[0], _reference(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-6)


def test_layer_normalization_mean_and_inv_std_dev_outputs():
    nodes = [h.make_node("LayerNormalization", ["x", "s", "b"], ["y", "mean", "inv"], axis=1)]
    inits = [numpy_helper.from_array(np.linspace(0.5, 2, 6, dtype=np.float32).reshape(2, 3),
                                     "s"),
             numpy_helper.from_array(np.full((2, 3), 0.25, np.float32), "b")]
    model = _model(nodes, [_vi("x", T.FLOAT, [4, 2, 3])],
                   [_vi("y", T.FLOAT, [4, 2, 3]), _vi("mean", T.FLOAT, [4, 1, 1]),
                    _vi("inv", T.FLOAT, [4, 1, 1])], opset=17, inits=inits)
    x = np.random.default_rng(2).standard_normal((4, 2, 3)).astype(np.float32)
    got, want = _run_tvm(model, {"x": x}), _reference(model, {"x": x})
    assert np.abs(want[1]).max() > 0.01  # the bug returned zeros here
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["Mish", "Softplus", "Tanh"])
def test_precision_for_small_and_very_negative_inputs(op):
    model = _model([h.make_node(op, ["x"], ["y"])], [_vi("x", T.FLOAT, [7])],
                   [_vi("y", T.FLOAT, [7])], opset=18)
    x = np.array([-20, -10, -3, -4.54e-5, 1e-3, 0.3, 5], np.float32)
    x64 = x.astype(np.float64)
    want = {"Softplus": np.log1p(np.exp(x64)), "Tanh": np.tanh(x64),
            "Mish": x64 * np.tanh(np.log1p(np.exp(x64)))}[op]
    np.testing.assert_allclose(_run_tvm(model, {"x": x})[0], want, rtol=1e-5, atol=0)


def test_reduce_max_of_an_all_minus_inf_row_is_minus_inf():
    nodes = [h.make_node("ReduceMax", ["x"], ["y"], axes=[1], keepdims=1),
             h.make_node("ReduceMin", ["x"], ["z"], axes=[1], keepdims=0)]
    model = _model(nodes, [_vi("x", T.FLOAT, [3, 3])],
                   [_vi("y", T.FLOAT, [3, 1]), _vi("z", T.FLOAT, [3])])
    x = np.array([[-np.inf] * 3, [1, -np.inf, 2], [np.inf] * 3], np.float32)
    for g, w in zip(_run_tvm(model, {"x": x}), _reference(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(g, w)


def test_onnx_attention_matches_the_reference():
    nodes = [h.make_node("Attention", ["q", "k", "v", "mask"], ["y"], is_causal=0)]
    shapes = {"q": [1, 2, 3, 4], "k": [1, 2, 5, 4], "v": [1, 2, 5, 4]}
    model = _model(nodes, [_vi(n, T.FLOAT, s) for n, s in shapes.items()]
                   + [_vi("mask", T.BOOL, [3, 5])], [_vi("y", T.FLOAT, [1, 2, 3, 4])],
                   opset=23)
    rng = np.random.default_rng(3)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["mask"] = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
    want = _reference(model, feeds)[0]
    got = _run_tvm(model, feeds)[0]
    assert np.isnan(got).sum() == np.isnan(want).sum()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_newer_opset_with_unchanged_ops_loads_at_max_opset():
    from lepton_edge import model as lepton_model

    model = _model([h.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [2])],
                   [_vi("y", T.FLOAT, [2])], opset=28)
    loaded = lepton_model.load(model)
    assert loaded.opset == lepton_model.MAX_OPSET


def test_newer_op_without_an_older_version_is_planned_on_onnxruntime():
    # (H1 #6: such ops now run on onnxruntime, see tests/unit/test_opsets.py)
    from lepton_edge import model as lepton_model
    from lepton_edge.plan import partition

    # (BitCast compiles since #6 revised ops, except to a type TVM cannot compute on)
    nodes = [h.make_node("BitCast", ["x"], ["y"], to=T.COMPLEX64)]
    model = _model(nodes, [_vi("x", T.INT64, [2])], [_vi("y", T.COMPLEX64, [2])], opset=26)
    loaded = lepton_model.load(model)
    assert loaded.opset == 26
    assert [sg.target for sg in partition(loaded, ["cpu"]).subgraphs] == ["onnxruntime"]


def test_float16_matmul_and_softmax_accumulate_in_float32():
    nodes = [h.make_node("MatMul", ["a", "b"], ["m"]),
             h.make_node("Softmax", ["m"], ["y"], axis=-1)]
    model = _model(nodes, [_vi("a", T.FLOAT16, [4, 64]), _vi("b", T.FLOAT16, [64, 8])],
                   [_vi("y", T.FLOAT16, [4, 8])])
    rng = np.random.default_rng(4)
    feeds = {"a": rng.standard_normal((4, 64)).astype(np.float16),
             "b": (rng.standard_normal((64, 8)) / 8).astype(np.float16)}
    m = feeds["a"].astype(np.float64) @ feeds["b"].astype(np.float64)
    e = np.exp(m - m.max(axis=-1, keepdims=True))
    want = (e / e.sum(axis=-1, keepdims=True)).astype(np.float16)
    got = _run_tvm(model, feeds)[0]
    assert got.dtype == np.float16
    # float32 accumulation: within one float16 ulp of the float64 result
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3,
                               atol=0)


def _reason(model: onnx.ModelProto) -> str | None:
    from lepton_edge import model as lepton_model
    from lepton_edge.plan import graph_view
    from lepton_edge_targets.cpu import support

    loaded = lepton_model.load(model)
    return support.unsupported_reason(loaded.proto.graph.node[0], graph_view(loaded))


def test_resize_that_shrinks_and_empty_reductions_are_kept_off_tvm():
    # both compile on TVM 0.27 and return wrong numbers (found with constant scales / axes);
    # from opset 11 lowering/dynamic_ops.py converts Resize itself, so only Resize-10 is kept
    scales = numpy_helper.from_array(np.array([1, 1, 0.6, 0.6], np.float32), "scales")
    shrink = _model([h.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear")],
                    [_vi("x", T.FLOAT, [1, 1, 5, 5])], [_vi("y", T.FLOAT, None)], opset=19,
                    inits=[scales])
    assert _reason(shrink) is None
    old = _model([h.make_node("Resize", ["x", "scales"], ["y"], mode="linear")],
                 [_vi("x", T.FLOAT, [1, 1, 5, 5])], [_vi("y", T.FLOAT, None)], opset=10,
                 inits=[scales])
    assert "shrinks an axis" in _reason(old)
    grow = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    upsample = _model([h.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear")],
                      [_vi("x", T.FLOAT, [1, 1, 5, 5])], [_vi("y", T.FLOAT, None)],
                      opset=19, inits=[grow])
    assert _reason(upsample) is None
    empty = _model([h.make_node("ReduceSum", ["x"], ["y"], keepdims=1)],
                   [_vi("x", T.FLOAT, [2, 0, 3])], [_vi("y", T.FLOAT, None)], opset=11)
    assert "empty tensor" in _reason(empty)


def test_recurrent_ops_batchnorm_training_and_isinf_flags_are_expanded():
    """Ops TVM lacks or gets wrong that get bodies of their own (lowering/bodies.py)."""
    x = _vi("x", T.FLOAT, [3, 2, 4])
    lstm = _model([h.make_node("LSTM", ["x", "w", "r"], ["y", "y_h"], hidden_size=5)],
                  [x, _vi("w", T.FLOAT, [1, 20, 4]), _vi("r", T.FLOAT, [1, 20, 5])],
                  [_vi("y", T.FLOAT, [3, 1, 2, 5]), _vi("y_h", T.FLOAT, [1, 2, 5])], opset=14)
    assert _reason(lstm) is None
    assert "LSTM" not in [n.op_type for n in onnx_fixups.apply(lstm).graph.node]
    isinf = _model([h.make_node("IsInf", ["x"], ["y"], detect_negative=0)], [x],
                   [_vi("y", T.BOOL, [3, 2, 4])], opset=20)
    assert _reason(isinf) is None
    assert onnx_fixups.wrong_on_tvm(isinf.graph.node[0]) is not None
    plain = h.make_node("IsInf", ["x"], ["y"])
    assert onnx_fixups.wrong_on_tvm(plain) is None


def test_reduce_max_with_runtime_axes_keeps_infinities_without_the_rewrite():
    # Runtime axes go to lowering/dynamic_ops.py, whose max starts from -inf: the all -inf
    # rewrite (which cannot broadcast two run-time shapes) must leave the node alone.
    nodes = [h.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=1)]
    model = _model(nodes, [_vi("x", T.FLOAT, [2, 3]), _vi("axes", T.INT64, [1])],
                   [_vi("y", T.FLOAT, [None, None])], opset=18)
    fixed = onnx_fixups.apply(model)
    assert [n.op_type for n in fixed.graph.node] == ["ReduceMax"]
    x = np.array([[-np.inf, -np.inf, -np.inf], [1.0, -2.0, 3.0]], np.float32)
    for axes in ([1], [-2], [0]):
        feeds = {"x": x, "axes": np.array(axes, np.int64)}
        np.testing.assert_array_equal(_run_tvm(model, feeds)[0], _reference(model, feeds)[0])


def test_softmax_cross_entropy_expands_through_its_nested_context_dependent_body():
    """SoftmaxCrossEntropyLoss's body calls NegativeLogLikelihoodLoss, whose own body depends
    on the input types: the planner infers them inside the outer body and keeps it on TVM."""
    node = h.make_node("SoftmaxCrossEntropyLoss", ["x", "t", "w"], ["loss", "logp"],
                       reduction="mean", ignore_index=2)
    model = _model([node], [_vi("x", T.FLOAT, [3, 5, 2]), _vi("t", T.INT64, [3, 2]),
                            _vi("w", T.FLOAT, [5])],
                   [_vi("loss", T.FLOAT, []), _vi("logp", T.FLOAT, [3, 5, 2])], opset=13)
    assert _reason(model) is None
    rng = np.random.default_rng(9)
    feeds = {"x": rng.standard_normal((3, 5, 2)).astype(np.float32),
             "t": np.array([[0, 2], [4, 1], [2, 3]], np.int64),
             "w": rng.uniform(0.5, 2, 5).astype(np.float32)}
    for got, want in zip(_run_tvm(onnx_fixups.apply(model), feeds), _reference(model, feeds),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
