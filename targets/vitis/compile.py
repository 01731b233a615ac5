"""Build one int8 QDQ subgraph for a Vitis profile: HLS C++, a C-simulation library, a pyxrt
host binding, and the board build folder (v++ lines; not synthesized here).

The subgraph is read as a graph of int8 layers (a chain, or a DAG with residual Adds; any
number of int8 inputs and outputs) computing exactly what the CPU int8 build computes, so
the C simulation and the CPU agree bit for bit:

- Conv / Gemm / MatMul: the integer math of lepton_edge/lowering/int8.py,
      acc = sum(x_q * w_q) (padding = x_zp) + (bias_q - x_zp * sum(w_q))      int32
      y_q = clip(rne((acc * m0) >> shift) + y_zp, lo, hi)                     fixed point
- Add, AveragePool and a requantize to a new scale (QDQ patterns the CPU build runs as float
  fake-quant, DequantizeLinear -> op -> QuantizeLinear): the same float32 operations in the
  same order (dequantize = (x - zp) * scale through a 256-entry table of exactly those
  float32 values, float add / sum, division, round half to even). This is the one way to be
  bit-exact with the CPU build here: an integer QLinearAdd (rescaling both inputs with
  fixed-point multipliers) differs from the float QDQ result by one step on some inputs.
- MaxPool, Flatten, Reshape: exact on int8 values (max is monotone; reshapes move nothing).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lepton_edge.errors import TargetError
from lepton_edge.lowering.int8 import fixed_point_multiplier
from lepton_edge.target import Build, Profile, Target
from lepton_edge_targets.vitis import estimate as estimates
from lepton_edge_targets.vitis import hls, host, support


@dataclass
class QTensor:
    """An int8 tensor of one sample: per-sample shape, scale and zero point."""

    shape: tuple[int, ...]
    scale: float
    zp: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class Layer:
    kind: str  # "conv", "dense", "maxpool", "avgpool", "add", "requant"
    inputs: list[str]  # buffer ids read
    output: str  # buffer id written
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        if self.kind == "conv":
            w = self.params["w"]
            return int(np.prod(self.out_shape)) * int(np.prod(w.shape[1:]))
        if self.kind == "dense":
            return int(self.params["w"].size)
        return 0

    @property
    def weight_bytes(self) -> int:
        return int(self.params["w"].size) if "w" in self.params else 0


@dataclass
class Port:
    """A kernel argument: one subgraph input or output, int8 on the wire."""

    name: str  # the ONNX tensor name at the subgraph boundary
    buffer: str
    dtype: str  # "int8", or "float32" when the host quantizes/dequantizes at the boundary
    q: QTensor


@dataclass
class Program:
    inputs: list[Port]
    outputs: list[Port]
    layers: list[Layer]
    buffers: dict[str, int]  # buffer id -> int8 elements per sample

    @property
    def layer_kinds(self) -> list[str]:
        return [lay.kind for lay in self.layers]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class _Refused(Exception):
    pass


_F32 = np.float32


def dequant_table(scale: float, zp: int) -> np.ndarray:
    """float32 DequantizeLinear of every int8 value (index v + 128), exactly as TVM computes
    it: float32(int32(v) - zp) * float32(scale)."""
    values = np.arange(-128, 128, dtype=np.int32) - np.int32(zp)
    return values.astype(_F32) * _F32(scale)


def quantize_f32(value: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """QuantizeLinear in float32 as TVM computes it: clip(rne(v / scale) + zp) (numpy model)."""
    r = np.rint(np.asarray(value, _F32) / _F32(scale)) + _F32(zp)
    return np.clip(r, -128, 127).astype(np.int8)


def parse(model: onnx.ModelProto) -> Program:
    """The subgraph as a graph of int8 layers; _Refused (a reason) when it is not one."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    shapes: dict[str, tuple] = {}
    types: dict[str, int] = {}
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = v.type.tensor_type
        types[v.name] = t.elem_type
        shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                               for d in t.shape.dim)

    def sample_shape(name: str) -> tuple[int, ...]:
        shape = shapes.get(name)
        if shape is None or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise _Refused(f"tensor '{name}' has no static shape (only the batch may vary)")
        return tuple(int(d) for d in shape[1:])

    def scalar(name: str) -> Any:
        if name not in inits or inits[name].size != 1:
            raise _Refused(f"'{name}' is not a constant scalar")
        return inits[name].ravel()[0]

    def zero_point(ins: list[str]) -> int:
        return int(scalar(ins[2])) if len(ins) > 2 and ins[2] else 0

    buffers: dict[str, int] = {}

    def new_buffer(qt: QTensor) -> str:
        bid = f"b{len(buffers)}"
        buffers[bid] = qt.size
        return bid

    # int8 tensors: name -> (buffer id, view); float tensors that are DQ(int8): name -> int8 name
    q: dict[str, tuple[str, QTensor]] = {}
    deq: dict[str, str] = {}
    consts: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    pending: dict[str, dict[str, Any]] = {}  # float results awaiting QuantizeLinear
    layers: list[Layer] = []
    inputs: list[Port] = []
    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    for name in graph_inputs:
        if types.get(name) == onnx.TensorProto.INT8:
            # an int8 boundary input: its scale comes from the DequantizeLinear that reads it
            found = [n for n in graph.node
                     if n.op_type == "DequantizeLinear" and n.input[0] == name]
            if not found:
                raise _Refused(f"the int8 input '{name}' is not dequantized")
            qt = QTensor(sample_shape(name), float(scalar(found[0].input[1])),
                         zero_point(list(found[0].input)))
            q[name] = (new_buffer(qt), qt)
            inputs.append(Port(name, q[name][0], "int8", qt))
        elif types.get(name) != onnx.TensorProto.FLOAT:
            raise _Refused(f"input '{name}' is neither int8 nor float32")

    def int8_of(float_name: str, op: str) -> tuple[str, QTensor]:
        if float_name not in deq:
            raise _Refused(f"{op} input '{float_name}' is not a dequantized int8 activation")
        return q[deq[float_name]]

    for node in graph.node:
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        if op == "QuantizeLinear":
            scale, zp = float(scalar(ins[1])), zero_point(ins)
            if ins[0] in graph_inputs:  # float boundary input: the host quantizes it
                qt = QTensor(sample_shape(ins[0]), scale, zp)
                q[outs[0]] = (new_buffer(qt), qt)
                inputs.append(Port(ins[0], q[outs[0]][0], "float32", qt))
            elif ins[0] in pending:
                layer = _finish(pending.pop(ins[0]), scale, zp)
                qt = QTensor(layer.out_shape, scale, zp)
                layer.output = new_buffer(qt)
                layers.append(layer)
                q[outs[0]] = (layer.output, qt)
            elif ins[0] in deq:
                bid, src = q[deq[ins[0]]]
                if _F32(src.scale) == _F32(scale) and src.zp == zp:
                    q[outs[0]] = (bid, QTensor(src.shape, scale, zp))  # same int8 values
                else:  # a requantize to a new scale: float, as the CPU build does it
                    qt = QTensor(src.shape, scale, zp)
                    layer = Layer("requant", [bid], "", src.shape, src.shape, dict(
                        table=dequant_table(src.scale, src.zp), scale=scale, zp=zp,
                        low=-128, high=127))
                    layer.output = new_buffer(qt)
                    layers.append(layer)
                    q[outs[0]] = (layer.output, qt)
            else:
                raise _Refused(f"QuantizeLinear of '{ins[0]}' is not after a supported op")
        elif op == "DequantizeLinear":
            if ins[0] in inits:
                zp = inits[ins[2]] if len(ins) > 2 and ins[2] else np.zeros(1, np.int8)
                if np.any(zp != 0):
                    raise _Refused("asymmetric weights")
                consts[outs[0]] = (inits[ins[0]], np.asarray(inits[ins[1]]).ravel(),
                                   int(_attr(node, "axis", 1)))
            elif ins[0] in q:
                src = q[ins[0]][1]
                if _F32(scalar(ins[1])) != _F32(src.scale) or zero_point(ins) != src.zp:
                    raise _Refused("DequantizeLinear scale differs from its QuantizeLinear")
                deq[outs[0]] = ins[0]
            else:
                raise _Refused(f"DequantizeLinear of '{ins[0]}' that is not int8 here")
        elif op in ("Conv", "Gemm", "MatMul"):
            bid, x = int8_of(ins[0], op)
            if ins[1] not in consts:
                raise _Refused(f"{op} weight is not a dequantized int8 constant")
            w_q, w_scale, axis = consts[ins[1]]
            if w_q.dtype != np.int8:
                raise _Refused("weight is not int8")
            if op == "Conv":
                o = w_q.shape[0]
                if w_scale.size > 1 and axis % 4 != 0:
                    raise _Refused("weight scales are not per output channel")
            else:
                if op == "Gemm" and _attr(node, "transB", 0):
                    w2, out_axis = w_q, 0
                else:
                    w2, out_axis = w_q.T, 1
                if w_scale.size > 1 and axis % 2 != out_axis:
                    raise _Refused("weight scales are not per output channel")
                w_q = np.ascontiguousarray(w2)
                o = w_q.shape[0]
            bias = None
            if len(ins) > 2 and ins[2]:
                if ins[2] in consts:
                    b_q, b_s, _ = consts[ins[2]]
                    bias = b_q.astype(np.float64).ravel() * b_s.astype(np.float64)
                elif ins[2] in inits:
                    bias = inits[ins[2]].astype(np.float64).ravel()
                else:
                    raise _Refused("bias is not constant")
            pending[outs[0]] = dict(op=op, node=node, x=x, buffers=[bid], w=w_q,
                                    w_scale=w_scale, o=o, bias=bias)
        elif op == "Add":
            (ba, a), (bb, b) = int8_of(ins[0], op), int8_of(ins[1], op)
            if a.shape != b.shape:
                raise _Refused(f"Add of shapes {a.shape} and {b.shape} (no broadcasting here)")
            pending[outs[0]] = dict(op=op, x=a, other=b, buffers=[ba, bb])
        elif op == "AveragePool":
            bid, x = int8_of(ins[0], op)
            pending[outs[0]] = dict(op=op, x=x, buffers=[bid], **_pool_attrs(node, x.shape))
        elif op in ("Relu", "Clip"):
            if ins[0] not in pending:
                raise _Refused(f"{op} must sit between an integer op and QuantizeLinear")
            p = pending.pop(ins[0])
            if op == "Clip":
                lo = float(scalar(ins[1])) if len(ins) > 1 and ins[1] else -math.inf
                hi = float(scalar(ins[2])) if len(ins) > 2 and ins[2] else math.inf
                p.setdefault("clips", []).append((lo, hi))
            else:
                p["relu"] = True
            pending[outs[0]] = p
        elif op == "MaxPool":
            bid, x = int8_of(ins[0], op)
            attrs = _pool_attrs(node, x.shape)
            qt = QTensor(attrs["y_shape"], x.scale, x.zp)
            layer = Layer("maxpool", [bid], "", x.shape, qt.shape, attrs)
            layer.output = new_buffer(qt)
            layers.append(layer)
            name = f"{outs[0]}__q"
            q[name] = (layer.output, qt)
            deq[outs[0]] = name
        elif op in ("Flatten", "Reshape"):
            src_name = deq.get(ins[0], ins[0])
            if src_name not in q:
                raise _Refused(f"{op} of a tensor that is not int8 here")
            bid, src = q[src_name]
            if op == "Flatten":
                new_shape: tuple[int, ...] = (src.size,)
            elif shapes.get(outs[0]):
                new_shape = sample_shape(outs[0])
            else:
                if ins[1] not in inits:
                    raise _Refused("Reshape needs a constant shape")
                dims = [int(d) for d in inits[ins[1]].ravel()][1:]
                if -1 in dims:
                    rest = int(np.prod([d for d in dims if d != -1]))
                    dims[dims.index(-1)] = src.size // max(rest, 1)
                new_shape = tuple(dims)
            if int(np.prod(new_shape)) != src.size:
                raise _Refused(f"{op} changes the per-sample size (it must keep the batch)")
            view = (bid, QTensor(new_shape, src.scale, src.zp))
            if ins[0] in deq:
                q[f"{outs[0]}__q"] = view
                deq[outs[0]] = f"{outs[0]}__q"
            else:
                q[outs[0]] = view
        else:
            raise _Refused(f"no HLS generator for {op}")
    if pending:
        raise _Refused(f"'{next(iter(pending))}' is not requantized to int8 (no QuantizeLinear)")
    outputs: list[Port] = []
    for out in graph.output:
        if out.name in deq:
            bid, qt = q[deq[out.name]]
            outputs.append(Port(out.name, bid, "float32", qt))
        elif out.name in q:
            bid, qt = q[out.name]
            outputs.append(Port(out.name, bid, "int8", qt))
        else:
            raise _Refused(f"output '{out.name}' is neither int8 nor a dequantized int8 tensor")
    missing = [name for name in graph_inputs if not any(p.name == name for p in inputs)]
    if missing:
        raise _Refused(f"input(s) {missing} are not quantized to int8 at the subgraph's entry")
    if not any(lay.kind in ("conv", "dense", "add", "avgpool") for lay in layers):
        raise _Refused("no Conv/Gemm/MatMul/Add/AveragePool to put on the FPGA")
    return Program(inputs, outputs, layers, buffers)


