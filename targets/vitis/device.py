"""The vitis device: the C simulation of the generated HLS kernel (never real hardware).

Used only when named (devices=["vitis", ...]). With XRT and a board this is where the board
would be reported; this version runs only the C simulation and says that hardware is absent.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.target import Device, DeviceInfo, Executable


def _xrt_present() -> bool:
    return bool(os.environ.get("XILINX_XRT")) or shutil.which("xbutil") is not None


class VitisDevice(Device):
    kind = "vitis"
    explicit_only = True

    def probe(self) -> list[DeviceInfo]:
        hardware = ("XRT found, but this version of lepton-edge does not drive FPGA boards yet"
                    if _xrt_present() else "no FPGA hardware: XRT is not installed")
        return [DeviceInfo(kind="vitis", name="vitis-csim:0", present=True,
                           details={"simulation": True,
                                    "what": "C simulation of the generated HLS kernel (g++)",
                                    "hardware": hardware})]

    def incompatibility(self, info: DeviceInfo, build_meta: dict[str, Any]) -> str | None:
        if build_meta.get("kind") != "hls-csim":
            return "build has no C-simulation library"
        return None

    def load(self, info: DeviceInfo, files: dict[str, Path], build_meta: dict[str, Any]
             ) -> Executable:
        return CsimExecutable(files["csim.so"], build_meta)


class CsimExecutable(Executable):
    def __init__(self, library: Path, meta: dict[str, Any]) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._fn = self._lib.lepton_run
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self._in_dtype = np.dtype(meta["in_dtype"])
        self._out_dtype = np.dtype(meta["out_dtype"])
        self._in_shape = tuple(meta["in_shape"])
        self._out_shape = tuple(meta["out_shape"])

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        (x,) = inputs
        x = np.ascontiguousarray(x, dtype=self._in_dtype)
        if tuple(x.shape[1:]) != self._in_shape:
            raise ValueError(f"vitis kernel expects [N, {self._in_shape}], got {x.shape}")
        batch = int(x.shape[0])
        out = np.empty((batch, *self._out_shape), self._out_dtype)
        self._fn(x.ctypes.data, out.ctypes.data, batch)
        return [out]
