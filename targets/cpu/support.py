"""Which ONNX nodes the CPU target compiles, and why not.

Besides "TVM has no converter", this lists the configurations where TVM 0.27's importer has a
converter but computes the wrong answer (found by `make conformance`, see
conformance/RESULTS.md). Those nodes go to the onnxruntime fallback instead: a correct
answer on the slower executor beats a fast wrong one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import onnx
from onnx import helper

from lepton_edge.lowering import narrow, onnx_fixups
from lepton_edge.lowering.relax import supported_onnx_ops
from lepton_edge.model import MAX_OPSET

if TYPE_CHECKING:
    from lepton_edge.plan import Lowering

T = onnx.TensorProto
# Element types TVM's LLVM backend cannot compute on (or decodes wrongly: float8 NaNs); the
# narrow ones reach TVM only as bytes, rewritten by lowering/narrow.py.
_UNSUPPORTED_TYPES = {
    T.STRING: "string", T.COMPLEX64: "complex64", T.COMPLEX128: "complex128",
    **{elem: fmt.name for elem, fmt in narrow.FORMATS.items()},
}
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
    """True when input `index` is (likely) a run-time value rather than a folded constant.

    Not run-time: an initializer, or an output whose every dim is static or an `unk__` dim
    that onnx's shape inference could not work out (shape arithmetic it does not propagate,
    e.g. through Where). lowering/onnx_fixups.py folds such inputs before import, and refuses
    the graph with a clear error (the subgraph then runs on onnxruntime) if it cannot. A
    named symbolic dim (a dynamic batch) means the value really is known only at run time.
    """
    def check(node: onnx.NodeProto, graph: Any) -> bool:
        if len(node.input) <= index or node.input[index] in graph.initializers:
            return False
        shape = graph.value_shapes.get(node.output[0])
        return shape is None or not all(
            (isinstance(d, int) and d >= 0) or (isinstance(d, str) and d.startswith("unk__"))
            for d in shape)
    return check


def _empty_input(node: onnx.NodeProto, graph: Any) -> bool:
    shape = graph.value_shapes.get(node.input[0]) if node.input else None
    return shape is not None and any(d == 0 for d in shape)


def _graph_input(name: str, graph: Any) -> bool:
    """`name` is a graph input (no node makes it, no initializer holds it)."""
    return bool(name) and name not in graph.initializers and not any(
        name in n.output for n in graph.nodes)


def _empty_reduction(node: onnx.NodeProto, graph: Any) -> bool:
    """An empty input to TVM's own Reduce converter (constant axes). With run-time axes,
    lowering/dynamic_ops.py's kernels start from the identity and handle empty inputs."""
    runtime_axes = len(node.input) > 1 and _graph_input(node.input[1], graph)
    return _empty_input(node, graph) and not runtime_axes


def _resize_downsamples(node: onnx.NodeProto, graph: Any) -> bool:
    """Linear/cubic Resize that shrinks some axis (or antialiases): TVM 0.27 gets it wrong.
    From opset 11 lowering/dynamic_ops.py converts every numeric Resize itself (any mode,
    constant or run-time scales/sizes/roi); only the older ones reach TVM's converter."""
    mode = _attr(node, "mode", b"nearest")
    if mode in (b"nearest", "nearest"):
        return False
    if graph.opset >= 11 and graph.value_types.get(node.input[0]) in _INT_TYPES | _FLOAT_TYPES:
        return False
    if _attr(node, "antialias", 0):
        return True
    scales = node.input[2] if len(node.input) > 2 else ""
    if scales in graph.initializers:
        from onnx import numpy_helper

        values = numpy_helper.to_array(graph.initializers[scales])
        if values.size and (values < 1).any():
            return True
    before = graph.value_shapes.get(node.input[0])
    after = graph.value_shapes.get(node.output[0])
    if before and after and len(before) == len(after):
        return any(isinstance(a, int) and isinstance(b, int) and a < b
                   for a, b in zip(after, before, strict=True))
    return False


_REDUCE = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
           "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")

