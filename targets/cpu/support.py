"""Which ONNX nodes the CPU target compiles, and why not.

Besides "TVM has no converter", this lists the configurations where TVM 0.27's importer has a
converter but computes the wrong answer (found by `make conformance`, see
conformance/RESULTS.md). Those nodes go to the onnxruntime fallback instead: a correct
answer on the slower executor beats a fast wrong one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import onnx
from onnx import helper

from lepton_edge.lowering.relax import supported_onnx_ops

T = onnx.TensorProto
# Element types TVM's LLVM backend cannot compute on (or decodes wrongly: float8 NaNs).
_UNSUPPORTED_TYPES = {
    T.STRING: "string", T.COMPLEX64: "complex64", T.COMPLEX128: "complex128",
    T.FLOAT8E4M3FN: "float8e4m3fn", T.FLOAT8E4M3FNUZ: "float8e4m3fnuz",
    T.FLOAT8E5M2: "float8e5m2", T.FLOAT8E5M2FNUZ: "float8e5m2fnuz",
    T.UINT4: "uint4", T.INT4: "int4",
}
for _name in ("FLOAT4E2M1", "FLOAT8E8M0", "UINT2", "INT2"):
    if hasattr(T, _name):
        _UNSUPPORTED_TYPES[getattr(T, _name)] = _name.lower()
# onnxruntime contrib ops that TVM's importer also converts.
_CONTRIB_OPS = {"FastGelu", "BiasGelu", "SkipLayerNormalization", "EmbedLayerNormalization",
                "Attention"}


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _used_outputs(node: onnx.NodeProto) -> int:
    return sum(1 for o in node.output if o)


def _not_constant(index: int) -> Callable[[onnx.NodeProto, Any], bool]:
    def check(node: onnx.NodeProto, graph: Any) -> bool:
        return len(node.input) > index and node.input[index] not in graph.initializers
    return check


# op -> (condition on the node, why it is kept off TVM)
_WRONG_ON_TVM: dict[str, tuple[Callable[[onnx.NodeProto, Any], bool], str]] = {
    "Expand": (_not_constant(1),
               "TVM 0.27 expands to the wrong shape when the shape is a runtime input"),
    "NonMaxSuppression": (lambda n, g: True, "TVM 0.27's NonMaxSuppression selects no boxes"),
    "LayerNormalization": (lambda n, g: _used_outputs(n) > 1,
                           "TVM 0.27 returns zeros for LayerNormalization's Mean/InvStdDev"),
    "ConvTranspose": (lambda n, g: _attr(n, "output_shape") is not None,
                      "TVM 0.27 ignores ConvTranspose's output_shape attribute"),
    "BatchNormalization": (lambda n, g: bool(_attr(n, "training_mode", 0)),
                           "TVM 0.27 computes wrong running statistics in training mode"),
    "IsInf": (lambda n, g: not _attr(n, "detect_negative", 1) or not _attr(
        n, "detect_positive", 1), "TVM 0.27 ignores IsInf's detect_negative/detect_positive"),
    "Dropout": (lambda n, g: _used_outputs(n) > 1 or len(n.input) > 2,
                "TVM 0.27 returns a float mask and ignores training_mode"),
    "Mod": (lambda n, g: g.value_types.get(n.input[0]) in (T.FLOAT, T.DOUBLE, T.FLOAT16,
                                                             T.BFLOAT16),
            "TVM 0.27 gets float Mod's inf/NaN and division-by-zero cases wrong"),
    "Mish": (lambda n, g: True, "TVM 0.27's Mish is off by up to 1.3e-3 relative"),
    "RoiAlign": (lambda n, g: _attr(n, "mode", b"avg") in (b"max", "max"),
                 "TVM 0.27's RoiAlign max mode is wrong"),
}


@functools.cache
def _ops() -> frozenset[str]:
    return supported_onnx_ops()


def unsupported_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    domain = node.domain or ""
    if domain == "com.microsoft":
        if node.op_type not in _CONTRIB_OPS:
            return f"TVM has no converter for contrib op com.microsoft.{node.op_type}"
    elif domain not in ("", "ai.onnx"):
        return f"TVM has no converter for ops of domain '{domain}'"
    elif node.op_type not in _ops():
        return f"TVM 0.27's ONNX importer has no converter for {node.op_type}"
    for name in list(node.input) + list(node.output):
        elem = graph.value_types.get(name)
        if elem in _UNSUPPORTED_TYPES:
            return f"tensor '{name}' is {_UNSUPPORTED_TYPES[elem]}, which TVM cannot compute on"
    if domain in ("", "ai.onnx") and node.op_type in _WRONG_ON_TVM:
        condition, why = _WRONG_ON_TVM[node.op_type]
        if condition(node, graph):
            return why
    return None
