"""The Vitis target: int8 QDQ subgraphs -> TVM TIR -> Vitis HLS C++ kernels, checked by C
simulation.

support.py decides which nodes the FPGA takes (the int8 kernels and the int8 glue between
them; the float boundary stays on the host CPU). tir_lower.py lowers a subgraph through TVM
as the CPU int8 build does (Relax import, lowering/int8.py, LegalizeOps, fusion) plus an HLS
loop schedule and TVM's lowering passes, and reads the Relax main function as a sequence of
call_tir kernels; hls.py prints each TIR PrimFunc as C++ and writes the top function
(sequential or DATAFLOW with hls::stream, per the profile's `parallelism` and `dataflow`
settings) and the v++ board build folder; estimate.py sizes the kernels against the
profile's budget; host.py writes the pyxrt host binding. Builds hold kernel.cpp/kernel.h,
csim.so (exactly that source built with g++), host_xrt.py, CMakeLists.txt and build/
(Makefile, connectivity.cfg, README.md). Nothing is synthesized here. The device (device.py)
runs a board through XRT when one and an xclbin are there, or the C simulation when the user
names the kind (devices=["vitis", ...]); never one in place of the other.
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
