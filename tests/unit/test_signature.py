"""Run-time inputs: session.run() checks names, dtypes, ranks and shapes, reporting all at once.

One two-input model (x[N, 4], z[N, 3] -> y[N, 3]) is compiled once for the module; the
pure check_feeds() cases below it need no compile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge import InputError
from lepton_edge.signature import TensorSpec, check_feeds

X_SPEC = TensorSpec("x", "float32", ("N", 4))
Z_SPEC = TensorSpec("z", "float32", ("N", 3))


def two_input_model() -> onnx.ModelProto:
    """y = Relu(x @ w + z): two inputs that share the symbolic batch dimension "N"."""
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "z"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    art = lepton_edge.compile(lepton_edge.load(two_input_model()), ["cpu"])
    path = art.save(tmp_path_factory.mktemp("signature") / "two_inputs.lepton")
    with lepton_edge.runtime.load(path) as loaded:
        yield loaded


def feeds(batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4)).astype(np.float32),
            "z": rng.standard_normal((batch, 3)).astype(np.float32)}


def run_error(session, given) -> str:
    with pytest.raises(InputError) as info:
        session.run(given)
    assert type(info.value) is InputError
    message = str(info.value)
    assert "\n" not in message, "user errors are one line"
    return message


# ----------------------------------------------------------------------------- through a session


def test_signature_comes_from_the_artifact(session) -> None:
    assert session.inputs == (X_SPEC, Z_SPEC)
    assert session.outputs == (TensorSpec("y", "float32", ("N", 3)),)


@pytest.mark.parametrize("batch", [1, 7])
def test_any_batch_matches_onnxruntime(session, batch: int) -> None:
    given = feeds(batch, seed=batch)
    ort = onnxruntime.InferenceSession(two_input_model().SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    want = ort.run(["y"], given)[0]
    got = session.run(given)
    assert list(got) == ["y"]
    assert got["y"].shape == (batch, 3) and got["y"].dtype == np.float32
    np.testing.assert_allclose(got["y"], want, rtol=1e-4, atol=1e-6)


def test_wrong_input_name(session) -> None:
    given = feeds()
    given["X"] = given.pop("x")
    message = run_error(session, given)
    assert "unknown input name(s) ['X']" in message
    assert "missing input(s) ['x']" in message
    assert "The model takes x: float32[N, 4]; z: float32[N, 3]" in message


def test_missing_input(session) -> None:
    given = feeds()
    del given["z"]
    message = run_error(session, given)
    assert message.startswith("bad inputs: missing input(s) ['z']")
    assert "unknown" not in message


def test_wrong_dtype_says_how_to_convert(session) -> None:
    given = feeds()
    given["x"] = given["x"].astype(np.float64)
    message = run_error(session, given)
    assert "input 'x' has dtype float64, expected float32" in message
    assert ".astype('float32')" in message


def test_wrong_rank(session) -> None:
    given = feeds()
    given["x"] = given["x"][0]
    message = run_error(session, given)
    assert "input 'x' has rank 1 (shape [4]), expected rank 2 ['N', 4]" in message


def test_wrong_fixed_dimension(session) -> None:
    given = feeds()
    given["z"] = np.zeros((2, 5), np.float32)
    message = run_error(session, given)
    assert "input 'z' has shape [2, 5], expected ['N', 3] (dimension 1 must be 3)" in message


def test_inputs_disagree_on_a_symbolic_dimension(session) -> None:
    given = {"x": np.zeros((2, 4), np.float32), "z": np.zeros((3, 3), np.float32)}
    message = run_error(session, given)
    assert "input 'z' dimension 0 ('N') is 3 but 'x' set 'N' = 2" in message


def test_empty_batch(session) -> None:
    message = run_error(session, feeds(batch=0))
    assert "input 'x' dimension 0 ('N') is 0" in message


@pytest.mark.parametrize("given", [
    pytest.param([np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)], id="list"),
    pytest.param(np.zeros((1, 4), np.float32), id="array"),
    pytest.param(None, id="none"),
])
def test_feeds_must_be_a_dict(session, given) -> None:
    message = run_error(session, given)
    assert "inputs must be a dict of name -> array" in message
    assert f"got {type(given).__name__}" in message and "expected names: x, z" in message


def test_every_problem_in_one_error(session) -> None:
    given = {"x": np.zeros((2, 4), np.float64), "z": np.zeros((2, 5), np.float32),
             "extra": np.zeros(1)}
    message = run_error(session, given)
    assert "unknown input name(s) ['extra']" in message
    assert "input 'x' has dtype float64" in message
    assert "input 'z' has shape [2, 5]" in message
    given = {"x": np.zeros((2, 4, 1), np.float32), "z": np.zeros((3, 3), np.float32)}
    message = run_error(session, given)
    assert "input 'x' has rank 3" in message and "input 'z'" not in message  # z binds N alone


def test_session_still_runs_after_refused_inputs(session) -> None:
    run_error(session, {"x": np.zeros((2, 4), np.float64)})
    got = session.run(feeds(batch=3))
    assert got["y"].shape == (3, 3)


def test_non_contiguous_inputs_are_accepted(session) -> None:
    given = feeds(batch=4)
    wide = np.zeros((4, 8), np.float32)
    wide[:, ::2] = given["x"]
    strided = {"x": wide[:, ::2], "z": given["z"]}
    assert not strided["x"].flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(session.run(strided)["y"], session.run(given)["y"])


# ----------------------------------------------------------------------------- check_feeds alone


def test_check_feeds_returns_contiguous_arrays_and_symbols() -> None:
    x = np.zeros((5, 8), np.float32)[:, ::2]
    arrays, symbols = check_feeds((X_SPEC,), {"x": x})
    assert symbols == {"N": 5}
    assert arrays["x"].flags["C_CONTIGUOUS"] and arrays["x"].shape == (5, 4)


def test_check_feeds_python_lists_need_the_right_dtype() -> None:
    with pytest.raises(InputError, match=r"dtype float64, expected float32"):
        check_feeds((X_SPEC,), {"x": [[1.0, 2.0, 3.0, 4.0]]})


@pytest.mark.parametrize("value", [object(), np.array([{"a": 1}], dtype=object)])
def test_check_feeds_non_numeric_values(value) -> None:
    with pytest.raises(InputError, match=r"input 'x' is not a numeric array"):
        check_feeds((X_SPEC,), {"x": value})


def test_check_feeds_none_for_a_required_tensor() -> None:
    with pytest.raises(InputError, match=r"input 'x' is None, but it is required "
                                         r"\(float32\[N, 4\]\): pass an array"):
        check_feeds((X_SPEC,), {"x": None})


SEQ_SPEC = TensorSpec("s", "float32", ("L", 4), kind="sequence")
OPT_SPEC = TensorSpec("o", "int64", (2,), kind="optional")
OPT_SEQ_SPEC = TensorSpec("q", "float32", None, kind="optional_sequence")


def test_check_feeds_sequences_and_optionals() -> None:
    elements = [np.zeros((3, 4), np.float32), np.ones((1, 4), np.float32)]
    values, symbols = check_feeds((X_SPEC, SEQ_SPEC, OPT_SPEC, OPT_SEQ_SPEC), {
        "x": np.zeros((2, 4), np.float32), "s": tuple(elements), "o": None,
        "q": [np.zeros((), np.float32), np.zeros((2, 2, 2), np.float32)]})
    assert symbols == {"N": 2}  # elements' 'L' differ (3, 1) and are not bound
    assert isinstance(values["s"], list) and [v.shape for v in values["s"]] == [(3, 4), (1, 4)]
    assert values["o"] is None and [v.ndim for v in values["q"]] == [0, 3]  # any rank
    values, _ = check_feeds((SEQ_SPEC, OPT_SPEC), {"s": [], "o": np.arange(2)})
    assert values["s"] == [] and values["o"].dtype == np.int64
    values, _ = check_feeds((SEQ_SPEC, OPT_SPEC), {"s": []})  # an optional may be left out
    assert values["o"] is None


def test_check_feeds_bad_sequences_and_optionals_all_at_once() -> None:
    with pytest.raises(InputError) as info:
        check_feeds((SEQ_SPEC, OPT_SPEC, OPT_SEQ_SPEC), {
            "s": [np.zeros((1, 4), np.float64), np.zeros(4, np.float32),
                  np.zeros((1, 5), np.float32)],
            "o": np.zeros(3, np.int64), "q": np.zeros(3, np.float32)})
    message = str(info.value)
    assert "input 's'[0] has dtype float64, expected float32" in message
    assert "input 's'[1] has rank 1 (shape [4]), expected rank 2 ['L', 4]" in message
    assert "input 's'[2] has shape [1, 5], expected ['L', 4] (dimension 1 must be 4)" in message
    assert "input 'o' has shape [3], expected [2]" in message
    assert ("input 'q' is one array, expected a list of arrays "
            "(optional<sequence<float32[...]>>) or None; wrap a single array in a list") in message
    assert "The model takes s: sequence<float32[L, 4]>; o: optional<int64[2]>" in message
    with pytest.raises(InputError, match=r"input 's' is None, but it is required "
                                         r"\(sequence<float32\[L, 4\]>\): pass a list"):
        check_feeds((SEQ_SPEC,), {"s": None})
    with pytest.raises(InputError, match=r"input 's' is a dict, expected a list of arrays"):
        check_feeds((SEQ_SPEC,), {"s": {"a": np.zeros((1, 4), np.float32)}})
    with pytest.raises(InputError, match=r"missing input\(s\) \['s'\]"):
        check_feeds((SEQ_SPEC, OPT_SPEC), {"o": None})


def test_check_feeds_ragged_list() -> None:
    with pytest.raises(InputError, match=r"input 'x' is not an array"):
        check_feeds((X_SPEC,), {"x": [[1.0, 2.0], [3.0]]})


def test_check_feeds_non_string_names_are_reported_not_crashed_on() -> None:
    given = {"x": np.zeros((1, 4), np.float32), 0: np.zeros(1), "q": np.zeros(1)}
    with pytest.raises(InputError) as info:
        check_feeds((X_SPEC,), given)
    assert "unknown input name(s) [0, 'q']" in str(info.value)


def test_check_feeds_scalar_for_a_tensor() -> None:
    with pytest.raises(InputError, match=r"has rank 0 \(shape \[\]\), expected rank 2"):
        check_feeds((X_SPEC,), {"x": np.float32(1.0)})


def test_check_feeds_fixed_only_and_scalar_specs() -> None:
    specs = (TensorSpec("s", "int64", ()), TensorSpec("m", "bool", (2, 2)))
    arrays, symbols = check_feeds(specs, {"s": np.int64(3), "m": np.ones((2, 2), bool)})
    assert symbols == {} and arrays["s"].shape == ()
    with pytest.raises(InputError, match=r"input 's' has dtype int32, expected int64"):
        check_feeds(specs, {"s": np.int32(3), "m": np.ones((2, 2), bool)})


def test_tensor_spec_json_round_trip() -> None:
    spec = TensorSpec("x", "float32", ("N", 4, "seq"))
    assert TensorSpec.from_json(spec.to_json()) == spec
    assert str(spec) == "x: float32[N, 4, seq]"
    assert "kind" not in spec.to_json()  # tensor entries are unchanged in manifests
    for other, text in ((SEQ_SPEC, "s: sequence<float32[L, 4]>"),
                        (OPT_SPEC, "o: optional<int64[2]>"),
                        (OPT_SEQ_SPEC, "q: optional<sequence<float32[...]>>")):
        assert TensorSpec.from_json(other.to_json()) == other
        assert str(other) == text


def test_signature_file_is_importable_without_the_compiler() -> None:
    # the runtime imports signature.py; it must need numpy only
    source = Path(__file__).parents[2] / "lepton_edge" / "signature.py"
    imports = [line for line in source.read_text().splitlines()
               if line.startswith(("import ", "from "))]
    assert all("onnx" not in line and "tvm" not in line for line in imports), imports


def test_scalar_input_round_trips_through_compile_and_golden(tmp_path: Path) -> None:
    """A 0-d input stays 0-d: in check_feeds, in the stored golden arrays, at run time."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "s"], ["y"], name="mul")], "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = lepton_edge.compile(lepton_edge.load(model), ["cpu"]).save(tmp_path / "s.lepton")
    with lepton_edge.runtime.load(path, self_test=True) as scaled:
        got = scaled.run({"x": np.ones((2, 4), np.float32), "s": np.float32(3)})
    np.testing.assert_array_equal(got["y"], np.full((2, 4), 3, np.float32))
