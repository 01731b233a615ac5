"""Graph rewrites applied to an ONNX (sub)graph before TVM 0.27's Relax importer sees it.

TVM's importer fails on, or gets wrong, several things ONNX allows and exporters emit; each
rewrite here turns such a graph into an equivalent one the importer handles (found by
`make conformance`, see conformance/RESULTS.md):

* `Constant` nodes with `value_float(s)` / `value_int(s)` / `value_string(s)`: the importer
  only reads `value` ("no value in Constant"). Rewritten to the `value` tensor form.
* Function ops: ops that TVM has no converter for (Swish, Celu, RotaryEmbedding, the window
  functions, NegativeLogLikelihoodLoss, ...; QLinearConv, QLinearMatMul, ConvInteger,
  LpNormalization, EyeLike with a dtype, RNN/GRU/LSTM, BatchNormalization in training mode and
  IsInf with a detect_* flag off get bodies of our own from lowering/bodies.py) or converts
  wrongly (ai.onnx Attention is sent
  to the com.microsoft Attention converter; LayerNormalization returns zeros for its Mean /
  InvStdDev outputs; Mish and Softplus lose precision, see `_PRECISE_SOFTPLUS`) are replaced
  by their ONNX function body, which uses ops TVM does handle.
* Constant folding: a node whose inputs are all constants (initializers, `Constant` nodes, or
  earlier folded results), and `Shape` / `Size` of a tensor whose shape is static, are
  evaluated here with onnx's reference evaluator and become initializers. Without this,
  shape arithmetic (`Shape -> Gather -> Div -> Reshape`, what function bodies and exporters
  emit) reaches the importer as a relax ShapeExpr that most converters reject ("cannot
  handle ShapeExpr inputs", "Reshape requires the input new shape to be Shape").

Graph *inputs* are never treated as constants: a shape, axes or scales tensor that is a
runtime input stays one. lowering/dynamic_ops.py converts Reduce*, CumSum, Pad, TopK, Split,
Reshape, Expand, Range, ConstantOfShape, AffineGrid and Resize with such inputs; any other
node that needs it constant fails TVM's import with a clear message, and the planner then
runs it on onnxruntime.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

# Folding never creates constants larger than this many elements.
MAX_FOLD_ELEMENTS = 1 << 20
# Ops never evaluated at compile time (random, or with side inputs we do not model).
_NO_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
            "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceMap",
            "Optional", "OptionalGetElement", "OptionalHasElement",
            # constant int8 weights stay QDQ: lowering/int8.py turns them into int8 kernels
            "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_DEFAULT = ("", "ai.onnx")


@functools.cache
def _tvm_ops() -> frozenset[str]:
    from lepton_edge.lowering.relax import supported_onnx_ops

    return supported_onnx_ops()


# ------------------------------------------------------------------ which ops get expanded
def _used_outputs(node: onnx.NodeProto) -> int:
    return sum(1 for o in node.output if o)


def wrong_on_tvm(node: onnx.NodeProto) -> str | None:
    """Why TVM's own converter for this default-domain node cannot be used, else None."""
    if node.op_type == "Attention":
        return "TVM 0.27 imports ai.onnx Attention with the com.microsoft converter"
    if node.op_type == "LayerNormalization" and _used_outputs(node) > 1:
        return "TVM 0.27 returns zeros for LayerNormalization's Mean/InvStdDev"
    if node.op_type == "Mish":
        return "TVM 0.27's Mish is off by up to 1.3e-3 relative"
    if node.op_type == "RMSNormalization":
        return "TVM 0.27's RMSNormalization fails to build when it normalizes every axis"
    if node.op_type == "IsInf" and any(a.name in ("detect_negative", "detect_positive")
                                       and a.i == 0 for a in node.attribute):
        return "TVM 0.27 ignores IsInf's detect_negative/detect_positive"
    if node.op_type == "BatchNormalization" and any(
            a.name == "training_mode" and a.i for a in node.attribute):
        return "TVM 0.27 computes wrong running statistics in training mode"
    if node.op_type == "EyeLike" and any(a.name == "dtype" for a in node.attribute):
        return "TVM 0.27's EyeLike refuses a dtype attribute that differs from its input's"
    return None