def _runtime(name: str, graph: Any) -> bool:
    """`name` is not a constant (no initializer, no Constant node makes it)."""
    return bool(name) and name not in graph.initializers and not any(
        name in n.output for n in graph.nodes if n.op_type == "Constant")


_INT_TYPES = {T.INT8, T.INT16, T.INT32, T.INT64, T.UINT8, T.UINT16, T.UINT32, T.UINT64}
_FLOAT_TYPES = {T.FLOAT, T.DOUBLE, T.FLOAT16, T.BFLOAT16}


def _dynamic_refused(node: onnx.NodeProto, graph: Any) -> bool:
    """A run-time axes/k input that lowering/dynamic_ops.py cannot convert (it would fail the
    whole subgraph's import): integer Mean/L2/LogSum(Exp), an axes tensor of unknown length
    with keepdims=0, TopK over an axis of unknown length."""
    if len(node.input) < 2 or not _runtime(node.input[1], graph):
        return False
    elem = graph.value_types.get(node.input[0])
    if node.op_type == "TopK":
        shape = graph.value_shapes.get(node.input[0])
        axis = _attr(node, "axis", -1)
        return shape is None or not isinstance(shape[axis % len(shape)], int) or (
            shape[axis % len(shape)] <= 0)
    if elem == T.BOOL:
        ok = node.op_type in ("ReduceMax", "ReduceMin")
    elif elem in _INT_TYPES:
        ok = node.op_type not in ("ReduceMean", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")
    else:
        ok = elem in _FLOAT_TYPES
    axes = graph.value_shapes.get(node.input[1])
    known = axes is not None and len(axes) == 1 and isinstance(axes[0], int)
    return not ok or (not known and _attr(node, "keepdims", 1) == 0)


# op -> (condition on the node, why it is kept off TVM)
_WRONG_ON_TVM: dict[str, tuple[Callable[[onnx.NodeProto, Any], bool], str]] = {
    # a graph-input shape is converted by lowering/dynamic_ops.py; one computed in the graph
    # may reach TVM's converter as a shape value, which it expands wrongly
    "Expand": (lambda n, g: _not_constant(1)(n, g) and not _graph_input(n.input[1], g),
               "TVM 0.27 expands to the wrong shape when the shape is computed at run time"),
    "NonMaxSuppression": (lambda n, g: True, "TVM 0.27's NonMaxSuppression selects no boxes"),
    "ConvTranspose": (lambda n, g: _attr(n, "output_shape") is not None,
                      "TVM 0.27 ignores ConvTranspose's output_shape attribute"),
    # (BatchNormalization in training mode and IsInf with a detect_* flag off get bodies of
    # their own in lowering/bodies.py: see onnx_fixups.wrong_on_tvm)
    "Dropout": (lambda n, g: not onnx_fixups.dropout_in_inference(n) or (
        _used_outputs(n) > 1 and g.opset < 10),
                "TVM 0.27 ignores training_mode (lepton-edge compiles inference-mode Dropout, "
                "with a bool mask from opset 10)"),
    **{op: (_empty_reduction,
            "TVM 0.27 returns garbage for a reduction over an empty tensor")
       for op in _REDUCE},
    "TopK": (_dynamic_refused, "TopK with a run-time k needs a static length of its axis"),
    "Resize": (_resize_downsamples,
               "TVM 0.27's linear/cubic Resize is wrong when it shrinks an axis or antialiases"),
    "Range": (lambda n, g: any(_runtime(i, g) for i in n.input) and g.value_types.get(
        n.input[0]) in (T.FLOAT16, T.BFLOAT16),
              "Range with run-time inputs is compiled for float32/float64 and integers"),
    "RoiAlign": (lambda n, g: _attr(n, "mode", b"avg") in (b"max", "max"),
                 "TVM 0.27's RoiAlign max mode is wrong"),
}


@functools.cache
def _ops() -> frozenset[str]:
    return supported_onnx_ops()


def _types_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    for name in list(node.input) + list(node.output):
        elem = graph.value_types.get(name)
        if elem in _UNSUPPORTED_TYPES:
            return f"tensor '{name}' is {_UNSUPPORTED_TYPES[elem]}, which TVM cannot compute on"
    return None


def _lowering_reason(node: onnx.NodeProto, graph: Any, lowering: Lowering) -> str | None:
    """Why the nodes plan.py puts in place of `node` (graph.lowering: a revised op
    lepton-edge lowers itself, an unrolled Scan) cannot reach TVM, or None."""
    if lowering.kind == "scan":
        if lowering.nodes is None:
            return ("TVM 0.27 has no Scan converter and lepton-edge unrolls only some: "
                    f"{lowering.why}")
        return _nodes_reason(node, list(lowering.nodes), graph)
    why = _types_reason(node, graph)
    if why is not None or lowering.kind == "convert":
        return why  # "convert": lowering/dynamic_ops.py's converter of its private name
    if lowering.nodes is None:
        return lowering.why
    return _nodes_reason(node, list(lowering.nodes), graph)


def _nodes_reason(node: onnx.NodeProto, nodes: list[onnx.NodeProto], graph: Any
                  ) -> str | None:
    """Why the nodes plan.py puts in place of `node` (an unrolled Scan, a function body)
    cannot reach TVM, or None."""
    view = None
    for inner in nodes:
        if inner.op_type == "Constant" and (inner.domain or "") in ("", "ai.onnx"):
            continue
        if (inner.domain or "") not in ("", "ai.onnx"):
            return f"{node.op_type} becomes {inner.domain}.{inner.op_type}"
        if onnx_fixups.needs_expansion(inner):
            # lowering/onnx_fixups.py expands it in turn (at MAX_OPSET, types not needed)
            if onnx_fixups.expandable(inner, MAX_OPSET, {}):
                continue
            if inner.op_type not in _ops():
                return (f"{node.op_type} becomes {inner.op_type}, which TVM 0.27 has no "
                        "converter for")
        wrong = onnx_fixups.wrong_on_tvm(inner)
        if wrong is not None:
            return f"{node.op_type} becomes {inner.op_type}: {wrong}"
        if inner.op_type in _WRONG_ON_TVM:
            if view is None:
                view = _inner_view(node, nodes, graph)
            condition, why = _WRONG_ON_TVM[inner.op_type]
            if condition(inner, view):
                return f"{node.op_type} becomes {inner.op_type}: {why}"
    return _narrow_reason(node, nodes, graph)


def _inner_view(node: onnx.NodeProto, nodes: list[onnx.NodeProto], graph: Any) -> Any:
    """What _WRONG_ON_TVM's conditions read, for the nodes that replace `node`: the shapes
    onnx's inference (with data propagation) finds from `node`'s input types; values it
    cannot shape count as run-time (the conditions then refuse)."""
    from types import SimpleNamespace

    shapes: dict[str, tuple[Any, ...]] = {}
    types = graph.input_types(node)
    if all(name in types for name in node.input if name):
        _, shapes = _inferred(nodes, {n: types[n] for n in dict.fromkeys(
            i for i in node.input if i)}, [o for o in node.output if o],
            graph.model_opset or graph.opset)
    return SimpleNamespace(value_types={}, value_shapes=shapes, initializers={},
                           nodes=tuple(nodes), opset=graph.opset, outputs=())


def _inferred(nodes: list[onnx.NodeProto], inputs: dict[str, onnx.TypeProto],
              outputs: list[str], opset: int
              ) -> tuple[dict[str, int], dict[str, tuple[Any, ...]]]:
    """Element types and shapes onnx's inference (with data propagation) finds for the
    values `nodes` make, given `inputs`' types; none where it fails."""
    sub = helper.make_graph(
        nodes, "inner", [helper.make_value_info(n, t) for n, t in inputs.items()],
        [helper.make_value_info(o, onnx.TypeProto()) for o in outputs])
    model = helper.make_model(sub, opset_imports=[helper.make_opsetid("", opset)])
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - nothing known: _inner_view's conditions then see
        # run-time values (and refuse), _narrow_reason judges by the outer values alone
        return {}, {}
    types: dict[str, int] = {}
    shapes: dict[str, tuple[Any, ...]] = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = value.type.tensor_type
        if t.elem_type:
            types[value.name] = t.elem_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                       for d in t.shape.dim)
    return types, shapes


