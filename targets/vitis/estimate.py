"""Resource and speed estimates of a generated kernel, before any synthesis.

A rough, documented model read off the lowered TIR of each kernel (not a synthesis report;
real numbers come from `v++` on a machine with Vitis). Per kernel (one TIR PrimFunc):

- cycles: a loop `PIPELINE`d at II=1 takes one cycle per iteration (what it contains is
  unrolled), an `UNROLL`ed loop costs its body once, any other loop extent x body, a store
  one cycle; statements in sequence add up.
- DSP48: per multiply in a stored value (index arithmetic is not counted), times the lanes of
  the enclosing unrolled loops: 1 for an integer multiply of 32 bits or less (an int8 MAC:
  HLS does not pack two int8 MACs into one DSP on its own), 4 for a 64-bit one (the
  requantize multiply), 3 for a float multiply, 2 for a float add or subtract.
- memory: each constant (ROM) and local array; a constant read by the unrolled lanes is split
  into `parallelism` banks. A bank over 1 KiB goes to BRAM18K (2 KiB each), a smaller one to
  LUT ROM/RAM (64 bits per LUT).
- LUT/FF: 300/400 per loop nest (control), 40/60 per DSP (operand muxes, adders, pipeline
  registers), 800/1300 per float divide.
- between kernels: the activation buffers (in BRAM18K over 1 KiB, else LUTRAM), twice with
  dataflow (the stream FIFO plus the task's local copy); the shell: 1200/1800 LUT/FF per
  m_axi port, 250/350 for s_axilite control, 100/100 per dataflow task.

Cycles per sample are the sum over kernels plus one per element loaded and stored; with
dataflow the interval between samples is the slowest task, without it the whole latency.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_BRAM_BYTES = 2048
_LUTRAM_MAX = 1024


def _memory(nbytes: int, banks: int = 1) -> tuple[int, int]:
    """(BRAM18K, LUT) to hold `nbytes` split into `banks` banks."""
    per_bank = math.ceil(nbytes / banks) if nbytes else 0
    if per_bank == 0:
        return 0, 0
    if per_bank > _LUTRAM_MAX:
        return banks * math.ceil(per_bank / _BRAM_BYTES), 0
    return 0, banks * math.ceil(per_bank / 8)


def _bytes(dtype: str) -> int:
    return 1 if dtype == "bool" else int(np.dtype(dtype).itemsize)


class _Count:
    """Cycles, DSPs, float dividers, loop nests and local arrays of one lowered PrimFunc."""

    def __init__(self) -> None:
        self.dsp = 0
        self.fdiv = 0
        self.nests = 0
        self.local_bytes: list[int] = []

    def stmt(self, node: Any, lanes: int, depth: int) -> int:
        from tvm import tirx

        from lepton_edge_targets.vitis.tir_lower import HLS_ANNOTATION

        if isinstance(node, tirx.SeqStmt):
            return sum(self.stmt(s, lanes, depth) for s in node.seq)
        if isinstance(node, tirx.For):
            if depth == 0:
                self.nests += 1
            extent = int(node.extent)
            hint = str(node.annotations.get(HLS_ANNOTATION, "")) if node.annotations else ""
            if hint == "unroll":
                return self.stmt(node.body, lanes * extent, depth + 1)
            body = self.stmt(node.body, lanes, depth + 1)
            if hint == "pipeline" or not _has_loop(node.body):
                return extent
            return extent * body
        if isinstance(node, tirx.BufferStore):
            self.value(node.value, lanes)
            return 1
        if isinstance(node, tirx.IfThenElse):
            a = self.stmt(node.then_case, lanes, depth)
            b = self.stmt(node.else_case, lanes, depth) if node.else_case is not None else 0
            return max(a, b)
        if isinstance(node, tirx.AllocBuffer):
            buf = node.buffer
            self.local_bytes.append(int(np.prod([int(d) for d in buf.shape]))
                                    * _bytes(str(buf.dtype)))
        return 0

    def value(self, expr: Any, lanes: int) -> None:
        import tvm
        from tvm import tirx

        from lepton_edge_targets.vitis.hls import dtype_of

        if isinstance(expr, tvm.ir.expr.TensorLoad):
            return  # index arithmetic is addressing, not datapath
        dtype = dtype_of(expr)
        if isinstance(expr, tirx.Mul) and not any(isinstance(x, tirx.IntImm)
                                                  for x in (expr.a, expr.b)):
            self.dsp += lanes * (3 if dtype.startswith("float") else
                                 4 if dtype.endswith("64") else 1)
        elif isinstance(expr, (tirx.Add, tirx.Sub)) and dtype.startswith("float"):
            self.dsp += lanes * 2
        elif isinstance(expr, tirx.Div) and dtype.startswith("float"):
            self.fdiv += lanes
        for name in ("a", "b", "value", "body", "condition", "true_value", "false_value",
                     "args"):
            child = getattr(expr, name, None)
            if child is None or callable(getattr(child, "__func__", None)):
                continue
            for item in (child if isinstance(child, (list, tuple, tvm.ir.Array)) else [child]):
                if isinstance(item, tvm.ir.expr.Expr):
                    self.value(item, lanes)


def _has_loop(stmt: Any) -> bool:
    from lepton_edge_targets.vitis.hls import _has_loop as has_loop

    return has_loop(stmt)


def _kernel(index: int, kernel: Any, program: Any) -> dict[str, Any]:
    p = program.parallelism
    count = _Count()
    cycles = count.stmt(kernel.func.body, 1, 0)
    bram = lut_mem = 0
    for cid in dict.fromkeys(a for a in kernel.args if a in program.consts):
        value = program.consts[cid]
        b, lut = _memory(int(value.nbytes), p if cid in kernel.partitioned else 1)
        bram, lut_mem = bram + b, lut_mem + lut
    for nbytes in count.local_bytes:
        b, lut = _memory(nbytes)
        bram, lut_mem = bram + b, lut_mem + lut
    return {"kernel": index, "name": kernel.name, "macs": kernel.macs, "cycles": cycles,
            "dsp": count.dsp, "bram_18k": bram,
            "lut": 300 * count.nests + 40 * count.dsp + 800 * count.fdiv + lut_mem,
            "ff": 400 * count.nests + 60 * count.dsp + 1300 * count.fdiv}


def estimate(program: Any, dataflow: bool = False, clock_mhz: Any = 300) -> dict[str, Any]:
    kernels = [_kernel(i, k, program) for i, k in enumerate(program.kernels)]
    ports = len(program.inputs) + len(program.outputs)
    io_cycles = [port.size for port in program.inputs + program.outputs]
    buf_bram = buf_lut = 0
    for dtype, size in program.buffers.values():
        bram, lut = _memory(size * _bytes(dtype) * (2 if dataflow else 1))
        buf_bram, buf_lut = buf_bram + bram, buf_lut + lut
    tasks = len(kernels) + ports
    total = {
        "macs": sum(k["macs"] for k in kernels),
        "cycles": sum(k["cycles"] for k in kernels) + sum(io_cycles),
        "dsp": sum(k["dsp"] for k in kernels),
        "bram_18k": sum(k["bram_18k"] for k in kernels) + buf_bram,
        "lut": sum(k["lut"] for k in kernels) + buf_lut + 1200 * ports + 250
        + (100 * tasks if dataflow else 0),
        "ff": sum(k["ff"] for k in kernels) + 1800 * ports + 350
        + (100 * tasks if dataflow else 0),
    }
    stages = [k["cycles"] for k in kernels] + io_cycles
    total["interval"] = max(stages) if dataflow else total["cycles"]
    clock = float(clock_mhz or 300)
    total["samples_per_s"] = int(clock * 1e6 / max(total["interval"], 1))
    return {"kernels": kernels, "total": total, "parallelism": program.parallelism,
            "dataflow": dataflow, "clock_mhz": clock,
            "model": "rough pre-synthesis model read off the TIR (targets/vitis/estimate.py)"}


BUDGET_KEYS = ("dsp", "bram_18k", "lut", "ff")


def over_budget(est: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    total = est["total"]
    return [f"{key} {total[key]} > budget {budget[key]}" for key in BUDGET_KEYS
            if key in budget and total[key] > budget[key]]


def budget_use(est: dict[str, Any], budget: dict[str, Any]) -> str:
    total = est["total"]
    return ", ".join(f"{key} {100 * total[key] / budget[key]:.1f}%" for key in BUDGET_KEYS
                     if budget.get(key))


def summary(est: dict[str, Any]) -> str:
    t = est["total"]
    return (f"{t['macs']:,} MACs/sample, {t['cycles']:,} cycles latency, interval "
            f"{t['interval']:,} cycles (~{t['samples_per_s']:,} samples/s at "
            f"{est['clock_mhz']:g} MHz), {t['dsp']} DSP, {t['bram_18k']} BRAM18K, "
            f"{t['lut']:,} LUT, {t['ff']:,} FF")


def kernel_line(k: dict[str, Any]) -> str:
    return (f"kernel {k['kernel']} ({k['name']}): {k['macs']} MACs, {k['cycles']} cycles, "
            f"{k['dsp']} DSP, {k['bram_18k']} BRAM18K, {k['lut']} LUT, {k['ff']} FF")
