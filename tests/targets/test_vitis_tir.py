"""The vitis kernels come from TVM TIR: the printer's C++ against TVM's own LLVM build of the
same PrimFunc, the kernels named after the Relax module's call_tir functions, and a TIR node
the printer has no exact form for keeps the subgraph on the CPU with that reason."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge_targets.vitis import hls, support, tir_lower
from tests.targets.test_vitis import qdq_float_model, vitis_registered  # noqa: F401

rng = np.random.default_rng(31)


def _prim_func():
    """Integer and float ops whose C++ semantics differ from TIR's if printed naively:
    floor division/modulo of negatives, int8 wrap-around, shifts, min/max, select, round half
    to even, float -> int truncation, a guarded (padding-style) load."""
    from tvm import te, tirx

    a = te.placeholder((64,), "int32", name="a")
    b = te.placeholder((64,), "int8", name="b")
    f = te.placeholder((64,), "float32", name="f")

    def body(i):
        d = tirx.const(7, "int32")
        fd = tirx.floordiv(a[i], d) * 1000 + tirx.floormod(a[i], d)
        wrap = (b[i] + tirx.const(100, "int8")).astype("int32")  # int8 wraps
        sh = (a[i] >> tirx.const(3, "int32")) + (a[i] << tirx.const(2, "int32"))
        mm = tirx.max(tirx.min(a[i], tirx.const(50, "int32")), tirx.const(-50, "int32"))
        sel = tirx.Select(a[i] < 0, fd, sh)
        rnd = tirx.round(f[i]).astype("int32") + (f[i] * tirx.const(3.5, "float32")).astype(
            "int32")
        pad = tirx.if_then_else(i > 0, a[tirx.max(i - 1, 0)], tirx.const(-7, "int32"))
        return fd + wrap * 3 + sel + mm * 11 + rnd * 13 + pad

    out = te.compute((64,), body, name="out")
    return te.create_prim_func([a, b, f, out]), (a, b, f)


def test_printed_tir_computes_what_tvm_compiles(tmp_path: Path) -> None:
    import tvm

    func, _ = _prim_func()
    a = rng.integers(-1000, 1000, 64).astype(np.int32)
    a[:8] = [-14, -13, -8, -7, -1, 0, 6, 7]
    b = rng.integers(-128, 128, 64).astype(np.int8)
    f = (rng.integers(-40, 40, 64) / np.float32(2)).astype(np.float32)  # exact halves
    # the reference: TVM's LLVM build of the same PrimFunc
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    want = tvm.runtime.tensor(np.zeros(64, np.int32))
    lib["main"](*[tvm.runtime.tensor(x) for x in (a, b, f)], want)
    lowered = tir_lower.lower_loops(func)
    text = hls.TirPrinter(lowered, "k0_out", ["a", "b", "f", "out"], 1, set(), [], 1).print()
    assert "lepton_floordiv<int32_t>" in text and "lepton_floormod<int32_t>" in text
    assert "nearbyintf(" in text and "#pragma HLS PIPELINE II=1" in text
    source = tmp_path / "k.cpp"
    source.write_text('#include <math.h>\n#include <stdint.h>\n' + hls._HELPERS + text
                      + 'extern "C" void run(const int32_t* a, const int8_t* b, const float* f,'
                      ' int32_t* out) { k0_out((const int32_t*)a, b, f, out); }\n')
    cmd = ["g++", *hls.CSIM_FLAGS, "-shared", "-fPIC", "-o", str(tmp_path / "k.so"),
           str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    got = np.zeros(64, np.int32)
    run = ctypes.CDLL(str(tmp_path / "k.so")).run
    run.argtypes, run.restype = [ctypes.c_void_p] * 4, None
    run(*[x.ctypes.data for x in (a, b, f, got)])
    np.testing.assert_array_equal(got, want.numpy())


def test_kernels_are_the_relax_modules_call_tir_functions() -> None:
    from tvm import relax

    model = lepton_edge.load(qdq_float_model("conv", relu=True))
    (sub,) = [sg.proto for sg in lepton_edge.partition(model, ["zcu104"]).subgraphs
              if sg.target == "vitis"]
    mod = tir_lower.relax_module(sub)
    calls = [b.value.args[0].name_hint for block in mod["main"].body.blocks
             for b in block.bindings if isinstance(b.value, relax.Call)]
    program = tir_lower.lower(sub, 8)
    assert program.kernel_names == calls
    # the conv kernel's reduction: fused, split into 8 unrolled lanes, the rest pipelined
    (conv,) = [k for k in program.kernels if "conv2d" in k.name]
    script = conv.func.script()
    assert '"lepton_hls": "unroll"' in script and '"lepton_hls": "pipeline"' in script
    assert conv.macs == 6 * 4 * 4 * 3 * 9 and conv.partitioned


def _sigmoid_model() -> onnx.ModelProto:
    consts = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
              [("sx", 0.05, np.float32), ("zx", 3, np.int8), ("sy", 1 / 256, np.float32),
               ("zy", -128, np.int8)]]
    nodes = [helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["xf"]),
             helper.make_node("Sigmoid", ["xf"], ["s"]),
             helper.make_node("QuantizeLinear", ["s", "sy", "zy"], ["y"])]
    graph = helper.make_graph(
        nodes, "sigmoid", [helper.make_tensor_value_info("x", TensorProto.INT8, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, ["N", 16])], consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_tir_node_the_printer_refuses_keeps_the_subgraph_on_the_cpu(monkeypatch,
                                                                      tmp_path: Path) -> None:
    """Sigmoid's TIR calls an exponential, which has no bit-exact C++ form: with vitis made to
    accept every node, the subgraph is still refused at compile time, with that reason, and
    runs on its CPU build."""
    from lepton_edge.target import Profile
    from lepton_edge_targets.vitis.compile import VitisTarget

    monkeypatch.setattr(support, "unsupported_reason", lambda node, graph: None)
    model = _sigmoid_model()
    notes = VitisTarget().notes(model, Profile("zcu104", "vitis", ""))
    assert len(notes) == 1 and "the HLS printer cannot print the TIR: TIR call" in notes[0]
    assert "sigmoid" in notes[0] or "exp" in notes[0], notes
    art = lepton_edge.compile(lepton_edge.load(model), ["zcu104", "cpu"])
    (sg,) = art.manifest["subgraphs"]
    assert sg["target"] == "vitis" and [b["target"] for b in sg["builds"]] == ["cpu"]
    assert "the HLS printer cannot print the TIR: TIR call" in sg["build_errors"]["vitis"]
    session = lepton_edge.runtime.load(art.save(tmp_path / "m.lepton"), devices=["vitis", "cpu"])
    assert [p.device for p in session.placement.values()] == ["cpu:0"]
    x = rng.integers(-128, 128, (2, 16)).astype(np.int8)
    y = session.run({"x": x})["y"]
    ref = 1 / (1 + np.exp(-(x.astype(np.float32) - 3) * np.float32(0.05)))
    assert np.abs(y.astype(np.int32) + 128 - ref * 256).max() <= 1


@pytest.mark.parametrize("parallelism", [1, 5])
def test_parallelism_shapes_the_tir_schedule(parallelism: int) -> None:
    model = lepton_edge.load(qdq_float_model("gemm"))
    (sub,) = [sg.proto for sg in lepton_edge.partition(model, ["zcu104"]).subgraphs
              if sg.target == "vitis"]
    program = tir_lower.lower(sub, parallelism)
    (mm,) = [k for k in program.kernels if "matmul" in k.name]
    script = mm.func.script()
    # the lanes read consecutive weights: the matmul's [K, O] weight is read as [O, K], which
    # is the Gemm's own transB weight, and that is the ROM array partitioned into lanes
    (rom,) = mm.partitioned
    w_q = next(numpy_helper.to_array(t) for t in model.proto.graph.initializer
               if t.name == "w_q")
    np.testing.assert_array_equal(program.consts[rom], w_q)
    # K = 24 split by the parallelism: an unrolled inner loop of that many lanes
    assert f"T.serial({parallelism}, annotations={{\"lepton_hls\": \"unroll\"}})" in script \
        or (parallelism == 1 and '"lepton_hls": "unroll"' in script), script
    assert mm.macs == 240
