"""Device discovery: what this machine really has. Nothing here is emulated or assumed.

The CPU is read from /proc/cpuinfo (Linux) or platform; accelerators are asked of their
target plug-ins, each of which reports a device as absent with the reason when it is not here.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from lepton_edge.target import DeviceInfo, host_arch, plugins

# ISA features that decide whether a CPU build can run here (names as in /proc/cpuinfo).
ISA_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq",
    "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16",
)


@dataclass(frozen=True)
class CpuInfo:
    arch: str
    model: str
    cores: int
    features: frozenset[str]

    @property
    def isa(self) -> list[str]:
        return [f for f in ISA_FEATURES if f in self.features]


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's CPU: architecture, model name, logical cores and ISA flags."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    if not flags and host_arch() == "aarch64":
        flags = _aarch64_hwcaps()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CpuInfo(arch=host_arch(), model=model, cores=cores or 1, features=frozenset(flags))


def _aarch64_hwcaps() -> set[str]:
    """AArch64 features from the kernel's auxiliary vector (when /proc/cpuinfo has none,
    e.g. under qemu-user, which shows the host's cpuinfo)."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return set()
    getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
    bits = {"fp": (hwcap, 0), "asimd": (hwcap, 1), "asimddp": (hwcap, 20),
            "sve": (hwcap, 22), "sve2": (hwcap2, 1), "i8mm": (hwcap2, 13),
            "bf16": (hwcap2, 14)}
    return {name for name, (word, bit) in bits.items() if word >> bit & 1}


def probe_devices() -> list[DeviceInfo]:
    """Every device of every registered target kind, present or absent (with a reason)."""
    found: list[DeviceInfo] = []
    for name, plugin in sorted(plugins().items(), key=lambda kv: -kv[1].priority):
        try:
            found.extend(plugin.make_device().probe())
        except Exception as exc:  # noqa: BLE001 - a broken probe means "absent", said aloud
            found.append(DeviceInfo(kind=name, name=name, present=False,
                                    reason=f"probe failed: {exc}"))
    return found


def nvidia_gpus() -> tuple[list[str], str]:
    """Names of NVIDIA GPUs the kernel driver reports, or the reason there are none."""
    root = "/proc/driver/nvidia/gpus"
    if not os.path.isdir(root):
        return [], "no NVIDIA driver loaded (/proc/driver/nvidia absent)"
    names = []
    for bus in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, bus, "information"), encoding="utf-8") as f:
                for line in f:
                    if line.startswith("Model:"):
                        names.append(f"{line.split(':', 1)[1].strip()} ({bus})")
        except OSError:
            names.append(bus)
    return names, "" if names else "NVIDIA driver loaded but reports no GPUs"


def tvm_cuda_devices() -> tuple[list[str], str]:
    """CUDA devices the TVM runtime itself can open (what CUDA builds would run on)."""
    try:
        import tvm.runtime
    except ImportError as exc:
        return [], f"TVM runtime not importable ({exc})"
    found = []
    for index in range(16):
        try:
            device = tvm.runtime.cuda(index)
            if not device.exist:
                break
            found.append(f"cuda:{index} {device.device_name} (compute {device.compute_version})")
        except Exception as exc:  # noqa: BLE001 - a runtime without CUDA support
            return [], f"TVM runtime cannot query CUDA ({exc})"
    return found, "" if found else "TVM runtime sees no CUDA device"


def xilinx_fpgas() -> tuple[list[str], str]:
    """Xilinx/AMD FPGA devices visible through XRT's device nodes, or why there are none."""
    nodes = []
    for folder in ("/dev/dri", "/dev/xfpga", "/dev"):
        if os.path.isdir(folder):
            nodes += [os.path.join(folder, n) for n in sorted(os.listdir(folder))
                      if n.startswith(("xclmgmt", "xocl", "zocl"))]
    if nodes:
        return nodes, ""
    xrt = os.path.isdir("/opt/xilinx/xrt")
    return [], ("XRT is installed but no FPGA device node was found" if xrt
                else "no XRT installation (/opt/xilinx/xrt) and no FPGA device nodes")
