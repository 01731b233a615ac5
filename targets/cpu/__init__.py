"""The CPU target: TVM LLVM builds for x86-64 and AArch64."""

from lepton_edge.target import TargetPlugin

PLUGIN = TargetPlugin(
    name="cpu",
    priority=10,
    description="CPU via TVM/LLVM (x86-64, AArch64 cross builds)",
    target="lepton_edge_targets.cpu.compile:CpuTarget",
    device="lepton_edge_targets.cpu.device:CpuDevice",
    default_profile="x86-64-native",
)
