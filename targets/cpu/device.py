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
        return TvmVmExecutable(files["lib.so"], build_meta.get("batch_entries") or ())


def _tvm_runtime_version() -> str:
    import tvm

    return str(tvm.__version__)


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


class TvmVmExecutable(Executable):
    """A Relax VM over an exported library; inputs in the subgraph's order."""

    def __init__(self, library: Path, entries: Any = ()) -> None:
        import tvm.runtime
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm.runtime
        self._device = tvm.runtime.cpu(0)
        self._vm = VirtualMachine(tvm.runtime.load_module(str(library)), self._device)
        self._main = self._vm["main"]
        # Static copies of main for some batch sizes (the build's "batch_entries", made by
        # lowering/tuning.py BatchEntries): inputs of exactly an entry's shapes run it
        # (static memory planning, no shape computations in the VM), any other shapes main.
        # Keyed by the shape of the input that carries the batch, the other inputs' shapes
        # checked on a hit: cheaper per call than a key of all shapes (0.17 us, not 0.7 us).
        self._entries: dict[tuple[int, ...], tuple[tuple[tuple[int, ...], ...], Any]] = {}
        self._batch_slot = 0
        for entry in entries:
            shapes = tuple(tuple(int(d) for d in s) for s in entry["inputs"])
            self._batch_slot = int(entry.get("batch_input", 0))
            self._entries[shapes[self._batch_slot]] = (shapes, self._vm[entry["function"]])
        # (input position, dtype, shape) -> an aligned numpy buffer and the TVM tensor over it
        self._staged: dict[tuple[int, np.dtype, tuple[int, ...]], tuple[np.ndarray, Any]] = {}
        # one-input models: (dtype, shape, buffer, tensor, function) of the last staged call,
        # so that a repeated call skips the two table lookups
        self._last: tuple[np.dtype, tuple[int, ...], np.ndarray, Any, Any] | None = None

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # Like the VM itself, not for concurrent calls (the Session runs under its lock).
        # A small input is copied into a 64-byte aligned buffer kept per position, dtype and
        # shape, already wrapped as a TVM tensor: a copy of a few KiB costs less than asking
        # numpy for the data pointer, and the caller's array is never handed to the VM.
        last = self._last
        if last is not None and len(inputs) == 1 and inputs[0].dtype is last[0] \
                and inputs[0].shape == last[1]:
            last[2][...] = inputs[0]
            return _to_numpy(last[4](last[3]))
        staged = self._staged
        args = []
        for slot, array in enumerate(inputs):
            hit = staged.get((slot, array.dtype, array.shape))
            if hit is None:
                args.append(self._convert(slot, array))
            else:
                hit[0][...] = array
                args.append(hit[1])
        main = self._main
        if self._entries and len(inputs) > self._batch_slot:
            hit = self._entries.get(inputs[self._batch_slot].shape)
            if hit is not None and len(inputs) == len(hit[0]) and (len(inputs) == 1 or all(
                    a.shape == s for a, s in zip(inputs, hit[0], strict=True))):
                main = hit[1]
        if len(inputs) == 1:
            hit = staged.get((0, inputs[0].dtype, inputs[0].shape))
            self._last = None if hit is None else (inputs[0].dtype, inputs[0].shape, *hit, main)
        return _to_numpy(main(*args))

    def _convert(self, slot: int, array: np.ndarray) -> Any:
        # DLPack instead of tvm.runtime.tensor(): ~5x less per-call overhead, which is most of
        # a small model's batch-1 time. TVM's kernels assume 64-byte aligned data, so an
        # input that is not aligned (or not contiguous) is copied into an aligned buffer.
        # Dtypes outside DLPack's numeric set (bfloat16, float8 from ml_dtypes) take the copy.
        # Empty arrays too: TVM's DLPack import rejects their (unaligned) data pointers.
        if array.dtype.name not in _DLPACK_DTYPES or not array.size:
            return self._tvm.tensor(array, self._device)
        if array.nbytes > _STAGE_BYTES:
            return self._tvm.from_dlpack(_aligned(array))
        if len(self._staged) >= _STAGED_MAX:  # many shapes (a symbolic batch): start over
            self._staged.clear()
        buffer = _aligned_empty(array.shape, array.dtype)
        np.copyto(buffer, array)
        tensor = self._tvm.from_dlpack(buffer)
        self._staged[(slot, array.dtype, array.shape)] = (buffer, tensor)
        return tensor


_ALIGN = 64
_DLPACK_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                            "uint32", "uint64", "float16", "float32", "float64"})


_STAGE_BYTES = 1 << 16  # inputs up to this size are copied into a kept aligned buffer
_STAGED_MAX = 16


def _aligned(array: np.ndarray) -> np.ndarray:
    # DLPack cannot export a read-only array (e.g. np.load(mmap_mode="r")): copy those too
    # Only canonical C strides: numpy calls an array with odd strides on size-1 axes
    # contiguous, but DLPack passes those strides on and TVM refuses them.
    if (array.flags.writeable and array.ctypes.data % _ALIGN == 0
            and array.strides == _c_strides(array)):
        return array
    out = _aligned_empty(array.shape, array.dtype)
    np.copyto(out, array)
    return out


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a 64-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGN, np.uint8)
    start = (-buffer.ctypes.data) % _ALIGN
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _c_strides(array: np.ndarray) -> tuple[int, ...]:
    strides, step = [], array.itemsize
    for extent in reversed(array.shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _to_numpy(result: Any) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        try:
            # a copy: the VM may reuse the output's storage on the next call (and an output
            # may be a staged input buffer)
            return [np.from_dlpack(result).copy()]
        except (RuntimeError, BufferError):  # bfloat16, float8: not in DLPack's numeric set
            return [result.numpy()]
    items = list(result)
    if all(isinstance(i, int) for i in items):  # a Shape output comes back as a shape tuple
        return [np.array(items, dtype=np.int64)]
    out: list[np.ndarray] = []
    for item in result:
        out.extend(_to_numpy(item))
    return out
