"""Function bodies of our own for ops that have neither an ONNX function body nor a correct
TVM 0.27 converter: the QOperator-format integer ops (QLinearMatMul, QLinearConv,
ConvInteger), LpNormalization, EyeLike with a `dtype` attribute, ReverseSequence (a
GatherElements), RNN/GRU/LSTM (unrolled over
a static sequence of at most `_MAX_STEPS` steps x directions), BatchNormalization in training
mode and IsInf with detect_positive/detect_negative off.

Also (used by plan.py, not through `body`): which ops revised or added after opset 25
lepton-edge compiles and how (`revised_lowering`: a private converter in dynamic_ops.py, the
op's ONNX function body at the model's opset, or a plain relabel for bfloat16-only
revisions), and Scan with a static number of iterations unrolled (`unroll_scan`), which also
carries LinearAttention-27's body.

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
    if op == "ReverseSequence" and len(ins) == 2:
        return _reverse_sequence(b, node, ins, rank_of(0), opset)
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


def _reverse_sequence(b: _Builder, node: onnx.NodeProto, ins: list[str], rank: int | None,
                      opset: int) -> onnx.FunctionProto | None:
    """out[.., t, .., b, ..] = x[.., src, .., b, ..] with src = len[b] - 1 - t for t < len[b],
    else t: one GatherElements along the time axis with an index built from Range/Where."""
    if rank is None or rank < 2 or opset < 13:
        return None
    attrs = _conv_attrs(node)
    time_axis, batch_axis = int(attrs.get("time_axis", 0)), int(attrs.get("batch_axis", 1))
    if {time_axis, batch_axis} != {0, 1}:
        return None
    x, lens = ins
    i64 = np.int64
    shape = b.add("Shape", [x])
    steps = b.add("Gather", [shape, b.const(np.array(time_axis, i64))])
    t = b.add("Range", [b.const(np.array(0, i64)), steps, b.const(np.array(1, i64))])
    lens64 = b.add("Cast", [lens], to=T.INT64)
    # t along the time axis, lens along the batch axis, as [T, 1] / [1, B] (or transposed)
    t2 = b.add("Unsqueeze", [t, b.const(np.array([1 - time_axis], i64))])
    l2 = b.add("Unsqueeze", [lens64, b.const(np.array([1 - batch_axis], i64))])
    reversed_ = b.add("Sub", [b.add("Sub", [l2, b.const(np.array(1, i64))]), t2])
    index = b.add("Where", [b.add("Less", [t2, l2]), reversed_, t2])
    if rank > 2:
        index = b.add("Unsqueeze", [index, b.const(np.arange(2, rank, dtype=i64))])
    index = b.add("Expand", [index, shape])
    return b.function(b.add("GatherElements", [x, index], axis=time_axis), opset)


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


# ------------------------------------------------- ops revised or added after opset 25
# Ops whose newest version lepton-edge compiles although TVM 0.27's importer predates it:
# op -> the opset version implemented. plan.py keeps such a node on a compiled target and,
# when it relabels the subgraph to MAX_OPSET for TVM's importer, renames it to
# `<op>_<version>` in PRIVATE_DOMAIN; lowering/dynamic_ops.py's converter of that name
# implements the newer semantics (signed BitShift, CumProd, BitCast, Mod's float cases).
# BitShift and Mod keep the rename although their plain names reach the same converters: at
# opset 25 a signed BitShift is an invalid model and float Mod with fmod=0 fails in
# onnxruntime, and a renamed node makes plan.py keep the model's own nodes as the
# subgraph's onnxruntime fallback (test_renamed_revised_ops_keep_a_valid_subgraph_and_fallback).
REVISED_OWN: dict[str, int] = {"CumProd": 26, "BitShift": 28, "BitCast": 26, "Mod": 28}
PRIVATE_DOMAIN = "lepton.revised"
# Revisions after MAX_OPSET that only added bfloat16 (the spec text is unchanged): a node
# means what the version before says, with one more element type, so plan.py relabels it
# as it is and TVM's converter of the older version takes it.
REVISED_TYPES_ONLY: dict[str, int] = {"OneHot": 28, "ReverseSequence": 28, "Einsum": 28,
                                      "Compress": 28, "Unique": 28}


def revised_lowering(node: onnx.NodeProto, opset: int) -> str | None:
    """"convert", "expand" or "relabel" for a node whose op (at `opset`) is one of the
    versions above (or a newer op with an ONNX function body: "expand"), else None."""
    from lepton_edge.model import MAX_OPSET

    if (node.domain or "") not in ("", "ai.onnx"):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return None
    since = schema.since_version
    if REVISED_OWN.get(node.op_type) == since:
        return "convert"
    if REVISED_TYPES_ONLY.get(node.op_type) == since:
        return "relabel"
    if since > MAX_OPSET and (schema.has_function or schema.has_context_dependent_function):
        # a newer op with an ONNX function body (CausalConvWithState-27, LinearAttention-27,
        # whose body is a Scan over the tokens: unrolled, Celu-28, SpaceToDepth-28, ...),
        # expanded at the model's opset before relabelling
        return "expand"
    return None


def revised_kind(node: onnx.NodeProto, types: dict[str, int], opset: int) -> str | None:
    """revised_lowering for a node of an op revised after MAX_OPSET that does not mean the
    same at MAX_OPSET for these element types (model.same_at_max_opset); else None."""
    from lepton_edge.model import revised_op, same_at_max_opset

    if revised_op(node.op_type, node.domain, opset) is None or same_at_max_opset(
            node, types, opset):
        return None
    return revised_lowering(node, opset)


def private_name(op: str) -> str:
    return f"{op}_{REVISED_OWN[op]}"


# ------------------------------------------------------------------- Scan, unrolled
# A Scan over a static number of iterations, unrolled into its body's nodes once per step (at
# most _MAX_SCAN_STEPS): TVM 0.27 has no Scan converter. plan.py applies it to compiled
# subgraphs (and to the Scan inside LinearAttention's ONNX function body).
_MAX_SCAN_STEPS = 64


def scan_steps(node: onnx.NodeProto, shapes: dict[str, tuple[Any, ...]], opset: int
               ) -> tuple[int | None, str]:
    """(number of iterations, "") for a Scan this module unrolls, else (None, why not)."""
    if opset < 9:
        return None, "Scan before opset 9 (batched, with sequence_lens) is not unrolled"
    attrs = {a.name: a for a in node.attribute}
    body = attrs["body"].g
    m = helper.get_attribute_value(attrs["num_scan_inputs"])
    n_state = len(node.input) - m
    for inner in body.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in inner.attribute):
            return None, "the Scan body has nested graphs"
    in_axes = list(helper.get_attribute_value(attrs["scan_input_axes"])) if (
        "scan_input_axes" in attrs) else [0] * m
    steps: set[int] = set()
    for j, name in enumerate(node.input[n_state:]):
        shape = shapes.get(name)
        if shape is None or not shape:
            return None, f"the rank of scan input '{name}' is not known"
        length = shape[in_axes[j] % len(shape)]
        if not isinstance(length, int) or length <= 0:
            return None, f"scan input '{name}' has no static, non-zero length"
        steps.add(length)
    if len(steps) != 1:
        return None, "the scan inputs' lengths are not known to agree"
    (count,) = steps
    if count > _MAX_SCAN_STEPS:
        return None, f"{count} iterations (at most {_MAX_SCAN_STEPS} are unrolled)"
    return count, ""


def unroll_scan(node: onnx.NodeProto, steps: int, prefix: str, opset: int
                ) -> list[onnx.NodeProto]:
    """The Scan `node` (opset >= 9) as `steps` copies of its body; names the body defines get
    a per-step prefix, names it reads from outside stay as they are."""
    attrs = {a.name: a for a in node.attribute}
    body = attrs["body"].g
    m = helper.get_attribute_value(attrs["num_scan_inputs"])
    n_state = len(node.input) - m
    k = len(body.output) - n_state

    def ints(name: str, count: int) -> list[int]:
        return list(helper.get_attribute_value(attrs[name])) if name in attrs else [0] * count

    in_axes, in_dirs = ints("scan_input_axes", m), ints("scan_input_directions", m)
    out_axes, out_dirs = ints("scan_output_axes", k), ints("scan_output_directions", k)
    out: list[onnx.NodeProto] = []
    count = [0]

    def fresh(tag: str) -> str:
        count[0] += 1
        return f"{prefix}{tag}{count[0]}"

    def add(op: str, inputs: list[str], output: str | None = None, **kw: Any) -> str:
        output = output or fresh(op)
        out.append(helper.make_node(op, inputs, [output], name=fresh(f"{op}_"), **kw))
        return output

    def const(value: np.ndarray) -> str:
        name = fresh("c")
        out.append(helper.make_node("Constant", [], [name], name=fresh("Constant_"),
                                    value=numpy_helper.from_array(value, name)))
        return name

    defined = {v.name for v in body.input} | {t.name for t in body.initializer} | {
        o for inner in body.node for o in inner.output if o}
    states = list(node.input[:n_state])
    collected: list[list[str]] = [[] for _ in range(k)]
    for t in range(steps):
        local = {name: f"{prefix}s{t}_{name}" for name in defined}
        for i, formal in enumerate(body.input):
            if i < n_state:
                add("Identity", [states[i]], local[formal.name])
            else:
                j = i - n_state
                index = t if in_dirs[j] == 0 else steps - 1 - t
                add("Gather", [node.input[n_state + j], const(np.array(index, np.int64))],
                    local[formal.name], axis=in_axes[j])
        for tensor in body.initializer:
            out.append(helper.make_node("Constant", [], [local[tensor.name]],
                                        name=fresh("Constant_"), value=tensor))
        for index, inner in enumerate(body.node):
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            copy.name = f"{prefix}s{t}_{inner.name or inner.op_type}_{index}"
            del copy.input[:], copy.output[:]
            copy.input.extend(local.get(n, n) if n else "" for n in inner.input)
            copy.output.extend(local.get(n, n) if n else "" for n in inner.output)
            out.append(copy)
        results = [local.get(o.name, o.name) for o in body.output]
        states = results[:n_state]
        for j in range(k):
            collected[j].append(results[n_state + j])
    for i, state in enumerate(states):
        if node.output[i]:
            add("Identity", [state], node.output[i])
    for j in range(k):
        name = node.output[n_state + j] if n_state + j < len(node.output) else ""
        if not name:
            continue
        parts = collected[j] if out_dirs[j] == 0 else collected[j][::-1]
        if opset >= 13:
            axes = const(np.array([out_axes[j]], np.int64))
            parts = [add("Unsqueeze", [p, axes]) for p in parts]
        else:
            parts = [add("Unsqueeze", [p], axes=[out_axes[j]]) for p in parts]
        add("Concat", parts, name, axis=out_axes[j])
    return out


def inlined_body(node: onnx.NodeProto, fn: onnx.FunctionProto,
                 types: dict[str, onnx.TypeProto], opset: int
                 ) -> tuple[list[onnx.NodeProto], dict[str, tuple[Any, ...]]]:
    """`node` replaced by the nodes of its function body `fn` (onnx.inliner renames the names
    inside Scan bodies too), and the shapes onnx's inference finds for the new values."""
    import onnx.inliner

    local_domain = "lepton.inline"
    function = onnx.FunctionProto()
    function.CopyFrom(fn)
    function.domain, function.name = local_domain, node.op_type
    call = onnx.NodeProto()
    call.CopyFrom(node)
    call.domain = local_domain
    inputs = list(dict.fromkeys(n for n in node.input if n))
    graph = helper.make_graph(
        [call], "inline",
        [helper.make_value_info(n, types[n]) for n in inputs],
        [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid(local_domain, 1)])
    inlined = onnx.inliner.inline_local_functions(model)
    shapes: dict[str, tuple[Any, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(inlined, data_prop=True)
        for value in inferred.graph.value_info:
            t = value.type.tensor_type
            if t.HasField("shape"):
                shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                           for d in t.shape.dim)
    except Exception:  # noqa: BLE001 - no shapes: Scans in the body are then not unrolled
        pass
    return list(inlined.graph.node), shapes


def expand_revised(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]
                   ) -> tuple[list[onnx.NodeProto] | None, str]:
    """(nodes, "") computing an "expand" node (revised_lowering): its ONNX function body at `opset`,
    inlined, with every Scan in it unrolled; else (None, why not)."""
    from lepton_edge.model import revised_op

    from lepton_edge.lowering import onnx_fixups

    if any(name and name not in types for name in node.input):
        return None, f"{node.op_type}: the types of its inputs are not known"
    fn = onnx_fixups.schema_body(node, opset, types)
    if fn is None:
        return None, (f"{node.op_type}-{opset}'s ONNX function body is not available for "
                      "these input types (their shapes must be known)")
    nodes, shapes = inlined_body(node, fn, types, opset)
    out: list[onnx.NodeProto] = []
    for index, inner in enumerate(nodes):
        if inner.op_type == "Scan" and (inner.domain or "") in ("", "ai.onnx"):
            steps, why = scan_steps(inner, shapes, opset)
            if steps is None:
                return None, f"{node.op_type}'s function body has a Scan: {why}"
            out.extend(unroll_scan(inner, steps, f"{node.name or node.op_type}_scan{index}__",
                                   opset))
        else:
            out.append(inner)
    for inner in out:
        if revised_op(inner.op_type, inner.domain, opset) is not None:
            return None, f"{node.op_type}'s function body uses {inner.op_type}, revised after 25"
    return out, ""
