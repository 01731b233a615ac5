"""When the packed int8 kernels (lowering/x86_int8.py) use the thread pool: only for work that
pays for a launch (schedules.PARALLEL_MIN_WORK times x86_int8.int8_work_scale multiply-adds).
A kernel with a symbolic batch holds both schedules and picks one per call from N x its
per-sample work (schedules._with_parallel_variant); both give the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

import lepton_edge
from lepton_edge.lowering import schedules, x86_int8
from tests.targets.test_default_schedules import _batch_branches, _holds, _loop_kinds
from tests.targets.test_int8_lowering import CASES, qdq_model, reference
from tests.targets.test_vnni import CASCADELAKE, needs_dot, single_op_module

tvm = pytest.importorskip("tvm")
tirx = tvm.tirx
HASWELL = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
rng = np.random.default_rng(5)


def _scheduled(batch: object, target: object) -> tuple[tirx.PrimFunc, schedules.ScheduleReport]:
    """A uint8 [batch, 64] x int8 [64, 64] matmul (4096 multiply-adds a row), packed and
    scheduled by the default-schedule pass."""
    weight = rng.integers(-128, 128, (64, 64)).astype(np.int8)
    mod, packed = x86_int8.pack_int8_kernels(single_op_module("matmul", [batch, 64], weight))
    assert len(packed) == 1, packed
    report = schedules.ScheduleReport()
    mod = schedules.apply_default_schedules(mod, target, report=report)
    (func,) = [f for g, f in mod.functions_items()
               if isinstance(f, tirx.PrimFunc) and report.rules.get(g.name_hint, "")
               .startswith("int8:")]
    return func, report


@pytest.mark.parametrize("target, first_parallel", [
    (CASCADELAKE, (schedules.PARALLEL_MIN_WORK * 4) // 4096),  # vpdpbusd: 4 a lane
    (HASWELL, (schedules.BATCH_PARALLEL_MIN_WORK * 2) // 4096),  # int16 vpmaddwd: 2
])
def test_symbolic_batch_kernel_goes_parallel_from_its_work(target, first_parallel: int) -> None:
    func, report = _scheduled(tirx.Var("N", "int64"), target)
    branches = _batch_branches(func)
    assert branches is not None, func.script()
    cond, parallel, serial = branches
    assert not _holds(cond, first_parallel - 1) and _holds(cond, first_parallel), cond
    assert "parallel" in _loop_kinds(func.with_body(parallel))
    assert "parallel" not in _loop_kinds(func.with_body(serial))
    (name,) = report.variants
    assert report.variants[name] == "parallel for large batches"


def test_the_two_schedules_stage_into_their_own_buffers() -> None:
    """A staging buffer both branches wrote would be allocated whole above them, outside the
    parallel loop that fills it per channel (schedules._fresh_buffers): the int8 max pool of
    the digits CNN's shape, whose planes are padded per channel."""
    relax = tvm.relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([tirx.Var("N", "int64"), 32, 8, 8], "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, (2, 2), (2, 2))))
        bb.emit_func_output(out)
    mod, packed = x86_int8.pack_int8_kernels(bb.get(), CASCADELAKE)
    assert len(packed) == 1 and packed[0].startswith("max_pool2d"), packed
    report = schedules.ScheduleReport()
    mod = schedules.apply_default_schedules(mod, CASCADELAKE, report=report)
    (func,) = [f for g, f in mod.functions_items() if report.rules.get(g.name_hint, "")
               .startswith("int8:")]
    branches = _batch_branches(func)
    assert branches is not None, func.script()
    _, parallel, serial = branches

    def written(stmt: object) -> list[object]:
        found = []
        for node in schedules._statements(stmt):
            if type(node).__name__ == "SBlock":
                found += [w.source for w in node.writes]
        return found

    ours = [b for b in written(parallel) if not any(b.same_as(p) for p in func.params)]
    theirs = written(serial)
    assert any("pad" in b.name for b in ours)  # the staged planes
    assert not [b.name for b in ours if any(b.same_as(t) for t in theirs)]


@pytest.mark.parametrize("batch, parallel", [(1, False), (512, True)])
def test_static_batch_kernel_goes_parallel_from_its_work(batch: int, parallel: bool) -> None:
    func, report = _scheduled(batch, CASCADELAKE)
    assert _batch_branches(func) is None and not report.variants
    assert ("parallel" in _loop_kinds(func)) == parallel, func.script()


@needs_dot
@pytest.mark.parametrize("case, large", [("conv", 2048), ("matmul", 32768)])
def test_both_schedules_are_bit_exact(case: str, large: int, build,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch 1 runs the serial schedule, `large` the parallel one on VNNI and AVX2 hosts
    alike (thresholds as checked above: 2^19 and 2^22 multiply-adds; these kernels do 2592
    and 240 a sample)."""
    monkeypatch.setenv(x86_int8.DOT_ENV, "on")  # also on AVX2-only hosts
    model, p = qdq_model(**CASES[case])
    _, session = build(lepton_edge.load(model))
    shape = [d for d in session.inputs[0].shape if not isinstance(d, str)]
    for batch in (1, large):
        x_q = rng.integers(-128, 128, (batch, *shape)).astype(np.int8)
        np.testing.assert_array_equal(session.run({"x_q": x_q})["y_q"], reference(x_q, p))