def needs_expansion(node: onnx.NodeProto) -> bool:
    """Whether `apply` replaces this node by its ONNX function body."""
    if (node.domain or "") not in _DEFAULT:
        return False
    return node.op_type not in _tvm_ops() or wrong_on_tvm(node) is not None


def _type_proto(elem: int, shape: tuple[Any, ...] | None) -> onnx.TypeProto:
    dims = None if shape is None else [d if isinstance(d, int) else None for d in shape]
    return helper.make_tensor_type_proto(elem, dims)


def schema_body(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]
                ) -> onnx.FunctionProto | None:
    """ONNX's own function body of default-domain `node` at `opset`: the plain one, else the
    context-dependent one built for these input types (all must be known); None if neither."""
    if (node.domain or "") not in _DEFAULT or not onnx.defs.has(node.op_type):
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return None
    if schema.has_function:
        versions = [v for v in schema.function_opset_versions if v <= opset]
        if versions:
            fn = schema.get_function_with_opset_version(max(versions))
            return onnx.FunctionProto.FromString(fn) if isinstance(fn, bytes) else fn
    if not schema.has_context_dependent_function:
        return None
    versions = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    in_types = [types.get(name) for name in node.input if name]
    if not versions or any(t is None for t in in_types):
        return None
    try:
        data = schema.get_context_dependent_function_with_opset_version(
            max(versions), node.SerializeToString(), [t.SerializeToString() for t in in_types])
    except Exception:  # noqa: BLE001 - onnx raises on types its builder rejects
        return None
    fn = onnx.FunctionProto()
    fn.ParseFromString(data)
    return fn if fn.node else None


def function_body(
    node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]
) -> onnx.FunctionProto | None:
    """The ONNX function body of `node` at `opset`, or None (no body, or not usable)."""
    if (node.domain or "") not in _DEFAULT or not onnx.defs.has(node.op_type):
        return None
    fn = schema_body(node, opset, types)
    if fn is None:  # ops with no ONNX body: bodies of our own (lowering/bodies.py)
        from lepton_edge.lowering import bodies

        fn = bodies.body(node, opset, types)
    if fn is None or not fn.node:
        return None
    # The body is written against the function's own opset; its ops must mean the same at
    # the model's opset (it will be interpreted there).
    fn_opset = next((o.version for o in fn.opset_import if o.domain in _DEFAULT), opset)
    for inner in fn.node:
        if (inner.domain or "") not in _DEFAULT:
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in inner.attribute):
            return None
        if not _same_meaning(inner.op_type, fn_opset, opset):
            return None
    return fn


# Version bumps that changed what an op computes without changing its inputs or attributes.
_SEMANTIC_BUMPS = {"Softmax": 13, "LogSoftmax": 13, "Hardmax": 13}


def _same_meaning(op: str, old: int, new: int) -> bool:
    """Whether `op` as written for opset `old` computes the same at opset `new`.

    Same schema version: yes. Otherwise the versions in between must keep the same inputs,
    outputs and attributes (with the same defaults), which is how ONNX records a change that
    only adds types, and none of them may be a known semantic change (`_SEMANTIC_BUMPS`).
    """
    try:
        a, b = onnx.defs.get_schema(op, old), onnx.defs.get_schema(op, new)
    except onnx.defs.SchemaError:
        return False
    if a.since_version == b.since_version:
        return True
    bump = _SEMANTIC_BUMPS.get(op)
    if bump is not None and a.since_version < bump <= b.since_version:
        return False

    def interface(schema: Any) -> tuple[Any, ...]:
        attrs = tuple(sorted((name, attr.default_value.SerializeToString())
                             for name, attr in schema.attributes.items()))
        return (tuple(i.name for i in schema.inputs), tuple(o.name for o in schema.outputs),
                attrs)

    return interface(a) == interface(b)


def expandable(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto],
               depth: int = 0) -> bool:
    """Whether the body exists and every op in it reaches TVM (expanding nested bodies)."""
    fn = function_body(node, opset, types)
    if fn is None or depth > 4:
        return False
    inner_nodes = _expand_node(node, fn, "_x__", opset)
    inner_types: dict[str, onnx.TypeProto] | None = None
    for inner in inner_nodes:
        if needs_expansion(inner):
            if inner_types is None:  # a nested context-dependent body needs its input types
                inner_types = _body_types(node, inner_nodes, opset, types)
            if not expandable(inner, opset, inner_types, depth + 1):
                return False
    return True


