"""MetaSchedule tuning into a persistent database, and reuse of that database.

One small tuning run (8 trials, ~15-20 s on 2 cores) shared by the tests through a module
fixture; the reuse checks are timing-independent (record counts and the build's log).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import ort_run

tvm = pytest.importorskip("tvm")

from lepton_edge.lowering import relax as lowering  # noqa: E402
from lepton_edge.lowering import tuning  # noqa: E402


def matmul_relu_model() -> onnx.ModelProto:
    """x [N, 64] @ w [64, 64] -> Relu, batch dimension symbolic."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        "matmul_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 64])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def cpu_target() -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": lowering.system_cpu(), "num-cores": 2})


class Tuned:
    def __init__(self, db: Path) -> None:
        self.model = matmul_relu_model()
        self.mod = lowering.import_onnx(self.model)
        self.db = db
        self.logs: list[str] = []
        self.executable = self.build(trials=8)
        self.records = tuning.count_records(db)

    def build(self, trials: int, log: Callable[[str], None] | None = None) -> object:
        return tuning.tune_and_build(self.mod, cpu_target(), trials=trials, database_dir=self.db,
                                     log=log or self.logs.append)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Tuned:
    return Tuned(tmp_path_factory.mktemp("tuning-db"))


def run(executable: object, x: np.ndarray) -> np.ndarray:
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_tuning_writes_records_and_logs_progress(tuned: Tuned) -> None:
    # Buckets N=1 and N=64 are two static kernels: 4 trials each, plus one measurement of
    # each kernel's default schedule (the baseline a tuned schedule must beat).
    assert 10 <= tuned.records <= 12  # + a re-measured default per kernel it beat head to head
    text = "\n".join(tuned.logs)
    assert "specialising N to [1, 64]" in text
    assert "tuning 2 of 2 kernels, 8 trials" in text
    assert "default schedules measured as the baseline" in text
    assert "no default-schedule baseline" not in text
    assert "kernels: 2 from the tuning database" in text


