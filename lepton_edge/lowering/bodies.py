"""Function bodies of our own for ops that have neither an ONNX function body nor a correct
TVM 0.27 converter: the QOperator-format integer ops (QLinearMatMul, QLinearConv,
ConvInteger), LpNormalization, EyeLike with a `dtype` attribute, RNN/GRU/LSTM (unrolled over
a static sequence of at most `_MAX_STEPS` steps x directions), BatchNormalization in training
mode and IsInf with detect_positive/detect_negative off.

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
        return self.functions([result], opset)

    def functions(self, results: list[str], opset: int) -> onnx.FunctionProto:
        """`function` with several outputs `_out<i>`."""
        outs = [f"_out{i}" for i in range(len(results))]
        for result, out in zip(results, outs, strict=True):
            self.nodes.append(helper.make_node("Identity", [result], [out]))
        return helper.make_function(
            "lepton", self.node.op_type, [f"_in{i}" for i in range(len(self.node.input))],
            outs, self.nodes, [helper.make_opsetid("", opset)])


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
    """An equivalent function body for the ops listed at the top of this module, or None
    (another op, a configuration without a body, or input types not known)."""
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
    if op == "IsInf" and len(ins) == 1:
        attrs = _conv_attrs(node)
        pos, neg = int(attrs.get("detect_positive", 1)), int(attrs.get("detect_negative", 1))
        elem = elem_of(0)
        if elem is None or (pos and neg):
            return None
        zero = b.const(np.zeros((), helper.tensor_dtype_to_np_dtype(elem)))
        inf = b.add("IsInf", [ins[0]])
        if not pos and not neg:
            return b.function(b.add("And", [inf, b.add("Not", [inf])]), opset)
        sign = b.add("Greater" if pos else "Less", [ins[0], zero])
        return b.function(b.add("And", [inf, sign]), opset)
    if op == "BatchNormalization" and len(ins) == 5 and opset >= 14:
        return _batchnorm_training(b, node, ins, rank_of(0), elem_of(0), opset)
    if op in _GATES and len(ins) >= 3:
        return _recurrent(b, node, ins, types, real, opset)
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


def _batchnorm_training(b: _Builder, node: onnx.NodeProto, ins: list[str], rank: int | None,
                        elem: int | None, opset: int) -> onnx.FunctionProto | None:
    """BatchNormalization with training_mode=1: batch statistics (population variance), and
    the running mean/variance updated with `momentum`, as ONNX's reference computes them."""
    attrs = _conv_attrs(node)
    if not int(attrs.get("training_mode", 0)) or rank is None or rank < 2 or elem not in (
            T.FLOAT, T.DOUBLE, T.FLOAT16):
        return None
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    momentum = float(attrs.get("momentum", 0.9))
    epsilon = float(attrs.get("epsilon", 1e-5))
    x, scale, bias, mean_in, var_in = ins
    axes = [a for a in range(rank) if a != 1]

    def mean_of(v: str) -> str:
        if opset >= 18:
            return b.add("ReduceMean", [v, b.const(np.array(axes, np.int64))], keepdims=1)
        return b.add("ReduceMean", [v], axes=axes, keepdims=1)

    channel = b.const(np.array([-1] + [1] * (rank - 2), np.int64))
    flat = b.const(np.array([-1], np.int64))
    mean = mean_of(x)
    centered = b.add("Sub", [x, mean])
    var = mean_of(b.add("Mul", [centered, centered]))
    y = b.add("Add", [b.add("Div", [
        b.add("Mul", [b.add("Reshape", [scale, channel]), centered]),
        b.add("Sqrt", [b.add("Add", [var, b.const(np.array(epsilon, np_type))])])]),
        b.add("Reshape", [bias, channel])])
    keep = b.const(np.array(momentum, np_type))
    rest = b.const(np.array(1 - momentum, np_type))
    run_mean = b.add("Add", [b.add("Mul", [mean_in, keep]),
                             b.add("Mul", [b.add("Reshape", [mean, flat]), rest])])
    run_var = b.add("Add", [b.add("Mul", [var_in, keep]),
                            b.add("Mul", [b.add("Reshape", [var, flat]), rest])])
    return b.functions([y, run_mean, run_var][:len(node.output)], opset)


# ------------------------------------------------------------------- RNN / GRU / LSTM
# Unrolled over the (static) sequence: per direction, X @ W^T for every step at once, then
# one step after the other (H @ R^T, the gates, the state update), ONNX's equations verbatim.
# Only ops that mean the same at every opset the ops exist in (Gather, Reshape, Concat,
# MatMul, ...) are used, so the body is valid at the model's opset.

