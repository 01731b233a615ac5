"""lepton_edge.load(): every way a model can be unusable is a ModelError that says why.

Each test builds its tiny model here with onnx.helper; nothing is compiled.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, external_data_helper, helper

import lepton_edge
from tests.conftest import mlp
from lepton_edge import ModelError, UnsupportedOpsError
from lepton_edge.model import MAX_OPSET, MIN_OPSET

NOT_ONNX = re.compile(r"not (a valid|an) ONNX model")


def ort_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def load_error(source, cls=ModelError, **kwargs) -> ModelError:
    with pytest.raises(cls) as info:
        lepton_edge.load(source, **kwargs)
    assert type(info.value) is cls, f"expected exactly {cls.__name__}, got {info.value!r}"
    assert "\n" not in str(info.value), "user errors are one line"
    return info.value


# ----------------------------------------------------------------------------- not a model


def test_missing_path(tmp_path: Path) -> None:
    error = load_error(tmp_path / "missing.onnx")
    assert "not found" in str(error) and "missing.onnx" in str(error)


def test_str_path_is_accepted_like_a_path(tmp_path: Path) -> None:
    error = load_error(str(tmp_path / "missing.onnx"))
    assert "not found" in str(error)


def test_directory(tmp_path: Path) -> None:
    error = load_error(tmp_path)
    assert "is a directory" in str(error) and ".onnx file inside it" in str(error)


@pytest.mark.parametrize("content", [
    pytest.param(np.random.default_rng(1).bytes(512), id="random-bytes"),
    pytest.param(b"this is a text file, not a model\n" * 4, id="text-file"),
])
def test_not_onnx(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    error = load_error(path)
    assert NOT_ONNX.search(str(error)) and str(path) in str(error)


def test_truncated_protobuf(tmp_path: Path) -> None:
    data = mlp().SerializeToString()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    error = load_error(path)
    assert NOT_ONNX.search(str(error)) and "truncated" in str(error)


def test_every_truncation_is_a_model_error() -> None:
    data = mlp().SerializeToString()
    for cut in range(0, len(data), 7):
        with pytest.raises(ModelError):
            lepton_edge.load(data[:cut])


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    error = load_error(path)
    assert "is empty" in str(error) and "not an ONNX model" in str(error)


def test_empty_and_random_bytes() -> None:
    assert "is empty" in str(load_error(b""))
    assert NOT_ONNX.search(str(load_error(np.random.default_rng(2).bytes(300))))


def test_unloadable_object() -> None:
    error = load_error(12345)
    assert "cannot load a model from a int" in str(error) and "torch.nn.Module" in str(error)


def test_invalid_graph_is_a_model_error() -> None:
    model = mlp()
    model.graph.node[0].input[1] = "no_such_tensor"
    error = load_error(model)
    assert "<ModelProto> is not a valid ONNX model" in str(error)


def test_damaged_string_fields_are_a_model_error() -> None:
    """protobuf returns bytes for non-UTF-8 strings; that must not escape as a TypeError."""
    data = mlp().SerializeToString()
    index = data.index(b"MatMul")
    damaged = data[:index] + b"\xffatMul" + data[index + 6:]
    error = load_error(damaged)
    assert "UTF-8" in str(error) or NOT_ONNX.search(str(error))


def test_invalid_element_type_is_a_model_error() -> None:
    model = mlp()
    model.graph.input[0].type.tensor_type.elem_type = 65  # no such TensorProto type
    error = load_error(model)
    assert NOT_ONNX.search(str(error))


# ----------------------------------------------------------------------------- opsets


def test_opset_too_new() -> None:
    error = load_error(mlp(opset=30))
    message = str(error)
    assert "opset 30, too new" in message
    assert f"{MIN_OPSET}-{MAX_OPSET}" in message and "opset_version=17" in message


def test_opset_too_old() -> None:
    error = load_error(mlp(opset=5))
    message = str(error)
    assert "opset 5, too old" in message and "version_converter" in message


def test_no_default_opset() -> None:
    model = mlp()
    del model.opset_import[:]
    assert "declares no default-domain (ai.onnx) opset (opset_import is empty)" in str(
        load_error(model))
    ml_only = mlp()
    del ml_only.opset_import[:]
    ml_only.opset_import.append(onnx.helper.make_opsetid("ai.onnx.ml", 3))
    assert "it uses only ['ai.onnx.ml']" in str(load_error(ml_only))


# ----------------------------------------------------------------------------- operators


def test_all_unknown_ops_in_one_error() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    nodes = [
        helper.make_node("Foo", ["x"], ["a"], name="foo1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("Bar", ["b"], ["c"], name="bar1"),
        helper.make_node("Foo", ["c"], ["d"], name="foo2"),
        helper.make_node("Baz", ["d"], ["y"], name="baz1", domain="com.acme"),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "unknown_ops", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)],
    )
    error = load_error(model, UnsupportedOpsError)
    assert len(error.problems) == 3, error.problems
    message = str(error)
    assert message.startswith("3 unsupported operator(s)")
    assert "Foo: not an ONNX operator at node(s) foo1, foo2" in message
    assert "Bar: not an ONNX operator at node(s) bar1" in message
    assert "Baz (com.acme): custom domain 'com.acme'" in message and "baz1" in message
    assert "Relu" not in message
    assert "standard ONNX ops or re-export" in message


def test_unknown_op_inside_a_subgraph_is_found() -> None:
    then_out = helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])
    else_out = helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])
    then_graph = helper.make_graph(
        [helper.make_node("Qux", ["x"], ["t"], name="inner_qux")], "then", [], [then_out])
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [], [else_out])
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph,
                              else_branch=else_graph, name="if")],
            "branches",
            [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
             helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    error = load_error(model, UnsupportedOpsError)
    assert error.problems == ["Qux: not an ONNX operator at node(s) inner_qux"]


def test_op_newer_than_the_model_opset() -> None:
    # Gelu joined the default domain in opset 20.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Gelu", ["x"], ["y"], name="g")], "gelu", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    error = load_error(model, UnsupportedOpsError)
    assert "Gelu: does not exist in opset 17" in str(error)


# ----------------------------------------------------------------------------- external data


def save_with_external_data(model: onnx.ModelProto, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    external_data_helper.convert_model_to_external_data(
        copy, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    onnx.save_model(copy, str(path))
    assert (folder / "weights.bin").is_file()
    return path


def relocate_external_data(path: Path, location: str) -> None:
    """Rewrite the model at `path` so that every external tensor points at `location`."""
    proto = onnx.load_model(str(path), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(proto):  # noqa: SLF001
        if external_data_helper.uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    path.write_bytes(proto.SerializeToString())


def test_external_data_next_to_the_model_loads(tmp_path: Path) -> None:
    original = mlp()
    path = save_with_external_data(original, tmp_path / "model")
    model = lepton_edge.load(path)
    assert not any(external_data_helper.uses_external_data(t)
                   for t in model.proto.graph.initializer)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(ort_run(model.proto, x), ort_run(original, x), rtol=1e-6)
    assert [s.shape for s in model.inputs] == [("N", 4)]
    assert model.sha256 == lepton_edge.load(original).sha256  # storage does not change identity


def test_external_data_in_a_parent_folder_is_refused(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "model")
    (tmp_path / "model" / "weights.bin").rename(tmp_path / "secret.bin")
    relocate_external_data(path, "../secret.bin")
    error = load_error(path)
    message = str(error)
    assert "refusing external data" in message and "'../secret.bin'" in message
    assert "outside the model folder" in message and "relative paths" in message


def test_external_data_at_an_absolute_path_is_refused(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "model")
    secret = tmp_path / "secret.bin"
    (tmp_path / "model" / "weights.bin").rename(secret)
    relocate_external_data(path, str(secret))
    error = load_error(path)
    assert "outside the model folder" in str(error) and str(secret) in str(error)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symbolic links")
def test_external_data_symlinked_outside_is_refused(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "model")
    weights = tmp_path / "model" / "weights.bin"
    weights.rename(tmp_path / "secret.bin")
    weights.symlink_to(tmp_path / "secret.bin")
    error = load_error(path)
    assert "outside the model folder" in str(error)


def test_missing_external_data_file(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "model")
    (tmp_path / "model" / "weights.bin").unlink()
    error = load_error(path)
    assert "needs external data file" in str(error) and "missing" in str(error)


def set_external_field(path: Path, key: str, value: str) -> None:
    """Set `key` of the first external tensor's external_data entries to `value`."""
    proto = onnx.load_model(str(path), load_external_data=False)
    tensor = proto.graph.initializer[0]
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            break
    else:
        tensor.external_data.add(key=key, value=value)
    path.write_bytes(proto.SerializeToString())