def _pool_attrs(node: onnx.NodeProto, shape: tuple[int, ...]) -> dict[str, Any]:
    if len(shape) != 3:
        raise _Refused(f"{node.op_type} needs a CHW input per sample")
    kernel = [int(k) for k in _attr(node, "kernel_shape")]
    strides = [int(s) for s in _attr(node, "strides", [1, 1])]
    pads = [int(p) for p in _attr(node, "pads", [0, 0, 0, 0])]
    if _attr(node, "ceil_mode", 0):
        raise _Refused(f"{node.op_type} with ceil_mode")
    c, h, w = shape
    y_shape = (c, (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1,
               (w + pads[1] + pads[3] - kernel[1]) // strides[1] + 1)
    return dict(kernel=kernel, strides=strides, pads=pads, y_shape=y_shape,
                count_include_pad=int(_attr(node, "count_include_pad", 0)))


def _float_bounds(p: dict[str, Any], y_scale: float, y_zp: int) -> tuple[int, int]:
    """Relu/Clip before a float QuantizeLinear as int8 bounds: quantize is monotone, so
    Q(max(v, lo)) == max(Q(v), Q(lo)) exactly (Q as the CPU computes it, in float32)."""
    low, high = -128, 127
    if p.get("relu"):
        low = max(low, int(quantize_f32(np.zeros(1), y_scale, y_zp)[0]))
    for lo_v, hi_v in p.get("clips", []):
        if math.isfinite(lo_v):
            low = max(low, int(quantize_f32(np.array([lo_v]), y_scale, y_zp)[0]))
        if math.isfinite(hi_v):
            high = min(high, int(quantize_f32(np.array([hi_v]), y_scale, y_zp)[0]))
    return low, high


def _finish(p: dict[str, Any], y_scale: float, y_zp: int) -> Layer:
    """The layer for a float result and its QuantizeLinear."""
    x: QTensor = p["x"]
    if p["op"] == "Add":
        low, high = _float_bounds(p, y_scale, y_zp)
        other: QTensor = p["other"]
        return Layer("add", p["buffers"], "", x.shape, x.shape, dict(
            table_a=dequant_table(x.scale, x.zp), table_b=dequant_table(other.scale, other.zp),
            scale=y_scale, zp=y_zp, low=low, high=high))
    if p["op"] == "AveragePool":
        low, high = _float_bounds(p, y_scale, y_zp)
        params = {k: p[k] for k in ("kernel", "strides", "pads", "count_include_pad")}
        params.update(table=dequant_table(x.scale, x.zp), scale=y_scale, zp=y_zp, low=low,
                      high=high)
        return Layer("avgpool", p["buffers"], "", x.shape, p["y_shape"], params)
    # Conv / Gemm / MatMul: fold the corrections and requantize exactly as lowering/int8.py
    w = p["w"]
    o = p["o"]
    w_scale = np.broadcast_to(p["w_scale"].astype(np.float64), (o,))
    acc_scale = float(_F32(x.scale)) * w_scale
    bias_q = np.zeros(o, np.int64)
    if p["bias"] is not None:
        bias_f = np.broadcast_to(p["bias"], (o,))
        bias_q = np.round(bias_f.astype(np.float64) / acc_scale).astype(np.int64)
    w_sum = w.astype(np.int64).reshape(o, -1).sum(axis=1)
    correction = bias_q - int(x.zp) * w_sum
    if np.abs(correction).max(initial=0) >= 2**31:
        raise _Refused("bias correction overflows int32")
    y_scale_f = float(_F32(y_scale))
    m0, shift = fixed_point_multiplier(acc_scale / y_scale_f)
    low, high = -128, 127
    if p.get("relu"):
        low = max(low, y_zp)
    for lo_v, hi_v in p.get("clips", []):
        if math.isfinite(lo_v):
            low = max(low, int(np.clip(round(lo_v / y_scale_f) + y_zp, -128, 127)))
        if math.isfinite(hi_v):
            high = min(high, int(np.clip(round(hi_v / y_scale_f) + y_zp, -128, 127)))
    params = dict(w=w, corr=correction.astype(np.int32), m0=m0.astype(np.int64),
                  shift=shift.astype(np.int64), zp=int(y_zp), low=low, high=high, x_zp=int(x.zp))
    if p["op"] == "Conv":
        node = p["node"]
        params.update(groups=int(_attr(node, "group", 1)),
                      strides=[int(s) for s in _attr(node, "strides", [1, 1])],
                      pads=[int(v) for v in _attr(node, "pads", [0, 0, 0, 0])])
        _, h, wd = x.shape
        kh, kw = w.shape[2:]
        pd, (sh, sw) = params["pads"], params["strides"]
        y_shape = (o, (h + pd[0] + pd[2] - kh) // sh + 1, (wd + pd[1] + pd[3] - kw) // sw + 1)
        return Layer("conv", p["buffers"], "", x.shape, y_shape, params)
    return Layer("dense", p["buffers"], "", x.shape, (o,), params)


def settings(profile: Profile) -> dict[str, Any]:
    """The generator settings a profile asks for: parallelism (MAC lanes per layer, the
    ARRAY_PARTITION factor) and dataflow (layers as DATAFLOW tasks joined by hls::stream)."""
    parallelism = profile.get("parallelism", 8)
    if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 1:
        raise TargetError(f"profile '{profile.name}': parallelism must be an integer >= 1, "
                          f"got {parallelism!r}")
    dataflow = profile.get("dataflow", False)
    if not isinstance(dataflow, bool):
        raise TargetError(f"profile '{profile.name}': dataflow must be true or false, "
                          f"got {dataflow!r}")
    return {"parallelism": parallelism, "dataflow": dataflow}


class VitisTarget(Target):
    name = "vitis"

    def check_toolchain(self, profile: Profile) -> None:
        if shutil.which("g++") is None:
            raise TargetError("the vitis target builds its C simulation with g++, which is not "
                              "on PATH; install it (Debian: apt install g++)")

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return support.unsupported_reason(node, graph)

    def notes(self, subgraph: onnx.ModelProto, profile: Profile | None = None) -> list[str]:
        """What explain shows: the kernel's layers and its estimate against the budget."""
        profile = profile or Profile("vitis", "vitis", "")
        try:
            program = parse(subgraph)
        except _Refused as why:
            return [f"vitis cannot generate this subgraph (it will run on the next target): "
                    f"{why}"]
        try:
            opts = settings(profile)
        except TargetError as exc:
            return [str(exc)]
        est = estimates.estimate(program, opts["parallelism"], opts["dataflow"],
                                 profile.get("clock_mhz", 300))
        lines = [f"vitis kernel: {' -> '.join(program.layer_kinds)}; "
                 f"{len(program.inputs)} in, {len(program.outputs)} out (int8 on AXI); "
                 f"parallelism {opts['parallelism']}, dataflow {opts['dataflow']}",
                 "estimate: " + estimates.summary(est)]
        over = estimates.over_budget(est, profile.get("budget", {}) or {})
        lines.append(f"over the {profile.name} budget: {'; '.join(over)}" if over
                     else f"fits the {profile.name} budget"
                     + (f" ({estimates.budget_use(est, profile.get('budget', {}))})"
                        if profile.get("budget") else ""))
        return lines

    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        self.check_toolchain(profile)
        try:
            program = parse(subgraph)
        except _Refused as why:
            raise TargetError(f"vitis cannot generate this subgraph: {why}") from None
        opts = settings(profile)
        clock = profile.get("clock_mhz", 300)
        est = estimates.estimate(program, opts["parallelism"], opts["dataflow"], clock)
        over = estimates.over_budget(est, profile.get("budget", {}) or {})
        if over:
            per = "; ".join(estimates.layer_line(k) for k in est["kernels"])
            raise TargetError(f"subgraph does not fit '{profile.name}' at parallelism "
                              f"{opts['parallelism']}: {'; '.join(over)} (per layer: {per}); "
                              "lower the profile's parallelism or split the model")
        kernel, sources = hls.generate(program, opts["parallelism"], dataflow=opts["dataflow"])
        csim = _build_csim(sources)
        platform = str(profile.get("platform", "UNKNOWN_PLATFORM"))
        files = {name: text.encode() for name, text in sources.items()}
        files["csim.so"] = csim
        files["host_xrt.py"] = host.generate(program, kernel).encode()
        for name, text in hls.board_files(kernel, profile.name, platform, clock, est, opts,
                                          len(program.inputs), len(program.outputs)).items():
            files[f"build/{name}"] = text.encode()
        meta = {"kind": "hls-csim", "kernel": kernel,
                "inputs": [_port_json(p) for p in program.inputs],
                "outputs": [_port_json(p) for p in program.outputs],
                "platform": platform, "part": profile.get("part", ""),
                "clock_mhz": clock, "estimate": est, "settings": opts,
                "xclbin": f"build/{kernel}.xclbin",
                "synthesized": False, "layers": program.layer_kinds}
        return Build(target=self.name, profile=profile.name, files=files, meta=meta)


def _port_json(port: Port) -> dict[str, Any]:
    return {"name": port.name, "dtype": port.dtype, "shape": list(port.q.shape),
            "scale": float(_F32(port.q.scale)), "zero_point": int(port.q.zp)}


def _build_csim(sources: dict[str, str]) -> bytes:
    """The exact kernel source compiled with g++ (our hls::stream stand-in only when the
    dataflow form needs it). -ffp-contract=off: no fused multiply-add, as the CPU build."""
    with tempfile.TemporaryDirectory(prefix="lepton-vitis-") as tmp:
        folder = Path(tmp)
        for name, text in sources.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        cmd = ["g++", *hls.CSIM_FLAGS, "-shared", "-fPIC", "-I", "csim_include", "-o",
               "csim.so", "kernel.cpp"]
        result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        if result.returncode != 0:
            raise TargetError(f"g++ failed to build the C simulation: {result.stderr[-2000:]}")
        return (folder / "csim.so").read_bytes()
