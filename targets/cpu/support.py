"""Which ONNX nodes the CPU target compiles, and why not."""

from __future__ import annotations

import functools

import onnx

from lepton_edge.lowering.relax import supported_onnx_ops

# Element types TVM's LLVM backend has no arithmetic for.
_UNSUPPORTED_TYPES = {
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.COMPLEX64: "complex64",
    onnx.TensorProto.COMPLEX128: "complex128",
}
# onnxruntime contrib ops that TVM's importer also converts.
_CONTRIB_OPS = {"FastGelu", "BiasGelu", "SkipLayerNormalization", "EmbedLayerNormalization",
                "Attention"}


@functools.cache
def _ops() -> frozenset[str]:
    return supported_onnx_ops()


def unsupported_reason(node: onnx.NodeProto, value_types: dict[str, int]) -> str | None:
    domain = node.domain or ""
    if domain == "com.microsoft":
        if node.op_type not in _CONTRIB_OPS:
            return f"TVM has no converter for contrib op com.microsoft.{node.op_type}"
    elif domain not in ("", "ai.onnx"):
        return f"TVM has no converter for ops of domain '{domain}'"
    elif node.op_type not in _ops():
        return f"TVM 0.27's ONNX importer has no converter for {node.op_type}"
    for name in list(node.input) + list(node.output):
        elem = value_types.get(name)
        if elem in _UNSUPPORTED_TYPES:
            return f"tensor '{name}' is {_UNSUPPORTED_TYPES[elem]}, which TVM cannot compute on"
    return None