@pytest.mark.parametrize("key, value, words", [
    ("length", "abc", "malformed external data offset or length"),
    ("offset", "-4", "malformed external data offset or length"),
    ("length", "999999", "cannot load the external data"),
    ("offset", "999999", "cannot load the external data"),
    ("location", "", "names no valid file"),
    ("location", "a\0b", "names no valid file"),
])
def test_malformed_external_data_fields(tmp_path: Path, key: str, value: str, words: str
                                        ) -> None:
    path = save_with_external_data(mlp(), tmp_path / "model")
    set_external_field(path, key, value)
    error = load_error(path)
    assert words in str(error) and "'w1'" in str(error)


def test_bytes_of_a_model_with_external_data(tmp_path: Path) -> None:
    path = save_with_external_data(mlp(), tmp_path / "model")
    error = load_error(path.read_bytes())
    message = str(error)
    assert "<bytes> refers to external data files" in message
    assert "load it from its path" in message


# ----------------------------------------------------------------------------- the caller's objects


def test_model_proto_is_not_modified() -> None:
    original = mlp(batch=None)  # an unnamed dynamic dim, which load() names on its copy
    before = original.SerializeToString()
    model = lepton_edge.load(original)
    assert original.SerializeToString() == before
    assert model.proto is not original
    assert model.inputs[0].shape == ("x_dim0", 4)


