"""Which ONNX nodes the Vitis target can generate HLS C++ for, and why not.

Decisions here are per node (types, attributes, constants); how the nodes chain into integer
kernels (DQ -> Conv/Gemm/MatMul -> [Relu|Clip] -> Q) is checked when a subgraph is compiled,
and a subgraph whose nodes do not form such a chain is refused there with the reason.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

T = onnx.TensorProto
_OPS = {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Relu", "Clip",
        "MaxPool", "Flatten", "Reshape"}


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _static(shape: Any) -> bool:
    """Static apart from a symbolic leading batch dimension."""
    return shape is not None and all(isinstance(d, int) and d > 0 for d in list(shape)[1:])


def _size(graph: Any, name: str) -> int | None:
    if name in graph.initializers:
        dims = list(graph.initializers[name].dims)
        n = 1
        for d in dims:
            n *= d
        return n
    return None


def unsupported_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    if (node.domain or "") not in ("", "ai.onnx"):
        return f"vitis generates only standard ONNX ops, not domain '{node.domain}'"
    op = node.op_type
    if op not in _OPS:
        return f"vitis has no HLS generator for {op} (int8 QDQ Conv/Gemm/MatMul/MaxPool only)"
    types, shapes = graph.value_types, graph.value_shapes
    if op == "QuantizeLinear":
        if len(node.input) < 3 or types.get(node.input[2]) != T.INT8:
            return "vitis QuantizeLinear must produce int8 (an int8 zero point is required)"
        for name in node.input[1:3]:
            if _size(graph, name) != 1:
                return "vitis needs a constant scalar activation scale and zero point"
        if _attr(node, "saturate", 1) != 1:
            return "vitis QuantizeLinear must saturate"
        return None
    if op == "DequantizeLinear":
        src = node.input[0]
        if src in graph.initializers:
            if types.get(src) not in (T.INT8, T.INT32):
                return "vitis dequantizes only int8 weights or int32 biases"
            if len(node.input) > 2 and node.input[2]:
                zp = graph.initializers.get(node.input[2])
                if zp is None or any(onnx.numpy_helper.to_array(zp).ravel() != 0):
                    return "vitis needs symmetric weights (weight zero point 0)"
            return None
        if types.get(src) != T.INT8:
            return "vitis DequantizeLinear input must be int8"
        for name in node.input[1:3]:
            if name and _size(graph, name) != 1:
                return "vitis needs a constant scalar activation scale and zero point"
        return None
    if op == "Conv":
        if len(node.input) < 2:
            return "Conv without weights"
        w_shape = shapes.get(node.input[1])
        x_shape = shapes.get(node.input[0])
        if x_shape is None or len(x_shape) != 4 or not _static(x_shape):
            return "vitis Conv needs a static NCHW input (only the batch may be symbolic)"
        group = int(_attr(node, "group", 1))
        if group != 1 and group != x_shape[1]:
            return f"vitis Conv supports group 1 or depthwise, not group {group}"
        if any(d != 1 for d in _attr(node, "dilations", [1, 1])):
            return "vitis Conv does not support dilations"
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "vitis Conv needs explicit pads (auto_pad unsupported)"
        if w_shape is None or len(w_shape) != 4:
            return "vitis Conv needs a constant 4-D weight"
        return None
    if op in ("Gemm", "MatMul"):
        x_shape = shapes.get(node.input[0])
        if x_shape is None or len(x_shape) != 2 or not _static(x_shape):
            return f"vitis {op} needs a static 2-D input (only the batch may be symbolic)"
        if op == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                             or _attr(node, "beta", 1.0) != 1.0):
            return "vitis Gemm needs transA=0, alpha=1, beta=1"
        return None
    if op == "MaxPool":
        x_shape = shapes.get(node.input[0])
        if x_shape is None or len(x_shape) != 4 or not _static(x_shape):
            return "vitis MaxPool needs a static NCHW input"
        if _attr(node, "ceil_mode", 0) or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
            return "vitis MaxPool does not support ceil_mode or dilations"
        if len(node.output) > 1 and node.output[1]:
            return "vitis MaxPool does not return indices"
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return "vitis MaxPool needs explicit pads"
        return None
    if op == "Flatten":
        if int(_attr(node, "axis", 1)) != 1:
            return "vitis Flatten must keep the batch axis (axis=1)"
        return None
    if op == "Reshape":
        if node.input[1] not in graph.initializers:
            return "vitis Reshape needs a constant shape"
        out = shapes.get(node.output[0])
        if out is None or not _static(out):
            return "vitis Reshape needs a static output shape (only the batch may be symbolic)"
        return None
    return None  # Relu, Clip: checked in context at compile time