def _body_types(node: onnx.NodeProto, body: list[onnx.NodeProto], opset: int,
                types: dict[str, onnx.TypeProto]) -> dict[str, onnx.TypeProto]:
    """Types of the values inside an expanded body (shape inference over the body alone,
    from the caller's input types); {} when they cannot be inferred."""
    inputs = [name for name in dict.fromkeys(node.input) if name]
    if any(name not in types for name in inputs):
        return {}
    graph = helper.make_graph(
        body, "body", [helper.make_value_info(name, types[name]) for name in inputs],
        [helper.make_value_info(name, onnx.TypeProto()) for name in node.output if name])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - unknown types: nested bodies then are not expandable
        return {}
    found = dict(types)
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            found[value.name] = value.type
    return found


def _expand_node(node: onnx.NodeProto, fn: onnx.FunctionProto, prefix: str, opset: int
                 ) -> list[onnx.NodeProto]:
    names: dict[str, str] = {}
    for i, formal in enumerate(fn.input):
        names[formal] = node.input[i] if i < len(node.input) else ""
    for i, formal in enumerate(fn.output):
        if i < len(node.output) and node.output[i]:
            names[formal] = node.output[i]
        # an output the caller leaves out still feeds the body: it keeps an internal name
    actual_attrs = {a.name: a for a in node.attribute}
    defaults = {a.name: a for a in fn.attribute_proto}
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
        for name, attr in schema.attributes.items():
            if name not in defaults and attr.default_value.type:
                defaults[name] = attr.default_value
    except onnx.defs.SchemaError:
        pass

    def rename(name: str) -> str:
        if not name:
            return ""
        if name not in names:
            names[name] = f"{prefix}{name}"
        return names[name]

    out = []
    for index, inner in enumerate(fn.node):
        new = onnx.NodeProto()
        new.op_type, new.domain = inner.op_type, inner.domain
        new.name = f"{prefix}{inner.name or inner.op_type}_{index}"
        new.input.extend(rename(n) for n in inner.input)
        new.output.extend(rename(n) for n in inner.output)
        for attr in inner.attribute:
            if attr.ref_attr_name:
                source = actual_attrs.get(attr.ref_attr_name, defaults.get(attr.ref_attr_name))
                if source is None:
                    continue
                copy = onnx.AttributeProto()
                copy.CopyFrom(source)
                copy.name = attr.name
                new.attribute.append(copy)
            else:
                new.attribute.append(attr)
        out.append(new)
    # Function outputs the caller does not use are computed into internal names, which
    # dead-code elimination then removes.
    return out


# ---------------------------------------------------------------------------- the passes
def _constant_value_form(node: onnx.NodeProto) -> bool:
    """Rewrite Constant value_* attributes into `value`; True if it changed the node."""
    if node.op_type != "Constant" or (node.domain or "") not in _DEFAULT:
        return False
    if any(a.name == "value" for a in node.attribute):
        return False
    for attr in list(node.attribute):
        value = helper.get_attribute_value(attr)
        if attr.name == "value_float":
            array = np.array(value, dtype=np.float32)
        elif attr.name == "value_floats":
            array = np.array(list(value), dtype=np.float32)
        elif attr.name == "value_int":
            array = np.array(value, dtype=np.int64)
        elif attr.name == "value_ints":
            array = np.array(list(value), dtype=np.int64)
        elif attr.name == "value_string":
            array = np.array(value.decode() if isinstance(value, bytes) else value,
                             dtype=object)
        elif attr.name == "value_strings":
            array = np.array([v.decode() if isinstance(v, bytes) else v for v in value],
                             dtype=object)
        else:
            continue
        del node.attribute[:]
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(array)))
        return True
    return False


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node makes (`value` or any value_* form but sparse), or None."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    _constant_value_form(copy)
    attrs = [a for a in copy.attribute if a.name == "value"]
    if copy.op_type != "Constant" or len(copy.attribute) != 1 or not attrs:
        return None
    tensor = onnx.TensorProto()
    tensor.CopyFrom(attrs[0].t)
    if tensor.HasField("data_location") and tensor.data_location != onnx.TensorProto.DEFAULT:
        return None  # external data: stays an input
    return tensor