@pytest.mark.parametrize("batch", [1, 64, 3])  # 3 is no bucket: the untuned symbolic kernel
def test_tuned_outputs_match_onnxruntime(tuned: Tuned, batch: int) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 64)).astype(np.float32)
    want = ort_run(tuned.model, {"x": x})["z"]
    got = run(tuned.executable, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_second_build_reuses_the_database(tuned: Tuned) -> None:
    logs: list[str] = []
    executable = tuned.build(trials=0, log=logs.append)
    assert tuning.count_records(tuned.db) == tuned.records
    assert not any(line.startswith("tuning ") for line in logs), logs
    assert any("kernels: 2 from the tuning database" in line for line in logs), logs
    x = np.random.default_rng(7).standard_normal((64, 64)).astype(np.float32)
    np.testing.assert_allclose(run(executable, x), ort_run(tuned.model, {"x": x})["z"],
                               rtol=1e-5, atol=1e-5)

    # Same budget again: every kernel already has its share of records, nothing is measured.
    logs.clear()
    tuned.build(trials=8, log=logs.append)
    assert tuning.count_records(tuned.db) == tuned.records
    assert any("nothing to tune" in line for line in logs), logs


def test_symbolic_kernels_are_not_tuned_without_buckets(tmp_path: Path) -> None:
    logs: list[str] = []
    mod = lowering.import_onnx(matmul_relu_model())
    tuning.tune_and_build(mod, cpu_target(), trials=4, database_dir=tmp_path, log=logs.append,
                          buckets={})
    assert tuning.count_records(tmp_path) == 0
    assert any("symbolic shapes or scalar parameters stay untuned" in line for line in logs), logs
    assert any("no tunable kernels" in line for line in logs), logs


def test_errors_are_clear(tmp_path: Path) -> None:
    mod = lowering.import_onnx(matmul_relu_model())
    with pytest.raises(tuning.TuningError, match="trials must be >= 0"):
        tuning.tune_and_build(mod, cpu_target(), trials=-1, database_dir=tmp_path)
    with pytest.raises(tuning.TuningError, match="LLVM"):
        tuning.tune_and_build(mod, tvm.target.Target({"kind": "cuda", "arch": "sm_80"}),
                              trials=0, database_dir=tmp_path)
    with pytest.raises(tuning.TuningError, match="symbolic dims are"):
        tuning.tune_and_build(mod, cpu_target(), trials=0, database_dir=tmp_path,
                              buckets={"batch": [1]})


def test_default_database_dir_is_per_target() -> None:
    a = tuning.default_database_dir(cpu_target())
    b = tuning.default_database_dir(tvm.target.Target({"kind": "llvm", "mcpu": "cortex-a72",
                                                       "mtriple": "aarch64-linux-gnu"}))
    assert a.parent == Path.home() / ".cache" / "lepton-edge" / "tuning"
    assert a != b and a.parent == b.parent


def test_compile_api_reuses_the_fixture_database(tuned: Tuned, tmp_path: Path) -> None:
    """lepton_edge.compile(tune=, tuning_db=) goes through the same database: with the
    fixture's records for this model, tune=0 applies them and measures nothing."""
    import lepton_edge

    logs: list[str] = []
    art = lepton_edge.compile(tuned.model, ["cpu"], tuning_db=tuned.db, log=logs.append)
    assert art.manifest["subgraphs"][0]["builds"][0]["meta"]["tuned"]["trials"] == 0
    assert tuning.count_records(tuned.db) == tuned.records
    assert any("from the tuning database" in line for line in logs), logs
    session = lepton_edge.runtime.load(art.save(tmp_path / "t.lepton"), self_test=True)
    x = np.random.default_rng(9).standard_normal((64, 64)).astype(np.float32)
    np.testing.assert_allclose(session.run({"x": x})["z"], ort_run(tuned.model, {"x": x})["z"],
                               rtol=1e-5, atol=1e-5)


def test_cross_builds_cannot_be_tuned_here() -> None:
    import shutil

    import lepton_edge
    from lepton_edge.errors import TargetError

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs g++-aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")
    with pytest.raises(TargetError, match="measured on the device itself"):
        lepton_edge.compile(matmul_relu_model(), ["rpi4"], tune=8, fallback=False)


def test_fixture_records_are_counted_per_task(tuned: Tuned) -> None:
    """The share check counts every record of a kernel (failed ones too), per kernel."""
    from tvm.s_tir import meta_schedule as ms

    target = cpu_target()
    prepared = tuning._prepare(tuning.specialize(tuned.mod, {"N": [1, 64]}), target)
    tasks = tuning._tunable_tasks(prepared, target, lambda _msg: None)
    database = ms.database.JSONDatabase(work_dir=str(tuned.db), module_equality="structural")
    counts = tuning._records_per_task(database, tasks)  # 4 trials + baseline (+ re-measure)
    assert len(counts) == 2 and all(c in (5, 6) for c in counts), counts
    assert sum(counts) == tuned.records


def gather_after_matmul_model() -> onnx.ModelProto:
    """x [N, 64] @ w -> Gather(columns 3, 0, 7): the gather kernel reads its indices from a
    buffer, which MetaSchedule's runner would fill with random (out-of-bounds) values."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    idx = numpy_helper.from_array(np.array([3, 0, 7], np.int64), "idx")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Gather", ["y", "idx"], ["z"], axis=1)],
        "matmul_gather",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
        [w, idx],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_gathers_and_scalar_parameter_kernels_are_not_tuned() -> None:
    """MetaSchedule's runner feeds random buffers and cannot feed scalars: a gather (its
    indices would be out of bounds: the measuring process crashes) and a kernel taking the
    batch size as a scalar (``Unsupported argument type``) are left out of the tasks."""
    from tvm.s_tir import meta_schedule as ms

    target = cpu_target()
    prepared = tuning._prepare(
        tuning.specialize(lowering.import_onnx(gather_after_matmul_model()), {"N": [1]}), target)
    everything = {t.task_name: t for t in ms.relax_integration.extract_tasks(prepared, target)}
    gathers = {n for n, t in everything.items()
               if tuning._has_data_dependent_index(t.dispatched[0]["main"])}
    assert gathers and all(n.startswith("take") for n in gathers), everything
    logs: list[str] = []
    kept = tuning._tunable_tasks(prepared, target, logs.append)
    names = {t.task_name for t in kept}
    assert names and not names & gathers
    assert any(n.startswith("matmul") for n in names), names  # the static N=1 matmul stays
    for task in kept:  # every kept kernel has static buffer parameters only
        assert all(getattr(p, "shape", None) is not None for p in task.dispatched[0]["main"].params)
    text = "\n".join(logs)
    assert "data-dependent indices (gathers) stay untuned" in text
    assert "symbolic shapes or scalar parameters stay untuned" in text and "shape_to_tensor" in text


def conv_relu_model() -> onnx.ModelProto:
    """x [1, 16, 10, 10] -> 3x3 Conv (16 -> 16, pad 1, bias) -> Relu: NCHWc-convertible."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["y"], ["z"])],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 10, 10])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16, 10, 10])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tuned_convolutions_use_the_untuned_builds_layout(tmp_path: Path) -> None:
    """A tuned build tunes the same channel-blocked (NCHWc) convolution kernel the untuned
    build runs (lowering/nchwc.py), so tuning competes with that kernel's default schedule,
    not with a slower NCHW convolution; a build from the database (here an empty one: tuning a
    convolution for real takes ~1 min, measured) runs that kernel and matches onnxruntime."""
    model = conv_relu_model()
    mod = lowering.import_onnx(model)
    target = cpu_target()
    logs: list[str] = []
    prepared = tuning._prepare(mod, target, logs.append)
    names = [t.task_name for t in tuning._tunable_tasks(prepared, target, lambda _m: None)]
    assert any(n.startswith("fused_conv2d_nchwc") for n in names), names
    assert not any(n.startswith("conv2d") and "nchwc" not in n for n in names), names
    from lepton_edge.lowering.schedules import vector_bits

    blocked = f"NCHW{vector_bits(target) // 32}c"  # 8c on AVX2, 16c on AVX-512
    assert any(blocked in line for line in logs), logs
    executable = tuning.tune_and_build(mod, target, trials=0, database_dir=tmp_path / "db",
                                       log=logs.append)
    assert any("kernels: 0 from the tuning database" in line for line in logs), logs
    x = np.random.default_rng(3).standard_normal((1, 16, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(run(executable, x), ort_run(model, {"x": x})["z"], rtol=1e-4,
                               atol=1e-4)


def test_let_bound_math_is_not_tuned() -> None:
    """MetaSchedule stops the whole search on a let-bound expression ("Do not have a default
    for prim.Let"; BERT-base's softmax, measured): kernels using VectorMath's exp / erf keep
    their default schedules and the rest is tuned."""
    w = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Softmax", ["y"], ["z"], axis=-1)],
        "matmul_softmax", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    target = cpu_target()
    prepared = tuning._prepare(lowering.import_onnx(model), target)
    logs: list[str] = []
    names = {t.task_name for t in tuning._tunable_tasks(prepared, target, logs.append)}
    assert any(n.startswith("matmul") for n in names) and not any("softmax" in n for n in names)
    assert any("let-bound math (exp, erf) keep the default schedules: softmax" in line
               for line in logs), logs


def test_specialize_gives_each_bucket_its_own_static_kernels() -> None:
    """Kernels written for the symbolic batch before specialising (the int8 lowering's
    requantizations) stay with main_generic; each bucket calls a static copy (FuseTIR
    failed on a static call site of a symbolic kernel: "no definition of requantize")."""
    from tvm import relax, te

    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 4], "float32"))

    def double(a: te.Tensor) -> te.Tensor:
        return te.compute(a.shape, lambda i, j: a[i, j] * 2.0, name="double")

    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.call_te(double, x, primfunc_name_hint="double"))
        bb.emit_func_output(y)
    mod = tuning.specialize(bb.get(), {"n": [1, 8]})
    names = sorted(gv.name_hint for gv, _ in mod.functions_items())
    assert names == ["double", "double_n1", "double_n8", "main", "main_generic", "main_n1",
                     "main_n8"], names
    for suffix, rows in (("n1", 1), ("n8", 8)):
        shape = [int(d) for d in mod[f"double_{suffix}"].params[0].ty.shape]
        assert shape == [rows, 4]
        assert f"double_{suffix}" in mod[f"main_{suffix}"].script()
    assert "double_n" not in mod["main_generic"].script()
    executable = tvm.compile(mod, target="llvm")
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    for rows in (1, 8, 3):
        data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(data)).numpy(), data * 2)


