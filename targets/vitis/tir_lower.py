"""An int8 subgraph through TVM for the Vitis target: ONNX -> Relax (lowering/relax.py) ->
the CPU target's integer lowering (lowering/int8.py) -> TIR -> plain loops, with the Relax
main function read as a sequence of call_tir kernels.

Steps (no CPU schedule is involved):
1. import_onnx, lower_int8 (the exact integer math of the CPU int8 build), the batch bound to
   1 (the kernel computes one sample; the top function loops over the batch);
2. LegalizeOps, then FuseOps/FuseTIR (TVM's operator fusion: one PrimFunc per fused group);
3. per PrimFunc, an HLS-oriented schedule: elementwise blocks read once are inlined into
   their consumer (an epilogue becomes one expression), the reduction loops of a reduction
   block are fused and split by the profile's `parallelism` (the inner loop is unrolled into
   `parallelism` MAC lanes, the outer one pipelined), and its init moved out of the loop;
4. TVM's own lowering passes to plain loops over flat buffers (LowerInitBlock,
   ConvertBlocksToOpaque, CompactBufferAllocation, LowerOpaqueBlock, FlattenBuffer, ...);
5. the main function's bindings give the kernels in order, the constant arguments (weights,
   requantize multipliers: ROM arrays) and the intermediate buffers between kernels.
Anything this does not understand raises Refused with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from lepton_edge.errors import TargetError

HLS_ANNOTATION = "lepton_hls"  # loop annotation: "pipeline" or "unroll"


class Refused(Exception):
    """The subgraph cannot become an HLS kernel (the message says why)."""


@dataclass
class Port:
    """A kernel argument: one subgraph input or output, on its own AXI port."""

    name: str  # the ONNX tensor name at the subgraph boundary
    buffer: str
    dtype: str  # the wire dtype (what the Relax function takes or returns)
    shape: tuple[int, ...]  # per sample

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Kernel:
    """One call_tir of the Relax main function: a lowered PrimFunc and its arguments."""

    name: str  # the PrimFunc's name (FuseTIR names it after the fused ops)
    func: Any  # the lowered tirx.PrimFunc
    args: list[str]  # buffer or constant ids, in the PrimFunc's parameter order
    outputs: list[str]  # the buffer ids among args it writes (the last ones)
    macs: int = 0
    partitioned: list[str] = field(default_factory=list)  # constants split into lanes

    @property
    def inputs(self) -> list[str]:
        return self.args[:len(self.args) - len(self.outputs)]


@dataclass
class Program:
    inputs: list[Port]
    outputs: list[Port]
    kernels: list[Kernel]
    buffers: dict[str, tuple[str, int]]  # buffer id -> (dtype, elements per sample)
    consts: dict[str, np.ndarray]  # constant id -> value (static const ROM arrays)
    parallelism: int

    @property
    def kernel_names(self) -> list[str]:
        return [k.name for k in self.kernels]


def _has_qdq(subgraph: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in subgraph.graph.node)


def relax_module(subgraph: onnx.ModelProto) -> Any:
    """The subgraph as the CPU int8 build sees it (imported, integer-lowered), for one sample,
    legalized to TIR and fused."""
    import tvm
    from tvm import relax

    from lepton_edge.lowering import relax as lowering

    try:
        mod = lowering.import_onnx(subgraph)
    except TargetError as exc:
        raise Refused(str(exc)) from None
    main = mod["main"]
    symbolic = list(relax.analysis.defined_symbolic_vars(main))
    if len(symbolic) > 1:
        raise Refused(f"shapes vary in {[str(v) for v in symbolic]}: only the batch may vary")
    for param in main.params:
        shape = getattr(param.ty, "shape", None)
        dims = list(getattr(shape, "values", None) or [])
        if not dims or (symbolic and not dims[0].same_as(symbolic[0])
                        and not (isinstance(dims[0], tvm.tirx.IntImm) and dims[0].value == 1)):
            raise Refused(f"input '{param.name_hint}' has no leading batch dimension")
    if symbolic:  # before the integer lowering: the PrimFuncs it makes are static too
        mod = relax.transform.BindSymbolicVars({symbolic[0]: 1})(mod)
    if _has_qdq(subgraph):
        try:
            mod, _ = lowering.lower_int8(mod)
        except TargetError as exc:
            raise Refused(str(exc)) from None
    seq = tvm.transform.Sequential([
        relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(), relax.transform.FuseOps(),
        relax.transform.FuseTIR(), relax.transform.DeadCodeElimination()])
    try:
        return seq(mod)
    except Exception as exc:  # noqa: BLE001 - a TVM pass failure is a refusal with its text
        raise Refused(f"TVM could not legalize the subgraph: {str(exc).strip()[-300:]}"
                      ) from None


def _static(shape: Any, what: str) -> tuple[int, ...]:
    import tvm

    dims = []
    for d in shape:
        if not isinstance(d, tvm.tirx.IntImm):
            raise Refused(f"{what} has a dynamic shape {list(shape)}")
        dims.append(int(d.value))
    return tuple(dims)


_FIELDS = ("seq", "init", "body", "then_case", "else_case", "condition", "value", "indices",
           "a", "b", "args", "true_value", "false_value", "min", "extent")


def walk(node: Any, visit: Any, skip: tuple[str, ...] = ()) -> None:
    """Call visit(n) on every TIR statement and expression under `node`, children first
    (TVM 0.27 has no Python post_order_visit for TIR), not descending into `skip` fields."""
    import tvm

    if node is None or isinstance(node, (tvm.tirx.Buffer, str, int, float)):
        return
    if isinstance(node, (list, tuple, tvm.ir.Array)):
        for item in node:
            walk(item, visit, skip)
        return
    for name in _FIELDS:
        child = getattr(node, name, None) if name not in skip else None
        if child is not None and not inspect.ismethod(child):
            walk(child, visit, skip)
    visit(node)


def _loads(stmt: Any) -> dict[Any, int]:
    """How often each buffer is loaded in `stmt` (keyed by the buffer)."""
    import tvm

    counts: dict[Any, int] = {}

    def visit(node: Any) -> None:
        if isinstance(node, tvm.ir.expr.TensorLoad):
            counts[node.source] = counts.get(node.source, 0) + 1

    walk(stmt, visit)
    return counts


def schedule(func: Any, parallelism: int, constants: set[int] | None = None
             ) -> tuple[Any, int, list[int], list[int]]:
    """The HLS schedule of one PrimFunc (see the module docstring). `constants`: positions of
    the parameters that are constants. Returns the scheduled PrimFunc, its multiply-
    accumulates per sample, the parameter positions the unrolled lanes read (to partition
    into `parallelism` banks) and those of 2-D constants transposed so that the lanes read
    consecutive elements (a matmul weight [K, O] becomes [O, K]: the caller transposes it)."""
    import tvm
    from tvm import s_tir

    constants = constants or set()
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    params = list(func.params)
    changed = True
    while changed:  # inline producers read once, until nothing changes
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            node = sch.get(block)
            if len(node.writes) != 1 or _data(node.writes[0]) in params \
                    or any(int(iv.iter_type) != 0 for iv in node.iter_vars):
                continue
            data = _data(node.writes[0])
            reads = sum(_loads(sch.get(b).body).get(data, 0)
                        for b in sch.get_child_blocks(sch.get_sblock("root")))
            if reads != 1:
                continue
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001, S112 - not inlinable: it stays a loop nest
                continue
            changed = True
            break
    macs = 0
    lane_names: list[str] = []
    transposed: list[int] = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        node = sch.get(block)
        kinds = [int(iv.iter_type) for iv in node.iter_vars]
        if 2 not in kinds:  # CommReduce
            continue
        extents = [int(iv.dom.extent) for iv in node.iter_vars]
        if _has_mul(node.body):
            macs += int(np.prod(extents))
        loops = sch.get_loops(block)
        n_red = kinds.count(2)
        if kinds != [0] * (len(kinds) - n_red) + [2] * n_red or len(loops) != len(kinds):
            continue  # not the legalized S..SR..R form: left as plain loops
        reduce_vars = [iv.var for iv in node.iter_vars if int(iv.iter_type) == 2]
        for i, region in enumerate(node.reads):
            buf = _data(region)
            mins = [r.min for r in region.region]
            position = next((n for n, p in enumerate(params) if p.same_as(buf)), None)
            if position in constants and len(mins) == 2 \
                    and any(mins[0].same_as(v) for v in reduce_vars) \
                    and not any(mins[1].same_as(v) for v in reduce_vars):
                sch.transform_layout(block, ("read", i), lambda a, b: (b, a))
                transposed.append(position)
        red = loops[-n_red:]
        fused = sch.fuse(*red) if n_red > 1 else red[0]
        k = int(np.prod(extents[-n_red:]))
        outer, inner = sch.split(fused, [None, max(1, min(parallelism, k))])
        sch.annotate(inner, HLS_ANNOTATION, "unroll")
        sch.annotate(outer, HLS_ANNOTATION, "pipeline")
        sch.decompose_reduction(block, outer)
        lane_names += [str(_data(r).name) for r in node.reads
                       if any(p.same_as(_data(r)) for p in params)]
    scheduled = sch.mod["main"]
    lanes = [n for n, p in enumerate(scheduled.params) if str(p.name) in lane_names]
    return scheduled, macs, lanes, transposed


def _has_mul(stmt: Any) -> bool:
    """Whether a stored value multiplies (a MAC), not counting index arithmetic."""
    import tvm

    found = []
    walk(stmt, lambda n: found.append(1) if isinstance(n, tvm.tirx.Mul) else None,
         skip=("indices",))
    return bool(found)


def lower_loops(func: Any) -> Any:
    """TVM's passes from scheduled blocks to plain loops over flat buffers."""
    import tvm
    from tvm import s_tir, tirx

    passes = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(),
        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(),
        s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerMatchBuffer(),
        s_tir.transform.StmtSimplify(),
        s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(),
        tirx.transform.NarrowDataType(32),
        tirx.transform.StmtSimplify(),
        tirx.transform.RemoveNoOp(),
    ])
    return passes(tvm.IRModule({"main": func}))["main"]