def _precise_softplus(model: onnx.ModelProto, opset: int) -> bool:
    """Softplus(x) -> max(x, 0) + log1p(exp(-|x|)), log1p in Kahan's exact form.

    TVM 0.27 lowers Softplus (and Mish) to log(1 + exp(..)), which loses all precision once
    exp(..) is below float32's epsilon (Mish(-10) off by 1.3e-3 relative). ONNX has no
    log1p; with u = 1 + e, log1p(e) = e * log(u) / (u - 1) (and e itself where u == 1) is
    exact to a few ulp.
    """
    if opset < 11:
        return False
    graph = model.graph
    types = _value_types(graph)

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        elem = types.get(node.input[0]).tensor_type.elem_type if (
            node.op_type == "Softplus" and (node.domain or "") in _DEFAULT
            and node.input[0] in types) else None
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                        onnx.TensorProto.FLOAT16):
            return None
        p = f"{node.name or 'Softplus'}_{index}__"
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        graph.initializer.extend([numpy_helper.from_array(np.array(1, dtype), p + "one"),
                                  numpy_helper.from_array(np.array(0, dtype), p + "zero")])
        x, y = node.input[0], node.output[0]
        make = helper.make_node
        out = [
            make("Abs", [x], [p + "a"]), make("Neg", [p + "a"], [p + "na"]),
            make("Exp", [p + "na"], [p + "e"]), make("Add", [p + "one", p + "e"], [p + "u"]),
            make("Sub", [p + "u", p + "one"], [p + "d"]), make("Log", [p + "u"], [p + "l"]),
            make("Div", [p + "l", p + "d"], [p + "r"]), make("Mul", [p + "e", p + "r"], [p + "k"]),
            make("Equal", [p + "d", p + "zero"], [p + "small"]),
            make("Where", [p + "small", p + "e", p + "k"], [p + "log1p"]),
            make("Max", [x, p + "zero"], [p + "pos"]),
            make("Add", [p + "pos", p + "log1p"], [y]),
        ]
        return out

    return _rewrite(graph, replace)


def _precise_tanh(model: onnx.ModelProto, opset: int) -> bool:
    """Tanh(x) -> x - x^3/3 + 2x^5/15 where |x| < 0.05, TVM's Tanh elsewhere.

    TVM 0.27's Tanh is a rational approximation with an absolute error near 1e-8: for tiny
    inputs that is a large relative error (tanh(4.54e-5) off by 2e-4 relative, which makes
    Mish(-10) fail onnx's rtol=1e-3). The odd series is exact to float32 below 0.05.
    """
    if opset < 9:
        return False
    graph = model.graph
    types = _value_types(graph)

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        elem = types[node.input[0]].tensor_type.elem_type if (
            node.op_type == "Tanh" and (node.domain or "") in _DEFAULT
            and node.input[0] in types and not node.name.endswith("__fixed")) else None
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            return None
        p = f"{node.name or 'Tanh'}_{index}__"
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        graph.initializer.extend([
            numpy_helper.from_array(np.array(0.05, dtype), p + "small"),
            numpy_helper.from_array(np.array(-1 / 3, dtype), p + "c3"),
            numpy_helper.from_array(np.array(2 / 15, dtype), p + "c5")])
        x, y = node.input[0], node.output[0]
        make = helper.make_node
        out = [
            make("Tanh", [x], [p + "t"], name=p + "__fixed"),
            make("Mul", [x, x], [p + "x2"]), make("Mul", [p + "x2", p + "c5"], [p + "a"]),
            make("Add", [p + "a", p + "c3"], [p + "b"]), make("Mul", [p + "b", p + "x2"], [p + "c"]),
            make("Mul", [p + "c", x], [p + "d"]), make("Add", [x, p + "d"], [p + "series"]),
            make("Abs", [x], [p + "abs"]), make("Less", [p + "abs", p + "small"], [p + "use"]),
            make("Where", [p + "use", p + "series", p + "t"], [y]),
        ]
        return out

    return _rewrite(graph, replace)


def dropout_in_inference(node: onnx.NodeProto) -> bool:
    """Dropout without a training_mode input: by definition y = x and the mask is all true."""
    return node.op_type == "Dropout" and (len(node.input) < 3 or not node.input[2])