def test_specialize_binds_compound_scalar_arguments() -> None:
    """A kernel that takes a scalar computed from the batch (here 2 * n) gets a
    static copy per bucket, the scalar's value folded in: bound, `2 * n` is the expression
    2 * 1, not yet an integer, and such a call site used to keep the symbolic kernel."""
    from tvm import relax
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def scale(a_h: T.handle, m: T.int64, b_h: T.handle) -> None:
        n = T.int64()
        a = T.match_buffer(a_h, (n, 4), "float32")
        b = T.match_buffer(b_h, (n, 4), "float32")
        for i, j in T.grid(n, 4):
            with T.sblock("b"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] * T.Cast("float32", m)

    n = tvm.tirx.Var("n", "int64")
    x = relax.Var("x", relax.TensorType([n, 4], "float32"))
    bb = relax.BlockBuilder()
    gv = bb.add_func(scale, "scale")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, [x, relax.expr.prim_value(n * 2)],
                                              relax.TensorType([n, 4], "float32")))
        bb.emit_func_output(y)
    mod = tuning.specialize(bb.get(), {"n": [1, 8]})
    names = sorted(gv.name_hint for gv, _ in mod.functions_items())
    assert {"scale_n1", "scale_n8"} <= set(names), names
    for suffix, rows in (("n1", 1), ("n8", 8)):
        kernel = mod[f"scale_{suffix}"]
        assert [int(d) for d in kernel.params[0].ty.shape] == [rows, 4]
        assert len(kernel.params) == 2  # the scalar is bound and dropped
        assert f"scale_{suffix}" in mod[f"main_{suffix}"].script()
    executable = tvm.compile(mod, target="llvm")
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    for rows in (1, 8, 3):
        data = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(data)).numpy(),
                                      data * 2 * rows)
