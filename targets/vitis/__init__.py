"""The Vitis target: int8 QDQ subgraphs -> Vitis HLS C++ kernels, checked by C simulation.

Builds contain the generated HLS source (kernel.cpp, kernel.h), a C-simulation shared library
of exactly that source (csim.so, compiled here with g++) and a board build folder (v++ compile
and link lines, connectivity.cfg). Nothing is synthesized here. The device side runs the
C simulation only when the user names it (devices=["vitis", ...]); it never claims hardware.
"""

from lepton_edge.target import TargetPlugin

PLUGIN = TargetPlugin(
    name="vitis",
    priority=20,
    description="AMD/Xilinx FPGA via generated Vitis HLS C++ (int8 QDQ; C simulation here)",
    target="lepton_edge_targets.vitis.compile:VitisTarget",
    device="lepton_edge_targets.vitis.device:VitisDevice",
    default_profile="zcu104",
)
