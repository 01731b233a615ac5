"""Function bodies of our own for ops that have neither an ONNX function body nor a correct
TVM 0.27 converter: the QOperator-format integer ops (QLinearMatMul, QLinearConv,
ConvInteger), LpNormalization, and EyeLike with a `dtype` attribute.

`body(node, opset, types)` builds an equivalent `FunctionProto` from ops TVM does convert, and
lowering/onnx_fixups.py expands it like any other function op (so the planner, `explain` and
the importer treat these nodes the same way).

Exactness: the integer products are summed in float64, which is exact for any sum below
2**53 (an int8/uint8 convolution would need more than 2**37 taps to reach it), and the
requantization follows the ONNX definition (and its reference implementation) step by step:
the scale ratio `x_scale * w_scale / y_scale` in the scales' own float type, the product in
float64, `+ y_zero_point`, saturate, round half to even (Floor-based before opset 11). So the result is the exact integer
the ONNX spec asks for, not a float32 approximation of it.

Speed: these bodies compute in float64. A QOperator model that matters for speed should be
quantized to QDQ (`lepton-edge quantize`), whose Conv/MatMul become int8 kernels
(lowering/int8.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

T = onnx.TensorProto
_RANGES = {T.INT8: (-128, 127), T.UINT8: (0, 255)}


class _Builder:
    def __init__(self, node: onnx.NodeProto) -> None:
        self.node = node
        self.nodes: list[onnx.NodeProto] = []
        self.count = 0

    def add(self, op: str, inputs: list[str], **attrs: Any) -> str:
        self.count += 1
        out = f"_q{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        self.count += 1
        out = f"_c{self.count}"
        self.nodes.append(helper.make_node("Constant", [], [out],
                                           value=numpy_helper.from_array(value, out)))
        return out

    def double(self, name: str) -> str:
        return self.add("Cast", [name], to=T.DOUBLE)

    def centered(self, value: str, zero_point: str | None, channel_axis_rank: int = 0) -> str:
        """float64(value) - float64(zero_point); a 1-D zero point per output channel is
        reshaped to [C, 1, ...] for a weight of rank `channel_axis_rank`."""
        x = self.double(value)
        if not zero_point:
            return x
        zp = self.double(zero_point)
        if channel_axis_rank:
            zp = self.add("Reshape", [zp, self.const(
                np.array([-1] + [1] * (channel_axis_rank - 1), np.int64))])
        return self.add("Sub", [x, zp])

    def requantize(self, acc: str, scale: str, y_zero_point: str, out_type: int,
                   opset: int) -> str:
        low, high = _RANGES[out_type]
        y = self.add("Add", [self.add("Mul", [acc, self.double(scale)]),
                             self.double(y_zero_point)])
        y = self.add("Max", [self.add("Min", [y, self.const(np.array(high, np.float64))]),
                             self.const(np.array(low, np.float64))])
        return self.add("Cast", [self.round_half_even(y, opset)], to=out_type)

    def round_half_even(self, y: str, opset: int) -> str:
        if opset >= 11:
            return self.add("Round", [y])
        # no Round before opset 11: floor, +1 above the half, ties to the even neighbour
        # (exact in float64 for |y| < 2**52)
        half = self.const(np.array(0.5, np.float64))
        f = self.add("Floor", [y])
        d = self.add("Sub", [y, f])
        up = self.add("Cast", [self.add("Greater", [d, half])], to=T.DOUBLE)
        tie = self.add("And", [self.add("Not", [self.add("Less", [d, half])]),
                               self.add("Not", [self.add("Greater", [d, half])])])
        odd = self.add("Sub", [f, self.add("Mul", [self.add("Floor", [self.add("Mul", [
            f, half])]), self.const(np.array(2.0, np.float64))])])
        bump = self.add("Add", [up, self.add("Mul", [self.add("Cast", [tie], to=T.DOUBLE),
                                                    odd])])
        return self.add("Add", [f, bump])

    def function(self, result: str, opset: int) -> onnx.FunctionProto:
        """The body's formal inputs are `_in<i>`, one per input slot of the node."""
        self.nodes.append(helper.make_node("Identity", [result], ["_out0"]))
        return helper.make_function(
            "lepton", self.node.op_type, [f"_in{i}" for i in range(len(self.node.input))],
            ["_out0"], self.nodes, [helper.make_opsetid("", opset)])


