"""partition(model, targets) -> Plan: which target runs which node, as ONNX subgraphs.

Each requested target is asked about every node; a node goes to the highest-priority target
that supports it, or to the onnxruntime fallback executor with every target's reason. Nodes
with the same assignment are grouped into subgraphs that can never form a cycle: a node's
"level" is the largest level of its producers, plus one where the assignment changes, and a
subgraph is all nodes of one (target, level). Every edge between two subgraphs therefore
goes to a strictly higher level, so running subgraphs in level order is always valid.
Each subgraph is emitted as a standalone, valid ONNX model; a compiled one has its Scans
unrolled and, in a model above MAX_OPSET, the revised ops lepton-edge lowers itself renamed
or expanded (`_lowered`) before it is relabelled to MAX_OPSET for TVM's importer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lepton_edge.errors import TargetError, UnsupportedOpsError
from lepton_edge.lowering import bodies, onnx_fixups
from lepton_edge.model import MAX_OPSET, ML_DOMAIN, Model, revised_op, same_at_max_opset
from lepton_edge.target import Profile, Target, TargetPlugin, resolve

FALLBACK = "onnxruntime"


@dataclass(frozen=True)
class Lowering:
    """What TVM's importer gets in place of a node plan.py rewrites (GraphView.lowering)."""

    # "convert": renamed to its private converter (bodies.private_name, in
    # bodies.PRIVATE_DOMAIN); "expand": its ONNX function body at the model's opset
    # (bodies.expand_revised); "scan": the Scan unrolled (bodies.unroll_scan)
    kind: str
    nodes: tuple[onnx.NodeProto, ...] | None  # None: it cannot be rewritten, see `why`
    why: str = ""


@dataclass(frozen=True)
class GraphView:
    """What a target may look at when deciding about a node: types and shapes by name."""

    value_types: dict[str, int]
    value_shapes: dict[str, tuple[Any, ...]]
    initializers: dict[str, onnx.TensorProto]
    opset: int
    # the graph's nodes and output names, for targets whose support depends on neighbours
    # (e.g. vitis keeps host-side float Quantize/Dequantize at a boundary off the FPGA)
    nodes: tuple[onnx.NodeProto, ...] = ()
    outputs: tuple[str, ...] = ()
    # values that are not tensors (sequences, optionals): name -> "sequence<tensor>", ...
    value_kinds: dict[str, str] = field(default_factory=dict)
    # the model's own ai.onnx opset when it is above `opset` (MAX_OPSET): revised ops that
    # lepton-edge lowers itself (lowering/bodies.py's revised_lowering) are
    # judged at it; 0 when the model is at `opset` or below
    model_opset: int = 0
    # node identity -> (node, its Lowering): `lowering` computes each once per planning pass
    _lowerings: dict[int, tuple[onnx.NodeProto, Lowering | None]] = field(
        default_factory=dict, compare=False, repr=False)

    def lowering(self, node: onnx.NodeProto) -> Lowering | None:
        """How a compiled subgraph gives `node` to TVM's importer when plan.py rewrites it (a
        Scan, or in a newer-opset model a revised op lepton-edge lowers itself), or None: as
        it is. Worked out once per node: a target's support check (targets/cpu/support.py)
        judges the very nodes `_lowered` then puts in the subgraph."""
        hit = self._lowerings.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        result = _lowering(node, self)
        self._lowerings[id(node)] = (node, result)
        return result

    def input_types(self, node: onnx.NodeProto) -> dict[str, onnx.TypeProto]:
        """Type protos (element type and known dims) of `node`'s inputs."""
        types = {}
        for name in node.input:
            if name and name in self.value_types:
                dims = self.value_shapes.get(name)
                types[name] = helper.make_tensor_type_proto(
                    self.value_types[name],
                    None if dims is None else [d if isinstance(d, int) else None
                                               for d in dims])
        return types


@dataclass(frozen=True)
class Subgraph:
    id: str
    target: str  # the planned (highest-priority supporting) target, or "onnxruntime"
    candidates: tuple[str, ...]  # every requested target supporting all its nodes, best first
    level: int
    nodes: tuple[str, ...]
    op_counts: dict[str, int]
    macs: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    proto: onnx.ModelProto
    # a compiled subgraph whose nodes were rewritten for TVM's importer (revised ops renamed
    # to private converters or expanded, Scans unrolled): its nodes as the model has them,
    # which onnxruntime runs if every build fails; else None (`proto` itself, at most
    # relabelled to MAX_OPSET with nodes that mean the same there, runs on onnxruntime)
    fallback_proto: onnx.ModelProto | None = None


