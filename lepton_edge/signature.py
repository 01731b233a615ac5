"""Input/output signatures: names, dtypes and shapes, with symbolic dimensions.

This module is shared by the compiler and the runtime, so it depends on numpy only (and
lepton_edge.narrow_types, a plain table).
A dimension is an int (fixed) or a str (symbolic, e.g. "N" for the batch): one artifact
serves every value of a symbolic dimension, and all tensors naming the same symbol must
agree on its value in one call.

Besides tensors, a graph input or output may be a sequence of tensors (fed and returned as
a Python list of arrays), an optional tensor (an array, or None when absent) or an optional
sequence (a list, or None). `kind` says which; `dtype` and `shape` then describe the tensor
(each element of a sequence), and `shape` is None where ONNX leaves the rank open. The
elements of one sequence may differ in their symbolic dimensions, so those are not bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lepton_edge.errors import ArtifactError, InputError
from lepton_edge.narrow_types import NUMPY_NAMES

Dim = int | str

# Element types numpy itself lacks, taken and returned as ml_dtypes arrays (one element per
# byte); compiled code sees their bytes as uint8 (see lepton_edge/lowering/narrow.py).
NARROW_DTYPES = NUMPY_NAMES


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype named `name`: numpy's own, or an ml_dtypes type (bfloat16, float8,
    int4, ...) once ml_dtypes has registered it; a TypeError for any other name."""
    if name in NARROW_DTYPES or name == "bfloat16":
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def is_narrow(dtype: np.dtype) -> bool:
    """An ml_dtypes type that compiled code takes as its uint8 bytes."""
    return dtype.itemsize == 1 and dtype.name in NARROW_DTYPES  # float8_e5m2's kind is 'f'

TENSOR = "tensor"
SEQUENCE = "sequence"
OPTIONAL = "optional"  # an optional tensor
OPTIONAL_SEQUENCE = "optional_sequence"
KINDS = (TENSOR, SEQUENCE, OPTIONAL, OPTIONAL_SEQUENCE)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: a tensor, a sequence of tensors or an optional of those."""

    name: str
    dtype: str  # a numpy dtype name: "float32", "int64", ... (of the elements for sequences)
    shape: tuple[Dim, ...] | None  # None: rank unknown (only for sequence/optional elements)
    kind: str = TENSOR

    @property
    def is_sequence(self) -> bool:
        return self.kind in (SEQUENCE, OPTIONAL_SEQUENCE)

    @property
    def is_optional(self) -> bool:
        return self.kind in (OPTIONAL, OPTIONAL_SEQUENCE)

    def tensor_str(self) -> str:
        """The tensor (element) type alone: float32[N, 3], or float32[...] for any rank."""
        if self.shape is None:
            return f"{self.dtype}[...]"
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def type_str(self) -> str:
        """The whole type: float32[N, 3], sequence<float32[N]>, optional<sequence<...>>."""
        text = self.tensor_str()
        if self.is_sequence:
            text = f"sequence<{text}>"
        return f"optional<{text}>" if self.is_optional else text

    def __str__(self) -> str:
        return f"{self.name}: {self.type_str()}"

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "dtype": self.dtype,
                                "shape": None if self.shape is None else list(self.shape)}
        if self.kind != TENSOR:  # tensor entries stay exactly as artifacts have always had them
            data["kind"] = self.kind
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        shape = None if data["shape"] is None else tuple(
            d if isinstance(d, str) else int(d) for d in data["shape"])
        dtype = str(data["dtype"])
        if dtype != "object":
            try:
                numpy_dtype(dtype)
            except (TypeError, AttributeError, ImportError) as exc:
                raise ArtifactError(
                    f"'{data['name']}' has dtype '{dtype}', which is not a numpy or ml_dtypes "
                    f"type ({exc}); the artifact is damaged or from a newer lepton-edge: "
                    "recompile it") from None
        return cls(name=str(data["name"]), dtype=str(data["dtype"]), shape=shape,
                   kind=str(data.get("kind", TENSOR)))


class _Symbols:
    """Values bound to symbolic dimensions in one call, and which input bound each."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.source: dict[str, str] = {}


def _check_tensor(spec: TensorSpec, label: str, value: Any, symbols: _Symbols | None,
                  problems: list[str]) -> np.ndarray | None:
    """One tensor (an input, or one element of a sequence input) against spec's dtype/shape.

    Symbolic dimensions are bound in `symbols` (None: not bound, for sequence elements, which
    may differ). Returns the contiguous array, or None after adding a problem.
    """
    try:
        arr = np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - any conversion failure is the user's input
        problems.append(f"{label} is not an array ({exc})")
        return None
    if spec.dtype == "object":  # a string tensor: onnxruntime takes object arrays of str
        if arr.dtype.kind not in "USO":
            problems.append(f"{label} has dtype {arr.dtype}, expected strings")
            return None
        arr = arr.astype(object)
    elif arr.dtype == object:
        problems.append(f"{label} is not a numeric array")
        return None
    if arr.dtype != numpy_dtype(spec.dtype):
        how = (f"ml_dtypes.{spec.dtype}" if spec.dtype in NARROW_DTYPES | {"bfloat16"}
               else f"'{spec.dtype}'")
        problems.append(f"{label} has dtype {arr.dtype}, expected {spec.dtype} "
                        f"(convert with .astype({how}))")
        return None
    if spec.shape is None:
        return _bytes_if_narrow(np.asarray(arr, order="C"))
    if arr.ndim != len(spec.shape):
        problems.append(f"{label} has rank {arr.ndim} (shape {list(arr.shape)}), "
                        f"expected rank {len(spec.shape)} {list(spec.shape)}")
        return None
    for axis, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True)):
        if isinstance(want, int):
            if want != got:
                problems.append(f"{label} has shape {list(arr.shape)}, expected "
                                f"{list(spec.shape)} (dimension {axis} must be {want})")
                return None
        elif symbols is None:
            continue
        elif want in symbols.values and symbols.values[want] != got:
            problems.append(f"{label} dimension {axis} ('{want}') is {got} but "
                            f"'{symbols.source[want]}' set '{want}' = {symbols.values[want]}")
            return None
        else:
            if got == 0:
                problems.append(f"{label} dimension {axis} ('{want}') is 0")
                return None
            symbols.values.setdefault(want, got)
            symbols.source.setdefault(want, spec.name)
    return _bytes_if_narrow(np.asarray(arr, order="C"))  # ascontiguousarray makes 0-d 1-d


