"""Compiled fp32 outputs match onnxruntime (relative error <= 1e-4) at batch 1 and 8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from tests.conftest import assert_close, ort_run

REPO = Path(__file__).resolve().parents[2]
rng = np.random.default_rng(0)


def const(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def mlp() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["a1"]),
        helper.make_node("MatMul", ["a1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["h3"]),
        helper.make_node("Tanh", ["h3"], ["a2"]),
        helper.make_node("Gemm", ["a2", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])],
        [const("w1", 64, 32), const("b1", 64), const("w2", 64, 48), const("b2", 48),
         const("w3", 48, 10), const("b3", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def residual_bn_cnn() -> onnx.ModelProto:
    def bn(prefix: str, c: int) -> list[onnx.TensorProto]:
        return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in (
            ("s", 1 + 0.1 * rng.standard_normal(c)), ("b", 0.1 * rng.standard_normal(c)),
            ("m", 0.1 * rng.standard_normal(c)), ("v", 0.5 + rng.random(c)))]

    def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
        return helper.make_node("BatchNormalization",
                                [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                                [y], epsilon=1e-5)

    nodes = [
        helper.make_node("Conv", ["x", "c0"], ["t0"], pads=[1, 1, 1, 1]),
        bn_node("bn0", "t0", "t1"), helper.make_node("Relu", ["t1"], ["r0"]),
        # residual block
        helper.make_node("Conv", ["r0", "c1"], ["t2"], pads=[1, 1, 1, 1]),
        bn_node("bn1", "t2", "t3"), helper.make_node("Relu", ["t3"], ["t4"]),
        helper.make_node("Conv", ["t4", "c2"], ["t5"], pads=[1, 1, 1, 1]),
        bn_node("bn2", "t5", "t6"),
        helper.make_node("Add", ["t6", "r0"], ["t7"]), helper.make_node("Relu", ["t7"], ["r1"]),
        # strided block with a 1x1 projection on the skip path
        helper.make_node("Conv", ["r1", "c3"], ["t8"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["t8"], ["t9"]),
        helper.make_node("Conv", ["r1", "c4"], ["skip"], strides=[2, 2]),
        helper.make_node("Add", ["t9", "skip"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
    ]
    inits = [const("c0", 8, 3, 3, 3), const("c1", 8, 8, 3, 3), const("c2", 8, 8, 3, 3),
             const("c3", 16, 8, 3, 3), const("c4", 16, 8, 1, 1), const("fc", 5, 16),
             const("fcb", 5)] + bn("bn0", 8) + bn("bn1", 8) + bn("bn2", 8)
    graph = helper.make_graph(
        nodes, "resnet_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def transformer_block() -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                             dropout=0.0, activation="gelu", batch_first=True)
    model = lepton_edge.load(layer, torch.randn(2, 12, 64), input_names=["tokens"])
    return model.proto


CASES = {
    "mlp": mlp,
    "digits_cnn": lambda: onnx.load(REPO / "samples/digits/digits.onnx"),
    "residual_bn_cnn": residual_bn_cnn,
    "transformer_block": transformer_block,
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_onnxruntime(name: str, build) -> None:
    proto = CASES[name]()
    model = lepton_edge.load(proto)
    _, session = build(model)
    assert [p.target for p in session.placement.values()] == ["cpu"], session.placement
    assert session.self_test().passed
    for batch in (1, 8):
        feeds = {}
        for spec in session.inputs:
            shape = [batch if isinstance(d, str) else d for d in spec.shape]
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))