def _inference_dropout(model: onnx.ModelProto, opset: int) -> bool:
    """Inference-mode Dropout with its mask output used -> Identity + an all-true mask.

    TVM 0.27 returns the mask as float (ONNX: bool); without training_mode nothing is dropped.
    """
    graph = model.graph

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if not (dropout_in_inference(node) and (node.domain or "") in _DEFAULT
                and _used_outputs(node) > 1 and opset >= 10):
            return None
        p = f"{node.name or 'Dropout'}_{index}__"
        graph.initializer.append(numpy_helper.from_array(np.array(True), p + "true"))
        make = helper.make_node
        out = [make("Identity", [node.input[0]], [node.output[0] or p + "y"]),
               make("Shape", [node.input[0]], [p + "shape"]),
               make("Expand", [p + "true", p + "shape"], [node.output[1]])]
        return out

    return _rewrite(graph, replace)


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
           onnx.TensorProto.BFLOAT16}
# integer bases whose powers are exact through float64 (every in-range result < 2**53)
_SMALL_INTS = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
               onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32}


def _pow_through_float64(model: onnx.ModelProto, opset: int) -> bool:
    """Pow with mixed base/exponent types, or an integer base: computed in float64, cast back
    to the base's type (what numpy, onnx's reference and onnxruntime compute).

    TVM 0.27 refuses Pow whose operands differ in type ("Binary operators must have the same
    datatype") and fails to build an integer Pow. int64 bases stay as they are (their powers
    above 2**53 are not exact in float64), so TVM's build fails and onnxruntime runs them.
    """
    graph = model.graph
    types = _value_types(graph)

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        base = exp = None
        if node.op_type == "Pow" and (node.domain or "") in _DEFAULT and all(
                name in types for name in node.input[:2]):
            base, exp = (types[n].tensor_type.elem_type for n in node.input[:2])
        if base is None or not ((base in _FLOATS and base != exp and exp not in _FLOATS
                                 and exp is not None) or base in _SMALL_INTS):
            return None
        p = f"{node.name or 'Pow'}_{index}__"
        make = helper.make_node
        out = [make("Cast", [node.input[0]], [p + "b"], to=onnx.TensorProto.DOUBLE),
               make("Cast", [node.input[1]], [p + "e"], to=onnx.TensorProto.DOUBLE),
               make("Pow", [p + "b", p + "e"], [p + "r"]),
               make("Cast", [p + "r"], [node.output[0]], to=base)]
        return out

    return _rewrite(graph, replace)


# ops whose float16 form TVM 0.27 accumulates in float16 (see _float16_via_float32)
_ACCUMULATING = {"MatMul", "Gemm", "Softmax", "LogSoftmax", "ReduceSum", "ReduceMean", "Conv"}


def _float16_via_float32(model: onnx.ModelProto, opset: int) -> bool:
    """float16 MatMul/Gemm/Softmax/ReduceSum/ReduceMean -> Cast to float32, op, Cast back.

    TVM 0.27 accumulates these in float16 (float16 Attention off by 2 ulp against onnx's
    float32-accumulating reference). x86 CPUs without AVX-512 FP16 compute float16 through
    float32 anyway, so this costs two conversions and gains the precision.
    """
    graph = model.graph
    types = _value_types(graph)
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        first = node.input[0] if node.input else ""
        if not (node.op_type in _ACCUMULATING and (node.domain or "") in _DEFAULT
                and first in types and types[first].tensor_type.elem_type == f16):
            return None
        p = f"{node.name or node.op_type}_{index}__f32_"
        out: list[onnx.NodeProto] = []
        new = onnx.NodeProto()
        new.CopyFrom(node)
        # the float inputs (data operands; Reduce axes and the like are int64) go to float32
        for i, name in enumerate(node.input):
            if name and name in types and types[name].tensor_type.elem_type == f16:
                out.append(helper.make_node("Cast", [name], [f"{p}in{i}"], to=f32))
                new.input[i] = f"{p}in{i}"
        for i, name in enumerate(node.output):
            if name:
                new.output[i] = f"{p}out{i}"
        out.append(new)
        for i, name in enumerate(node.output):
            if name:
                out.append(helper.make_node("Cast", [f"{p}out{i}"], [name], to=f16))
        return out

    return _rewrite(graph, replace)


