"""Narrow element types in compiled code: float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz, e8m0),
float4e2m1, int4/uint4 and int2/uint2 (their table: lepton_edge/narrow_types.py).

At run time such a tensor is an ml_dtypes numpy array, one element per byte (never ONNX's
packed storage); compiled code sees its raw bytes as uint8 (for int4/int2 the element's bits
are the low bits of the byte). The conversions are lepton-edge's own and exact; TVM's float8
types are not used (TVM 0.27 decodes float8 NaNs as numbers):

* narrow -> wide: a 256-entry table (built with ml_dtypes at compile time, so every bit
  pattern, NaN, infinities, -0 and the fnuz variants decode as ml_dtypes does) and a take;
* wide -> narrow: integer arithmetic on the float32 bits (`_encode_float`, `_encode_e8m0`,
  `_encode_int`): round to nearest even, Cast's `saturate` (float8), e8m0's `round_mode`
  (as onnx.numpy_helper.to_float8e8m0), and for int4/int2 what onnx's reference does
  (ml_dtypes: truncate toward zero, keep the low bits).

`to_bytes` rewrites an ONNX graph (after onnx_fixups) so that TVM's importer never sees a
narrow type: narrow graph inputs, outputs and initializers become uint8, decodes become
Cast(to int32) + Gather over the table, QuantizeLinear/DequantizeLinear become float ops
around a decode/encode, and each encode stays a Cast node marked with the attribute
`lepton_narrow`, which `convert_cast` (registered in lowering/dynamic_ops.py) turns into a
TIR kernel. `reason` says which nodes this covers (targets/cpu/support.py asks it).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton_edge.narrow_types import BY_NAME, FORMATS, Format

T = onnx.TensorProto
MARK = "lepton_narrow"  # attribute of an encoding Cast: the target format's ONNX name

# wide types a narrow value decodes to / is encoded from
_FLOAT_WIDE = {T.FLOAT: "float32", T.FLOAT16: "float16", T.DOUBLE: "float64"}
_INT_WIDE = {T.INT8: "int8", T.UINT8: "uint8", T.INT16: "int16", T.UINT16: "uint16",
             T.INT32: "int32", T.UINT32: "uint32", T.INT64: "int64", T.UINT64: "uint64"}
_ENCODE_FROM = {T.FLOAT: "float32", T.FLOAT16: "float16", T.BFLOAT16: "bfloat16"}


# ------------------------------------------------------------------------ numpy reference

def decode_table(fmt: Format, target: str) -> np.ndarray:
    """Every byte's value in `target` (a numpy dtype name), as ml_dtypes converts it."""
    codes = np.arange(256, dtype=np.uint8).view(fmt.dtype)
    with np.errstate(all="ignore"):
        return codes.astype(np.dtype(target))


# ------------------------------------------------------------------------ TIR encoders

class _Lets:
    """Named sub-expressions bound with Let, so that a value used several times is one
    variable in the kernel, not a copy of its whole expression (copies made TVM's TIR
    simplifier take ~40 s on one encoder)."""

    def __init__(self) -> None:
        self.steps: list[tuple[Any, Any]] = []

    def __call__(self, name: str, value: Any) -> Any:
        from tvm import tirx

        var = tirx.Var(name, value.ty.dtype)
        self.steps.append((var, value))
        return var

    def wrap(self, body: Any) -> Any:
        from tvm import tirx

        for var, value in reversed(self.steps):
            body = tirx.Let(var, value, body)
        return body


