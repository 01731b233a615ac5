"""Input/output signatures: names, dtypes and shapes, with symbolic dimensions.

This module is shared by the compiler and the runtime, so it depends on numpy only.
A dimension is an int (fixed) or a str (symbolic, e.g. "N" for the batch): one artifact
serves every value of a symbolic dimension, and all tensors naming the same symbol must
agree on its value in one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lepton_edge.errors import InputError

Dim = int | str


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str  # a numpy dtype name: "float32", "int64", ...
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        dims = ", ".join(str(d) for d in self.shape)
        return f"{self.name}: {self.dtype}[{dims}]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        shape = tuple(d if isinstance(d, str) else int(d) for d in data["shape"])
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=shape)


def check_feeds(
    specs: tuple[TensorSpec, ...], feeds: dict[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Check `feeds` against `specs`; return them as contiguous arrays and the bound symbols.

    Every problem is reported at once in one InputError, each naming the input, what was
    expected and what was given, so a caller fixes them all in one go.
    """
    if not isinstance(feeds, dict):
        raise InputError(
            f"inputs must be a dict of name -> array, got {type(feeds).__name__}; "
            f"expected names: {', '.join(s.name for s in specs)}"
        )
    problems: list[str] = []
    known = {s.name for s in specs}
    unknown = sorted(set(feeds) - known, key=str)  # names may not all be str
    missing = [s.name for s in specs if s.name not in feeds]
    if unknown:
        problems.append(f"unknown input name(s) {unknown}")
    if missing:
        problems.append(f"missing input(s) {missing}")
    arrays: dict[str, np.ndarray] = {}
    symbols: dict[str, int] = {}
    symbol_source: dict[str, str] = {}
    for spec in specs:
        if spec.name not in feeds:
            continue
        value = feeds[spec.name]
        try:
            arr = np.asarray(value)
        except Exception as exc:  # noqa: BLE001 - any conversion failure is the user's input
            problems.append(f"input '{spec.name}' is not an array ({exc})")
            continue
        if spec.dtype == "object":  # a string tensor: onnxruntime takes object arrays of str
            if arr.dtype.kind not in "USO":
                problems.append(f"input '{spec.name}' has dtype {arr.dtype}, expected strings")
                continue
            arr = arr.astype(object)
        elif arr.dtype == object:
            problems.append(f"input '{spec.name}' is not a numeric array")
            continue
        if arr.dtype != np.dtype(spec.dtype):
            problems.append(
                f"input '{spec.name}' has dtype {arr.dtype}, expected {spec.dtype} "
                f"(convert with .astype('{spec.dtype}'))"
            )
            continue
        if arr.ndim != len(spec.shape):
            problems.append(
                f"input '{spec.name}' has rank {arr.ndim} (shape {list(arr.shape)}), "
                f"expected rank {len(spec.shape)} {list(spec.shape)}"
            )
            continue
        for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int):
                if want != got:
                    problems.append(
                        f"input '{spec.name}' has shape {list(arr.shape)}, expected "
                        f"{list(spec.shape)} (dimension {axis} must be {want})"
                    )
                    break
            elif want in symbols and symbols[want] != got:
                problems.append(
                    f"input '{spec.name}' dimension {axis} ('{want}') is {got} but "
                    f"'{symbol_source[want]}' set '{want}' = {symbols[want]}"
                )
                break
            else:
                if got == 0:
                    problems.append(f"input '{spec.name}' dimension {axis} ('{want}') is 0")
                    break
                symbols.setdefault(want, got)
                symbol_source.setdefault(want, spec.name)
        arrays[spec.name] = np.asarray(arr, order="C")  # ascontiguousarray makes 0-d 1-d
    if problems:
        expected = "; ".join(str(s) for s in specs)
        raise InputError("bad inputs: " + "; ".join(problems) + f". The model takes {expected}")
    return arrays, symbols
