"""Models outside TVM's opsets: newer ops and ai.onnx.ml run on onnxruntime, the rest compiles.

Each test builds its model here with onnx.helper, checks where the plan puts every node and
why, and compares the compiled artifact's outputs with onnxruntime on the original model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper

import lepton_edge
from lepton_edge.errors import ModelError, TargetError, UnsupportedOpsError
from lepton_edge.model import MAX_OPSET, MIN_OPSET
from lepton_edge.plan import FALLBACK
from tests.conftest import assert_close, ort_run

ML = "ai.onnx.ml"


def _model(nodes, inputs, outputs, opsets, inits=()) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(graph, opset_imports=[h.make_opsetid(d, v) for d, v in opsets])


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return h.make_tensor_value_info(name, elem, shape)


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _run(model: onnx.ModelProto, feeds, tmp_path: Path, **kw):
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], golden_count=1, **kw)
    session = lepton_edge.runtime.load(art.save(tmp_path / "m.lepton"), self_test=True)
    try:
        return art, session.run(feeds), {k: p.target for k, p in session.placement.items()}
    finally:
        session.close()


def _range_model() -> onnx.ModelProto:
    """x, limit -> Max(limit, one) [cpu] -> Range@27 on float16 [onnxruntime] -> Cast -> Relu
    [cpu]; `one` is a Constant node read by both sides (it is Range's delta). Only exact
    arithmetic on the cpu side: Range's length is sensitive to float16 rounding."""
    nodes = [
        h.make_node("Constant", [], ["one"], name="one_const",
                    value=numpy_helper.from_array(np.array(1.0, np.float16))),
        h.make_node("Max", ["limit", "one"], ["a"], name="add"),
        h.make_node("Range", ["x", "a", "one"], ["b"], name="rng"),
        h.make_node("Cast", ["b"], ["bf"], name="to_float", to=T.FLOAT),
        h.make_node("Relu", ["bf"], ["y"], name="relu"),
    ]
    return _model(nodes, [_vi("x", T.FLOAT16, []), _vi("limit", T.FLOAT16, [])],
                  [_vi("y", T.FLOAT, [None])], [("", 27)])


# ------------------------------------------------------------------------ opsets 26..newest


def test_revised_op_runs_on_onnxruntime_and_the_rest_compiles(tmp_path: Path) -> None:
    model = _range_model()
    loaded = lepton_edge.load(model)
    assert loaded.opset == 27  # onnx.version_converter cannot bring float16 Range@27 down
    plan = lepton_edge.partition(loaded, ["cpu"])
    placed = {n: sg.target for sg in plan.subgraphs for n in sg.nodes}
    assert placed["rng"] == FALLBACK
    assert placed["add"] == "cpu" and placed["relu"] == "cpu"
    # Cast is the same at opset 27 as at 25
    assert placed["to_float"] == "cpu" and "to_float" not in plan.reasons
    # Range-27 has an ONNX function body (lepton-edge expands newer ops that have one), but
    # it is a Loop, which TVM cannot take
    assert plan.reasons["rng"]["cpu"] == "Range becomes Loop, which TVM 0.27 has no converter for"
    assert "rng: cpu: Range becomes Loop" in plan.explain()
    assert "opset: 27 (onnx.version_converter cannot convert the whole model down to " \
           f"{MAX_OPSET}: revised ops it cannot bring down node by node run on onnxruntime)" \
           in plan.explain().splitlines()
    for sg in plan.subgraphs:  # compiled parts are relabelled for TVM's importer
        assert _default_opset(sg.proto) == (27 if sg.target == FALLBACK else MAX_OPSET)
        onnx.checker.check_model(sg.proto, full_check=True)
    ort_sg = next(sg for sg in plan.subgraphs if sg.target == FALLBACK)
    # the Constant made on the cpu side travels as the onnxruntime subgraph's own initializer
    assert "one" not in ort_sg.inputs and not any("one" in sg.outputs for sg in plan.subgraphs)
    assert "one" in {t.name for t in ort_sg.proto.graph.initializer}

    feeds = {"x": np.array(-2.5, np.float16), "limit": np.array(4.0, np.float16)}
    art, got, placement = _run(model, feeds, tmp_path)
    assert_close(got, ort_run(model, feeds), rel=0)
    assert got["y"].tolist() == [0.0, 0.0, 0.0, 0.5, 1.5, 2.5, 3.5]
    assert sorted(set(placement.values())) == ["cpu", FALLBACK]
    assert not any(sg["build_errors"] for sg in art.manifest["subgraphs"])


def test_revised_op_with_a_converter_of_its_own_compiles(tmp_path: Path) -> None:
    """BitShift@28 (signed types) is renamed to lepton-edge's converter when relabelled."""
    nodes = [
        h.make_node("Constant", [], ["shift"], name="shift_const",
                    value=numpy_helper.from_array(np.array([1, 2, 3], np.int32))),
        h.make_node("Add", ["x", "shift"], ["a"], name="add"),
        h.make_node("BitShift", ["a", "shift"], ["b"], name="shl", direction="LEFT"),
        h.make_node("Cast", ["b"], ["bf"], name="to_float", to=T.FLOAT),
        h.make_node("Relu", ["bf"], ["y"], name="relu"),
    ]
    model = _model(nodes, [_vi("x", T.INT32, [2, 3])], [_vi("y", T.FLOAT, [2, 3])], [("", 28)])
    loaded = lepton_edge.load(model)
    assert loaded.opset == 28
    plan = lepton_edge.partition(loaded, ["cpu"])
    assert [sg.target for sg in plan.subgraphs] == ["cpu"] and not plan.reasons
    (sg,) = plan.subgraphs
    assert _default_opset(sg.proto) == MAX_OPSET
    assert [(n.domain, n.op_type) for n in sg.proto.graph.node if n.name == "shl"] == [
        ("lepton.revised", "BitShift_28")]
    x = np.array([[1, 2, 3], [4, -5, 1 << 28]], np.int32)
    _, got, placement = _run(model, {"x": x}, tmp_path)
    want = np.maximum(((x + [1, 2, 3]).astype(np.int64) << [1, 2, 3]).astype(np.int32), 0)
    np.testing.assert_array_equal(got["y"], want.astype(np.float32))
    assert set(placement.values()) == {"cpu"}


def test_failed_build_of_a_renamed_revised_op_falls_back_to_the_model_nodes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If every build of a subgraph rewritten for TVM (BitShift@28 renamed to a private
    converter) fails, onnxruntime gets the nodes as the model has them, at opset 28."""
    from lepton_edge_targets.cpu.compile import CpuTarget

    def broken(self, subgraph, profile):
        raise TargetError("simulated TVM build failure")

    monkeypatch.setattr(CpuTarget, "compile", broken)
    model = _model([h.make_node("BitShift", ["x", "s"], ["y"], name="shr", direction="RIGHT")],
                   [_vi("x", T.INT32, [4]), _vi("s", T.INT32, [4])], [_vi("y", T.INT32, [4])],
                   [("", 28)])
    plan = lepton_edge.partition(lepton_edge.load(model), ["cpu"])
    (sg,) = plan.subgraphs
    assert sg.target == "cpu" and sg.proto.graph.node[0].op_type == "BitShift_28"
    assert sg.fallback_proto.graph.node[0].op_type == "BitShift"
    assert _default_opset(sg.fallback_proto) == 28
    with pytest.warns(UserWarning, match="simulated TVM build failure"):
        art = lepton_edge.compile(model, ["cpu"], golden_count=0)
    session = lepton_edge.runtime.load(art.save(tmp_path / "m.lepton"))
    x, s = np.array([-8, 8, -1, 7], np.int32), np.array([1, 2, 31, 0], np.int32)
    got = session.run({"x": x, "s": s})["y"]
    np.testing.assert_array_equal(got, x >> s)  # arithmetic shift, as BitShift-28 says
    assert [p.target for p in session.placement.values()] == ["onnxruntime"]


def test_revised_op_without_fallback_is_one_clear_error() -> None:
    with pytest.raises(UnsupportedOpsError) as info:
        lepton_edge.partition(lepton_edge.load(_range_model()), ["cpu"], fallback=False)
    message = str(info.value)
    assert "Range (node rng): cpu: Range becomes Loop" in message
    assert f"re-export the model at opset <= {MAX_OPSET}" in message


def test_onnxruntime_without_the_opset_fails_at_compile_time(monkeypatch) -> None:
    loaded = lepton_edge.load(_bitcast_model())
    plan = lepton_edge.partition(loaded, ["cpu"])
    assert [sg.target for sg in plan.subgraphs] == [FALLBACK]
    assert plan.reasons["cast_bits"]["cpu"] == (
        "tensor 'y' is complex64, which TVM cannot compute on")
    real = onnxruntime.InferenceSession

    def older_onnxruntime(data, *args, **kwargs):  # an onnxruntime that stops at opset 25
        proto = onnx.load_from_string(data) if isinstance(data, bytes) else onnx.load(data)
        if _default_opset(proto) > MAX_OPSET:
            raise RuntimeError("Current official support for domain ai.onnx is till opset 25.")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", older_onnxruntime)
    with pytest.raises(TargetError) as info:
        lepton_edge.compile(loaded, ["cpu"], golden_count=0)
    message = str(info.value)
    assert message.startswith("sg0 cannot run on the onnxruntime fallback: onnxruntime ")
    assert "cannot load nodes cast_bits (BitCast)" in message
    assert f"re-export the model at opset <= {MAX_OPSET}" in message
    assert "\n" not in message


def _bitcast_model() -> onnx.ModelProto:
    """BitCast-26 compiles (lowering/dynamic_ops.py), except to a type TVM cannot compute on."""
    return _model([h.make_node("BitCast", ["x"], ["y"], name="cast_bits", to=T.COMPLEX64)],
                  [_vi("x", T.INT64, [2])], [_vi("y", T.COMPLEX64, [2])], [("", 26)])


def test_missing_onnxruntime_fails_at_compile_time(monkeypatch) -> None:
    loaded = lepton_edge.load(_bitcast_model())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(TargetError) as info:
        lepton_edge.compile(loaded, ["cpu"], golden_count=0)
    message = str(info.value)
    assert "cannot run on the onnxruntime fallback: onnxruntime is not installed" in message
    assert "nodes cast_bits (BitCast) need the onnxruntime fallback: pip install onnxruntime, or " \
           f"re-export the model at opset <= {MAX_OPSET}" in message


def test_ops_unchanged_since_max_opset_are_relabelled() -> None:
    model = _model([h.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [2])],
                   [_vi("y", T.FLOAT, [2])], [("", 28)])
    loaded = lepton_edge.load(model)
    assert loaded.opset == MAX_OPSET and _default_opset(loaded.proto) == MAX_OPSET
    assert _default_opset(model) == 28  # the caller's proto is untouched
    assert loaded.opset_note == f"declared 28; every op it uses is unchanged since {MAX_OPSET}"


def test_revised_op_the_converter_handles_is_converted_down() -> None:
    # Cast was revised at opset 28; onnx.version_converter has its adapter.
    model = _model([h.make_node("Cast", ["x"], ["y"], to=T.INT32)], [_vi("x", T.FLOAT, [2])],
                   [_vi("y", T.INT32, [2])], [("", 28)])
    loaded = lepton_edge.load(model)
    assert loaded.opset == MAX_OPSET
    assert loaded.opset_note == "declared 28, converted down with onnx.version_converter"
    plan = lepton_edge.partition(loaded, ["cpu"])
    assert [sg.target for sg in plan.subgraphs] == ["cpu"] and not plan.reasons


def test_opset_beyond_onnx_is_refused() -> None:
    newest = onnx.defs.onnx_opset_version()
    model = _model([h.make_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [2])],
                   [_vi("y", T.FLOAT, [2])], [("", newest + 1)])
    with pytest.raises(ModelError, match=rf"opset {newest + 1}, too new .*knows opsets up to "
                                         rf"{newest}.*opset_version=17"):
        lepton_edge.load(model)


def test_scan_body_reading_a_constant_from_a_compiled_subgraph(tmp_path: Path) -> None:
    """onnxruntime types a Scan body's outputs only when the outer Unsqueeze axes it reads
    are constant; the axes Constant sits in the compiled subgraph, and the Scan (no TVM
    converter; a run-time number of iterations, so not unrolled) gets its own copy instead of
    a run-time input."""
    body = h.make_graph(
        [h.make_node("Add", ["s_in", "x_t"], ["sum"]),
         h.make_node("Unsqueeze", ["sum", "axes"], ["u"]),
         h.make_node("Squeeze", ["u", "axes"], ["s_out"]),
         h.make_node("Identity", ["s_out"], ["y_t"])],
        "body", [h.make_tensor_value_info("s_in", T.FLOAT, None),
                 h.make_tensor_value_info("x_t", T.FLOAT, None)],
        [h.make_value_info("s_out", onnx.TypeProto()), h.make_value_info("y_t", onnx.TypeProto())])
    nodes = [
        h.make_node("Constant", [], ["axes"], name="axes_const",
                    value=numpy_helper.from_array(np.array([0], np.int64))),
        h.make_node("Unsqueeze", ["x", "axes"], ["x1"], name="unsq"),
        h.make_node("Relu", ["x1"], ["x2"], name="relu"),
        h.make_node("Squeeze", ["x2", "axes"], ["x3"], name="sq"),
        h.make_node("Scan", ["s0", "x3"], ["s", "ys"], name="scan", body=body,
                    num_scan_inputs=1),
    ]
    model = _model(nodes, [_vi("x", T.FLOAT, ["N", 3]), _vi("s0", T.FLOAT, [3])],
                   [_vi("s", T.FLOAT, [3]), _vi("ys", T.FLOAT, ["N", 3])], [("", 17)])
    plan = lepton_edge.partition(lepton_edge.load(model), ["cpu"])
    scan_sg = next(sg for sg in plan.subgraphs if "scan" in sg.nodes)
    assert scan_sg.target == FALLBACK and "axes" not in scan_sg.inputs
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32),
             "s0": np.ones(3, np.float32)}
    _, got, placement = _run(model, feeds, tmp_path)
    assert_close(got, ort_run(model, feeds))
    assert set(placement.values()) == {"cpu", FALLBACK}


# ------------------------------------------------------------------------------ ai.onnx.ml


def test_ml_only_model_runs_on_onnxruntime(tmp_path: Path) -> None:
    model = _model([h.make_node("Binarizer", ["x"], ["y"], name="bin", domain=ML,
                                threshold=0.5)],
                   [_vi("x", T.FLOAT, ["N", 4])], [_vi("y", T.FLOAT, ["N", 4])], [(ML, 1)])
    loaded = lepton_edge.load(model)
    assert loaded.opset == 0  # no ai.onnx opset declared
    assert "opset: no ai.onnx opset (only ai.onnx.ml ops)" in (
        lepton_edge.partition(loaded).explain().splitlines())
    plan = lepton_edge.partition(loaded, ["cpu"])
    assert [sg.target for sg in plan.subgraphs] == [FALLBACK]
    assert plan.reasons["bin"]["cpu"] == (
        "Binarizer is an ai.onnx.ml op and TVM has no ai.onnx.ml importer")
    x = np.array([[0.1, 0.5, 0.7, -2.0], [3.0, 0.49, 0.51, 0.0]], np.float32)
    _, got, placement = _run(model, {"x": x}, tmp_path)
    assert_close(got, ort_run(model, {"x": x}), rel=0)
    assert set(placement.values()) == {FALLBACK}


def test_sklearn_style_mix_compiles_the_ai_onnx_part(tmp_path: Path) -> None:
    """A scaler (ai.onnx) feeding a tree ensemble (ai.onnx.ml), as sklearn-onnx writes."""
    nodes = [
        h.make_node("Sub", ["x", "mean"], ["c"], name="center"),
        h.make_node("Mul", ["c", "scale"], ["z"], name="scale"),
        h.make_node("TreeEnsembleClassifier", ["z"], ["label", "proba"], name="trees",
                    domain=ML, class_ids=[0, 1], class_nodeids=[1, 2], class_treeids=[0, 0],
                    class_weights=[1.0, 1.0], classlabels_int64s=[0, 1],
                    nodes_falsenodeids=[2, 0, 0], nodes_featureids=[1, 0, 0],
                    nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"], nodes_nodeids=[0, 1, 2],
                    nodes_treeids=[0, 0, 0], nodes_truenodeids=[1, 0, 0],
                    nodes_values=[0.0, 0.0, 0.0], nodes_missing_value_tracks_true=[0, 0, 0],
                    nodes_hitrates=[1.0, 1.0, 1.0], post_transform="NONE"),
    ]
    inits = [numpy_helper.from_array(np.array([1.0, -1.0], np.float32), "mean"),
             numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "scale")]
    model = _model(nodes, [_vi("x", T.FLOAT, ["N", 2])],
                   [_vi("label", T.INT64, ["N"]), _vi("proba", T.FLOAT, ["N", 2])],
                   [("", 17), (ML, 3)], inits)
    plan = lepton_edge.partition(lepton_edge.load(model), ["cpu"])
    placed = {n: sg.target for sg in plan.subgraphs for n in sg.nodes}
    assert placed == {"center": "cpu", "scale": "cpu", "trees": FALLBACK}
    assert "TreeEnsembleClassifier is an ai.onnx.ml op" in plan.reasons["trees"]["cpu"]
    x = np.array([[0.0, -2.0], [3.0, 1.0], [1.0, -0.5]], np.float32)
    _, got, _ = _run(model, {"x": x}, tmp_path)
    assert_close(got, ort_run(model, {"x": x}))


def test_unknown_ml_op_is_named() -> None:
    model = _model([h.make_node("NotAnMlOp", ["x"], ["y"], name="bad", domain=ML)],
                   [_vi("x", T.FLOAT, [2])], [_vi("y", T.FLOAT, [2])], [(ML, 3)])
    with pytest.raises(UnsupportedOpsError, match=r"NotAnMlOp \(ai.onnx.ml\): not an ai.onnx.ml "
                                                  r"operator at node\(s\) bad"):
        lepton_edge.load(model)


# -------------------------------------------------------------------------- old opsets


def test_old_opset_is_upgraded(tmp_path: Path) -> None:
    model = _model([h.make_node("Not", ["x"], ["y"])], [_vi("x", T.BOOL, [2, 3])],
                   [_vi("y", T.BOOL, [2, 3])], [("", 1)])
    loaded = lepton_edge.load(model)
    assert loaded.opset == MIN_OPSET
    assert f"opset: {MIN_OPSET} (declared 1, upgraded with onnx.version_converter)" in (
        lepton_edge.partition(loaded).explain().splitlines())
    x = np.array([[True, False, True], [False, False, True]])
    _, got, placement = _run(model, {"x": x}, tmp_path)
    np.testing.assert_array_equal(got["y"], ~x)
    assert set(placement.values()) == {"cpu"}


def test_old_opset_the_converter_cannot_upgrade_is_a_clear_error() -> None:
    model = _model([h.make_node("Split", ["x"], ["a", "b"])], [_vi("x", T.FLOAT, [4])],
                   [_vi("a", T.FLOAT, [2]), _vi("b", T.FLOAT, [2])], [("", 1)])
    with pytest.raises(ModelError) as info:
        lepton_edge.load(model)
    message = str(info.value)
    assert f"uses opset 1, too old (lepton-edge supports opsets {MIN_OPSET}-{MAX_OPSET}" in message
    assert "No Adapter From Version $1 for Split" in message and "re-export" in message


# ----------------------------------------------------------------------- zero-size constants


def test_zero_size_constant_concat_compiles_and_loads(tmp_path: Path) -> None:
    """TVM 0.27 cannot load an executable holding a zero-size constant; one that is only
    concatenated is dropped (CausalConvWithState with kernel size 1 builds exactly this)."""
    inits = [numpy_helper.from_array(np.zeros((2, 4, 0), np.float32), "pad")]
    model = _model([h.make_node("Concat", ["pad", "x"], ["c"], axis=-1),
                    h.make_node("Relu", ["c"], ["y"])],
                   [_vi("x", T.FLOAT, [2, 4, 8])], [_vi("y", T.FLOAT, [2, 4, 8])], [("", 17)],
                   inits)
    x = np.random.default_rng(1).standard_normal((2, 4, 8)).astype(np.float32)
    art, got, placement = _run(model, {"x": x}, tmp_path)
    assert_close(got, ort_run(model, {"x": x}), rel=0)
    assert set(placement.values()) == {"cpu"}
    assert not any(sg["build_errors"] for sg in art.manifest["subgraphs"])


def test_unloadable_build_falls_back_at_compile_time(tmp_path: Path) -> None:
    """A zero-size constant output is still in the constant pool: the cpu build is refused
    when compiled (its library does not load), not on the device."""
    inits = [numpy_helper.from_array(np.zeros((3, 0), np.float32), "e")]
    model = _model([h.make_node("Relu", ["e"], ["y"]), h.make_node("Neg", ["x"], ["z"])],
                   [_vi("x", T.FLOAT, [2])], [_vi("y", T.FLOAT, [3, 0]), _vi("z", T.FLOAT, [2])],
                   [("", 17)], inits)
    x = np.array([1.0, -2.0], np.float32)
    with pytest.warns(UserWarning, match="runs on onnxruntime because every build failed"):
        art, got, placement = _run(model, {"x": x}, tmp_path)
    errors = [sg["build_errors"]["cpu"] for sg in art.manifest["subgraphs"] if sg["build_errors"]]
    assert errors and "the TVM runtime cannot load the built library" in errors[0]
    assert_close(got, ort_run(model, {"x": x}), rel=0)


def test_zipmap_output_names_the_skl2onnx_option() -> None:
    zipmap = h.make_node("ZipMap", ["p"], ["probs"], domain=ML, classlabels_int64s=[0, 1])
    out = h.make_value_info("probs", h.make_sequence_type_proto(h.make_map_type_proto(
        T.INT64, h.make_tensor_type_proto(T.FLOAT, None))))
    model = _model([zipmap], [_vi("p", T.FLOAT, ["N", 2])], [out], [(ML, 1)])
    with pytest.raises(ModelError, match=r"'probs' is sequence<map<int64, tensor>>.*"
                                         r"skl2onnx options=\{'zipmap': False\}"):
        lepton_edge.load(model)


@pytest.mark.parametrize("attr", [
    {"value": numpy_helper.from_array(np.arange(6, dtype=np.int64).reshape(2, 3))},
    {"value_float": 1.5}, {"value_floats": [1.0, -2.5]}, {"value_int": 7},
    {"value_ints": [3, -1]}, {"value_string": "a"}, {"value_strings": ["x", "yz"]},
])
def test_shared_constant_values_match_onnx(attr) -> None:
    from onnx.reference import ReferenceEvaluator

    from lepton_edge.lowering.onnx_fixups import constant_tensor

    node = h.make_node("Constant", [], ["c"], **attr)
    graph = h.make_graph([node], "g", [], [h.make_value_info("c", onnx.TypeProto())])
    want = ReferenceEvaluator(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])).run(
        None, {})[0]
    got = numpy_helper.to_array(constant_tensor(node))
    assert got.shape == np.asarray(want).shape
    np.testing.assert_array_equal(got.astype(np.asarray(want).dtype), want)
    if got.dtype.kind != "O":
        assert got.dtype == np.asarray(want).dtype
