"""Session.run's per-call shortcuts (FeedChecker's repeat-call path, the output-check cache,
the CPU executable's staged input buffers) must give exactly what the full checks give:
the same arrays, the same errors, the same numbers. Structure only; no timing."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from lepton_edge.errors import DeviceError, InputError
from lepton_edge.signature import FeedChecker, TensorSpec, check_feeds
from tests.conftest import mlp, ort_run

SPECS = (TensorSpec("a", "float32", ("N", 3)), TensorSpec("b", "int64", ("N",)))


def _feeds(n: int = 2) -> dict[str, np.ndarray]:
    return {"a": np.ones((n, 3), np.float32), "b": np.arange(n, dtype=np.int64)}


def _error(call, feeds) -> str:
    with pytest.raises(InputError) as info:
        call(feeds)
    return str(info.value)


def test_a_repeated_call_returns_what_check_feeds_returns(monkeypatch) -> None:
    from lepton_edge import signature

    full: list[int] = []

    def counted(specs, feeds):
        full.append(1)
        return check_feeds(specs, feeds)

    monkeypatch.setattr(signature, "check_feeds", counted)
    checker = FeedChecker(SPECS)
    for n in (2, 2, 5, 5, 2):  # first call, repeat, new batch, repeat, back
        feeds = _feeds(n)
        got, symbols = checker(feeds)
        want, want_symbols = check_feeds(SPECS, feeds)
        assert symbols == want_symbols == {"N": n}
        assert list(got) == list(want)
        for name in want:
            assert got[name] is feeds[name]  # contiguous arrays pass through uncopied
            assert want[name] is feeds[name]
    assert len(full) == 3  # the repeats took the fast path (first call, n=5, back to n=2)


@pytest.mark.parametrize("bad", [
    {"a": np.ones((2, 3), np.float64), "b": np.arange(2, dtype=np.int64)},  # dtype
    {"a": np.ones((2, 4), np.float32), "b": np.arange(2, dtype=np.int64)},  # fixed dim
    {"a": np.ones((2, 3), np.float32), "b": np.arange(3, dtype=np.int64)},  # symbol clash
    {"a": np.ones((2, 3), np.float32), "c": np.arange(2, dtype=np.int64)},  # name
    {"a": np.ones((2, 3), np.float32)},  # missing
    {"a": np.ones((2, 3), np.float32), "b": None},
    {"a": np.ones((2, 3), np.float32), "b": [0, 1]},  # a list: converted, then accepted
])
def test_after_a_good_call_other_feeds_get_the_full_check(bad) -> None:
    checker = FeedChecker(SPECS)
    checker(_feeds(2))  # primes the repeat-call path
    try:
        want = check_feeds(SPECS, bad)
    except InputError as exc:
        assert _error(checker, bad) == str(exc)
        return
    got = checker(bad)
    assert got[1] == want[1]
    for name, value in want[0].items():
        np.testing.assert_array_equal(got[0][name], value)


def test_non_contiguous_and_subclassed_arrays_are_made_contiguous() -> None:
    checker = FeedChecker(SPECS)
    checker(_feeds(2))
    wide = np.ones((2, 6), np.float32)
    got, _ = checker({"a": wide[:, ::2], "b": np.arange(2, dtype=np.int64)})
    assert got["a"].flags.c_contiguous
    masked = {"a": np.ma.masked_array(np.ones((2, 3), np.float32)),
              "b": np.arange(2, dtype=np.int64)}
    got, _ = checker(masked)
    assert type(got["a"]) is type(check_feeds(SPECS, masked)[0]["a"])


def test_narrow_inputs_come_back_as_their_bytes_on_every_call() -> None:
    specs = (TensorSpec("q", "float8_e4m3fn", (4,)),)
    checker = FeedChecker(specs)
    q = np.array([0.5, 1, 2, -4], ml_dtypes.float8_e4m3fn)
    for _ in range(3):
        got, _ = checker({"q": q})
        assert got["q"].dtype == np.uint8
        np.testing.assert_array_equal(got["q"], q.view(np.uint8))


def test_optional_and_sequence_inputs_always_take_the_full_check() -> None:
    specs = (TensorSpec("s", "float32", (2,), kind="sequence"),)
    checker = FeedChecker(specs)
    for _ in range(2):
        got, _ = checker({"s": [np.zeros(2, np.float32)]})
        assert isinstance(got["s"], list)
    assert "expected a list of arrays" in _error(checker, {"s": np.zeros(2, np.float32)})


def test_session_repeats_match_onnxruntime_and_rebind_the_batch(build) -> None:
    model = mlp()
    _, session = build(model)
    rng = np.random.default_rng(1)
    for n in (1, 1, 4, 4, 1):
        x = rng.standard_normal((n, 4)).astype(np.float32)
        kept = x.copy()
        y = session.run({"x": x})["y"]
        assert y.shape == (n, 3)
        np.testing.assert_allclose(y, ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(x, kept)  # the caller's input is never written
    big = rng.standard_normal((8192, 4)).astype(np.float32)  # past the staged-buffer size
    np.testing.assert_allclose(session.run({"x": big})["y"], ort_run(model, {"x": big})["y"],
                               rtol=1e-4, atol=1e-5)
    for n in (1, 1, 4):  # after an unstaged call, the repeat shortcut starts over
        x = rng.standard_normal((n, 4)).astype(np.float32)
        np.testing.assert_allclose(session.run({"x": x})["y"], ort_run(model, {"x": x})["y"],
                                   rtol=1e-5, atol=1e-6)


def test_a_wrong_output_is_caught_after_good_calls(build, monkeypatch) -> None:
    _, session = build(mlp())
    x = np.ones((2, 4), np.float32)
    session.run({"x": x})
    session.run({"x": x})  # this dtype/shape is now remembered as checked
    executable = session._subgraphs[0].executable
    real = type(executable).run
    monkeypatch.setattr(type(executable), "run",
                        lambda self, inputs: [real(self, inputs)[0].astype(np.float64)])
    with pytest.raises(DeviceError, match="float64"):
        session.run({"x": x})
    monkeypatch.setattr(type(executable), "run", lambda self, inputs: [np.zeros((2, 5))])
    with pytest.raises(DeviceError, match="expected float32"):
        session.run({"x": x})
    monkeypatch.setattr(type(executable), "run", real)
    session.run({"x": x})
