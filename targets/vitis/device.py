"""The vitis device: an FPGA board through XRT (pyxrt), or the C simulation of the generated
kernel, never one silently in place of the other.

The kind is used only when named (devices=["vitis", ...]). probe() reports:
- `vitis-xrt:<i>`: a board, present when `import pyxrt` works and XRT enumerates a device;
  otherwise one absent entry saying why. A build runs on it only with an xclbin built from
  the build's build/ folder (LEPTON_VITIS_XCLBIN=/path/lepton_<hash>.xclbin, or a folder of
  them): lepton-edge does not synthesize, so an artifact never carries one.
- `fpga-sim:0`: the C simulation (csim.so, the exact kernel source built with g++). It is
  refused while a board is present, unless LEPTON_VITIS_SIMULATE=1 asks for it on purpose.
Both go through the build's generated host code (host_xrt.py); only the kernel call differs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.errors import DeviceError
from lepton_edge.target import Device, DeviceInfo, Executable

XCLBIN_ENV = "LEPTON_VITIS_XCLBIN"
SIMULATE_ENV = "LEPTON_VITIS_SIMULATE"


def xrt_boards() -> tuple[list[tuple[int, str]], str]:
    """(index, name) of the FPGA devices XRT's Python binding enumerates, or why none."""
    try:
        import pyxrt
    except ImportError as exc:
        return [], (f"no FPGA board: pyxrt cannot be imported ({exc}); on a board, install "
                    "XRT and `source /opt/xilinx/xrt/setup.sh`")
    try:
        count = int(pyxrt.enumerate_devices())
    except Exception as exc:  # noqa: BLE001 - a broken XRT install is reported, not raised
        return [], f"pyxrt is importable but enumerating devices failed: {exc}"
    boards = []
    for index in range(count):
        name = f"xrt device {index}"
        try:
            info = getattr(pyxrt, "xrt_info_device", None)
            if info is not None:
                name = str(pyxrt.device(index).get_info(info.name))
        except Exception:  # noqa: BLE001 - the name is only for display
            pass
        boards.append((index, name))
    return boards, "" if boards else "pyxrt is importable but XRT reports no FPGA device"


def _load_host(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"lepton_vitis_host_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise DeviceError(f"cannot load the generated host code {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class VitisDevice(Device):
    kind = "vitis"
    explicit_only = True

    def probe(self) -> list[DeviceInfo]:
        boards, why = xrt_boards()
        infos = [DeviceInfo(kind="vitis", name=f"vitis-xrt:{index}", present=True,
                            details={"simulation": False, "board": name, "index": index})
                 for index, name in boards]
        if not boards:
            infos.append(DeviceInfo(kind="vitis", name="vitis-xrt", present=False,
                                    details={"simulation": False}, reason=why))
        infos.append(DeviceInfo(
            kind="vitis", name="fpga-sim:0", present=True,
            details={"simulation": True, "hardware_present": bool(boards),
                     "what": "C simulation of the generated HLS kernel (g++), not hardware",
                     "hardware": ", ".join(n for _, n in boards) or why}))
        return infos

    def incompatibility(self, info: DeviceInfo, build_meta: dict[str, Any]) -> str | None:
        if build_meta.get("kind") != "hls-csim":
            return "build has no generated HLS kernel"
        if info.details.get("simulation"):
            if info.details.get("hardware_present") and os.environ.get(SIMULATE_ENV) != "1":
                return (f"an FPGA board is present, and the C simulation never stands in "
                        f"for it; set {SIMULATE_ENV}=1 to run the simulation on purpose")
            return None
        kernel = build_meta.get("kernel", "")
        setting = os.environ.get(XCLBIN_ENV, "")
        if not setting:
            return (f"no xclbin for this build: lepton-edge does not synthesize; build "
                    f"{kernel}.xclbin from the build's build/ folder with Vitis (make) and "
                    f"set {XCLBIN_ENV} to it (or to the folder holding it)")
        if xclbin_for(kernel) is None:
            return f"{XCLBIN_ENV}={setting} is neither an xclbin file nor a folder with {kernel}.xclbin"
        return None

    def load(self, info: DeviceInfo, files: dict[str, Path], build_meta: dict[str, Any]
             ) -> Executable:
        host = _load_host(files["host_xrt.py"])
        if info.details.get("simulation"):
            return CsimExecutable(files["csim.so"], host, build_meta)
        xclbin = xclbin_for(build_meta.get("kernel", ""))
        if xclbin is None:
            raise DeviceError(f"no xclbin for kernel {build_meta.get('kernel')} ({XCLBIN_ENV})")
        return XrtExecutable(host, str(xclbin), int(info.details.get("index", 0)))


def xclbin_for(kernel: str) -> Path | None:
    """LEPTON_VITIS_XCLBIN: an xclbin file (one that holds this kernel, checked when loaded)
    or a folder with <kernel>.xclbin (the name build/Makefile gives it)."""
    setting = os.environ.get(XCLBIN_ENV, "")
    if not setting:
        return None
    path = Path(setting)
    if path.is_dir():
        path = path / f"{kernel}.xclbin"
    return path if path.is_file() else None


class XrtExecutable(Executable):
    """The kernel on a board: the generated pyxrt binding."""

    def __init__(self, host: Any, xclbin: str, index: int) -> None:
        self._kernel = host.XrtKernel(xclbin, index)

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self._kernel.run(inputs)


class CsimExecutable(Executable):
    """The C simulation: csim.so's kernel function called with int8 buffers, one per port."""

    def __init__(self, library: Path, host: Any, meta: dict[str, Any]) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._host = host
        self._fn = getattr(self._lib, meta["kernel"])
        self._fn.restype = None
        ports = len(host.INPUTS) + len(host.OUTPUTS)
        self._fn.argtypes = [ctypes.c_void_p] * ports + [ctypes.c_int]
        self._errors = getattr(self._lib, "lepton_csim_stream_errors", None)
        if self._errors is not None:
            self._errors.restype = ctypes.c_int

    def _call(self, q_in: list[np.ndarray], q_out: list[np.ndarray], batch: int) -> None:
        before = self._errors() if self._errors is not None else 0
        self._fn(*[q.ctypes.data for q in q_in + q_out], batch)
        if self._errors is not None and self._errors() != before:
            raise DeviceError("the vitis C simulation read an empty hls::stream (its dataflow "
                              "would deadlock in hardware); this is a lepton-edge bug")

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return self._host.run_with(self._call, inputs)
        except ValueError as exc:
            raise DeviceError(str(exc)) from None