def _elem(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    t = types.get(name)
    return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None


def _rank(types: dict[str, onnx.TypeProto], name: str) -> int | None:
    t = types.get(name)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    return len(t.tensor_type.shape.dim)


def _conv_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def body(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]
         ) -> onnx.FunctionProto | None:
    """An equivalent function body for QLinearMatMul / QLinearConv / ConvInteger, or None
    (another op, or input types not known)."""
    op = node.op_type
    real = list(node.input)
    ins = [f"_in{i}" if name else "" for i, name in enumerate(real)]

    def elem_of(i: int) -> int | None:
        return _elem(types, real[i]) if i < len(real) else None

    def rank_of(i: int) -> int | None:
        return _rank(types, real[i]) if i < len(real) else None

    if opset < 10 or (node.domain or "") not in ("", "ai.onnx"):
        return None
    b = _Builder(node)
    if op == "QLinearMatMul" and len(ins) == 8:
        a, a_s, a_zp, w, w_s, w_zp, y_s, y_zp = ins
        out_type = elem_of(7)
        if out_type not in _RANGES:
            return None
        acc = b.add("MatMul", [b.centered(a, a_zp), b.centered(w, w_zp)])
        scale = b.add("Div", [b.add("Mul", [a_s, w_s]), y_s])
        return b.function(b.requantize(acc, scale, y_zp, out_type, opset), opset)
    if op == "QLinearConv" and len(ins) >= 8:
        x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = ins[:8]
        rank, out_type = rank_of(3), elem_of(7)
        if rank is None or out_type not in _RANGES:
            return None
        conv_in = [b.centered(x, x_zp), b.centered(w, w_zp, rank)]
        if len(ins) > 8 and ins[8]:
            conv_in.append(b.double(ins[8]))
        acc = b.add("Conv", conv_in, **_conv_attrs(node))
        scale = b.add("Div", [b.add("Mul", [x_s, w_s]), y_s])
        # a per-output-channel scale [C] broadcasts over [N, C, spatial...]
        scale = b.add("Reshape", [scale, b.const(np.array([1, -1] + [1] * (rank - 2),
                                                          np.int64))])
        return b.function(b.requantize(acc, scale, y_zp, out_type, opset), opset)
    if op == "LpNormalization" and len(ins) == 1:
        attrs = _conv_attrs(node)
        p, axis = int(attrs.get("p", 2)), int(attrs.get("axis", -1))
        if p not in (1, 2):
            return None
        reduce = "ReduceL2" if p == 2 else "ReduceL1"
        if opset >= 18:
            norm = b.add(reduce, [ins[0], b.const(np.array([axis], np.int64))], keepdims=1)
        else:
            norm = b.add(reduce, [ins[0]], axes=[axis], keepdims=1)
        # a zero norm gives 0, not 0/0 (as onnx's reference and onnxruntime do)
        zero = b.add("Sub", [ins[0], ins[0]])
        is_zero = b.add("Equal", [norm, b.add("Sub", [norm, norm])])
        return b.function(b.add("Where", [is_zero, zero, b.add("Div", [ins[0], norm])]),
                          opset)
    if op == "EyeLike" and len(ins) == 1:
        attrs = _conv_attrs(node)
        if "dtype" not in attrs:
            return None
        eye = b.add("EyeLike", [ins[0]], k=int(attrs.get("k", 0)))
        return b.function(b.add("Cast", [eye], to=int(attrs["dtype"])), opset)
    if op == "ConvInteger" and len(ins) >= 2:
        x, w = ins[:2]
        x_zp = ins[2] if len(ins) > 2 else ""
        w_zp = ins[3] if len(ins) > 3 else ""
        rank = rank_of(1)
        if rank is None:
            return None
        acc = b.add("Conv", [b.centered(x, x_zp), b.centered(w, w_zp, rank)],
                    **_conv_attrs(node))
        return b.function(b.add("Cast", [acc], to=T.INT32), opset)
    return None
