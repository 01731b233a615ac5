"""lowering/relax.fold_constant_calls: calls over constants evaluated with numpy at import, so
TVM's FoldConstant (one compiled kernel per call) has nothing left to do on common graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import lepton_edge
from lepton_edge import runtime
from lepton_edge.lowering import relax as lowering


def _gemm_gather_model() -> onnx.ModelProto:
    """Gemm with a constant transposed weight, then Gathers with scalar constant indices
    (what torch's BERT export makes): permute_dims, shape_to_tensor, take and the negative-
    index checks are all computed over constants."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((12, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "b")
    shape = numpy_helper.from_array(np.array([4, 3, 4], np.int64), "shape")
    idx = [numpy_helper.from_array(np.array(i, np.int64), f"i{i}") for i in (0, 1, -1)]
    nodes = [h.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1),
             h.make_node("Reshape", ["y", "shape"], ["r"])]
    nodes += [h.make_node("Gather", ["r", f"i{i}"], [f"g{i}"], axis=1) for i in (0, 1, -1)]
    nodes.append(h.make_node("Sum", ["g0", "g1", "g-1"], ["out"]))
    graph = h.make_graph(nodes, "fold", [h.make_tensor_value_info("x", T.FLOAT, [4, 8])],
                         [h.make_tensor_value_info("out", T.FLOAT, [4, 4])],
                         initializer=[w, b, shape, *idx])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def test_constant_calls_are_folded_at_import_and_results_match_onnxruntime(tmp_path):
    model = _gemm_gather_model()
    mod = lowering.import_onnx(model)
    script = mod.script()
    assert "permute_dims" not in script and "shape_to_tensor" not in script
    assert not lowering._has_constant_call(mod)  # noqa: SLF001 - FoldConstant is skipped

    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], golden_count=0)
    art.save(tmp_path / "m.lepton")
    session = runtime.load(tmp_path / "m.lepton")
    assert [p.target for p in session.placement.values()] == ["cpu"]
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    got = session.run({"x": x})["out"]
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_and_out_of_range_indices_are_left_to_tvm():
    folds = lowering._numpy_folds()  # noqa: SLF001
    assert folds["relax.add"]([np.array(1, np.int64), np.array(2, np.int32)], None) is None
    take_attrs = type("A", (), {"axis": 0})()
    assert folds["relax.take"]([np.arange(3), np.array([3])], take_attrs) is None
    assert folds["relax.take"]([np.arange(3), np.array([-1])], take_attrs) is None
    np.testing.assert_array_equal(folds["relax.take"]([np.arange(3), np.array([2])],
                                                      take_attrs), [2])
    out = folds["relax.less"]([np.array([1, 5], np.int64), np.array([3, 3], np.int64)], None)
    assert out.dtype == np.bool_ and out.tolist() == [True, False]