def _reduce_extreme_of_infinities(model: onnx.ModelProto, opset: int) -> bool:
    """ReduceMax over all -inf (ReduceMin over all +inf) -> -inf (+inf), not -FLT_MAX.

    TVM 0.27 starts its max reduction at the lowest finite value, so a row that is all -inf
    (a fully masked attention row) reduces to -3.4e38 and checks like `max == -inf` fail.
    Rewritten as Where(no element differs from -inf, -inf, ReduceMax(x)).
    """
    if opset < 11:
        return False
    graph = model.graph
    types = _value_types(graph)

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        name = node.input[0] if node.input else ""
        elem = types[name].tensor_type.elem_type if (
            node.op_type in ("ReduceMax", "ReduceMin") and (node.domain or "") in _DEFAULT
            and name in types and not node.name.endswith("__fixed")
            and not _runtime_axes(node, graph)) else None
        if elem not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                        onnx.TensorProto.FLOAT16):
            return None
        p = f"{node.name or node.op_type}_{index}__"
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        inf = -np.inf if node.op_type == "ReduceMax" else np.inf
        graph.initializer.extend([numpy_helper.from_array(np.array(inf, dtype), p + "inf"),
                                  numpy_helper.from_array(np.array(0, dtype), p + "zero")])
        make = helper.make_node
        reduced = onnx.NodeProto()
        reduced.CopyFrom(node)
        reduced.name = p + "__fixed"
        del reduced.output[:]
        reduced.output.append(p + "y")
        counted = onnx.NodeProto()
        counted.CopyFrom(reduced)
        counted.op_type = "ReduceMax"
        counted.name = p + "count__fixed"
        counted.input[0] = p + "other"
        counted.output[0] = p + "n"
        out = [
            reduced, make("Equal", [name, p + "inf"], [p + "isinf"]),
            make("Not", [p + "isinf"], [p + "notinf"]),
            make("Cast", [p + "notinf"], [p + "other"], to=elem), counted,
            make("Equal", [p + "n", p + "zero"], [p + "allinf"]),
            make("Where", [p + "allinf", p + "inf", p + "y"], [node.output[0]]),
        ]
        return out

    return _rewrite(graph, replace)


def _runtime_axes(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    """A Reduce whose axes tensor is not constant: lowering/dynamic_ops.py converts it, and
    its max/min start from -inf/+inf, so the all-infinities rewrite is not needed."""
    if len(node.input) < 2 or not node.input[1]:
        return False
    name = node.input[1]
    return not any(t.name == name for t in graph.initializer) and not any(
        name in n.output for n in graph.node if n.op_type == "Constant")


def _rewrite(graph: onnx.GraphProto,
             replace: Callable[[int, onnx.NodeProto], list[onnx.NodeProto] | None]) -> bool:
    """The skeleton of every node rewrite: `replace(index, node)` returns the nodes standing
    for `node` (None keeps it); the node list is swapped only if anything changed."""
    nodes: list[onnx.NodeProto] = []
    changed = False
    for index, node in enumerate(graph.node):
        new = replace(index, node)
        nodes.extend([node] if new is None else new)
        changed = changed or new is not None
    if changed:
        del graph.node[:]
        graph.node.extend(nodes)
    return changed


def _value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    types: dict[str, onnx.TypeProto] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type
    for tensor in graph.initializer:
        types[tensor.name] = _type_proto(tensor.data_type, tuple(tensor.dims))
    return types


def _static_shape(t: onnx.TypeProto | None) -> tuple[int, ...] | None:
    if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in t.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def _expand_functions(model: onnx.ModelProto, opset: int) -> bool:
    graph = model.graph
    types = _value_types(graph)

    def replace(index: int, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        fn = function_body(node, opset, types) if needs_expansion(node) else None
        if fn is None:
            return None
        return _expand_node(node, fn, f"{node.name or node.op_type}_{index}__", opset)

    return _rewrite(graph, replace)


def _evaluate(node: onnx.NodeProto, values: list[np.ndarray | None], opset: int
              ) -> list[np.ndarray] | None:
    from onnx.reference import ReferenceEvaluator

    inputs = []
    feeds = {}
    for i, (name, value) in enumerate(zip(node.input, values, strict=True)):
        if not name:
            inputs.append("")
            continue
        formal = f"in{i}"
        inputs.append(formal)
        feeds[formal] = value
    single = onnx.NodeProto()
    single.CopyFrom(node)
    del single.input[:]
    single.input.extend(inputs)
    outs = [f"out{i}" if o else "" for i, o in enumerate(node.output)]
    del single.output[:]
    single.output.extend(outs)
    graph = helper.make_graph(
        [single], "fold",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), None)
         for n in feeds],
        [helper.make_tensor_value_info(o, 0, None) for o in outs if o])
    try:
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception:  # noqa: BLE001 - anything it cannot evaluate simply stays in the graph
        return None
    arrays = [np.asarray(r) for r in results]
    if any(a.dtype == object or a.size > MAX_FOLD_ELEMENTS for a in arrays):
        return None
    return arrays


