"""float8 / int4 tensors at the graph boundary: ml_dtypes arrays in and out, the conversions
(Cast, CastLike, QuantizeLinear, DequantizeLinear) compiled by TVM through
lowering/narrow.py, checked bit for bit against onnx.reference; plus the artifact's dtype
record, bad feeds, and narrow values crossing into the onnxruntime fallback."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

import lepton_edge
import lepton_edge.runtime
from lepton_edge.errors import ArtifactError, InputError, TargetError

T = onnx.TensorProto
F8 = ml_dtypes.float8_e4m3fn


def model() -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array([0], np.int8), "like"),
             numpy_helper.from_array(np.array([0.5, 3.0], np.float32), "scale"),
             numpy_helper.from_array(np.array([1, -2], ml_dtypes.int4), "zp"),
             numpy_helper.from_array(np.array(0.25, np.float32), "s0")]
    nodes = [
        helper.make_node("Cast", ["x"], ["y8"], to=T.FLOAT8E5M2, saturate=0),
        helper.make_node("Cast", ["q"], ["qf"], to=T.FLOAT),
        helper.make_node("CastLike", ["i", "like"], ["i8"]),
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["qi4"], axis=0),
        helper.make_node("DequantizeLinear", ["q", "s0"], ["dq"]),
    ]
    graph = helper.make_graph(
        nodes, "narrow_io",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 6]),
         helper.make_tensor_value_info("q", T.FLOAT8E4M3FN, [8]),
         helper.make_tensor_value_info("i", T.INT4, [6])],
        [helper.make_tensor_value_info("y8", T.FLOAT8E5M2, [2, 6]),
         helper.make_tensor_value_info("qf", T.FLOAT, [8]),
         helper.make_tensor_value_info("i8", T.INT8, [6]),
         helper.make_tensor_value_info("qi4", T.INT4, [2, 6]),
         helper.make_tensor_value_info("dq", T.FLOAT, [8])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def feeds() -> dict[str, np.ndarray]:
    x = np.array([[0.1, -3.7, 1e6, -np.inf, np.nan, 2.5],
                  [-0.0, 57344.0, 61440.0, 1.5e-5, -7.0, 40.0]], np.float32)
    q = np.array([0x00, 0x80, 0x01, 0x7E, 0xFE, 0x7F, 0x38, 0xB9], np.uint8).view(F8)
    i = np.array([-8, -1, 0, 1, 7, 3], ml_dtypes.int4)
    return {"x": x, "q": q, "i": i}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    art = lepton_edge.compile(lepton_edge.load(model()), ["cpu"], golden_count=0)
    path = art.save(tmp_path_factory.mktemp("narrow") / "narrow.lepton")
    session = lepton_edge.runtime.load(path)
    yield art, path, session
    session.close()


def assert_bits_equal(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if want.dtype.name in ("float32", "float16", "float64"):
        np.testing.assert_array_equal(got, want, err_msg=name)  # NaN where NaN, -0 == 0
        assert (np.signbit(got) == np.signbit(want)).all(), name
    elif want.dtype.name.startswith("float"):  # ml_dtypes float8 (float8_e5m2's kind is 'f')
        nan = np.isnan(want.astype(np.float32))
        assert (np.isnan(got.astype(np.float32)) == nan).all(), name
        np.testing.assert_array_equal(got.view(np.uint8)[~nan], want.view(np.uint8)[~nan],
                                      err_msg=name)
    else:
        np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64),
                                      err_msg=name)


def test_outputs_are_onnx_reference_bit_for_bit(built) -> None:
    _, _, session = built
    got = session.run(feeds())
    want = ReferenceEvaluator(model()).run(None, feeds())
    for (name, value), ref in zip(got.items(), want, strict=True):
        assert_bits_equal(value, np.asarray(ref), name)
    assert got["y8"].dtype == np.dtype(ml_dtypes.float8_e5m2)
    assert got["qi4"].dtype == np.dtype(ml_dtypes.int4)


def test_golden_io_is_recorded_and_replayed(tmp_path: Path) -> None:
    # int4 graph I/O: the golden outputs come from onnx's reference evaluator
    art = lepton_edge.compile(lepton_edge.load(model()), ["cpu"],
                              golden_inputs=[feeds()])
    with lepton_edge.runtime.load(art.save(tmp_path / "g.lepton"), self_test=True) as session:
        report = session.self_test(tolerance=0.0)
    assert report.passed and report.cases == 1


def test_every_node_is_compiled_for_the_cpu(built) -> None:
    art, _, session = built
    assert {sg["target"] for sg in art.manifest["subgraphs"]} == {"cpu"}
    assert {p.target for p in session.placement.values()} == {"cpu"}
    assert not session.events


def test_signature_dtypes_round_trip_through_the_artifact(built) -> None:
    art, _, session = built
    recorded = {s["name"]: s["dtype"] for s in art.manifest["inputs"] + art.manifest["outputs"]}
    assert recorded == {"x": "float32", "q": "float8_e4m3fn", "i": "int4",
                        "y8": "float8_e5m2", "qf": "float32", "i8": "int8", "qi4": "int4",
                        "dq": "float32"}
    assert {s.name: s.dtype for s in session.inputs + session.outputs} == recorded


def test_a_wrong_dtype_feed_is_an_input_error(built) -> None:
    _, _, session = built
    bad = feeds()
    bad["q"] = bad["q"].view(np.uint8)
    with pytest.raises(InputError, match=r"input 'q' has dtype uint8, expected float8_e4m3fn "
                                         r"\(convert with \.astype\(ml_dtypes\.float8_e4m3fn\)\)"):
        session.run(bad)
    bad = feeds()
    bad["i"] = bad["i"].view(ml_dtypes.uint4)
    with pytest.raises(InputError, match=r"input 'i' has dtype uint4, expected int4"):
        session.run(bad)


def test_an_unknown_dtype_in_the_manifest_is_an_artifact_error(built, tmp_path: Path) -> None:
    _, path, _ = built
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    manifest = json.loads(entries["manifest.json"])
    manifest["inputs"][1]["dtype"] = "float8_e9m9"
    entries["manifest.json"] = json.dumps(manifest).encode()
    bad = tmp_path / "bad.lepton"
    with zipfile.ZipFile(bad, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    with pytest.raises(ArtifactError, match=r"'q' has dtype 'float8_e9m9', which is not a numpy "
                                            r"or ml_dtypes type"):
        lepton_edge.runtime.load(bad)


def passthrough(elem: int) -> onnx.ModelProto:
    """Identity on a narrow input (left to onnxruntime), then a Cast that TVM compiles."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"]),
         helper.make_node("Cast", ["b"], ["c"], to=T.FLOAT)],
        "pass", [helper.make_tensor_value_info("a", elem, [4])],
        [helper.make_tensor_value_info("b", elem, [4]),
         helper.make_tensor_value_info("c", T.FLOAT, [4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("elem", [T.FLOAT8E4M3FN, T.FLOAT8E5M2FNUZ])
def test_float8_crosses_into_the_onnxruntime_fallback_with_golden_io(elem: int,
                                                                     tmp_path: Path) -> None:
    art = lepton_edge.compile(lepton_edge.load(passthrough(elem)), ["cpu"])
    targets = [sg["target"] for sg in art.manifest["subgraphs"]]
    assert targets == ["onnxruntime", "cpu"]
    assert art.manifest["golden"]  # recorded by onnxruntime from float8 feeds
    with lepton_edge.runtime.load(art.save(tmp_path / "p.lepton"), self_test=True) as session:
        a = np.array([0x7F, 0x80, 0x38, 0xC4], np.uint8).view(
            onnx.helper.tensor_dtype_to_np_dtype(elem))
        got = session.run({"a": a})
        assert_bits_equal(got["b"], a, "b")
        np.testing.assert_array_equal(got["c"], a.astype(np.float32))


def test_int4_into_the_onnxruntime_fallback_is_refused_at_compile_time() -> None:
    with pytest.raises(TargetError, match=r"'a' \(int4\).*onnxruntime's Python API cannot pass "
                                          r"int4/uint4/int2/uint2/float4e2m1/float8e8m0 tensors"):
        lepton_edge.compile(lepton_edge.load(passthrough(T.INT4)), ["cpu"], golden_count=0)


def test_an_int4_chain_with_an_op_lepton_edge_does_not_compile_stays_on_onnxruntime(
        tmp_path: Path) -> None:
    """float -> int4 -> Transpose -> float: the Casts could compile, but the int4 value would
    then cross into onnxruntime for the Transpose; the whole chain runs there instead."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["q"], to=T.INT4),
         helper.make_node("Transpose", ["q"], ["r"]),
         helper.make_node("Cast", ["r"], ["y"], to=T.FLOAT),
         helper.make_node("Relu", ["y"], ["z"])],
        "chain", [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("z", T.FLOAT, [3, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    art = lepton_edge.compile(lepton_edge.load(proto), ["cpu"], golden_count=0)
    assert [sg["target"] for sg in art.manifest["subgraphs"]] == ["onnxruntime", "cpu"]
    why = " ".join(w for by_target in art.manifest["reasons"].values()
                   for w in by_target.values())
    assert "int4 value 'q' is also used by Transpose" in why
    x = np.array([[-9.0, 3.0, 7.0], [8.0, -1.0, 0.0]], np.float32)  # onnxruntime and onnx
    # disagree on fractions (onnxruntime rounds, onnx truncates): integers only here
    with lepton_edge.runtime.load(art.save(tmp_path / "c.lepton")) as session:
        got = session.run({"x": x})["z"]
    np.testing.assert_array_equal(got, ReferenceEvaluator(proto).run(None, {"x": x})[0])


def test_float8_fake_quantization_inside_a_model_compiles(tmp_path: Path) -> None:
    """QuantizeLinear to float8 then DequantizeLinear, float at the boundary: both on TVM."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], saturate=1),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])],
        "fq", [helper.make_tensor_value_info("x", T.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2, 4])],
        initializer=[numpy_helper.from_array(np.array(0.125, np.float32), "s"),
                     numpy_helper.from_array(np.array(0, np.float32).astype(F8), "zp")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    art = lepton_edge.compile(lepton_edge.load(proto), ["cpu"], golden_count=0)
    assert [sg["target"] for sg in art.manifest["subgraphs"]] == ["cpu"]
    x = np.array([[0.01, -0.3, 1.7, 100.0], [-1e3, np.nan, 0.0621, -0.0624]], np.float32)
    with lepton_edge.runtime.load(art.save(tmp_path / "fq.lepton")) as session:
        got = session.run({"x": x})["y"]
    assert_bits_equal(got, ReferenceEvaluator(proto).run(None, {"x": x})[0], "y")


def _branch_cast_model(back: bool) -> onnx.ModelProto:
    """If whose then-branch casts float32 -> float8e4m3fn (and back to float32 with `back`),
    the else-branch negates (then casts)."""
    out_type = T.FLOAT if back else T.FLOAT8E4M3FN
    then = [helper.make_node("Cast", ["x"], ["q"], to=T.FLOAT8E4M3FN)]
    other = [helper.make_node("Neg", ["x"], ["n"])]
    if back:
        then.append(helper.make_node("Cast", ["q"], ["t"], to=T.FLOAT))
    else:
        other.append(helper.make_node("Cast", ["n"], ["n8"], to=T.FLOAT8E4M3FN))
    branches = {
        name: helper.make_graph(nodes, name, [], [
            helper.make_tensor_value_info(nodes[-1].output[0], out_type, [5])])
        for name, nodes in (("then_branch", then), ("else_branch", other))}
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], **branches)], "if8",
        [helper.make_tensor_value_info("c", T.BOOL, []),
         helper.make_tensor_value_info("x", T.FLOAT, [5])],
        [helper.make_tensor_value_info("y", out_type, [5])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("back", [False, True])
def test_a_float8_cast_inside_an_if_branch_runs_on_onnxruntime(back: bool,
                                                               tmp_path: Path) -> None:
    """TVM 0.27 has no If converter: the If (and the float8 Cast in its branch) is planned on
    onnxruntime, and its outputs are onnx's and onnxruntime's bit for bit (saturation, NaN)."""
    import onnxruntime

    proto = _branch_cast_model(back)
    art = lepton_edge.compile(lepton_edge.load(proto), ["cpu"], golden_count=0)
    assert [sg["target"] for sg in art.manifest["subgraphs"]] == ["onnxruntime"]
    why = " ".join(w for by in art.manifest["reasons"].values() for w in by.values())
    assert "If" in why, why
    x = np.array([0.1, 1000.0, -3.3, np.nan, -448.0], np.float32)
    ort = onnxruntime.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    with lepton_edge.runtime.load(art.save(tmp_path / "if8.lepton")) as session:
        for c in (True, False):
            feed = {"c": np.array(c), "x": x}
            got = session.run(feed)["y"]
            want = np.asarray(ReferenceEvaluator(proto).run(None, feed)[0])
            assert_bits_equal(got, want, f"y (c={c})")
            if back:  # onnxruntime's numpy API returns float32 (float8 only as OrtValues)
                assert_bits_equal(got, ort.run(None, feed)[0], f"y (c={c}, onnxruntime)")
    if not back:
        assert got.dtype == np.dtype(F8)


def _scan_cast_model(elem: int, identity: bool) -> onnx.ModelProto:
    """A Scan whose body casts each float32 row to `elem` and back (through an Identity on the
    narrow value with `identity`), summing the rows in its state."""
    nodes = [helper.make_node("Cast", ["x_t"], ["q"], to=elem)]
    if identity:
        nodes.append(helper.make_node("Identity", ["q"], ["q2"]))
    nodes += [helper.make_node("Cast", [nodes[-1].output[0]], ["d"], to=T.FLOAT),
              helper.make_node("Add", ["s_in", "d"], ["s_out"]),
              helper.make_node("Identity", ["d"], ["y_t"])]
    row = [helper.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("s_in", "x_t")]
    body = helper.make_graph(nodes, "body", row, [
        helper.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("s_out", "y_t")])
    graph = helper.make_graph(
        [helper.make_node("Scan", ["s0", "x"], ["s", "ys"], body=body, num_scan_inputs=1)],
        "scan8", [helper.make_tensor_value_info("s0", T.FLOAT, [3]),
                  helper.make_tensor_value_info("x", T.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("s", T.FLOAT, [3]),
         helper.make_tensor_value_info("ys", T.FLOAT, [4, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("elem", [T.FLOAT8E4M3FN, T.FLOAT8E5M2FNUZ, T.INT4])
def test_narrow_casts_in_an_unrolled_scan_body_compile(elem: int, tmp_path: Path) -> None:
    """The unrolled body's Casts go through lowering/narrow.py (not TVM's float8 casts):
    bit for bit onnx's reference, NaN and saturation included."""
    proto = _scan_cast_model(elem, identity=False)
    art = lepton_edge.compile(lepton_edge.load(proto), ["cpu"], golden_count=0)
    assert [sg["target"] for sg in art.manifest["subgraphs"]] == ["cpu"], art.manifest
    x = np.array([[0.1, 1e6, -3.3], [np.nan, 7.5, -0.0], [448.0, 17.0, -1e-3],
                  [2.5, -8.0, 300.0]], np.float32)
    feed = {"s0": np.zeros(3, np.float32), "x": x}
    with lepton_edge.runtime.load(art.save(tmp_path / "s.lepton"), fallback=False) as session:
        got = session.run(feed)
    for name, want in zip(("s", "ys"), ReferenceEvaluator(proto).run(None, feed), strict=True):
        assert_bits_equal(got[name], np.asarray(want), name)


def test_a_scan_body_with_a_narrow_op_lepton_edge_does_not_compile_is_planned_on_onnxruntime(
        tmp_path: Path) -> None:
    """An Identity on a float8 value inside a Scan body: planned on onnxruntime with the
    reason (it used to be planned on the cpu, and its build failed)."""
    proto = _scan_cast_model(T.FLOAT8E4M3FN, identity=True)
    loaded = lepton_edge.load(proto)
    plan = lepton_edge.partition(loaded, ["cpu"])
    assert [sg.target for sg in plan.subgraphs] == ["onnxruntime"]
    (why,) = plan.reasons["Scan_0"].values()
    assert why.startswith("Scan becomes Identity: Identity on float8e4m3fn tensors"), why
    art = lepton_edge.compile(loaded, ["cpu"], golden_count=0)
    x = np.array([[0.1, 1e6, -3.3], [np.nan, 7.5, -0.0], [448.0, 17.0, -1e-3],
                  [2.5, -8.0, 300.0]], np.float32)
    feed = {"s0": np.zeros(3, np.float32), "x": x}
    with lepton_edge.runtime.load(art.save(tmp_path / "s.lepton")) as session:
        assert not session.events
        got = session.run(feed)
    for name, want in zip(("s", "ys"), ReferenceEvaluator(proto).run(None, feed), strict=True):
        assert_bits_equal(got[name], np.asarray(want), name)
