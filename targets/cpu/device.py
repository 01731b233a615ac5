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
        args = [self._tvm.tensor(a, self._device) for a in inputs]
        return _to_numpy(self._main(*args))


def _to_numpy(result: Any) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    items = list(result)
    if all(isinstance(i, int) for i in items):  # a Shape output comes back as a shape tuple
        return [np.array(items, dtype=np.int64)]
    out: list[np.ndarray] = []
    for item in result:
        out.extend(_to_numpy(item))
    return out