def _encode_float(fmt: Format, saturate: bool) -> Any:
    """float32 tensor -> the bytes of a sign/exponent/mantissa format, rounding to nearest
    even."""
    from tvm import tirx

    emin = 1 - fmt.bias  # exponent of the smallest normal
    sign_bit = 1 << (fmt.bits - 1)
    saturate = saturate or fmt.saturating
    if saturate:
        overflow = fmt.max_code
    else:
        overflow = fmt.inf_code if fmt.inf_code is not None else fmt.nan_code

    def c(v: int) -> Any:
        return tirx.const(v, "int32")

    def encode_one(x: Any) -> Any:
        let = _Lets()
        b = let("b", tirx.reinterpret("int32", x))
        a = let("a", tirx.bitwise_and(b, c(0x7FFFFFFF)))
        e = let("e", tirx.shift_right(a, c(23)) - c(127))
        m = let("m", tirx.bitwise_or(tirx.bitwise_and(a, c(0x7FFFFF)), c(0x800000)))
        # bits of m below the target's quantum at this exponent; >= 25 always rounds to 0
        sh = let("sh", tirx.min(c(23 - fmt.mbits) + tirx.max(e, c(emin)) - e, c(25)))
        q = let("q", tirx.shift_right(m, sh))
        rem = let("rem", tirx.bitwise_and(m, tirx.shift_left(c(1), sh) - c(1)))
        half = let("half", tirx.shift_left(c(1), sh - c(1)))
        odd = tirx.bitwise_and(q, c(1)) == c(1)
        up = tirx.Or(rem > half, tirx.And(rem == half, odd))
        q = let("qr", q + tirx.Select(up, c(1), c(0)))
        # a rounded-up mantissa carries into the exponent by itself
        code = let("code", tirx.Select(e >= c(emin),
                                       tirx.shift_left(e + c(fmt.bias), c(fmt.mbits)) + q
                                       - c(1 << fmt.mbits), q))
        mag = let("mag", tirx.Select(tirx.Or(a >= c(0x7F800000), code > c(fmt.max_code)),
                                     c(overflow), code))
        neg = tirx.shift_right(b, c(31))  # -1 or 0
        if fmt.fnuz:
            # no -0, and NaN (0x80) has no sign: the sign bit only on 0 < mag < 0x80, where
            # (mag + 127) >> 7 is 1 (arithmetic: comparisons on mag cost TVM's simplifier
            # seconds here)
            signed = tirx.bitwise_or(mag, tirx.shift_left(
                tirx.bitwise_and(neg, tirx.shift_right(mag + c(127), c(7))), c(7)))
            nan = c(0x80)
        else:
            signed = tirx.bitwise_or(mag, tirx.bitwise_and(neg, c(sign_bit)))
            if fmt.saturating:  # float4 has no NaN: ml_dtypes gives +NaN -> 0x8, -NaN -> 0x0
                nan = tirx.bitwise_and(tirx.bitwise_not(neg), c(sign_bit))
            else:
                nan = tirx.bitwise_or(c(fmt.nan_code), tirx.bitwise_and(neg, c(sign_bit)))
        out = tirx.Select(a > c(0x7F800000), nan, signed)
        return let.wrap(tirx.Cast("uint8", out))

    return _elementwise(encode_one, f"to_{fmt.name}")


def _encode_e8m0(saturate: bool, round_mode: str) -> Any:
    """float32 -> float8e8m0 (exponent only), as onnx.numpy_helper.to_float8e8m0."""
    from tvm import tirx

    def c(v: int) -> Any:
        return tirx.const(v, "int32")

    def encode(x: Any) -> Any:
        let = _Lets()
        b = let("b", tirx.reinterpret("int32", x))
        exp = let("exp", tirx.bitwise_and(tirx.shift_right(b, c(23)), c(0xFF)))
        if round_mode == "nearest":
            g = tirx.bitwise_and(b, c(0x400000)) != c(0)
            r = tirx.bitwise_and(b, c(0x200000)) != c(0)
            s = tirx.bitwise_and(b, c(0x1FFFFF)) != c(0)
            up = tirx.And(g, tirx.Or(tirx.Or(r, s), exp > c(0)))
        elif round_mode == "up":
            up = tirx.bitwise_and(b, c(0x7FFFFF)) != c(0)
        else:  # down
            up = tirx.const(False, "bool")
        if saturate:
            up = tirx.And(up, exp != c(0xFE))
        out = tirx.Select(exp == c(0xFF), c(0xFF), exp + tirx.Select(up, c(1), c(0)))
        return let.wrap(tirx.Cast("uint8", out))

    return _elementwise(encode, "to_float8e8m0")


def _encode_int(fmt: Format, source: str) -> Any:
    """A number -> the low `bits` bits of its integer value (truncated toward zero), as
    ml_dtypes (onnx's reference) casts: NaN, infinities and |x| >= 2**63 give 0."""
    from tvm import tirx

    mask = tirx.const((1 << fmt.bits) - 1, "int64")

    def encode(x: Any) -> Any:
        if source.startswith(("int", "uint")):
            v = tirx.Cast("int64", x)
        else:
            f = tirx.Cast("float32", x) if source != "float32" else x
            ok = tirx.abs(f) < tirx.const(2.0 ** 63, "float32")  # False for NaN
            v = tirx.Cast("int64", tirx.Select(ok, f, tirx.const(0.0, "float32")))
        return tirx.Cast("uint8", tirx.bitwise_and(v, mask))

    return _elementwise(encode, f"to_{fmt.name}")


