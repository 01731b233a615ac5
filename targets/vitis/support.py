"""Which ONNX nodes the Vitis target takes, and why not.

A node is taken when it is part of an int8 kernel: DequantizeLinear -> Conv / Gemm / MatMul (+ constant bias Add) /
Add / AveragePool (-> Relu | Clip) -> QuantizeLinear, MaxPool / Flatten / Reshape between a
DequantizeLinear and its consumers, and the constant weight/bias DequantizeLinears. Decided
per node from its own attributes and its direct neighbours (GraphView.nodes).

Placement decision (issue #8): the FPGA takes the int8 work and the int8 glue between it,
the host CPU the float boundary.
- MaxPool, Flatten and Reshape between FPGA layers stay on the FPGA: on int8 values they are
  exact (max is monotone, reshapes move nothing), cost no DSPs, and keeping them there
  avoids a round trip (for the digits CNN the 32x8x8 conv output would go down to the host
  and its 32x4x4 pooled copy back up, plus a second kernel launch per batch).
- A QuantizeLinear of a float tensor that does not come from an FPGA layer (the model's
  float input) and a DequantizeLinear whose float result leaves the FPGA (the logits) run on
  the host CPU: float conversion is host work, and the kernel's AXI ports then carry int8,
  a quarter of the bytes of float32.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

T = onnx.TensorProto
_OPS = {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Relu", "Clip",
        "MaxPool", "AveragePool", "Add", "Flatten", "Reshape"}
_MATMULS = {"Conv", "Gemm", "MatMul"}
_FLOAT_RESULT = _MATMULS | {"Add", "AveragePool"}  # float results a QuantizeLinear ends
_TAKES_DQ = _MATMULS | {"Add", "AveragePool", "MaxPool", "Flatten", "Reshape"}
_QUANTIZED_BY = _FLOAT_RESULT | {"Relu", "Clip", "MaxPool", "Flatten", "Reshape",
                                 "DequantizeLinear"}

_LINKS: dict[int, tuple[Any, dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]] = {}


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
        n = 1
        for d in graph.initializers[name].dims:
            n *= d
        return n
    return None


def _links(graph: Any) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """Producer and consumers of every tensor, cached per GraphView."""
    cached = _LINKS.get(id(graph))
    if cached is not None and cached[0] is graph:
        return cached[1], cached[2]
    producers: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in getattr(graph, "nodes", ()):
        for out in node.output:
            producers[out] = node
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    if len(_LINKS) > 8:
        _LINKS.clear()
    _LINKS[id(graph)] = (graph, producers, consumers)
    return producers, consumers


def _is_activation_dq(node: onnx.NodeProto | None, graph: Any) -> bool:
    return (node is not None and node.op_type == "DequantizeLinear"
            and node.input[0] not in graph.initializers)


def _is_weight_dq(node: onnx.NodeProto | None, graph: Any) -> bool:
    return (node is not None and node.op_type == "DequantizeLinear"
            and node.input[0] in graph.initializers)


def _bias_add(node: onnx.NodeProto, graph: Any) -> bool:
    """Add(MatMul/Gemm result, constant per-output-channel bias): int8.py folds the bias into
    the integer accumulator, so it is part of the matmul kernel."""
    if node.op_type != "Add" or len(node.input) != 2 or not getattr(graph, "nodes", ()):
        return False
    producers, _ = _links(graph)
    for mm, bias in (node.input, node.input[::-1]):
        src = producers.get(mm)
        if src is None or src.op_type not in ("MatMul", "Gemm"):
            continue
        const = bias if bias in graph.initializers else None
        dq = producers.get(bias)
        if const is None and _is_weight_dq(dq, graph):
            const = dq.input[0]
        out = graph.value_shapes.get(mm)
        if const is None or not out:
            continue
        size = _size(graph, const)
        if size is not None and size in (1, out[-1]):
            return True
    return False


def unsupported_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    if (node.domain or "") not in ("", "ai.onnx"):
        return f"vitis generates only standard ONNX ops, not domain '{node.domain}'"
    op = node.op_type
    if op not in _OPS:
        return (f"vitis has no HLS generator for {op} (int8 QDQ Conv/Gemm/MatMul/Add/"
                "AveragePool/MaxPool/Reshape only)")
    own = _own_reason(node, graph)
    if own is not None or not getattr(graph, "nodes", ()):
        return own
    return _context_reason(node, graph)


def _own_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    """Types, attributes and constants of the node itself."""
    op = node.op_type
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
    if op in ("MaxPool", "AveragePool"):
        x_shape = shapes.get(node.input[0])
        if x_shape is None or len(x_shape) != 4 or not _static(x_shape):
            return f"vitis {op} needs a static NCHW input"
        if _attr(node, "ceil_mode", 0) or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
            return f"vitis {op} does not support ceil_mode or dilations"
        if len(node.output) > 1 and node.output[1]:
            return "vitis MaxPool does not return indices"
        if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            return f"vitis {op} needs explicit pads"
        return None
    if op == "Add":
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        if _bias_add(node, graph):
            return None
        if a is None or a != b or not _static(a):
            return "vitis Add needs two inputs of one static shape (no broadcasting)"
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
    if op == "Clip":
        for name in node.input[1:]:
            if name and _size(graph, name) != 1:
                return "vitis Clip needs constant scalar bounds"
    return None  # Relu


def _context_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    """Where the node sits: is it part of an int8 kernel, or host-side float conversion?"""
    producers, consumers = _links(graph)
    op = node.op_type
    users = consumers.get(node.output[0], []) if node.output else []
    leaves = node.output[0] in graph.outputs if node.output else False
    src = producers.get(node.input[0]) if node.input else None
    if op == "QuantizeLinear":
        if src is None or src.op_type not in _QUANTIZED_BY or (
                src.op_type == "DequantizeLinear" and not _is_activation_dq(src, graph)):
            what = f"{src.op_type} '{src.name}'" if src is not None else "a graph input"
            return (f"float -> int8 conversion of '{node.input[0]}' (from {what}) runs on the "
                    "host CPU: the FPGA kernel takes int8, a quarter of float32's bytes on AXI")
        if src.op_type == "DequantizeLinear":  # a requantize to a new scale
            return None
        if unsupported_reason(src, graph) is not None:
            return f"its input comes from {src.op_type} '{src.name}', which is not on the FPGA"
        return None
    if op == "DequantizeLinear":
        if leaves:
            return (f"int8 -> float conversion of a model output ('{node.output[0]}') runs on "
                    "the host CPU")
        if not users:
            return "its result is not used"
        if node.input[0] in graph.initializers:
            bad = [u for u in users if u.op_type not in _MATMULS and not _bias_add(u, graph)]
            if bad:
                return f"constant dequantized for {bad[0].op_type} '{bad[0].name}', not a matmul"
            return None
        bad = [u for u in users if u.op_type not in _TAKES_DQ | {"QuantizeLinear"}
               or (_own_reason(u, graph) if u.op_type == "QuantizeLinear"
                   else unsupported_reason(u, graph)) is not None]
        if bad:
            return (f"int8 -> float conversion for {bad[0].op_type} '{bad[0].name}', which is "
                    "not on the FPGA, runs on the host CPU")
        return None
    if op in _MATMULS:
        if not _is_activation_dq(src, graph):
            return f"vitis {op} needs a dequantized int8 activation as input"
        if not _is_weight_dq(producers.get(node.input[1]), graph):
            return f"vitis {op} needs a constant int8 weight (DequantizeLinear of a constant)"
        if len(node.input) > 2 and node.input[2] and node.input[2] not in graph.initializers \
                and not _is_weight_dq(producers.get(node.input[2]), graph):
            return f"vitis {op} needs a constant bias"
    elif op == "Add" and _bias_add(node, graph):
        pass  # the matmul operand's own checks decide
    elif op == "Add":
        if not all(_is_activation_dq(producers.get(name), graph) for name in node.input[:2]):
            return "vitis Add needs two dequantized int8 activations (QLinearAdd pattern)"
    elif op in ("MaxPool", "AveragePool", "Flatten", "Reshape"):
        if not (_is_activation_dq(src, graph) or (src is not None and op in ("Flatten", "Reshape")
                                                   and src.op_type in ("MaxPool", "Flatten",
                                                                       "Reshape"))):
            return f"vitis {op} needs a dequantized int8 activation as input"
    elif op in ("Relu", "Clip"):
        if src is None or src.op_type not in _FLOAT_RESULT:
            return f"vitis {op} must follow Conv/Gemm/MatMul/Add/AveragePool"
    if op in _FLOAT_RESULT | {"Relu", "Clip"}:
        follow = {"QuantizeLinear"} if op in ("Relu", "Clip") else {"QuantizeLinear", "Relu",
                                                                      "Clip"}
        if op == "AveragePool":
            follow = {"QuantizeLinear"}
        if leaves or not users or any(u.op_type not in follow and not (
                op in ("MatMul", "Gemm") and _bias_add(u, graph)) for u in users):
            return (f"the float result of {op} must be requantized (QuantizeLinear) on the "
                    "FPGA, not used in float")
    if op in ("MaxPool", "Flatten", "Reshape"):
        if leaves or not users or any(u.op_type not in _TAKES_DQ | {"QuantizeLinear"}
                                      for u in users):
            return f"the result of {op} leaves the FPGA in float"
    return None