def _narrow_reason(node: onnx.NodeProto, nodes: list[onnx.NodeProto], graph: Any
                   ) -> str | None:
    """Why the narrow (float8/float4/int4/int2) values among the nodes that replace `node`
    (a Scan body's Casts, say) keep it off TVM, or None. lowering/narrow.py rewrites them
    when the subgraph is imported, so they follow its rules (narrow.reason), judged with the
    element types onnx's inference finds; a node it does not compile would otherwise fail
    the build (TVM's own converters get float8 wrong)."""
    produced = {o for n in nodes for o in n.output if o}
    inputs: dict[str, onnx.TypeProto] = {}
    types: dict[str, int] = {}
    shapes: dict[str, tuple[Any, ...]] = {}
    for name in dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced):
        if graph.value_types.get(name):  # read from outside: `node`'s inputs, outer values
            dims = graph.value_shapes.get(name)
            dims = None if dims is None else tuple(d if isinstance(d, int) else None
                                                   for d in dims)
            inputs[name] = helper.make_tensor_type_proto(graph.value_types[name], dims)
            types[name] = graph.value_types[name]
            if dims is not None:
                shapes[name] = dims
    inner_types, inner_shapes = _inferred(nodes, inputs, [o for o in node.output if o],
                                          graph.model_opset or graph.opset)
    types.update(inner_types)
    shapes.update(inner_shapes)
    if not any(t in narrow.FORMATS for t in types.values()):
        return None
    # Constants become bytes in narrow.to_bytes, whatever their type
    compiled = [n for n in nodes if not (n.op_type == "Constant" and (n.domain or "") in (
        "", "ai.onnx"))]
    for inner in compiled:
        why = narrow.reason(inner, types, shapes, compiled)
        if why is not None:
            return f"{node.op_type} becomes {inner.op_type}: {why}"
    return None