def _bytes_if_narrow(arr: np.ndarray) -> np.ndarray:
    """A narrow (ml_dtypes) array as its uint8 bytes: how compiled code takes it, and how
    golden files store it (.npy cannot describe float8_e5m2)."""
    return arr.view(np.uint8) if is_narrow(arr.dtype) else arr


def _check_value(spec: TensorSpec, value: Any, symbols: _Symbols, problems: list[str]) -> Any:
    """One input of any kind: an array, a list of arrays, or None for an absent optional."""
    label = f"input '{spec.name}'"
    if value is None:
        if not spec.is_optional:
            what = "a list of arrays" if spec.is_sequence else "an array"
            problems.append(f"{label} is None, but it is required ({spec.type_str()}): pass "
                            f"{what}")
        return None
    if not spec.is_sequence:
        return _check_tensor(spec, label, value, symbols, problems)
    if not isinstance(value, list | tuple):
        given = ("one array" if isinstance(value, np.ndarray)
                 else f"a {type(value).__name__}")
        problems.append(
            f"{label} is {given}, expected a list of arrays ({spec.type_str()})"
            + (" or None" if spec.is_optional else "")
            + ("; wrap a single array in a list" if isinstance(value, np.ndarray) else ""))
        return None
    before = len(problems)
    elements = [_check_tensor(spec, f"{label}[{i}]", v, None, problems)
                for i, v in enumerate(value)]
    return elements if len(problems) == before else None


def check_feeds(
    specs: tuple[TensorSpec, ...], feeds: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Check `feeds` against `specs`; return them (contiguous arrays) and the bound symbols.

    Tensor inputs become arrays (narrow ml_dtypes ones their uint8 bytes), sequence inputs
    lists of arrays, absent optionals None (an optional input may also be left out). Every problem is reported at once in one
    InputError, each naming the input, what was expected and what was given, so a caller
    fixes them all in one go.
    """
    if not isinstance(feeds, dict):
        raise InputError(
            f"inputs must be a dict of name -> array, got {type(feeds).__name__}; "
            f"expected names: {', '.join(s.name for s in specs)}"
        )
    problems: list[str] = []
    known = {s.name for s in specs}
    unknown = sorted(set(feeds) - known, key=str)  # names may not all be str
    missing = [s.name for s in specs if s.name not in feeds and not s.is_optional]
    if unknown:
        problems.append(f"unknown input name(s) {unknown}")
    if missing:
        problems.append(f"missing input(s) {missing}")
    values: dict[str, Any] = {}
    symbols = _Symbols()
    for spec in specs:
        if spec.name not in feeds:
            if spec.is_optional:
                values[spec.name] = None
            continue
        values[spec.name] = _check_value(spec, feeds[spec.name], symbols, problems)
    if problems:
        expected = "; ".join(str(s) for s in specs)
        raise InputError("bad inputs: " + "; ".join(problems) + f". The model takes {expected}")
    return values, symbols.values


class FeedChecker:
    """check_feeds for one signature, remembering the last accepted call.

    A call whose inputs are all plain tensors given as C-contiguous numpy arrays of exactly the
    dtypes and shapes of the last accepted call passes without the full check (its result,
    symbols included, would be the same); any other call takes check_feeds, errors and all.
    """

    def __init__(self, specs: tuple[TensorSpec, ...]) -> None:
        self.specs = specs
        self._plain = all(s.kind == TENSOR and s.dtype != "object" for s in specs)
        # ((name, dtype, shape, narrow) per input, symbols) of the last accepted call
        self._last: tuple[tuple[tuple[str, np.dtype, tuple[int, ...], bool], ...],
                          dict[str, int]] | None = None

    def __call__(self, feeds: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
        last = self._last
        if last is not None and type(feeds) is dict and len(feeds) == len(last[0]):
            values: dict[str, Any] = {}
            for name, dtype, shape, narrow in last[0]:
                value = feeds.get(name)
                if (type(value) is not np.ndarray or value.dtype is not dtype
                        or value.shape != shape or not value.flags.c_contiguous):
                    break
                values[name] = value.view(np.uint8) if narrow else value
            else:
                return values, dict(last[1])
        values, symbols = check_feeds(self.specs, feeds)
        if self._plain:
            self._last = (tuple((s.name, feeds[s.name].dtype, feeds[s.name].shape,
                                 is_narrow(feeds[s.name].dtype))
                                for s in self.specs if type(feeds[s.name]) is np.ndarray),
                          dict(symbols))
            if len(self._last[0]) != len(self.specs):
                self._last = None  # an input given as a list or an ndarray subclass
        return values, symbols