def test_model_proto_is_not_modified_when_refused() -> None:
    original = mlp(opset=30)
    before = original.SerializeToString()
    load_error(original)
    assert original.SerializeToString() == before


def test_sequence_and_optional_graph_io_load() -> None:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    opt = helper.make_value_info("o", helper.make_optional_type_proto(
        helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.INT64, [3]))))
    out = helper.make_tensor_sequence_value_info("y", TensorProto.FLOAT, None)
    n = helper.make_tensor_value_info("n", TensorProto.BOOL, [])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Identity", ["s"], ["y"], name="id"),
                           helper.make_node("OptionalHasElement", ["o"], ["n"], name="has")],
                          "seq", [seq, opt], [out, n]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    loaded = lepton_edge.load(model)
    assert [str(s) for s in loaded.inputs] == ["s: sequence<float32[...]>",
                                               "o: optional<sequence<int64[3]>>"]
    assert [(s.kind, s.shape) for s in loaded.inputs] == [("sequence", None),
                                                          ("optional_sequence", (3,))]
    assert [s.kind for s in loaded.outputs] == ["sequence", "tensor"]


@pytest.mark.parametrize("value_type, words", [
    (helper.make_sequence_type_proto(helper.make_sequence_type_proto(
        helper.make_tensor_type_proto(TensorProto.FLOAT, None))),
     "'s' is sequence<sequence<tensor>>"),
    (helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(
        TensorProto.FLOAT, None)), "'s' is map<int64, tensor>"),
])
def test_nested_or_map_graph_input_is_refused(value_type, words: str) -> None:
    model = helper.make_model(
        helper.make_graph([], "passthrough", [helper.make_value_info("s", value_type)],
                          [helper.make_value_info("s", value_type)]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    message = str(load_error(model))
    assert words in message, message
    assert "takes tensors, sequences of tensors and optionals of those" in message


def test_strict_inference_failure_onnxruntime_runs_is_tolerated() -> None:
    """onnx's own MeanVarianceNormalization function body (opset 13) fails strict shape
    inference when `axes` is left at its default; onnxruntime runs the op: it loads."""
    model = helper.make_model(
        helper.make_graph([helper.make_node("MeanVarianceNormalization", ["x"], ["y"])], "mvn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3, 3, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3, 3, 1])]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    with pytest.raises(onnx.shape_inference.InferenceError):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
    loaded = lepton_edge.load(model)
    assert [str(s) for s in loaded.outputs] == ["y: float32[3, 3, 3, 1]"]


def test_really_inconsistent_shapes_still_refused() -> None:
    """A model whose shapes contradict each other: strict inference and onnxruntime both
    refuse it, so load names the inference error."""
    model = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "bad",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
                           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    message = str(load_error(model))
    assert "is not a valid ONNX model" in message and "ShapeInferenceError" in message, message


def test_input_without_shape() -> None:
    model = mlp()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    model.graph.output[0].type.tensor_type.ClearField("shape")
    error = load_error(model)
    assert "'x' has no shape" in str(error) or NOT_ONNX.search(str(error))


# ----------------------------------------------------------------------------- torch


class _TinyNet:
    """Built lazily so that collecting this module does not import torch."""

    @staticmethod
    def make():
        import torch

        class TinyNet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.linear = torch.nn.Linear(4, 3)

            def forward(self, x):
                return torch.relu(self.linear(x))

        torch.manual_seed(0)
        return TinyNet()


def test_torch_module_needs_example_inputs() -> None:
    pytest.importorskip("torch")
    error = load_error(_TinyNet.make())
    assert "needs example_inputs" in str(error) and "tensor" in str(error)


def test_torch_example_inputs_must_be_tensors() -> None:
    pytest.importorskip("torch")
    error = load_error(_TinyNet.make(), example_inputs=[[1.0, 2.0, 3.0, 4.0]])
    assert "example_inputs must be torch tensors" in str(error)


def test_torch_module_exports_with_a_symbolic_batch() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    net = _TinyNet.make()
    net.train()
    # a batch-1 example would be specialised by torch.export; load() keeps it symbolic
    model = lepton_edge.load(net, example_inputs=torch.randn(1, 4))
    assert [s.shape for s in model.inputs] == [("N", 4)]
    assert model.outputs[0].shape == ("N", 3)
    assert net.training, "load() restores the module's training mode"
    x = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float32)
    session = onnxruntime.InferenceSession(model.proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = session.run(None, {model.inputs[0].name: x})[0]
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