def _elementwise(f: Any, name: str) -> Any:
    """A PrimExpr -> PrimExpr function as a tensor -> tensor one."""
    from tvm import te

    return lambda x: te.compute(x.shape, lambda *i: f(x(*i)), name=name)


def encoder(fmt: Format, source: str, saturate: bool = True, round_mode: str = "up") -> Any:
    """A function te.Tensor (of dtype `source`) -> te.Tensor of the encoded uint8 bytes."""
    from tvm import te, tirx

    if fmt.kind == "int":
        return _encode_int(fmt, source)
    inner = _encode_float(fmt, saturate) if fmt.kind == "float" else _encode_e8m0(
        saturate, round_mode)
    if source == "float32":
        return inner
    return lambda x: inner(te.compute(x.shape, lambda *i: tirx.Cast("float32", x(*i)),
                                      name="to_float32"))


# ------------------------------------------------------------------------ Relax converter

def _text(value: Any, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def convert_cast(bb: Any, inputs: list[Any], attrs: dict[str, Any], opset: int) -> Any:
    """An encoding Cast marked by `to_bytes` -> a TIR kernel writing the narrow bytes; any
    other Cast: None (TVM's converter)."""
    if MARK not in attrs:
        return None
    fmt = BY_NAME[_text(attrs[MARK], "")]
    data = inputs[0]
    source = str(data.ty.dtype)
    kernel = encoder(fmt, source, bool(attrs.get("saturate", 1)),
                     _text(attrs.get("round_mode"), "up"))
    return bb.emit_te(kernel, data, primfunc_name_hint=f"lepton_to_{fmt.name}")


# ------------------------------------------------------------------------ which nodes

def _elem(name: str, types: dict[str, int]) -> int | None:
    return types.get(name) if name else None


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def touches(node: onnx.NodeProto, types: dict[str, int]) -> bool:
    """Whether some input or output of `node` has a narrow element type."""
    return any(_elem(n, types) in FORMATS for n in list(node.input) + list(node.output))


def _cast_reason(src: int | None, dst: int | None) -> str | None:
    if src in FORMATS and dst in FORMATS:
        return None
    if src in FORMATS:
        fmt = FORMATS[src]
        if dst in _FLOAT_WIDE or (fmt.kind == "int" and dst in _INT_WIDE):
            return None
        return (f"lepton-edge converts {fmt.name} to float/double/float16"
                + (" and integer types" if fmt.kind == "int" else "") + " only")
    if dst in FORMATS:
        fmt = FORMATS[dst]
        if src in _ENCODE_FROM or (fmt.kind == "int" and src in _INT_WIDE):
            return None
        return ("lepton-edge converts float/float16/bfloat16"
                + (" and integer types" if fmt.kind == "int" else "") + f" to {fmt.name} only")
    return None


def reason(node: onnx.NodeProto, types: dict[str, int],
           shapes: dict[str, Any] | None = None,
           nodes: list[onnx.NodeProto] | None = None) -> str | None:
    """None when `node` has no narrow tensor or lepton-edge compiles it (Cast, CastLike,
    per-tensor/per-axis QuantizeLinear/DequantizeLinear); else why not.

    With the graph's `nodes`: an int4/uint4/int2/uint2/float4e2m1/float8e8m0 value that
    another node lepton-edge does not compile also makes or reads keeps this node off TVM
    too, so the value never crosses into the onnxruntime fallback (which cannot take it)."""
    why = _node_reason(node, types, shapes)
    if why is not None or nodes is None:
        return why
    for name in list(node.input) + list(node.output):
        fmt = FORMATS.get(_elem(name, types))
        if fmt is None or fmt.float8:
            continue  # float8 (not e8m0) crosses into onnxruntime as OrtValues
        for other in _users(nodes).get(name, ()):
            if other is not node and _node_reason(other, types, shapes) is not None:
                return (f"{fmt.name} value '{name}' is also used by {other.op_type}, which "
                        "lepton-edge does not compile, and onnxruntime cannot take it from "
                        "compiled code: both stay on onnxruntime")
    return None


_USERS: dict[int, tuple[Any, dict[str, list[onnx.NodeProto]]]] = {}


def _users(nodes: Any) -> dict[str, list[onnx.NodeProto]]:
    """Value name -> the nodes making or reading it; built once per node list (a planning
    pass asks for every narrow node of the same graph)."""
    hit = _USERS.get(id(nodes))
    if hit is not None and hit[0] is nodes:
        return hit[1]
    users: dict[str, list[onnx.NodeProto]] = {}
    for other in nodes:
        for name in dict.fromkeys(list(other.input) + list(other.output)):
            if name:
                users.setdefault(name, []).append(other)
    if len(_USERS) >= 8:
        _USERS.clear()
    _USERS[id(nodes)] = (nodes, users)
    return users


def _node_reason(node: onnx.NodeProto, types: dict[str, int],
                 shapes: dict[str, Any] | None) -> str | None:
    if not touches(node, types):
        return None
    narrow = sorted({FORMATS[t].name for n in list(node.input) + list(node.output)
                     if (t := _elem(n, types)) in FORMATS})
    generic = (f"{node.op_type} on {'/'.join(narrow)} tensors: lepton-edge compiles narrow "
               "types only in Cast, CastLike, QuantizeLinear and DequantizeLinear")
    if (node.domain or "") not in ("", "ai.onnx"):
        return generic
    out = node.output[0] if node.output else ""
    if node.op_type in ("Cast", "CastLike"):
        dst = _elem(node.input[1], types) if node.op_type == "CastLike" else _attr(node, "to")
        return _cast_reason(_elem(node.input[0], types), dst)
    if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return generic
    if _attr(node, "block_size", 0):
        return f"blocked {node.op_type} on {'/'.join(narrow)} is not compiled by lepton-edge"
    x, scale = node.input[0], node.input[1]
    rank = len(shapes[x]) if shapes and shapes.get(x) is not None else None
    scale_shape = shapes.get(scale) if shapes else None
    if scale_shape is None or len(scale_shape) > 1 or (len(scale_shape) == 1 and (
            rank is None or not isinstance(scale_shape[0], int))):
        return f"{node.op_type} on {'/'.join(narrow)} needs a scale of known shape"
    if node.op_type == "QuantizeLinear":
        if _elem(x, types) not in (T.FLOAT, T.FLOAT16) or _elem(scale, types) != _elem(
                x, types) or _elem(out, types) not in FORMATS:
            return (f"QuantizeLinear to {'/'.join(narrow)} is compiled from float/float16 "
                    "with a scale of the same type")
        return None
    if _elem(x, types) not in FORMATS or _elem(out, types) not in _FLOAT_WIDE:
        return f"DequantizeLinear from {'/'.join(narrow)} is compiled to float types only"
    return None


# ------------------------------------------------------------------------ graph rewrite

def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _attr(node, "value")
            if isinstance(value, onnx.TensorProto):
                types[node.output[0]] = value.data_type
    return types


def _shapes(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None
                              for d in v.type.tensor_type.shape.dim]
    for t in graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


class _Rewriter:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.types = _value_types(graph)
        self.shapes = _shapes(graph)
        self.ranks = {n: len(s) for n, s in self.shapes.items()}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}__narrow{self.count}"

    def const(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def decode(self, name: str, fmt: Format, target: int, output: str | None = None) -> str:
        """bytes -> `target` values: Gather over the 256-entry table."""
        dtype = helper.tensor_dtype_to_np_dtype(target)
        table = self.const(decode_table(fmt, np.dtype(dtype).name), f"{fmt.name}_table")
        index = self.node("Cast", [name], to=T.INT32)
        return self.node("Gather", [table, index], output, axis=0)

    def encode(self, name: str, fmt: Format, output: str | None = None,
               saturate: int = 1, round_mode: str = "up") -> str:
        attrs: dict[str, Any] = {"to": T.UINT8, MARK: fmt.name, "saturate": int(saturate)}
        if fmt.kind == "e8m0":
            attrs["round_mode"] = round_mode
        return self.node("Cast", [name], output, **attrs)

    def broadcast(self, name: str, x: str, axis: int, like: str | None = None) -> str:
        """A per-axis vector (rank that of `like`, default `name`) reshaped to broadcast
        along `axis` of `x` (rank known)."""
        if self.ranks.get(like or name, 0) == 0:
            return name
        rank = self.ranks[x]
        axis = axis % rank
        shape = self.const(np.array([-1] + [1] * (rank - 1 - axis), np.int64), "shape")
        return self.node("Reshape", [name, shape])

    def cast(self, node: onnx.NodeProto) -> None:
        src = self.types.get(node.input[0])
        dst = (self.types.get(node.input[1]) if node.op_type == "CastLike"
               else _attr(node, "to"))
        out = node.output[0]
        saturate = _attr(node, "saturate", 1)
        mode = _attr(node, "round_mode", b"up")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if src in FORMATS and dst in FORMATS:
            wide = self.decode(node.input[0], FORMATS[src], T.FLOAT)
            self.encode(wide, FORMATS[dst], out, saturate, mode)
        elif src in FORMATS:
            self.decode(node.input[0], FORMATS[src], dst, out)
        else:
            self.encode(node.input[0], FORMATS[dst], out, saturate, mode)

    def quantize(self, node: onnx.NodeProto) -> None:
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 else ""
        fmt = FORMATS[self.types[node.output[0]]]
        axis = _attr(node, "axis", 1)
        scaled = self.node("Div", [x, self.broadcast(scale, x, axis)])
        if self.types.get(x) != T.FLOAT:
            scaled = self.node("Cast", [scaled], to=T.FLOAT)
        zp_f = self.broadcast(self.decode(zp, fmt, T.FLOAT), x, axis, zp) if zp else ""
        if fmt.kind == "int":
            value = self.node("Round", [scaled])
            if zp_f:
                value = self.node("Add", [value, zp_f])
            lo, hi = decode_table(fmt, "float32")[:1 << fmt.bits].min(), decode_table(
                fmt, "float32")[:1 << fmt.bits].max()
            # Max/Min, not Clip: TVM's Clip converter needs a static shape
            value = self.node("Max", [value, self.const(np.array(lo, np.float32), "lo")])
            value = self.node("Min", [value, self.const(np.array(hi, np.float32), "hi")])
            self.encode(value, fmt, node.output[0])
        elif fmt.kind == "float" and not fmt.saturating:
            # onnx: float8 zero points must be 0 and are not added
            self.encode(scaled, fmt, node.output[0], _attr(node, "saturate", 1))
        else:
            value = self.node("Add", [scaled, zp_f]) if zp_f else scaled
            self.encode(value, fmt, node.output[0])

    def dequantize(self, node: onnx.NodeProto) -> None:
        x, scale = node.input[0], node.input[1]
        zp = node.input[2] if len(node.input) > 2 else ""
        fmt = FORMATS[self.types[x]]
        axis = _attr(node, "axis", 1)
        value = self.decode(x, fmt, T.FLOAT)
        if zp:
            value = self.node("Sub", [value, self.broadcast(self.decode(zp, fmt, T.FLOAT), x,
                                                            axis, zp)])
        scale_f = scale if self.types.get(scale) == T.FLOAT else self.node(
            "Cast", [scale], to=T.FLOAT)
        scale_f = self.broadcast(scale_f, x, axis, scale)
        out_type = self.types.get(node.output[0], T.FLOAT)
        if out_type == T.FLOAT:
            self.node("Mul", [value, scale_f], node.output[0])
        else:
            value = self.node("Mul", [value, scale_f])
            self.node("Cast", [value], node.output[0], to=out_type)

    def run(self) -> bool:
        touched = False
        for node in self.graph.node:
            if not touches(node, self.types):
                self.nodes.append(node)
                continue
            if node.op_type == "Constant" and isinstance(_attr(node, "value"),
                                                         onnx.TensorProto):
                value = numpy_helper.to_array(_attr(node, "value")).view(np.uint8)
                self.nodes.append(helper.make_node("Constant", [], list(node.output),
                                                   value=numpy_helper.from_array(value)))
                continue
            why = reason(node, self.types, self.shapes)
            if why is not None:
                raise ValueError(why)
            touched = True
            if node.op_type in ("Cast", "CastLike"):
                self.cast(node)
            elif node.op_type == "QuantizeLinear":
                self.quantize(node)
            else:
                self.dequantize(node)
        return touched


def _as_uint8(value: onnx.ValueInfoProto) -> None:
    if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type in FORMATS:
        value.type.tensor_type.elem_type = T.UINT8


def to_bytes(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every narrow tensor as uint8 bytes and its conversions spelled out (see
    the module doc); `proto` itself when it has no narrow tensor."""
    graph = proto.graph
    types = _value_types(graph)
    if not any(t in FORMATS for t in types.values()):
        return proto
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    rewriter = _Rewriter(graph)
    rewriter.run()
    del graph.node[:]
    graph.node.extend(rewriter.nodes)
    inits = []
    for t in graph.initializer:
        if t.data_type in FORMATS:
            raw = numpy_helper.to_array(t).view(np.uint8)
            t = numpy_helper.from_array(np.ascontiguousarray(raw), t.name)
        inits.append(t)
    del graph.initializer[:]
    graph.initializer.extend(inits + rewriter.inits)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        _as_uint8(v)
    return model