def lower(subgraph: onnx.ModelProto, parallelism: int) -> Program:
    """The subgraph as a Program of lowered PrimFuncs; Refused when it cannot be one."""
    from tvm import relax
    from tvm.ir.expr import Constant

    mod = relax_module(subgraph)
    main = mod["main"]
    buffers: dict[str, tuple[str, int]] = {}
    consts: dict[str, np.ndarray] = {}
    const_ids: dict[Any, str] = {}
    where: dict[Any, list[str]] = {}  # relax var -> buffer ids (one per tuple field)

    def new_buffer(sinfo: Any, what: str) -> str:
        bid = f"b{len(buffers)}"
        shape = _static(sinfo.shape.values, what)
        buffers[bid] = (str(sinfo.dtype), int(np.prod(shape)) if shape else 1)
        return bid

    graph_inputs = [i.name for i in subgraph.graph.input
                    if i.name not in {t.name for t in subgraph.graph.initializer}]
    if len(graph_inputs) != len(main.params):
        raise Refused("the Relax function's parameters do not match the subgraph's inputs")
    inputs = []
    for name, param in zip(graph_inputs, main.params, strict=True):
        sinfo = param.ty
        if not isinstance(sinfo, relax.TensorType):
            raise Refused(f"input '{name}' is not a tensor")
        bid = new_buffer(sinfo, f"input '{name}'")
        where[param] = [bid]
        inputs.append(Port(name, bid, str(sinfo.dtype),
                           _static(sinfo.shape.values, name)[1:]))

    def arg_id(arg: Any) -> str:
        if isinstance(arg, Constant):
            for key, cid in const_ids.items():
                if key.same_as(arg):
                    return cid
            cid = f"c{len(consts)}"
            consts[cid] = arg.value.numpy()
            const_ids[arg] = cid
            return cid
        if isinstance(arg, relax.Var) and arg in where and len(where[arg]) == 1:
            return where[arg][0]
        raise Refused(f"a kernel argument is {type(arg).__name__}, not a tensor or constant")

    kernels: list[Kernel] = []
    cache: dict[str, tuple[Any, int, list[Any]]] = {}
    body = main.body
    for block in body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == \
                    "relax.call_tir":
                gvar = value.args[0]
                name = gvar.name_hint
                args = [arg_id(a) for a in value.args[1].fields]
                sinfo = binding.var.ty
                fields = list(sinfo.fields) if isinstance(sinfo, relax.TupleType) \
                    else [sinfo]
                outs = [new_buffer(f, f"the result of {name}") for f in fields]
                where[binding.var] = outs
                constants = {i for i, a in enumerate(args) if a in consts}
                key = (name, tuple(sorted(constants)))
                if key not in cache:
                    scheduled, macs, lanes, transposed = schedule(mod[gvar], parallelism,
                                                                  constants)
                    cache[key] = (lower_loops(scheduled), macs, lanes, transposed)
                lowered, macs, lane_params, transposed = cache[key]
                for i in transposed:  # the kernel reads this constant transposed
                    cid = f"{args[i]}t"
                    consts.setdefault(cid, np.ascontiguousarray(consts[args[i]].T))
                    args[i] = cid
                partitioned = [(args + outs)[i] for i in lane_params
                               if (args + outs)[i] in consts]
                kernels.append(Kernel(name, lowered, args + outs, outs, macs, partitioned))
            elif isinstance(value, relax.TupleGetItem) and value.tuple_value in where:
                where[binding.var] = [where[value.tuple_value][int(value.index)]]
            elif isinstance(value, relax.Var) and value in where:
                where[binding.var] = where[value]
            elif isinstance(value, relax.Tuple) and all(f in where for f in value.fields):
                where[binding.var] = [where[f][0] for f in value.fields]
            else:
                what = getattr(getattr(value, "op", None), "name", type(value).__name__)
                raise Refused(f"the Relax function computes {what} outside a TIR kernel")
    result = body.body
    fields = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    out_ids = []
    for f in fields:
        if not isinstance(f, relax.Var) or f not in where:
            raise Refused("an output is not computed by a TIR kernel")
        out_ids += where[f]
    if len(out_ids) != len(subgraph.graph.output):
        raise Refused("the Relax function's results do not match the subgraph's outputs")
    outputs = []
    for out, bid in zip(subgraph.graph.output, out_ids, strict=True):
        if any(p.buffer == bid for p in inputs):
            raise Refused(f"output '{out.name}' is an input passed through")
        dtype, size = buffers[bid]
        shape = [d.dim_value for d in out.type.tensor_type.shape.dim][1:]
        if int(np.prod(shape)) != size:
            shape = [size]
        outputs.append(Port(out.name, bid, dtype, tuple(int(d) for d in shape)))
    if not kernels:
        raise Refused("no computation to put on the FPGA")
    used = {a for k in kernels for a in k.args}  # a constant only read transposed is dropped
    consts = {cid: value for cid, value in consts.items() if cid in used}
    return Program(inputs, outputs, kernels, buffers, consts, parallelism)


def _data(region: Any) -> Any:
    """The data var of a block's read/write region (TVM 0.27: a TensorRegion of a Buffer)."""
    return getattr(region, "buffer", None) or region.source
