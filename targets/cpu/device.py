"""Run CPU builds with the TVM runtime's Relax VM (no compiler imported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.runtime.devices import cpu_info
from lepton_edge.target import Device, DeviceInfo, Executable


class CpuDevice(Device):
    kind = "cpu"

    def probe(self) -> list[DeviceInfo]:
        info = cpu_info()
        return [DeviceInfo(kind="cpu", name="cpu:0", present=True,
                           details={"arch": info.arch, "model": info.model, "cores": info.cores,
                                    "isa": info.isa})]

    def incompatibility(self, info: DeviceInfo, build_meta: dict[str, Any]) -> str | None:
        arch = build_meta.get("arch")
        if arch and arch != info.details.get("arch"):
            return f"build is for {arch}, this CPU is {info.details.get('arch')}"
        built_with = build_meta.get("tvm", "")
        running = _tvm_runtime_version()
        if built_with and _major_minor(built_with) != _major_minor(running):
            return (f"build was compiled with TVM {built_with}, this runtime is TVM {running}; "
                    "recompile or install the matching TVM runtime")
        missing = [f for f in build_meta.get("requires", []) if f not in info.details["isa"]]
        if missing:
            return (f"build needs CPU features {missing} (compiled for {build_meta.get('mcpu')}) "
                    "that this CPU lacks")
        return None

    def load(self, info: DeviceInfo, files: dict[str, Path], build_meta: dict[str, Any]
             ) -> Executable:
        return TvmVmExecutable(files["lib.so"])


def _tvm_runtime_version() -> str:
    import tvm

    return str(tvm.__version__)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


class TvmVmExecutable(Executable):
    """A Relax VM over an exported library; inputs in the subgraph's order."""

    def __init__(self, library: Path) -> None:
        import tvm.runtime
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm.runtime
        self._device = tvm.runtime.cpu(0)
        self._vm = VirtualMachine(tvm.runtime.load_module(str(library)), self._device)
        self._main = self._vm["main"]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # DLPack instead of tvm.runtime.tensor(): ~5x less per-call overhead, which is most of
        # a small model's batch-1 time. TVM's kernels assume 64-byte aligned data, so an
        # input that is not aligned (or not contiguous) is copied into an aligned buffer.
        # Dtypes outside DLPack's numeric set (bfloat16, float8 from ml_dtypes) take the copy.
        # Empty arrays too: TVM's DLPack import rejects their (unaligned) data pointers.
        args = [self._tvm.from_dlpack(_aligned(a)) if a.dtype.name in _DLPACK_DTYPES and a.size
                else self._tvm.tensor(a, self._device) for a in inputs]
        return _to_numpy(self._main(*args))


_ALIGN = 64
_DLPACK_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                            "uint32", "uint64", "float16", "float32", "float64"})


def _aligned(array: np.ndarray) -> np.ndarray:
    # DLPack cannot export a read-only array (e.g. np.load(mmap_mode="r")): copy those too
    # Only canonical C strides: numpy calls an array with odd strides on size-1 axes
    # contiguous, but DLPack passes those strides on and TVM refuses them.
    if (array.flags.writeable and array.ctypes.data % _ALIGN == 0
            and array.strides == _c_strides(array)):
        return array
    buffer = np.empty(array.nbytes + _ALIGN, np.uint8)
    start = (-buffer.ctypes.data) % _ALIGN
    out = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


def _c_strides(array: np.ndarray) -> tuple[int, ...]:
    strides, step = [], array.itemsize
    for extent in reversed(array.shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _to_numpy(result: Any) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        if str(result.dtype) in _DLPACK_DTYPES:
            # a copy: the VM may reuse the output's storage on the next call
            return [np.from_dlpack(result).copy()]
        return [result.numpy()]
    items = list(result)
    if all(isinstance(i, int) for i in items):  # a Shape output comes back as a shape tuple
        return [np.array(items, dtype=np.int64)]
    out: list[np.ndarray] = []
    for item in result:
        out.extend(_to_numpy(item))
    return out
