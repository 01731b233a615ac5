"""Build one int8 QDQ subgraph for a Vitis profile: HLS C++, a C-simulation library, and the
board build folder (v++ lines; not synthesized here).

The subgraph is read as a chain of integer layers with exactly the math of
lepton_edge/lowering/int8.py (the CPU int8 build), so C simulation and CPU agree bit for bit:

    acc = sum(x_q * w_q) (padding = x_zp) + (bias_q - x_zp * sum(w_q))      int32
    y_q = clip(rne((acc * m0) >> shift) + y_zp, lo, hi)                     fixed point
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
from lepton_edge_targets.vitis import hls, support


@dataclass
class QTensor:
    """An int8 tensor of one sample: per-sample shape, scale and zero point."""

    shape: tuple[int, ...]
    scale: float
    zp: int


@dataclass
class Layer:
    kind: str  # "conv", "dense", "maxpool"
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
class Program:
    in_dtype: str  # "float32" or "int8" at the subgraph boundary
    out_dtype: str
    in_q: QTensor
    out_q: QTensor
    layers: list[Layer]
    input_name: str
    output_name: str


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


class _Refused(Exception):
    pass


def parse(model: onnx.ModelProto) -> Program:
    """The subgraph as a chain of integer layers; _Refused (a reason) when it is not one."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise _Refused("vitis kernels take exactly one input and one output")
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

    def scalar(name: str) -> float:
        if name not in inits or inits[name].size != 1:
            raise _Refused(f"'{name}' is not a constant scalar")
        return inits[name].ravel()[0]

    inp, out = graph.input[0].name, graph.output[0].name
    q: dict[str, QTensor] = {}  # int8 activations
    deq: dict[str, str] = {}  # float name -> the int8 tensor it dequantizes
    consts: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # DQ of constants: (q, scale)
    pending: dict[str, dict[str, Any]] = {}  # float accumulators awaiting Q
    layers: list[Layer] = []
    in_dtype = "int8" if types.get(inp) == onnx.TensorProto.INT8 else "float32"
    in_q: QTensor | None = None
    if in_dtype == "int8":
        # an int8 boundary input: its scale comes from the DequantizeLinear that reads it
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] == inp:
                in_q = QTensor(sample_shape(inp), float(scalar(node.input[1])),
                               int(scalar(node.input[2])) if len(node.input) > 2 else 0)
        if in_q is None:
            raise _Refused("the int8 input is not dequantized")
        q[inp] = in_q
    current = inp

    for node in graph.node:
        op, ins, outs = node.op_type, list(node.input), list(node.output)
        if op == "QuantizeLinear":
            scale, zp = float(scalar(ins[1])), int(scalar(ins[2]))
            if ins[0] == inp and in_dtype == "float32":
                in_q = QTensor(sample_shape(inp), scale, zp)
                q[outs[0]] = in_q
            elif ins[0] in pending:
                layers.append(_finish(pending.pop(ins[0]), scale, zp))
                q[outs[0]] = QTensor(layers[-1].out_shape, scale, zp)
            elif ins[0] in deq:
                src = q[deq[ins[0]]]
                if not (np.float32(src.scale) == np.float32(scale) and src.zp == zp):
                    raise _Refused("requantizing to a new scale without an integer op between")
                q[outs[0]] = QTensor(src.shape, scale, zp)
                _alias(layers, q, deq[ins[0]], outs[0])
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
                src = q[ins[0]]
                if not (np.float32(scalar(ins[1])) == np.float32(src.scale)):
                    raise _Refused("DequantizeLinear scale differs from its QuantizeLinear")
                deq[outs[0]] = ins[0]
            else:
                raise _Refused(f"DequantizeLinear of '{ins[0]}' that is not int8 here")
        elif op in ("Conv", "Gemm", "MatMul"):
            if ins[0] not in deq:
                raise _Refused(f"{op} input is not a dequantized int8 activation")
            if ins[1] not in consts:
                raise _Refused(f"{op} weight is not a dequantized int8 constant")
            x = q[deq[ins[0]]]
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
            pending[outs[0]] = dict(op=op, node=node, x=x, w=w_q, w_scale=w_scale, o=o,
                                    bias=bias, low=-128, high=127)
        elif op in ("Relu", "Clip"):
            if ins[0] not in pending:
                raise _Refused(f"{op} must sit between Conv/Gemm/MatMul and QuantizeLinear")
            p = pending.pop(ins[0])
            if op == "Clip":
                lo = float(scalar(ins[1])) if len(ins) > 1 and ins[1] else -math.inf
                hi = float(scalar(ins[2])) if len(ins) > 2 and ins[2] else math.inf
                p.setdefault("clips", []).append((lo, hi))
            else:
                p["relu"] = True
            pending[outs[0]] = p
        elif op == "MaxPool":
            if ins[0] not in deq:
                raise _Refused("MaxPool input is not a dequantized int8 activation")
            x = q[deq[ins[0]]]
            kernel = [int(k) for k in _attr(node, "kernel_shape")]
            strides = [int(s) for s in _attr(node, "strides", [1, 1])]
            pads = [int(p) for p in _attr(node, "pads", [0, 0, 0, 0])]
            c, h, wd = x.shape
            y_shape = (c, (h + pads[0] + pads[2] - kernel[0]) // strides[0] + 1,
                       (wd + pads[1] + pads[3] - kernel[1]) // strides[1] + 1)
            layers.append(Layer("maxpool", x.shape, y_shape,
                                dict(kernel=kernel, strides=strides, pads=pads)))
            name = f"{outs[0]}__q"
            q[name] = QTensor(y_shape, x.scale, x.zp)
            deq[outs[0]] = name
        elif op in ("Flatten", "Reshape"):
            src = q.get(deq.get(ins[0], ins[0]))
            if src is None:
                raise _Refused(f"{op} of a tensor that is not int8 here")
            if op == "Flatten":
                new_shape: tuple[int, ...] = (int(np.prod(src.shape)),)
            elif shapes.get(outs[0]):
                new_shape = sample_shape(outs[0])
            else:
                dims = [int(d) for d in inits[ins[1]].ravel()][1:]
                if -1 in dims:
                    rest = int(np.prod([d for d in dims if d != -1]))
                    dims[dims.index(-1)] = int(np.prod(src.shape)) // max(rest, 1)
                new_shape = tuple(dims)
            if ins[0] in deq:
                x = q[deq[ins[0]]]
                name = f"{outs[0]}__q"
                q[name] = QTensor(new_shape, x.scale, x.zp)
                deq[outs[0]] = name
            elif ins[0] in q:
                x = q[ins[0]]
                q[outs[0]] = QTensor(new_shape, x.scale, x.zp)
            if int(np.prod(q[deq.get(outs[0], outs[0])].shape)) != int(np.prod(x.shape)):
                raise _Refused(f"{op} changes the per-sample size (it must keep the batch)")
        else:
            raise _Refused(f"no HLS generator for {op}")
        current = outs[0]
    if current != out:
        raise _Refused("the nodes do not form a single chain ending at the output")
    if out in deq:
        out_q, out_dtype = q[deq[out]], "float32"
    elif out in q:
        out_q, out_dtype = q[out], "int8"
    else:
        raise _Refused("the output is neither int8 nor a dequantized int8 tensor")
    if in_q is None:
        raise _Refused("the input is not quantized to int8 at the subgraph's entry")
    if not any(lay.kind in ("conv", "dense") for lay in layers):
        raise _Refused("no Conv/Gemm/MatMul to put on the FPGA")
    return Program(in_dtype, out_dtype, in_q, out_q, layers, inp, out)


def _alias(layers: list[Layer], q: dict[str, QTensor], src: str, dst: str) -> None:
    """Q(DQ(x)) with the same scale: the same int8 values, nothing to compute."""


def _finish(p: dict[str, Any], y_scale: float, y_zp: int) -> Layer:
    """Fold the corrections and the requantization exactly as lowering/int8.py does."""
    x: QTensor = p["x"]
    w = p["w"]
    o = p["o"]
    w_scale = np.broadcast_to(p["w_scale"].astype(np.float64), (o,))
    acc_scale = float(np.float32(x.scale)) * w_scale
    bias_q = np.zeros(o, np.int64)
    if p["bias"] is not None:
        bias_f = np.broadcast_to(p["bias"], (o,))
        bias_q = np.round(bias_f.astype(np.float64) / acc_scale).astype(np.int64)
    w_sum = w.astype(np.int64).reshape(o, -1).sum(axis=1)
    correction = bias_q - int(x.zp) * w_sum
    if np.abs(correction).max(initial=0) >= 2**31:
        raise _Refused("bias correction overflows int32")
    y_scale_f = float(np.float32(y_scale))
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
        return Layer("conv", x.shape, y_shape, params)
    return Layer("dense", x.shape, (o,), params)


def estimate(program: Program, parallelism: int) -> dict[str, Any]:
    kernels = []
    for i, layer in enumerate(program.layers):
        if layer.kind not in ("conv", "dense"):
            continue
        kernels.append({
            "layer": i, "kind": layer.kind, "macs": layer.macs,
            "cycles": math.ceil(layer.macs / parallelism),
            "dsp": parallelism,
            "bram_18k": math.ceil(layer.weight_bytes / 2304),
        })
    total = {"macs": sum(k["macs"] for k in kernels),
             "cycles": sum(k["cycles"] for k in kernels),
             "dsp": sum(k["dsp"] for k in kernels),
             "bram_18k": sum(k["bram_18k"] for k in kernels)}
    return {"kernels": kernels, "total": total, "parallelism": parallelism}


class VitisTarget(Target):
    name = "vitis"

    def check_toolchain(self, profile: Profile) -> None:
        if shutil.which("g++") is None:
            raise TargetError("the vitis target builds its C simulation with g++, which is not "
                              "on PATH; install it (Debian: apt install g++)")

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return support.unsupported_reason(node, graph)

    def notes(self, subgraph: onnx.ModelProto) -> list[str]:
        try:
            program = parse(subgraph)
        except _Refused as why:
            return [f"vitis cannot generate this subgraph: {why}"]
        total = estimate(program, 8)["total"]
        return [f"vitis: {len(program.layers)} HLS layers, {total['macs']} MACs/sample"]

    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        self.check_toolchain(profile)
        try:
            program = parse(subgraph)
        except _Refused as why:
            raise TargetError(f"vitis cannot generate this subgraph: {why}") from None
        parallelism = int(profile.get("parallelism", 8))
        if parallelism < 1:
            raise TargetError(f"profile '{profile.name}': parallelism must be >= 1")
        est = estimate(program, parallelism)
        budget = profile.get("budget", {}) or {}
        over = [f"{key} {est['total'][key]} > budget {budget[key]}"
                for key in ("dsp", "bram_18k") if key in budget and est["total"][key] > budget[key]]
        if over:
            per = ", ".join(f"layer {k['layer']} ({k['kind']}): {k['macs']} MACs, {k['dsp']} DSP, "
                            f"{k['bram_18k']} BRAM18K" for k in est["kernels"])
            raise TargetError(f"subgraph does not fit '{profile.name}' at parallelism "
                              f"{parallelism}: {'; '.join(over)} ({per})")
        sources = hls.generate(program, parallelism)
        csim = _build_csim(sources)
        platform = str(profile.get("platform", "UNKNOWN_PLATFORM"))
        files = {"kernel.cpp": sources["kernel.cpp"].encode(),
                 "kernel.h": sources["kernel.h"].encode(),
                 "csim.cpp": sources["csim.cpp"].encode(),
                 "csim.so": csim}
        for name, text in hls.board_files(profile.name, platform,
                                          profile.get("clock_mhz", 300), est).items():
            files[f"build/{name}"] = text.encode()
        meta = {"kind": "hls-csim", "in_dtype": program.in_dtype,
                "out_dtype": program.out_dtype,
                "in_shape": list(program.in_q.shape), "out_shape": list(program.out_q.shape),
                "platform": platform, "part": profile.get("part", ""),
                "clock_mhz": profile.get("clock_mhz"), "estimate": est,
                "synthesized": False, "layers": [lay.kind for lay in program.layers]}
        return Build(target=self.name, profile=profile.name, files=files, meta=meta)


def _build_csim(sources: dict[str, str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="lepton-vitis-") as tmp:
        folder = Path(tmp)
        for name in ("kernel.cpp", "kernel.h", "csim.cpp"):
            (folder / name).write_text(sources[name])
        cmd = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-o", "csim.so",
               "kernel.cpp", "csim.cpp"]
        result = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        if result.returncode != 0:
            raise TargetError(f"g++ failed to build the C simulation: {result.stderr[-2000:]}")
        return (folder / "csim.so").read_bytes()
