"""Shared test helpers: compile a model, run it, and compare against onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.reference import reference_session
from lepton_edge.runtime.session import compare


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def spec_output(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output under the ONNX semantics (lepton_edge.reference)."""
    return reference_session(model).run(None, feeds)[0]


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rel: float = 1e-4
                 ) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        _, rel_err = compare(got[name], want[name])
        assert rel_err <= rel, f"{name}: relative error {rel_err:.3g} > {rel:g}"


@pytest.fixture
def build(tmp_path: Path):
    """build(model, targets=("cpu",), **kw) -> (artifact path, session)."""

    def _build(model, targets=("cpu",), devices=None, fallback=True, **kw):
        art = lepton_edge.compile(model, list(targets), fallback=fallback, **kw)
        path = art.save(tmp_path / "model.lepton")
        return path, lepton_edge.runtime.load(path, devices=devices, fallback=fallback)

    return _build


def mlp(opset: int = 17, batch: str | int | None = "N") -> onnx.ModelProto:
    """x[batch, 4] -> MatMul -> Add -> Relu -> MatMul -> y[batch, 3]; batch None = unnamed."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["h2"], name="add1"),
        helper.make_node("Relu", ["h2"], ["h3"], name="relu"),
        helper.make_node("MatMul", ["h3", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
