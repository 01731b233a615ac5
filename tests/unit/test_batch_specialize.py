"""Untuned CPU builds of models with a symbolic batch also carry a static copy of `main` for
batch 1 (issue #7: lowering/tuning.py BatchEntries), which the runtime calls for inputs of
exactly its shapes (targets/cpu/device.py). Numbers against onnxruntime at N=1 and N=3,
the batch-1 entry against the symbolic main of the same build, and structure: which entry
functions a build has and which one each call runs. Also the tuned builds' specialize() on
int8 modules, whose requantize kernels it used to lose."""

from __future__ import annotations

import re
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm.runtime.vm import VirtualMachine

import lepton_edge
from lepton_edge.errors import InputError, TargetError
from lepton_edge.lowering import relax as lrelax
from lepton_edge.lowering.tuning import BatchEntries, bound_suffix, specialize
from lepton_edge_targets.cpu.device import TvmVmExecutable
from tests.conftest import assert_close, ort_run, spec_output


def cnn(batch: str | int = "N") -> onnx.ModelProto:
    """x[batch, 2, 6, 6] -> Conv 3x3 -> Relu -> MaxPool 2 -> Flatten -> Gemm -> y[batch, 5]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((36, 5)).astype(np.float32), "fc"),
        numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "fb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2],
                         name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], name="gemm"),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 2, 6, 6)).astype(np.float32)}


def cpu_build(art: lepton_edge.Artifact, folder: Path) -> tuple[Path, dict]:
    """The artifact's one CPU build: its library written to `folder` under a new name (never
    over a library already loaded: rewriting a mapped .so in place crashed the interpreter
    at exit with SIGBUS), and its meta."""
    (sg,) = art.manifest["subgraphs"]
    (build,) = [b for b in sg["builds"] if b["target"] == "cpu"]
    path = folder / f"lib{len(list(folder.glob('lib*.so')))}.so"
    path.write_bytes(art.files[build["files"]["lib.so"]])
    return path, build["meta"]


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("fp32")
    model = cnn()
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], fallback=False,
                              batch_buckets=(1, 2))
    lib, meta = cpu_build(art, folder)
    return model, art.save(folder / "cnn.lepton"), lib, meta


def test_the_build_lists_its_entries_and_has_both_functions(fp32) -> None:
    _, _, lib, meta = fp32
    assert meta["batch_entries"] == [
        {"function": "main_N1", "batch": 1, "inputs": [[1, 2, 6, 6]], "batch_input": 0},
        {"function": "main_N2", "batch": 2, "inputs": [[2, 2, 6, 6]], "batch_input": 0}]
    vm = VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    x1 = tvm.runtime.tensor(feeds(1)["x"])
    generic, entry = vm["main"](x1).numpy(), vm["main_N1"](x1).numpy()
    np.testing.assert_array_equal(entry, generic)  # the same kernels: bit-identical
    with pytest.raises(Exception, match="(?i)shape|match"):  # the entry is static: N=3 refused
        vm["main_N1"](tvm.runtime.tensor(feeds(3)["x"]))
    assert vm["main"](tvm.runtime.tensor(feeds(3)["x"])).numpy().shape == (3, 5)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_outputs_match_onnxruntime(fp32, n: int) -> None:
    model, path, _, _ = fp32
    session = lepton_edge.runtime.load(path, self_test=True)  # golden batches 1 and 2
    assert_close(session.run(feeds(n, seed=n)), ort_run(model, feeds(n, seed=n)), rel=1e-5)


def test_the_runtime_calls_an_entry_only_for_its_shapes(fp32) -> None:
    _, _, lib, meta = fp32
    exe = TvmVmExecutable(lib, meta["batch_entries"])
    calls: list[str] = []

    def spy(name: str, fn):
        def call(*args):
            calls.append(name)
            return fn(*args)
        return call

    exe._main = spy("main", exe._main)
    exe._entries = {key: (shapes, spy(f"N{shapes[0][0]}", fn))
                    for key, (shapes, fn) in exe._entries.items()}
    for n in (1, 3, 2, 1, 5):
        (out,) = exe.run([feeds(n)["x"]])
        assert out.shape == (n, 5)
    assert calls == ["N1", "main", "N2", "N1", "main"]
    plain = TvmVmExecutable(lib)  # no entries given (an older manifest): main for everything
    np.testing.assert_allclose(plain.run([feeds(1)["x"]])[0], exe.run([feeds(1)["x"]])[0],
                               rtol=1e-5, atol=1e-6)


def test_no_entries_when_turned_off_static_or_two_symbolic_dims(tmp_path: Path) -> None:
    off = lepton_edge.compile(lepton_edge.load(cnn()), ["cpu"], golden_count=0,
                              fallback=False, batch_buckets=())
    lib, meta = cpu_build(off, tmp_path)
    assert "batch_entries" not in meta
    vm = VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    with pytest.raises(Exception, match="main_N1"):
        vm["main_N1"]
    static = lepton_edge.compile(lepton_edge.load(cnn(batch=1)), ["cpu"], golden_count=0,
                                 fallback=False)
    assert "batch_entries" not in cpu_build(static, tmp_path)[1]

    # x[N, S, 4] @ w: two symbolic dims, so a batch-1 copy would still be symbolic: none made
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 3)).astype(
        np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "S", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "S", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], golden_count=0, fallback=False)
    assert "batch_entries" not in cpu_build(art, tmp_path)[1]
    session = lepton_edge.runtime.load(art.save(tmp_path / "seq.lepton"))
    for shape in ((1, 2, 4), (3, 5, 4)):
        x = {"x": np.random.default_rng(2).standard_normal(shape).astype(np.float32)}
        assert_close(session.run(x), ort_run(model, x), rel=1e-5)


def test_entries_are_added_after_fusion_and_share_main_s_kernels() -> None:
    mod = lrelax.import_onnx(cnn())
    with tvm.target.Target({"kind": "llvm"}):
        for step in lrelax.legalize_passes():  # legalize, fuse: as the CPU pipeline does
            mod = step(mod)
    kernels = {gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)}
    main = mod["main"]
    assert BatchEntries(())(mod).same_as(mod)
    entries = BatchEntries((2, 1, 2))
    out = entries(mod)
    assert entries.error is None
    assert [e["function"] for e in entries.made] == ["main_N1", "main_N2"]
    tvm.ir.assert_structural_equal(out["main"], main)
    assert out["main_N1"].attrs["global_symbol"] == "main_N1"
    # no kernel of their own: the entries call main's (symbolic) kernels with static shapes
    assert {gv.name_hint for gv, f in out.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc)} == kernels
    called = {m.group(1) for m in re.finditer(r"R\.call_tir\((?:cls\.)?(\w+)",
                                               out["main_N1"].script())}
    assert called and called <= kernels
    with pytest.raises(TargetError, match="positive integers"):
        BatchEntries((0,))
    # names: an unnamed ONNX batch imports as e.g. "x_dim0"; a digit gets a separator
    assert [bound_suffix(b) for b in ({"N": 1}, {"x_dim0": 1}, {"a b": 2})] == [
        "N1", "x_dim0_1", "a_b2"]


@pytest.fixture(scope="module")
def int8_model() -> lepton_edge.Model:
    calib = np.random.default_rng(3).standard_normal((8, 2, 6, 6)).astype(np.float32)
    return lepton_edge.quantize(lepton_edge.load(cnn()), calib)


def test_int8_entry_is_bit_exact_with_the_symbolic_main(int8_model, tmp_path: Path) -> None:
    art = lepton_edge.compile(int8_model, ["cpu"], fallback=False)
    lib, meta = cpu_build(art, tmp_path)
    assert [e["function"] for e in meta["batch_entries"]] == ["main_N1"]
    assert meta["int8_kernels"], "the QDQ convolution and Gemm were lowered to integer kernels"
    vm = VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    x1 = tvm.runtime.tensor(feeds(1, seed=4)["x"])
    np.testing.assert_array_equal(vm["main_N1"](x1).numpy(), vm["main"](x1).numpy())
    session = lepton_edge.runtime.load(art.save(tmp_path / "q.lepton"), self_test=True)
    step = art.manifest["output_quant_step"]["y"]
    for n in (1, 3):  # within one output quantization step of the QDQ semantics
        want = spec_output(int8_model.proto, feeds(n, seed=5))
        assert np.abs(session.run(feeds(n, seed=5))["y"] - want).max() <= step * (1 + 1e-5)


def test_specialize_keeps_and_specialises_the_int8_kernels(int8_model) -> None:
    # Tuned builds: specialize() rebuilt the module with fresh GlobalVars, losing the
    # requantize kernels main calls ("There is no definition of I.GlobalVar('requantize')"),
    # and a symbolic kernel called with static shapes stopped FuseTIR.
    mod, _ = lrelax.lower_int8(lrelax.import_onnx(int8_model.proto), float_requantize=True)
    kernels = [gv.name_hint for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels
    out = specialize(mod, {"N": [1]})
    names = {gv.name_hint for gv in out.get_global_vars()}
    assert {"main", "main_generic", "main_N1"} <= names
    assert set(kernels) <= names and {f"{k}_N1" for k in kernels} <= names
    for k in kernels:
        dims = [d for p in out[f"{k}_N1"].params for d in p.ty.shape]
        assert all(isinstance(d, tvm.tirx.IntImm) for d in dims), k
    with tvm.target.Target({"kind": "llvm"}):
        for step in lrelax.legalize_passes():  # FuseOps + FuseTIR: failed before the fix
            out = step(out)


def test_bad_batch_buckets_are_refused() -> None:
    from lepton_edge.cli import _batch_sizes

    for bad in ((0,), (1.5,), (True,), ("1",)):
        with pytest.raises(InputError, match="batch_buckets must be positive integers"):
            lepton_edge.compile(lepton_edge.load(cnn()), ["cpu"], batch_buckets=bad)
    with pytest.raises(InputError, match="applies to untuned builds"):  # not silently ignored
        lepton_edge.compile(lepton_edge.load(cnn()), ["cpu"], batch_buckets=(1, 8), tune=0,
                            tuning_db="unused")
    assert _batch_sizes("1,8") == (1, 8)
    assert _batch_sizes("none") == ()
    for bad_text in ("x", "0", "1,,2"):
        with pytest.raises(click.UsageError, match="--batch-buckets"):
            _batch_sizes(bad_text)
