"""The CPU device hands arrays to TVM through DLPack: every kind of numpy array a user may pass
(read-only, misaligned, strided, from np.load's mmap) must give the same numbers, and outputs
must be the caller's own copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import mlp, ort_run


def _placed(x: np.ndarray, offset: int) -> np.ndarray:
    """A copy of float32 `x` starting `offset` bytes past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 64 + offset, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset
    out = raw[start:start + x.nbytes].view(np.float32).reshape(x.shape)
    out[...] = x
    return out


def _variants(x: np.ndarray, tmp_path: Path) -> dict[str, np.ndarray]:
    readonly = _placed(x, 0)  # aligned, so only its read-only flag stands in DLPack's way
    readonly.flags.writeable = False
    misaligned = _placed(x, 4)
    wide = np.zeros((x.shape[0], x.shape[1] * 2), np.float32)
    wide[:, ::2] = x
    np.save(tmp_path / "x.npy", x)
    return {"plain": x, "readonly": readonly, "misaligned": misaligned,
            "strided": wide[:, ::2], "mmap": np.load(tmp_path / "x.npy", mmap_mode="r")}


def test_every_array_layout_gives_the_same_numbers(build, tmp_path: Path) -> None:
    model = mlp()
    _, session = build(model)
    x = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    want = ort_run(model, {"x": x})["y"]
    variants = _variants(x, tmp_path)
    assert variants["misaligned"].ctypes.data % 64 == 4
    assert not variants["strided"].flags.c_contiguous
    for name, array in variants.items():
        got = session.run({"x": array})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_outputs_are_independent_copies(build) -> None:
    _, session = build(mlp())
    x = np.ones((2, 4), np.float32)
    first = session.run({"x": x})["y"]
    kept = first.copy()
    first[...] = 0  # the caller owns its result
    second = session.run({"x": x})["y"]
    np.testing.assert_array_equal(second, kept)
    third = session.run({"x": 2 * x})["y"]
    np.testing.assert_array_equal(second, kept)  # a later run does not overwrite it
    assert not np.array_equal(third, kept)


def test_batch_one_with_odd_strides(build) -> None:
    model = mlp()
    _, session = build(model)
    row = np.arange(4, dtype=np.float32)
    base = np.zeros(1024 + 16, np.float32)
    base[:4] = row
    # one row whose batch axis has a 4096-byte stride: numpy calls it contiguous, DLPack
    # would hand TVM that stride
    odd = np.lib.stride_tricks.as_strided(base, (1, 4), (4096, 4))
    assert odd.flags.c_contiguous and odd.strides == (4096, 4)
    np.testing.assert_allclose(session.run({"x": odd})["y"],
                               ort_run(model, {"x": row[None]})["y"], rtol=1e-5, atol=1e-6)
    # (empty tensors reach the device through the conformance subset: test_tril_zero)