# Unrolled steps (sequence length x directions) beyond which the op stays on onnxruntime: each
# step adds ~15-25 kernels, and compiling a 3-step bidirectional GRU takes ~13 s on 2 cores.
_MAX_STEPS = 32
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_DEFAULT_ACTS = {"RNN": ["Tanh"], "GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
# activations with their parameters' defaults (those with no default are refused)
_ACTS = {"Tanh": (), "Sigmoid": (), "Relu": (), "Softsign": (), "Softplus": (),
         "LeakyRelu": (("alpha", 0.01),), "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
         "Elu": (("alpha", 1.0),)}


def _dims(types: dict[str, onnx.TypeProto], name: str) -> list[int] | None:
    t = types.get(name)
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.tensor_type.shape.dim]
    return None if any(d < 0 for d in dims) else dims


def _recurrent(b: _Builder, node: onnx.NodeProto, ins: list[str],
               types: dict[str, onnx.TypeProto], real: list[str], opset: int
               ) -> onnx.FunctionProto | None:
    op = node.op_type
    attrs = _conv_attrs(node)

    def decode(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)
    direction = decode(attrs.get("direction", "forward"))
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    hidden = attrs.get("hidden_size")
    layout = int(attrs.get("layout", 0))
    elem = _elem(types, real[0])
    x_dims = _dims(types, real[0])
    if (dirs is None or hidden is None or elem not in (T.FLOAT, T.DOUBLE) or x_dims is None
            or len(x_dims) != 3 or attrs.get("activation_alpha") or attrs.get("activation_beta")
            or int(attrs.get("input_forget", 0))):
        return None
    steps, batch = (x_dims[0], x_dims[1]) if layout == 0 else (x_dims[1], x_dims[0])
    if steps < 1 or steps * len(dirs) > _MAX_STEPS:
        return None
    acts = [decode(a) for a in attrs.get("activations", [])] or _DEFAULT_ACTS[op] * len(dirs)
    per_dir = len(_DEFAULT_ACTS[op])
    if len(acts) != per_dir * len(dirs) or any(a not in _ACTS for a in acts):
        return None
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    gates, h = _GATES[op], int(hidden)
    clip = attrs.get("clip")
    has = [i < len(ins) and bool(ins[i]) for i in range(8)]
    seq_lens = ins[4] if has[4] else None
    if seq_lens and (len(dirs) > 1 or dirs[0]):
        return None  # variable lengths in reverse: per-batch start steps, not unrolled here

    def const(v: Any) -> str:
        return b.const(np.asarray(v, np_type))

    def index(v: Any) -> str:
        return b.const(np.asarray(v, np.int64))

    def gather(x: str, idx: Any, axis: int) -> str:
        return b.add("Gather", [x, index(idx)], axis=axis)

    def reshape(x: str, shape: list[int]) -> str:
        return b.add("Reshape", [x, index(shape)])

    def act(name: str, x: str) -> str:
        params = {k: v for k, v in _ACTS[name]}
        return b.add(name, [x], **params)

    def clipped(x: str) -> str:
        if clip is None:
            return x
        return b.add("Max", [b.add("Min", [x, const(clip)]), const(-clip)])

    def part(x: str, k: int) -> str:  # gate k of a [..., gates*h] tensor
        return gather(x, list(range(k * h, (k + 1) * h)), -1)

    x = ins[0] if layout == 0 else b.add("Transpose", [ins[0]], perm=[1, 0, 2])
    init_h = ins[5] if has[5] else None
    init_c = ins[6] if has[6] and op == "LSTM" else None
    if layout == 1:
        init_h = init_h and b.add("Transpose", [init_h], perm=[1, 0, 2])
        init_c = init_c and b.add("Transpose", [init_c], perm=[1, 0, 2])
    mask = None
    if seq_lens:
        lens = reshape(b.add("Cast", [seq_lens], to=T.INT64), [batch, 1])
    outs_y, outs_h, outs_c = [], [], []
    for d, reverse in enumerate(dirs):
        w = b.add("Transpose", [gather(ins[1], d, 0)], perm=[1, 0])  # [I, gates*h]
        r = b.add("Transpose", [gather(ins[2], d, 0)], perm=[1, 0])  # [h, gates*h]
        xw = b.add("MatMul", [x, w])  # [steps, batch, gates*h]
        bias_r = None
        if has[3]:
            bias = gather(ins[3], d, 0)
            bias_w = gather(bias, list(range(gates * h)), 0)
            bias_r = gather(bias, list(range(gates * h, 2 * gates * h)), 0)
            if op != "GRU" or not int(attrs.get("linear_before_reset", 0)):
                xw = b.add("Add", [xw, b.add("Add", [bias_w, bias_r])])
                bias_r = None
            else:  # Rb is added per gate: the h gate's stays inside r * (H R^T + Rbh)
                xw = b.add("Add", [xw, bias_w])
        state = gather(init_h, d, 0) if init_h else const(np.zeros((batch, h)))
        cell = None
        if op == "LSTM":
            cell = gather(init_c, d, 0) if init_c else const(np.zeros((batch, h)))
            if has[7]:
                peep = gather(ins[7], d, 0)
                p_i, p_o, p_f = (gather(peep, list(range(k * h, (k + 1) * h)), 0)
                                 for k in range(3))
        f_act, *rest = acts[d * per_dir:(d + 1) * per_dir]
        ys: list[str] = [""] * steps
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            xt = gather(xw, t, 0)  # [batch, gates*h]
            if op == "RNN":
                new = act(f_act, clipped(b.add("Add", [xt, b.add("MatMul", [state, r])])))
            elif op == "GRU":
                def gate_in(k: int) -> str:
                    pre = b.add("Add", [part(xt, k), b.add("MatMul", [state, part(r, k)])])
                    return pre if bias_r is None else b.add("Add", [pre, part(bias_r, k)])
                z = act(f_act, clipped(gate_in(0)))
                rr = act(f_act, clipped(gate_in(1)))
                if int(attrs.get("linear_before_reset", 0)):
                    hr = b.add("MatMul", [state, part(r, 2)])
                    if bias_r is not None:
                        hr = b.add("Add", [hr, part(bias_r, 2)])
                    pre = b.add("Add", [part(xt, 2), b.add("Mul", [rr, hr])])
                else:
                    pre = b.add("Add", [part(xt, 2), b.add("MatMul", [
                        b.add("Mul", [rr, state]), part(r, 2)])])
                cand = act(rest[0], clipped(pre))
                one_minus = b.add("Sub", [const(1.0), z])
                new = b.add("Add", [b.add("Mul", [one_minus, cand]), b.add("Mul", [z, state])])
            else:  # LSTM, gates i, o, f, c
                gate = b.add("Add", [xt, b.add("MatMul", [state, r])])
                gi, go, gf, gc = (part(gate, k) for k in range(4))
                if has[7]:
                    gi = b.add("Add", [gi, b.add("Mul", [p_i, cell])])
                    gf = b.add("Add", [gf, b.add("Mul", [p_f, cell])])
                i_t = act(f_act, clipped(gi))
                f_t = act(f_act, clipped(gf))
                c_t = act(rest[0], clipped(gc))
                new_cell = b.add("Add", [b.add("Mul", [f_t, cell]), b.add("Mul", [i_t, c_t])])
                if has[7]:
                    go = b.add("Add", [go, b.add("Mul", [p_o, new_cell])])
                o_t = act(f_act, clipped(go))
                new = b.add("Mul", [o_t, act(rest[1], new_cell)])
            if seq_lens:
                mask = b.add("Less", [index(t), lens])  # [batch, 1]
                ys[t] = b.add("Where", [mask, new, const(0.0)])
                new = b.add("Where", [mask, new, state])
                if op == "LSTM":
                    new_cell = b.add("Where", [mask, new_cell, cell])
            else:
                ys[t] = new
            state = new
            if op == "LSTM":
                cell = new_cell
        outs_y.append([reshape(y, [1, 1, batch, h]) for y in ys])
        outs_h.append(reshape(state, [1, batch, h]))
        if op == "LSTM":
            outs_c.append(reshape(cell, [1, batch, h]))
    per_step = [b.add("Concat", [outs_y[d][t] for d in range(len(dirs))], axis=1)
                if len(dirs) > 1 else outs_y[0][t] for t in range(steps)]
    y = b.add("Concat", per_step, axis=0) if steps > 1 else per_step[0]  # [steps, D, B, h]
    y_h = b.add("Concat", outs_h, axis=0) if len(dirs) > 1 else outs_h[0]
    results = [y, y_h]
    if op == "LSTM":
        results.append(b.add("Concat", outs_c, axis=0) if len(dirs) > 1 else outs_c[0])
    if layout == 1:
        results = [b.add("Transpose", [results[0]], perm=[2, 0, 1, 3])] + [
            b.add("Transpose", [v], perm=[1, 0, 2]) for v in results[1:]]
    return b.functions(results[:len(node.output)], opset)
