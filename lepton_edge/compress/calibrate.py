"""Calibration data in the forms users have it, as a stream of feed dicts.

Accepted: one array (single-input models), a dict of stacked arrays by input name, an
iterable of feed dicts, or a folder of .npy files (either `<input name>.npy` stacked arrays,
or, for a single-input model, any number of .npy batches). Stacked arrays are cut into
batches along axis 0.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.errors import InputError
from lepton_edge.signature import TensorSpec, check_feeds


def calibration_batches(
    data: Any, inputs: tuple[TensorSpec, ...], batch_size: int = 16
) -> list[dict[str, np.ndarray]]:
    """Normalise `data` into a list of checked feed dicts."""
    names = [s.name for s in inputs]
    if isinstance(data, str | os.PathLike):
        data = _from_folder(Path(data), names)
    if isinstance(data, np.ndarray):
        if len(names) != 1:
            raise InputError(f"one calibration array given, but the model has inputs {names}; "
                             "pass a dict of arrays by input name")
        data = {names[0]: data}
    if isinstance(data, dict):
        batches = list(_split(data, batch_size))
    elif isinstance(data, Iterable):
        batches = list(data)
    else:
        raise InputError(f"calibration data of type {type(data).__name__} is not supported; "
                         "pass arrays, a dict of arrays, feed dicts or a folder of .npy files")
    if not batches:
        raise InputError("calibration data is empty")
    checked = []
    for index, feeds in enumerate(batches):
        try:
            arrays, _ = check_feeds(inputs, feeds)
        except InputError as exc:
            raise InputError(f"calibration batch {index}: {exc}") from None
        checked.append(arrays)
    return checked


def _split(stacked: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    lengths = {name: len(np.asarray(a)) for name, a in stacked.items()}
    if len(set(lengths.values())) != 1:
        raise InputError(f"calibration arrays have different sample counts: {lengths}")
    total = next(iter(lengths.values()))
    for start in range(0, total, batch_size):
        yield {name: np.asarray(a)[start:start + batch_size] for name, a in stacked.items()}


def _from_folder(folder: Path, names: list[str]) -> Any:
    if not folder.is_dir():
        raise InputError(f"calibration folder not found: {folder}")
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise InputError(f"no .npy files in calibration folder {folder}")
    by_name = {f.stem: f for f in files}
    if all(n in by_name for n in names):
        return {n: np.load(by_name[n], allow_pickle=False) for n in names}
    if len(names) == 1:
        return [{names[0]: np.load(f, allow_pickle=False)} for f in files]
    raise InputError(f"{folder} must hold one stacked <input>.npy per input {names}")