@dataclass(frozen=True)
class Plan:
    model: Model
    targets: tuple[tuple[TargetPlugin, Profile], ...]
    subgraphs: tuple[Subgraph, ...]
    # node name -> {target name: reason it is not supported}; only nodes not on their best target
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)
    fallback: bool = True

    def transfers(self) -> list[tuple[str, str, str]]:
        """(tensor, from subgraph, to subgraph) for every tensor crossing a subgraph boundary."""
        producer = {o: sg.id for sg in self.subgraphs for o in sg.outputs}
        return [(t, producer[t], sg.id) for sg in self.subgraphs for t in sg.inputs
                if t in producer]

    def explain(self) -> str:
        """The plan as text a person reads: subgraphs, op counts, MACs, transfers, reasons."""
        lines = [f"model {self.model.name}: {len(self.model.proto.graph.node)} nodes, "
                 f"{sum(sg.macs for sg in self.subgraphs):,} MACs per sample"]
        lines.append(_opset_line(self.model))
        lines.append("targets: " + ", ".join(f"{p.name} (profile {pr.name})"
                                              for p, pr in self.targets))
        for sg in self.subgraphs:
            ops = ", ".join(f"{k} x{v}" for k, v in sorted(sg.op_counts.items()))
            where = ("onnxruntime fallback (no requested target supports these nodes)"
                     if sg.target == FALLBACK else sg.target)
            lines.append(f"{sg.id}: {len(sg.nodes)} nodes on {where}; builds for "
                         f"{', '.join(sg.candidates) or FALLBACK}; {sg.macs:,} MACs")
            lines.append(f"  ops: {ops}")
            lines.append(f"  in: {', '.join(sg.inputs)}  out: {', '.join(sg.outputs)}")
        transfers = self.transfers()
        lines.append(f"transfers between subgraphs: {len(transfers)}")
        for tensor, src, dst in transfers:
            lines.append(f"  {tensor}: {src} -> {dst}")
        if self.reasons:
            lines.append("nodes not on the first-choice target, and why:")
            for node, by_target in self.reasons.items():
                why = "; ".join(f"{t}: {r}" for t, r in by_target.items())
                lines.append(f"  {node}: {why}")
        return "\n".join(lines)


def _opset_line(model: Model) -> str:
    """The model's ai.onnx opset, and how load() got it into the opsets TVM compiles."""
    if model.opset == 0:
        return "opset: no ai.onnx opset (only " + ", ".join(sorted(
            {o.domain for o in model.proto.opset_import})) + " ops)"
    return f"opset: {model.opset}" + (f" ({model.opset_note})" if model.opset_note else "")


