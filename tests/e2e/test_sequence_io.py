"""Sequence and optional graph inputs/outputs, end to end: load -> plan -> compile -> run.

Nodes that touch sequence or optional values run on the onnxruntime fallback (compiled code
has no such values); the tensor-only nodes around them still compile with TVM. Every output
is checked against onnxruntime on the same feeds, and bad feeds get one InputError naming
each problem. One model is compiled for the whole module.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

import lepton_edge
from lepton_edge import ArtifactError, InputError, UnsupportedOpsError
from lepton_edge.runtime.session import compare
from lepton_edge.signature import TensorSpec

F = TensorProto.FLOAT


def mixed_model() -> onnx.ModelProto:
    """x[N,3] (tensor), s (sequence of [L,3]), o (optional [2]) ->
    y = Exp(Concat(s + [Relu(x)])) (tensor), t = s + [Relu(x)] (sequence), n = len(s),
    o2 = o (optional, None when absent), has = o is present."""
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(F, ["L", 3]))
    opt = helper.make_optional_type_proto(helper.make_tensor_type_proto(F, [2]))
    nodes = [
        helper.make_node("Relu", ["x"], ["xr"], name="relu"),
        helper.make_node("SequenceInsert", ["s", "xr"], ["t"], name="insert"),
        helper.make_node("ConcatFromSequence", ["t"], ["c"], axis=0, name="concat"),
        helper.make_node("Exp", ["c"], ["y"], name="exp"),
        helper.make_node("SequenceLength", ["s"], ["n"], name="length"),
        helper.make_node("Identity", ["o"], ["o2"], name="pass_optional"),
        helper.make_node("OptionalHasElement", ["o"], ["has"], name="has"),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", F, ["N", 3]), helper.make_value_info("s", seq),
         helper.make_value_info("o", opt)],
        [helper.make_tensor_value_info("y", F, [None, 3]), helper.make_value_info("t", seq),
         helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_value_info("o2", opt),
         helper.make_tensor_value_info("has", TensorProto.BOOL, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def if_sequence_model() -> onnx.ModelProto:
    """Two Ifs whose branches build sequences from the outer x: "if" returns the sequence,
    "if_concat" concatenates it into a tensor (sequences only inside its bodies)."""

    def branch(name: str, op: str, concat: bool) -> onnx.GraphProto:
        out = f"{name}_out"
        nodes = [helper.make_node(op, ["x"], [f"{name}_e"], name=f"{name}_op"),
                 helper.make_node("SequenceConstruct", ["x", f"{name}_e"],
                                  [f"{name}_seq" if concat else out], name=f"{name}_seq")]
        if concat:
            nodes.append(helper.make_node("ConcatFromSequence", [f"{name}_seq"], [out], axis=0,
                                          name=f"{name}_concat"))
        value = (helper.make_tensor_value_info(out, F, [None, 2]) if concat
                 else helper.make_tensor_sequence_value_info(out, F, None))
        return helper.make_graph(nodes, name, [], [value])

    nodes = [helper.make_node("If", ["cond"], ["res"], name="if",
                              then_branch=branch("a", "Neg", False),
                              else_branch=branch("b", "Abs", False)),
             helper.make_node("If", ["cond"], ["w"], name="if_concat",
                              then_branch=branch("c", "Neg", True),
                              else_branch=branch("d", "Abs", True)),
             helper.make_node("Sigmoid", ["x"], ["z"], name="sigmoid")]
    graph = helper.make_graph(
        nodes, "if_seq",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", F, ["N", 2])],
        [helper.make_tensor_sequence_value_info("res", F, None),
         helper.make_tensor_value_info("w", F, [None, 2]),
         helper.make_tensor_value_info("z", F, ["N", 2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def ort_outputs(model: onnx.ModelProto, feeds: dict) -> dict:
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_matches_ort(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, value in want.items():
        if value is None:
            assert got[name] is None, name
            continue
        if isinstance(value, list):
            assert isinstance(got[name], list) and len(got[name]) == len(value), name
            pairs = list(zip(got[name], value, strict=True))
        else:
            pairs = [(got[name], value)]
        for g, w in pairs:
            assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape, name
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory):
    model = lepton_edge.load(mixed_model())
    art = lepton_edge.compile(model, ["cpu"])
    path = art.save(tmp_path_factory.mktemp("seq") / "mixed.lepton")
    with lepton_edge.runtime.load(path, self_test=True) as session:
        yield model, art, path, session


def feeds(seed: int, lengths=(2, 1), batch: int = 3, optional: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 3)).astype(np.float32),
            "s": [rng.standard_normal((n, 3)).astype(np.float32) for n in lengths],
            "o": rng.standard_normal(2).astype(np.float32) if optional else None}


def test_signature_records_sequences_and_optionals(mixed) -> None:
    model, art, _, session = mixed
    assert [str(s) for s in model.inputs] == [
        "x: float32[N, 3]", "s: sequence<float32[L, 3]>", "o: optional<float32[2]>"]
    assert session.inputs == model.inputs and session.outputs == model.outputs
    assert [s.kind for s in session.outputs] == ["tensor", "sequence", "tensor", "optional",
                                                 "tensor"]
    assert art.manifest["inputs"][1] == {"name": "s", "dtype": "float32", "shape": ["L", 3],
                                         "kind": "sequence"}
    assert "kind" not in art.manifest["inputs"][0]  # tensors are recorded as before


def test_tensor_nodes_compile_sequence_nodes_fall_back(mixed) -> None:
    model, art, _, session = mixed
    placed = {node: sg["target"] for sg in art.manifest["subgraphs"] for node in sg["nodes"]}
    assert placed["relu"] == "cpu" and placed["exp"] == "cpu"
    for node in ("insert", "concat", "length", "pass_optional", "has"):
        assert placed[node] == "onnxruntime", node
    explain = art.plan.explain()
    assert "insert: cpu: SequenceInsert works on sequence/optional values; compiled code " \
           "has no sequence or optional values" in explain
    assert "pass_optional: cpu: consumes optional<tensor> value 'o'" in explain
    targets = {p.target for p in session.placement.values()}
    assert targets == {"cpu", "onnxruntime"}


@pytest.mark.parametrize("case", [
    dict(seed=1), dict(seed=2, lengths=(4,), batch=1), dict(seed=3, lengths=(), batch=2),
    dict(seed=4, optional=False), dict(seed=5, lengths=(1, 2, 3), batch=5, optional=False),
])
def test_outputs_match_onnxruntime(mixed, case) -> None:
    _, _, _, session = mixed
    given = feeds(**case)
    got = session.run(given)
    want = ort_outputs(mixed_model(), given)
    assert_matches_ort(got, want)
    assert isinstance(got["t"], list) and len(got["t"]) == len(given["s"]) + 1
    assert (got["o2"] is None) == (given["o"] is None)
    assert bool(got["has"]) == (given["o"] is not None)


def test_optional_input_may_be_left_out(mixed) -> None:
    _, _, _, session = mixed
    given = feeds(6)
    del given["o"]
    got = session.run(given)
    assert got["o2"] is None and not got["has"]


def test_golden_sequences_are_stored_and_replayed(mixed) -> None:
    _, art, path, session = mixed
    case = art.manifest["golden"][0]
    assert isinstance(case["inputs"]["s"], list) and len(case["inputs"]["s"]) == 2
    assert isinstance(case["outputs"]["t"], list) and len(case["outputs"]["t"]) == 3
    report = session.self_test()
    assert report.passed and set(report.max_rel) == {"y", "t", "n", "o2", "has"}
    assert compare([np.ones(2)], [np.ones(2), np.ones(2)]) == (float("inf"), float("inf"))
    assert compare(None, None) == (0.0, 0.0) and compare(np.ones(2), None)[0] == float("inf")


def run_error(session, given) -> str:
    with pytest.raises(InputError) as info:
        session.run(given)
    assert type(info.value) is InputError
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_feeds_name_the_input_and_what_was_expected(mixed) -> None:
    _, _, _, session = mixed
    given = feeds(7)
    given["s"] = given["s"][0]  # one array instead of a list
    message = run_error(session, given)
    assert "input 's' is one array, expected a list of arrays (sequence<float32[L, 3]>); " \
           "wrap a single array in a list" in message
    given = feeds(7)
    given["s"] = [given["s"][0].astype(np.float64), np.zeros(3, np.float32)]
    given["x"] = None
    given["o"] = np.zeros(3, np.float32)
    message = run_error(session, given)
    assert "input 's'[0] has dtype float64, expected float32 (convert with " in message
    assert "input 's'[1] has rank 1 (shape [3]), expected rank 2 ['L', 3]" in message
    assert "input 'x' is None, but it is required (float32[N, 3]): pass an array" in message
    assert "input 'o' has shape [3], expected [2] (dimension 0 must be 2)" in message
    assert ("The model takes x: float32[N, 3]; s: sequence<float32[L, 3]>; "
            "o: optional<float32[2]>") in message
    given = feeds(7)
    given["s"] = None
    assert "input 's' is None, but it is required (sequence<float32[L, 3]>): pass a list " \
           "of arrays" in run_error(session, given)
    given = feeds(7)
    del given["s"]
    assert "missing input(s) ['s']" in run_error(session, given)
    # the session still runs after refused feeds
    assert_matches_ort(session.run(feeds(8)), ort_outputs(mixed_model(), feeds(8)))


def rewritten(path: Path, out: Path, edit) -> Path:
    """A copy of the artifact at `path` with its manifest changed by edit(manifest)."""
    with zipfile.ZipFile(path) as zf:
        entries = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    manifest = json.loads(entries["manifest.json"])
    edit(manifest)
    entries["manifest.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return out


def test_manifest_with_a_bad_kind_or_sequence_file_is_refused(mixed, tmp_path: Path) -> None:
    _, _, path, _ = mixed
    bad = rewritten(path, tmp_path / "kind.lepton",
                    lambda m: m["inputs"][1].update(kind="map"))
    with pytest.raises(ArtifactError, match=r"'inputs' must list tensors .* known kind"):
        lepton_edge.runtime.load(bad)
    bad = rewritten(path, tmp_path / "shape.lepton",
                    lambda m: m["inputs"][0].update(shape=None))  # a tensor needs a shape
    with pytest.raises(ArtifactError, match=r"'inputs' must list tensors"):
        lepton_edge.runtime.load(bad)
    bad = rewritten(path, tmp_path / "golden.lepton",
                    lambda m: m["golden"][0]["inputs"]["s"].append("golden/0/inputs/9.npy"))
    with pytest.raises(ArtifactError, match=r"golden case names files not in the artifact: "
                                            r"\['golden/0/inputs/9.npy'\]"):
        lepton_edge.runtime.load(bad)


def test_no_fallback_names_the_sequence_nodes() -> None:
    with pytest.raises(UnsupportedOpsError) as info:
        lepton_edge.partition(lepton_edge.load(mixed_model()), ["cpu"], fallback=False)
    message = str(info.value)
    assert "SequenceInsert (node insert): cpu: SequenceInsert works on sequence" in message
    assert "Relu" not in message and "Exp" not in message


def test_if_with_sequence_branches_runs_on_onnxruntime(build) -> None:
    model = lepton_edge.load(if_sequence_model())
    assert model.outputs[0] == TensorSpec("res", "float32", ("N", 2), kind="sequence")
    plan = lepton_edge.partition(model, ["cpu"])
    by_node = {n: sg.target for sg in plan.subgraphs for n in sg.nodes}
    assert by_node == {"if": "onnxruntime", "if_concat": "onnxruntime", "sigmoid": "cpu"}
    assert plan.reasons["if"]["cpu"].startswith("produces sequence<tensor> value 'res'; ")
    assert re.match(r"its (then|else)_branch body: SequenceConstruct works on "
                    r"sequence/optional values; ", plan.reasons["if_concat"]["cpu"])
    _, session = build(model)
    x = np.random.default_rng(9).standard_normal((2, 2)).astype(np.float32)
    for cond in (True, False):
        given = {"cond": np.array(cond), "x": x}
        assert_matches_ort(session.run(given), ort_outputs(if_sequence_model(), given))


def test_sequence_crossing_subgraphs_and_cli_run(tmp_path: Path) -> None:
    """A sequence made on onnxruntime (sg1) waits in the runtime while a compiled subgraph
    (sg2) runs, then reaches onnxruntime again (sg3); `lepton-edge run -o DIR` writes each
    element of a sequence output as DIR/<name>.<i>.npy."""
    from click.testing import CliRunner

    from lepton_edge.cli import cli

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("SplitToSequence", ["r"], ["parts"], axis=0, name="split"),
         helper.make_node("ConcatFromSequence", ["parts"], ["c"], axis=0, name="concat"),
         helper.make_node("Exp", ["c"], ["e"], name="exp"),
         helper.make_node("SequenceInsert", ["parts", "e"], ["out"], name="insert")],
        "split", [helper.make_tensor_value_info("x", F, [3, 2])],
        [helper.make_tensor_sequence_value_info("out", F, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"])
    assert [(sg.target, sg.nodes) for sg in art.plan.subgraphs] == [
        ("cpu", ("relu",)), ("onnxruntime", ("split", "concat")), ("cpu", ("exp",)),
        ("onnxruntime", ("insert",))]
    assert ("parts", "sg1", "sg3") in art.plan.transfers()
    path = art.save(tmp_path / "split.lepton")
    x = np.random.default_rng(10).standard_normal((3, 2)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(cli, ["run", str(path), "-i", f"x={tmp_path / 'x.npy'}",
                                      "-o", str(tmp_path / "out"), "--check"])
    assert result.exit_code == 0, result.output
    assert "out: sequence of 4 tensor(s)" in result.output
    want = ort_outputs(model, {"x": x})["out"]
    assert len(want) == 4
    for i, element in enumerate(want):
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"out.{i}.npy"), element,
                                   rtol=1e-6)
    assert not (tmp_path / "out" / "out.4.npy").exists()


def test_bench_random_feeds_refuses_sequence_inputs() -> None:
    from lepton_edge.bench import random_feeds

    with pytest.raises(InputError, match=r"cannot make random data for s: "
                                         r"sequence<float32\[L, 3\]> \(not a tensor\)"):
        random_feeds([TensorSpec("x", "float32", ("N", 3)),
                      TensorSpec("s", "float32", ("L", 3), kind="sequence")])