def _fold_constants(model: onnx.ModelProto, opset: int) -> bool:
    graph = model.graph
    outputs = {o.name for o in graph.output}
    types = _value_types(graph)
    known: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.STRING and not tensor.HasField("data_location"):
            known[tensor.name] = numpy_helper.to_array(tensor)
    graph_inputs = {i.name for i in graph.input}
    for name in graph_inputs:
        known.pop(name, None)  # an initializer that is also an input can be overridden
    new_inits: list[onnx.TensorProto] = []
    kept: list[onnx.NodeProto] = []
    changed = False
    for node in graph.node:
        produced: list[np.ndarray] | None = None
        foldable = (
            (node.domain or "") in _DEFAULT and node.op_type not in _NO_FOLD
            and not any(o in outputs for o in node.output)
            and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                        for a in node.attribute))
        if foldable and node.op_type in ("Shape", "Size") and node.input[0] not in known:
            shape = _static_shape(types.get(node.input[0]))
            if shape is not None:
                if node.op_type == "Size":
                    produced = [np.array(int(np.prod(shape)), dtype=np.int64)]
                else:
                    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                    start, end = attrs.get("start", 0), attrs.get("end", None)
                    produced = [np.array(shape[start:end], dtype=np.int64)]
        elif foldable and all(not n or n in known for n in node.input):
            if node.op_type == "Constant" and any(a.name == "sparse_value"
                                                  for a in node.attribute):
                produced = None
            else:
                produced = _evaluate(node, [known.get(n) if n else None for n in node.input],
                                     opset)
        if produced is None:
            kept.append(node)
            continue
        changed = True
        for name, array in zip([o for o in node.output if o], produced, strict=False):
            known[name] = array
            new_inits.append(numpy_helper.from_array(array, name))
    if not changed:
        return False
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_inits)
    _remove_dead(graph)
    return True


def _remove_dead(graph: onnx.GraphProto) -> None:
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o and o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # names a subgraph body reads from outside
                for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs):
                    for inner in g.node:
                        needed.update(inner.input)
    kept.reverse()
    inputs = {i.name for i in graph.input}
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in needed or t.name in inputs]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)
    vis = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - keep what we have; folding just does less
        return model


def _default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in _DEFAULT), default=0)


def apply(proto: onnx.ModelProto, max_rounds: int = 6) -> onnx.ModelProto:
    """An equivalent copy of `proto` that TVM 0.27's ONNX importer handles (see module doc)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    opset = _default_opset(model)
    if not opset:
        return model
    for node in model.graph.node:
        _constant_value_form(node)
    for _ in range(max_rounds):
        changed = _expand_functions(model, opset)
        if changed:
            for node in model.graph.node:
                _constant_value_form(node)
        model = _infer(model)
        changed = _precise_softplus(model, opset) or changed
        changed = _reduce_extreme_of_infinities(model, opset) or changed
        changed = _precise_tanh(model, opset) or changed
        changed = _pow_through_float64(model, opset) or changed
        changed = _inference_dropout(model, opset) or changed
        changed = _float16_via_float32(model, opset) or changed
        changed = _fold_constants(model, opset) or changed
        if not changed:
            break
    # Expand with a run-time shape: lowering/dynamic_ops.py converts a shape tensor, and
    # refuses a shape value made by Shape ops (TVM 0.27 expands to the wrong shape then).
    return model
