"""Resource and speed estimates of a generated kernel, before any synthesis.

A rough, documented model (not a synthesis report; real numbers come from `v++` on a machine
with Vitis). Per layer:

- conv / dense: `parallelism` int8 MAC lanes (one DSP48 each: HLS does not pack two int8
  MACs into one DSP on its own) plus 4 DSPs for the 32x31-bit requantize multiply;
  cycles = outputs x ceil(K / parallelism) (one pipelined chunk per cycle, II=1).
  LUT/FF: 400/500 control, 40/60 per lane (operand muxes, adder tree, pipeline registers),
  300/450 for the requantizer.
- weights: partitioned cyclically into `parallelism` banks; a bank over 1 KiB goes to
  BRAM18K (2 KiB of int8 each, 2048x9 mode), a smaller one to LUT ROM (64 bits per LUT).
- maxpool: 150/200 LUT/FF, one output per cycle.
- add / requant / avgpool (float32, as the CPU build computes them): 256-entry float tables
  in LUT ROM (128 LUTs each), fadd 350/550 + 2 DSP, fdiv 800/1300, round and convert
  250/300; one element per cycle, avgpool one window element per 5 cycles (the fadd
  latency chain of a sequential sum, kept in the CPU's order).
- activation buffers: over 1 KiB in BRAM18K, else LUTRAM (1 LUT per 8 bytes); twice that
  with dataflow (the stream FIFO plus the task's local copy).
- shell: 1200/1800 LUT/FF per m_axi port, 250/350 for s_axilite control, 100/100 per
  dataflow task.

Cycles per sample are the sum over layers (and loads/stores); with dataflow the interval
between samples is the slowest task, without it the whole latency.
"""

from __future__ import annotations

import math
from typing import Any

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


def _layer(index: int, layer: Any, p: int) -> dict[str, Any]:
    outputs = int(math.prod(layer.out_shape))
    row = {"layer": index, "kind": layer.kind, "macs": layer.macs, "dsp": 0, "bram_18k": 0,
           "lut": 0, "ff": 0, "cycles": outputs}
    if layer.kind in ("conv", "dense"):
        w = layer.params["w"]
        k = int(w[0].size)
        bram, lut = _memory(int(w.size), p)
        row.update(cycles=outputs * math.ceil(k / p) + 10, dsp=p + 4, bram_18k=bram,
                   lut=400 + 40 * p + 300 + lut + 3 * layer.params["corr"].size,
                   ff=500 + 60 * p + 450)
    elif layer.kind == "maxpool":
        row.update(lut=150, ff=200)
    else:  # add, requant, avgpool: float32 like the CPU build
        tables = 2 if layer.kind == "add" else 1
        row.update(dsp=2, lut=128 * tables + 350 + 800 + 250, ff=550 + 1300 + 300)
        if layer.kind == "avgpool":
            kh, kw = layer.params["kernel"]
            row["cycles"] = outputs * kh * kw * 5
    return row


def estimate(program: Any, parallelism: int, dataflow: bool = False,
             clock_mhz: Any = 300) -> dict[str, Any]:
    p = parallelism
    kernels = [_layer(i, layer, p) for i, layer in enumerate(program.layers)]
    ports = len(program.inputs) + len(program.outputs)
    io_cycles = [port.q.size for port in program.inputs + program.outputs]
    buf_bram = buf_lut = 0
    for size in program.buffers.values():
        bram, lut = _memory(size * (2 if dataflow else 1))
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
    return {"kernels": kernels, "total": total, "parallelism": p, "dataflow": dataflow,
            "clock_mhz": clock, "model": "rough pre-synthesis model (targets/vitis/estimate.py)"}


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


def layer_line(k: dict[str, Any]) -> str:
    return (f"layer {k['layer']} ({k['kind']}): {k['macs']} MACs, {k['cycles']} cycles, "
            f"{k['dsp']} DSP, {k['bram_18k']} BRAM18K, {k['lut']} LUT, {k['ff']} FF")