def graph_view(model: Model) -> GraphView:
    graph = model.proto.graph
    types: dict[str, int] = {}
    shapes: dict[str, tuple[Any, ...]] = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor_type = value.type.tensor_type
        types[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[value.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tensor_type.shape.dim)
    inits = {t.name: t for t in graph.initializer}
    for name, tensor in inits.items():
        types[name] = tensor.data_type
        shapes[name] = tuple(tensor.dims)
    # Targets only see nodes that mean the same at MAX_OPSET (revised ones are planned on
    # onnxruntime, see _fallback_only), so they judge them at the opset TVM knows; revised
    # ops lepton-edge lowers itself (bodies.revised_lowering) are judged at model_opset.
    return GraphView(value_types=types, value_shapes=shapes, initializers=inits,
                     opset=min(model.opset, MAX_OPSET), nodes=tuple(graph.node),
                     outputs=tuple(o.name for o in graph.output),
                     value_kinds=_non_tensor_values(graph),
                     model_opset=model.opset if model.opset > MAX_OPSET else 0)


# Ops that always take or make a sequence, whatever shape inference recorded (a value it
# could not type has no value_info to look at). OptionalHasElement/OptionalGetElement also
# take plain tensors (TVM compiles those); they are judged by their values' types.
SEQUENCE_OPS = frozenset({
    "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceAt",
    "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence",
})


def _type_kind(type_proto: onnx.TypeProto) -> str | None:
    """None for a tensor, else what the value is: sequence<tensor>, optional<...>, map."""
    which = type_proto.WhichOneof("value")
    if which in (None, "tensor_type"):
        return None
    if which == "sequence_type":
        return f"sequence<{_type_kind(type_proto.sequence_type.elem_type) or 'tensor'}>"
    if which == "optional_type":
        return f"optional<{_type_kind(type_proto.optional_type.elem_type) or 'tensor'}>"
    return which.removesuffix("_type")


def _non_tensor_values(graph: onnx.GraphProto) -> dict[str, str]:
    """Every value of `graph` and of its nested If/Loop/Scan bodies that is not a tensor."""
    kinds: dict[str, str] = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        kind = _type_kind(value.type)
        if kind is not None:
            kinds[value.name] = kind
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                kinds.update(_non_tensor_values(body))
    return kinds


def _sequence_use(node: onnx.NodeProto, kinds: dict[str, str]) -> str | None:
    """Why `node` needs sequence/optional values (which compiled code has none of), or None.

    Looks at its inputs and outputs, values its If/Loop/Scan bodies read from outside, and
    everything inside those bodies.
    """
    if (node.domain or "") in ("", "ai.onnx") and node.op_type in SEQUENCE_OPS:
        return f"{node.op_type} works on sequence/optional values"
    for role, names in (("consumes", _node_inputs(node)), ("produces", list(node.output))):
        for name in names:
            if name in kinds:
                return f"{role} {kinds[name]} value '{name}'"
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for inner in body.node:
                why = _sequence_use(inner, kinds)
                if why is not None:
                    return f"its {attr.name} body: {why}"
    return None


def _fallback_only(node: onnx.NodeProto, kinds: dict[str, str], opset: int,
                   functions: dict[tuple[str, str], onnx.FunctionProto],
                   types: dict[str, int]) -> str | None:
    """Why no compiled target can take `node`, whatever it supports, or None.

    Sequence/optional values (compiled code has none), ai.onnx.ml ops (TVM has no importer
    for that domain) and ops revised after MAX_OPSET (TVM's importer predates them) that
    lepton-edge does not lower itself (lowering/bodies.py's revised_lowering) run on
    onnxruntime; also when they sit inside the node's If/Loop/Scan bodies or its model-local
    function.
    """
    sequence_use = _sequence_use(node, kinds)
    if sequence_use is not None:
        return f"{sequence_use}; compiled code has no sequence or optional values"
    return _unimportable(node, opset, functions, types)


def _unimportable(node: onnx.NodeProto, opset: int,
                  functions: dict[tuple[str, str], onnx.FunctionProto],
                  types: dict[str, int] | None = None) -> str | None:
    """Why TVM's ONNX importer cannot take `node` (its domain or opset), or None.

    `types` (element types by value name) are known for the main graph's nodes; a revised
    op's node that onnx.version_converter brings down unchanged for them is importable, and
    so is one lepton-edge lowers itself (bodies.revised_lowering; the targets then judge it).
    """
    if (node.domain or "") == ML_DOMAIN:
        return f"{node.op_type} is an {ML_DOMAIN} op and TVM has no {ML_DOMAIN} importer"
    since = revised_op(node.op_type, node.domain, opset)
    if since is not None and types is not None and bodies.revised_lowering(node, opset):
        since = None
    if since is not None and not (types is not None
                                  and same_at_max_opset(node, types, opset)):
        try:
            onnx.defs.get_schema(node.op_type, MAX_OPSET, "")
            change = "was revised"
        except onnx.defs.SchemaError:
            change = "was added"
        return (f"{node.op_type} {change} at opset {since}; TVM's importer covers opsets up "
                f"to {MAX_OPSET} and onnx.version_converter cannot convert this node down to "
                "it")
    inner: list[onnx.NodeProto] = []
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            inner.extend(body.node)
    function = functions.get((node.domain or "", node.op_type))
    if function is not None:
        inner.extend(function.node)
        functions = {k: v for k, v in functions.items() if v is not function}  # no cycles
    for child in inner:
        why = _unimportable(child, opset, functions)
        if why is not None:
            return f"its {'function' if function is not None else 'body'} uses {why}"
    return None


def partition(
    model: Model, targets: list[str] | tuple[str, ...] = ("cpu",), *, fallback: bool = True
) -> Plan:
    """Split `model` into subgraphs, each assigned to the best requested target.

    With `fallback` (the default) nodes no requested target supports go to onnxruntime;
    without it they are all reported in one UnsupportedOpsError.
    """
    resolved = _resolve_all(targets)
    ordered = sorted(resolved, key=lambda tp: -tp[0].priority)
    compilers: list[tuple[str, Target]] = [(p.name, p.make_target()) for p, _ in ordered]
    proto = _named_copy(model.proto)
    view = graph_view(model)
    nodes = list(proto.graph.node)
    functions = {(f.domain, f.name): f for f in proto.functions}

    labels: dict[str, str] = {}
    supported_by: dict[str, set[str]] = {}
    reasons: dict[str, dict[str, str]] = {}
    for node in nodes:
        why_not: dict[str, str] = {}
        ok: set[str] = set()
        only_fallback = _fallback_only(node, view.value_kinds, model.opset, functions,
                                       view.value_types)
        if only_fallback is not None:  # no compiled target can take it
            supported_by[node.name] = {n for n, _ in compilers if n == FALLBACK}
            labels[node.name] = FALLBACK
            why_not = {name: only_fallback for name, _ in compilers if name != FALLBACK}
            if why_not:
                reasons[node.name] = why_not
            continue
        for name, target in compilers:
            reason = target.unsupported_reason(node, view)
            if reason is None:
                ok.add(name)
            else:
                why_not[name] = reason
        supported_by[node.name] = ok
        best = next((name for name, _ in compilers if name in ok), FALLBACK)
        labels[node.name] = best
        if why_not and best != compilers[0][0]:
            reasons[node.name] = why_not
    unplaced = [n for n in nodes if labels[n.name] == FALLBACK]
    if unplaced and not fallback:
        raise UnsupportedOpsError(
            [f"{n.op_type} (node {n.name}): " + "; ".join(
                f"{t}: {r}" for t, r in reasons[n.name].items()) for n in unplaced],
            hint="Pass fallback=True (CLI: drop --no-fallback) to run them on onnxruntime"
            + (f", or re-export the model at opset <= {MAX_OPSET}" if model.opset > MAX_OPSET
               else ""),
        )

    groups = _group(nodes, labels)
    constants = _small_constants(nodes)
    subgraphs = []
    for index, ((label, level), members) in enumerate(groups):
        candidates = tuple(name for name, _ in compilers
                           if all(name in supported_by[n.name] for n in members))
        subgraphs.append(_subgraph(f"sg{index}", label, candidates, level, members, proto, view,
                                   constants, model.opset))
    return Plan(model=model, targets=tuple(ordered), subgraphs=tuple(subgraphs),
                reasons=reasons, fallback=fallback)


def _resolve_all(targets: list[str] | tuple[str, ...]) -> list[tuple[TargetPlugin, Profile]]:
    if isinstance(targets, str):
        targets = [targets]
    resolved = [resolve(t) for t in targets]
    seen: dict[str, str] = {}
    for plugin, profile in resolved:
        if plugin.name in seen:
            raise TargetError(
                f"target '{plugin.name}' requested twice ({seen[plugin.name]} and "
                f"{profile.name}); compile once per profile of the same target"
            )
        seen[plugin.name] = profile.name
    if not resolved:
        raise TargetError("no targets given; pass at least one, e.g. targets=['cpu'] (-t cpu)")
    return resolved


def _named_copy(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose nodes all have unique names (the plan and explain refer to them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    seen: set[str] = set()
    for index, node in enumerate(copy.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return copy


def _implicit_inputs(node: onnx.NodeProto) -> set[str]:
    """Names an If/Loop/Scan body reads from the enclosing graph."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {v.name for v in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local |= set(inner.output)
            for inner in g.node:
                names |= {i for i in inner.input if i and i not in local}
                names |= _implicit_inputs(inner) - local
    return names


def _node_inputs(node: onnx.NodeProto) -> list[str]:
    return [i for i in node.input if i] + sorted(_implicit_inputs(node))


def _group(nodes: list[onnx.NodeProto], labels: dict[str, str]
           ) -> list[tuple[tuple[str, int], list[onnx.NodeProto]]]:
    producer: dict[str, onnx.NodeProto] = {o: n for n in nodes for o in n.output if o}
    level: dict[str, int] = {}
    for node in nodes:  # ONNX requires topological order; the checker enforced it
        lv = 0
        for name in _node_inputs(node):
            src = producer.get(name)
            if src is not None:
                lv = max(lv, level[src.name] + (labels[src.name] != labels[node.name]))
        level[node.name] = lv
    # A node with no producer (e.g. a DequantizeLinear of constant weights) joins its
    # consumers' subgraph when they all share its assignment, instead of sitting alone at
    # level 0 and shipping its result across a boundary. Its edges still never go down.
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in _node_inputs(node):
            if name in producer:
                consumers.setdefault(producer[name].name, []).append(node)
    for node in nodes:
        users = consumers.get(node.name, [])
        if users and not any(name in producer for name in _node_inputs(node)) and all(
                labels[u.name] == labels[node.name] for u in users):
            level[node.name] = min(level[u.name] for u in users)
    groups: dict[tuple[str, int], list[onnx.NodeProto]] = {}
    for node in nodes:
        groups.setdefault((labels[node.name], level[node.name]), []).append(node)
    return sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] == FALLBACK, kv[0][0]))


def _macs(node: onnx.NodeProto, view: GraphView) -> int:
    def numel(shape: tuple[Any, ...]) -> int:
        return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in shape]))

    try:
        if node.op_type in ("Conv", "ConvInteger"):
            # each output element is a dot product over (Cin/group, kh, kw)
            return numel(view.value_shapes[node.output[0]]) * numel(
                view.value_shapes[node.input[1]][1:])
        if node.op_type == "ConvTranspose":
            # each input element is scattered over (Cout/group, kh, kw)
            return numel(view.value_shapes[node.input[0]]) * numel(
                view.value_shapes[node.input[1]][1:])
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul"):
            a = view.value_shapes[node.input[0]]
            out = view.value_shapes[node.output[0]]
            k = a[-1] if node.op_type != "Gemm" or not _attr(node, "transA") else a[0]
            return numel(out) * (k if isinstance(k, int) and k > 0 else 1)
    except (KeyError, IndexError):
        return 0
    return 0


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return None


# Constant nodes up to this many elements are copied into every subgraph that reads them.
MAX_SHARED_CONSTANT = 4096


def _small_constants(nodes: list[onnx.NodeProto]) -> dict[str, onnx.TensorProto]:
    """Output name -> value of every small `Constant` node (shapes, axes, scalars).

    A subgraph that reads one from another subgraph gets the value as its own initializer
    instead of as an input: to onnxruntime (and TVM) it stays a constant, which their shape
    inference needs (e.g. the Unsqueeze axes inside a Scan body, without which onnxruntime
    cannot type the body's outputs and refuses to run the Scan), and no transfer is needed.
    """
    constants = {}
    for node in nodes:
        if node.op_type != "Constant" or (node.domain or "") not in ("", "ai.onnx") or len(
                node.output) != 1 or not node.output[0]:
            continue
        tensor = onnx_fixups.constant_tensor(node)
        if tensor is not None and int(np.prod(tensor.dims)) <= MAX_SHARED_CONSTANT:
            tensor.name = node.output[0]
            constants[node.output[0]] = tensor
    return constants


def _subgraph(
    sg_id: str, label: str, candidates: tuple[str, ...], level: int,
    members: list[onnx.NodeProto], proto: onnx.ModelProto, view: GraphView,
    constants: dict[str, onnx.TensorProto], opset: int,
) -> Subgraph:
    graph = proto.graph
    member_names = {n.name for n in members}
    produced = {o for n in members for o in n.output if o}
    consumed_outside = {i for n in graph.node if n.name not in member_names
                        for i in _node_inputs(n)}
    graph_outputs = [o.name for o in graph.output]
    inputs: list[str] = []
    inits: list[onnx.TensorProto] = []
    for node in members:
        for name in _node_inputs(node):
            if name in produced or name in inputs or any(t.name == name for t in inits):
                continue
            if name in view.initializers:
                inits.append(view.initializers[name])
            elif name in constants:  # made by a Constant node in another subgraph
                inits.append(constants[name])
            else:
                inputs.append(name)
    # A small Constant read elsewhere travels as the reader's own initializer, not an output
    # (unless nothing else is left to output).
    outputs = [o for n in members for o in n.output
               if o and (o in consumed_outside and o not in constants or o in graph_outputs)]
    if not outputs:
        outputs = [o for n in members for o in n.output if o and o in consumed_outside]
    # Graph outputs keep the model's order where they are produced here.
    outputs.sort(key=lambda o: graph_outputs.index(o) if o in graph_outputs else len(
        graph_outputs))
    value_infos = {v.name: v for v in list(graph.input) + list(graph.value_info)
                   + list(graph.output)}

    def info(name: str) -> onnx.ValueInfoProto:
        if name in value_infos:
            return value_infos[name]
        return helper.make_tensor_value_info(name, view.value_types.get(name, 0), None)

    def model_of(nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
        sub = helper.make_graph(
            nodes=nodes, name=f"{graph.name or 'model'}_{sg_id}",
            inputs=[info(n) for n in inputs], outputs=[info(n) for n in outputs],
            initializer=inits,
            value_info=[value_infos[o] for n in members for o in n.output
                        if o in value_infos and o not in outputs],
        )
        imports = list(proto.opset_import)
        if any(n.domain == bodies.PRIVATE_DOMAIN for n in nodes):
            imports.append(helper.make_opsetid(bodies.PRIVATE_DOMAIN, 1))
        made = helper.make_model(sub, opset_imports=imports, ir_version=proto.ir_version)
        made.functions.extend(proto.functions)
        return made

    lowered = _lowered(members, view) if label != FALLBACK else members
    sub_model = model_of(lowered)
    fallback_proto = None
    if label != FALLBACK and opset > MAX_OPSET:
        _relabel(sub_model, opset)
    if lowered != members:  # renamed/expanded/unrolled; a plain relabel onnxruntime runs
        fallback_proto = model_of(members)
    counts: dict[str, int] = {}
    for node in members:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return Subgraph(
        id=sg_id, target=label, candidates=candidates, level=level,
        nodes=tuple(n.name for n in members), op_counts=counts,
        macs=sum(_macs(n, view) for n in members), inputs=tuple(inputs), outputs=tuple(outputs),
        proto=sub_model, fallback_proto=fallback_proto,
    )


def _lowering(node: onnx.NodeProto, view: GraphView) -> Lowering | None:
    """GraphView.lowering, uncached."""
    opset = view.model_opset or view.opset  # the model's own
    kind = bodies.revised_kind(node, view.value_types, opset)
    if kind == "convert":
        renamed = onnx.NodeProto()
        renamed.CopyFrom(node)
        renamed.op_type = bodies.private_name(node.op_type)
        renamed.domain = bodies.PRIVATE_DOMAIN
        return Lowering(kind, (renamed,))
    if kind == "expand":
        nodes, why = bodies.expand_revised(node, opset, view.input_types(node))
        return Lowering(kind, None if nodes is None else tuple(nodes), why)
    if node.op_type == "Scan" and (node.domain or "") in ("", "ai.onnx"):
        steps, why = bodies.scan_steps(node, view.value_shapes, opset)
        if steps is None:
            return Lowering("scan", None, why)
        # node names are unique in the plan's copy of the graph (_named_copy)
        return Lowering("scan", tuple(bodies.unroll_scan(node, steps, f"{node.name}__",
                                                         opset)))
    return None


def _lowered(members: list[onnx.NodeProto], view: GraphView) -> list[onnx.NodeProto]:
    """`members` of a compiled subgraph as TVM's importer gets them (GraphView.lowering):
    Scans unrolled, and in a newer-opset model the revised ops lepton-edge lowers itself made
    safe to relabel to MAX_OPSET: renamed to their private converters or replaced by their
    ONNX function body at the model's opset."""
    out: list[onnx.NodeProto] = []
    for node in members:
        lowering = view.lowering(node)
        if lowering is None:
            out.append(node)
        elif lowering.nodes is None:
            raise TargetError(f"{node.op_type} (node {node.name}): {lowering.why}")
        else:
            out.extend(lowering.nodes)
    return out


def _relabel(sub_model: onnx.ModelProto, opset: int) -> None:
    """Declare a compiled subgraph of a newer-opset model at MAX_OPSET, for TVM's importer.

    Its nodes are unchanged since MAX_OPSET or earlier, revised ones that
    onnx.version_converter brings down unchanged or that only gained bfloat16
    (bodies.REVISED_TYPES_ONLY), or private-named ones `_lowered` made of the revised ops
    lepton-edge lowers itself (the others are planned on onnxruntime), so they mean the same
    there. Model-local functions using revised ops are dropped: no
    compiled node can call them.
    """
    def relabelled(imports: Any) -> None:
        for entry in imports:
            if entry.domain in ("", "ai.onnx") and entry.version > MAX_OPSET:
                entry.version = MAX_OPSET

    relabelled(sub_model.opset_import)
    kept = [f for f in sub_model.functions
            if not any(revised_op(n.op_type, n.domain, opset) is not None for n in f.node)]
    del sub_model.functions[:]
    sub_model.functions.extend(kept)
    for function in sub_model.functions:
        relabelled(function.opset_import)
