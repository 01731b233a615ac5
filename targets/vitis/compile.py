"""Build one int8 subgraph for a Vitis profile: HLS C++ printed from TVM TIR, a C-simulation
library, a pyxrt host binding, and the board build folder (v++ lines; not synthesized here).

The subgraph goes through TVM exactly as the CPU int8 build lowers it (tir_lower.py: Relax
import, lowering/int8.py's integer rewrite, LegalizeOps, fusion, an HLS loop schedule, TVM's
lowering passes to plain loops), and each TIR kernel is printed as C++ (hls.py). The C
simulation therefore computes what the CPU build computes, bit for bit: the same integer
ops, and the float ops (DequantizeLinear -> Add/AveragePool/MaxPool -> QuantizeLinear run as
float fake-quant, as on the CPU) in the same order and precision, with no fused multiply-add.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import onnx

from lepton_edge.errors import TargetError
from lepton_edge.target import Build, Profile, Target
from lepton_edge_targets.vitis import estimate as estimates
from lepton_edge_targets.vitis import hls, host, support, tir_lower
from lepton_edge_targets.vitis.tir_lower import Port, Program, Refused


def settings(profile: Profile) -> dict[str, Any]:
    """The generator settings a profile asks for: parallelism (MAC lanes per reduction, the
    ARRAY_PARTITION factor) and dataflow (kernels as DATAFLOW tasks joined by hls::stream)."""
    parallelism = profile.get("parallelism", 8)
    if not isinstance(parallelism, int) or isinstance(parallelism, bool) or parallelism < 1:
        raise TargetError(f"profile '{profile.name}': parallelism must be an integer >= 1, "
                          f"got {parallelism!r}")
    dataflow = profile.get("dataflow", False)
    if not isinstance(dataflow, bool):
        raise TargetError(f"profile '{profile.name}': dataflow must be true or false, "
                          f"got {dataflow!r}")
    return {"parallelism": parallelism, "dataflow": dataflow}


def lower(subgraph: onnx.ModelProto, parallelism: int) -> tuple[Program, str]:
    """The subgraph lowered through TVM and printed as HLS C++ (the kernel functions), or
    Refused with the reason (TVM could not lower it, or the printer has no form for a node)."""
    program = tir_lower.lower(subgraph, parallelism)
    try:
        text = "".join(hls.print_kernels(program))
    except hls.Unprintable as why:
        raise Refused(f"the HLS printer cannot print the TIR: {why}") from None
    return program, text


class VitisTarget(Target):
    name = "vitis"

    def check_toolchain(self, profile: Profile) -> None:
        if shutil.which("g++") is None:
            raise TargetError("the vitis target builds its C simulation with g++, which is not "
                              "on PATH; install it (Debian: apt install g++)")

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return support.unsupported_reason(node, graph)

    def notes(self, subgraph: onnx.ModelProto, profile: Profile | None = None) -> list[str]:
        """What explain shows: the kernel's TIR functions and its estimate against the budget."""
        profile = profile or Profile("vitis", "vitis", "")
        try:
            opts = settings(profile)
        except TargetError as exc:
            return [str(exc)]
        try:
            program, _ = lower(subgraph, opts["parallelism"])
        except Refused as why:
            return [f"vitis cannot generate this subgraph (it will run on the next target): "
                    f"{why}"]
        est = estimates.estimate(program, opts["dataflow"], profile.get("clock_mhz", 300))
        lines = [f"vitis kernel from TIR: {' -> '.join(program.kernel_names)}; "
                 f"{len(program.inputs)} in, {len(program.outputs)} out (AXI); "
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
        opts = settings(profile)
        try:
            program, _ = lower(subgraph, opts["parallelism"])
        except Refused as why:
            raise TargetError(f"vitis cannot generate this subgraph: {why}") from None
        clock = profile.get("clock_mhz", 300)
        est = estimates.estimate(program, opts["dataflow"], clock)
        over = estimates.over_budget(est, profile.get("budget", {}) or {})
        if over:
            per = "; ".join(estimates.kernel_line(k) for k in est["kernels"])
            raise TargetError(f"subgraph does not fit '{profile.name}' at parallelism "
                              f"{opts['parallelism']}: {'; '.join(over)} (per kernel: {per}); "
                              "lower the profile's parallelism or split the model")
        kernel, sources = hls.generate(program, dataflow=opts["dataflow"])
        csim = _build_csim(sources)
        platform = str(profile.get("platform", "UNKNOWN_PLATFORM"))
        files = {name: text.encode() for name, text in sources.items()}
        files["csim.so"] = csim
        files["host_xrt.py"] = host.generate(program, kernel).encode()
        for name, text in hls.board_files(kernel, profile.name, platform, clock, est, opts,
                                          len(program.inputs), len(program.outputs)).items():
            files[f"build/{name}"] = text.encode()
        meta = {"kind": "hls-csim", "kernel": kernel,
                "inputs": [port_json(p) for p in program.inputs],
                "outputs": [port_json(p) for p in program.outputs],
                "platform": platform, "part": profile.get("part", ""),
                "clock_mhz": clock, "estimate": est, "settings": opts,
                "xclbin": f"build/{kernel}.xclbin", "synthesized": False,
                "tir_kernels": program.kernel_names}
        return Build(target=self.name, profile=profile.name, files=files, meta=meta)


def port_json(port: Port) -> dict[str, Any]:
    """A kernel port as the host binding and the manifest describe it."""
    return {"name": port.name, "dtype": port.dtype, "shape": list(port.shape)}


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