def unsupported_reason(node: onnx.NodeProto, graph: Any) -> str | None:
    if narrow.touches(node, graph.value_types):  # float8/float4/int4/int2: narrow.py converts
        return narrow.reason(node, graph.value_types, graph.value_shapes, graph.nodes)
    domain = node.domain or ""
    lowering = graph.lowering(node)  # plan.py rewrites it for TVM's importer
    if lowering is not None:
        return _lowering_reason(node, graph, lowering)
    if domain == "com.microsoft":
        if node.op_type not in _CONTRIB_OPS:
            return f"TVM has no converter for contrib op com.microsoft.{node.op_type}"
    elif domain not in ("", "ai.onnx"):
        return f"TVM has no converter for ops of domain '{domain}'"
    elif onnx_fixups.needs_expansion(node):
        # lowering/onnx_fixups.py replaces the node by its ONNX function body before import
        if not onnx_fixups.expandable(node, graph.opset, graph.input_types(node)):
            why = (f"TVM 0.27's ONNX importer has no converter for {node.op_type}"
                   if node.op_type not in _ops() else onnx_fixups.wrong_on_tvm(node))
            if onnx_fixups.function_body(node, graph.opset, graph.input_types(node)) is None:
                return why
            return f"{why}, and its ONNX function body uses ops TVM cannot take either"
    why = _types_reason(node, graph)
    if why is not None:
        return why
    if domain in ("", "ai.onnx") and node.op_type in _WRONG_ON_TVM:
        condition, why = _WRONG_ON_TVM[node.op_type]
        if condition(node, graph):
            return why
    if domain in ("", "ai.onnx") and node.op_type in _REDUCE and _dynamic_refused(node, graph):
        return (f"{node.op_type} with run-time axes is compiled for float inputs (and integer "
                "Sum/Max/Min/Prod/L1/SumSquare, bool Max/Min) with an axes tensor of known "
                "length")
    return None
