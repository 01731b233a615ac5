"""Each vitis kernel kind against the CPU int8 build (the reference) and a numpy model.

Add (QLinearAdd as DQ, DQ -> Add -> Q; residual and two-input), AveragePool, Reshape, a
requantize to a new scale, multi-input / multi-output kernels; each in the sequential and
the DATAFLOW (hls::stream) form, whose generated source is read for the pragmas asked for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.target import DeviceInfo, Profile
from lepton_edge_targets.vitis import tir_lower
from lepton_edge_targets.vitis.compile import VitisTarget
from lepton_edge_targets.vitis.device import VitisDevice
from tests.targets.test_vitis import cpu_reference, vitis_registered  # noqa: F401

rng = np.random.default_rng(23)
F = np.float32


def dequant_table(scale: float, zp: int) -> np.ndarray:
    """numpy model of DequantizeLinear of every int8 value (index v + 128) as TVM computes
    it: float32(int32(v) - zp) * float32(scale)."""
    values = np.arange(-128, 128, dtype=np.int32) - np.int32(zp)
    return values.astype(F) * F(scale)


def quantize_f32(value: np.ndarray, scale: float, zp: int) -> np.ndarray:
    """numpy model of QuantizeLinear in float32: clip(rne(v / scale) + zp)."""
    r = np.rint(np.asarray(value, F) / F(scale)) + F(zp)
    return np.clip(r, -128, 127).astype(np.int8)


def _model(nodes, inputs, outputs, consts) -> onnx.ModelProto:
    inits = []
    for name, value in consts.items():
        if isinstance(value, float):
            value = np.array(value, np.float32)
        elif isinstance(value, int):
            value = np.array(value, np.int8)
        inits.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph(
        nodes, "kernel", [helper.make_tensor_value_info(n, TensorProto.INT8, s)
                          for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.INT8, s) for n, s in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _dq(x: str, s: str, z: str, out: str) -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", [x, s, z], [out])


def _q(x: str, s: str, z: str, out: str) -> onnx.NodeProto:
    return helper.make_node("QuantizeLinear", [x, s, z], [out])


def _weights(prefix: str, w_shape: tuple[int, ...], x_scale: float) -> tuple[list, dict]:
    o = w_shape[0]
    sw = rng.uniform(0.004, 0.02, o).astype(F)
    consts = {f"{prefix}_w": rng.integers(-127, 128, w_shape).astype(np.int8),
              f"{prefix}_sw": sw, f"{prefix}_zw": np.zeros(o, np.int8),
              f"{prefix}_b": rng.integers(-3000, 3000, o).astype(np.int32),
              f"{prefix}_sb": (F(x_scale) * sw).astype(F), f"{prefix}_zb": np.zeros(o, np.int32)}
    nodes = [helper.make_node("DequantizeLinear", [f"{prefix}_w", f"{prefix}_sw",
                                                   f"{prefix}_zw"], [f"{prefix}_wf"], axis=0),
             helper.make_node("DequantizeLinear", [f"{prefix}_b", f"{prefix}_sb",
                                                   f"{prefix}_zb"], [f"{prefix}_bf"], axis=0)]
    return nodes, consts


def residual_model() -> onnx.ModelProto:
    """x -> Conv+Relu -> h (an output too); y = Relu(Add(DQ(h), DQ(x))): a DAG, 2 outputs."""
    consts = {"sx": 0.031, "zx": -3, "sh": 0.047, "zh": -11, "sy": 0.06, "zy": -20}
    wn, wc = _weights("c", (4, 4, 3, 3), 0.031)
    consts.update(wc)
    nodes = [_dq("x", "sx", "zx", "xf"), *wn,
             helper.make_node("Conv", ["xf", "c_wf", "c_bf"], ["ca"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ca"], ["cr"]), _q("cr", "sh", "zh", "h"),
             _dq("h", "sh", "zh", "hf"), _dq("x", "sx", "zx", "xf2"),
             helper.make_node("Add", ["hf", "xf2"], ["s"]),
             helper.make_node("Relu", ["s"], ["sr"]), _q("sr", "sy", "zy", "y")]
    shape = ["N", 4, 6, 6]
    return _model(nodes, [("x", shape)], [("y", shape), ("h", shape)], consts)


def two_input_model() -> onnx.ModelProto:
    """a, b -> Add -> Q -> Gemm -> Q: a kernel with two int8 inputs."""
    consts = {"sa": float(F(0.043878887)), "za": -12, "sb": float(F(0.04671148)), "zb": 19,
              "ss": float(F(0.09955348)), "zs": 14, "sy": 0.2, "zy": 5}
    wn, wc = _weights("g", (8, 16), consts["ss"])
    consts.update(wc)
    nodes = [_dq("a", "sa", "za", "af"), _dq("b", "sb", "zb", "bf"),
             helper.make_node("Add", ["af", "bf"], ["s"]), _q("s", "ss", "zs", "sq"),
             _dq("sq", "ss", "zs", "sf"), *wn,
             helper.make_node("Gemm", ["sf", "g_wf", "g_bf"], ["ga"], transB=1),
             _q("ga", "sy", "zy", "y")]
    return _model(nodes, [("a", ["N", 16]), ("b", ["N", 16])],
                  [("y", ["N", 8]), ("sq", ["N", 16])], consts)


def avgpool_model(count_include_pad: int) -> onnx.ModelProto:
    consts = {"sx": 0.027, "zx": 7, "sy": 0.013, "zy": -4}
    nodes = [_dq("x", "sx", "zx", "xf"),
             helper.make_node("AveragePool", ["xf"], ["p"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], count_include_pad=count_include_pad),
             _q("p", "sy", "zy", "y")]
    return _model(nodes, [("x", ["N", 3, 7, 7])], [("y", ["N", 3, 4, 4])], consts)


def reshape_requant_model() -> onnx.ModelProto:
    """MaxPool -> Q to a new scale (a requantize), Reshape, Q(DQ) to another, then Gemm."""
    consts = {"sx": 0.05, "zx": 2, "sp": 0.037, "zp": -9, "sr": 0.061, "zr": 3, "sy": 0.3,
              "zy": 0, "shape": np.array([-1, 32], np.int64)}
    wn, wc = _weights("g", (5, 32), consts["sr"])
    consts.update(wc)
    nodes = [_dq("x", "sx", "zx", "xf"),
             helper.make_node("MaxPool", ["xf"], ["m"], kernel_shape=[2, 2], strides=[2, 2]),
             _q("m", "sp", "zp", "mq"), _dq("mq", "sp", "zp", "mf"),
             helper.make_node("Reshape", ["mf", "shape"], ["r"]), _q("r", "sp", "zp", "rq"),
             _dq("rq", "sp", "zp", "rf"), _q("rf", "sr", "zr", "rq2"),
             _dq("rq2", "sr", "zr", "rf2"), *wn,
             helper.make_node("Gemm", ["rf2", "g_wf", "g_bf"], ["ga"], transB=1),
             _q("ga", "sy", "zy", "y")]
    return _model(nodes, [("x", ["N", 2, 8, 8])], [("y", ["N", 5])], consts)


def matmul_bias_model() -> onnx.ModelProto:
    """DQ -> MatMul(DQ W[K, N]) -> Add(DQ int32 bias) -> Relu -> Q: the exporter form of a
    linear layer; int8.py folds the bias into the accumulator."""
    consts = {"sx": 0.021, "zx": 4, "sy": 0.11, "zy": -7}
    w = rng.integers(-127, 128, (12, 6)).astype(np.int8)
    sw = rng.uniform(0.004, 0.02, 6).astype(F)
    consts.update({"w": w, "sw": sw, "zw": np.zeros(6, np.int8),
                   "b": rng.integers(-3000, 3000, 6).astype(np.int32),
                   "sb": (F(0.021) * sw).astype(F), "zb": np.zeros(6, np.int32)})
    nodes = [_dq("x", "sx", "zx", "xf"),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wf"], axis=1),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"], axis=0),
             helper.make_node("MatMul", ["xf", "wf"], ["m"]),
             helper.make_node("Add", ["m", "bf"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), _q("r", "sy", "zy", "y")]
    return _model(nodes, [("x", ["N", 12])], [("y", ["N", 6])], consts)


MODELS = {"residual": residual_model, "matmul_bias": matmul_bias_model, "two_inputs": two_input_model,
          "avgpool_pad": lambda: avgpool_model(1), "avgpool_nopad": lambda: avgpool_model(0),
          "reshape_requant": reshape_requant_model}
# ops that must appear, in this order, in the names of distinct TIR kernels (FuseTIR names a
# fused PrimFunc after its ops)
OPS = {"residual": ["conv2d", "add"], "matmul_bias": ["matmul"], "two_inputs": ["add", "matmul"],
       "avgpool_pad": ["avg_pool2d"], "avgpool_nopad": ["avg_pool2d"],
       "reshape_requant": ["max_pool2d", "reshape", "matmul"]}


def in_order(ops: list[str], kernels: list[str]) -> bool:
    rest = iter(kernels)
    return all(any(op in k for k in rest) for op in ops)


def _feeds(session, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in session.inputs:
        shape = [batch if isinstance(d, str) else d for d in spec.shape]
        feeds[spec.name] = rng.integers(-128, 128, shape).astype(np.int8)
    return feeds


def _run_build(build, tmp_path: Path, inputs: list[np.ndarray]) -> list[np.ndarray]:
    folder = tmp_path / f"build_{build.meta['settings']['dataflow']}"
    files = {}
    for name, data in build.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        files[name] = folder / name
    info = DeviceInfo("vitis", "fpga-sim:0", True, {"simulation": True})
    return VitisDevice().load(info, files, build.meta).run(inputs)


@pytest.mark.parametrize("case", list(MODELS))
def test_kernel_kind_is_bit_exact_with_cpu_int8(case: str, tmp_path: Path) -> None:
    model = MODELS[case]()
    path = lepton_edge.compile(lepton_edge.load(model), ["cpu", "zcu104"]).save(
        tmp_path / "m.lepton")
    fpga = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    assert [p.device for p in fpga.placement.values()] == ["fpga-sim:0"], fpga.placement
    (sg,) = fpga.manifest["subgraphs"]
    meta = next(b for b in sg["builds"] if b["target"] == "vitis")["meta"]
    assert in_order(OPS[case], meta["tir_kernels"]), meta["tir_kernels"]
    cpu = cpu_reference(model, tmp_path)
    for batch in (5, 1):
        feeds = _feeds(fpga, batch)
        got, want = fpga.run(feeds), cpu.run(feeds)
        for name in want:
            assert got[name].dtype == np.int8
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("dataflow", [False, True])
@pytest.mark.parametrize("case", ["residual", "two_inputs", "reshape_requant"])
def test_sequential_and_dataflow_forms(case: str, dataflow: bool, tmp_path: Path) -> None:
    """The setting picks the form; the source has its pragmas; the C simulation of either is
    bit-exact with the CPU int8 build."""
    model = lepton_edge.load(MODELS[case]())
    (sub,) = [sg.proto for sg in lepton_edge.partition(model, ["zcu104"]).subgraphs]
    build = VitisTarget().compile(sub, Profile("t", "vitis", "", {"parallelism": 4,
                                                                   "dataflow": dataflow}))
    kernel = build.files["kernel.cpp"].decode()
    n_in, n_out = len(build.meta["inputs"]), len(build.meta["outputs"])
    for j in range(n_in):
        assert f"#pragma HLS INTERFACE m_axi port=in{j} offset=slave bundle=gmem{j}" in kernel
        assert f"#pragma HLS INTERFACE s_axilite port=in{j} bundle=control" in kernel
    for k in range(n_out):
        assert f"#pragma HLS INTERFACE m_axi port=out{k} offset=slave bundle=gmem{n_in + k}" \
            in kernel
    if dataflow:
        assert "#pragma HLS DATAFLOW" in kernel and '#include "hls_stream.h"' in kernel
        streams = len(re.findall(r"hls::stream<\w+> s_", kernel))
        # one FIFO per producer -> consumer edge (a fork, like the residual, gets two)
        program = tir_lower.lower(sub, 4)
        edges = sum(len([b for b in k.inputs if b not in program.consts])
                    for k in program.kernels) + n_out
        assert streams == edges
        assert kernel.count("#pragma HLS STREAM variable=s_") == streams
        assert "csim_include/hls_stream.h" in build.files
        assert "Vitis HLS" in build.files["csim_include/hls_stream.h"].decode()
    else:
        assert "DATAFLOW" not in kernel and "hls::stream" not in kernel
        assert "csim_include/hls_stream.h" not in build.files
    assert "#pragma HLS PIPELINE II=1" in kernel
    if any("matmul" in k for k in build.meta["tir_kernels"]):
        assert re.search(r"ARRAY_PARTITION variable=c\d+t? cyclic factor=4", kernel)
        assert "#pragma HLS UNROLL" in kernel
    cpu = cpu_reference(model, tmp_path)
    feeds = _feeds(cpu, 3)
    got = _run_build(build, tmp_path, [feeds[i.name] for i in sub.graph.input])
    want = cpu.run(feeds)
    for out, value in zip(sub.graph.output, got, strict=True):
        np.testing.assert_array_equal(value, want[out.name], err_msg=out.name)


def test_add_matches_numpy_float32_on_every_int8_pair(tmp_path: Path) -> None:
    """All 65,536 (a, b) pairs through the Add kernel: equal to numpy's float32 QDQ model and
    to the CPU build (these scales make FMA or a reciprocal differ from it on one pair)."""
    model = two_input_model()
    path = lepton_edge.compile(lepton_edge.load(model), ["cpu", "zcu104"]).save(
        tmp_path / "m.lepton")
    fpga = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    cpu = cpu_reference(model, tmp_path)
    values = np.arange(-128, 128, dtype=np.int8)
    a = np.repeat(values, 256).reshape(4096, 16)
    b = np.tile(values, 256).reshape(4096, 16)
    got, want = fpga.run({"a": a, "b": b})["sq"], cpu.run({"a": a, "b": b})["sq"]
    c = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    s = dequant_table(c["sa"], c["za"])[a.astype(int) + 128] + \
        dequant_table(c["sb"], c["zb"])[b.astype(int) + 128]
    expected = quantize_f32(s, c["ss"], int(c["zs"]))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, want)
    # the fused multiply-add alternative really differs here, so the check has teeth
    fma = ((a.astype(np.int32) - c["za"]).astype(np.float64) * np.float64(c["sa"])
           + dequant_table(c["sb"], c["zb"])[b.astype(int) + 128]).astype(F)
    assert np.any(quantize_f32(fma, c["ss"], int(c["zs"])) != expected)


@pytest.mark.parametrize("count_include_pad", [0, 1])
def test_avgpool_matches_numpy_float32(count_include_pad: int, tmp_path: Path) -> None:
    model = avgpool_model(count_include_pad)
    path = lepton_edge.compile(lepton_edge.load(model), ["zcu104"]).save(tmp_path / "m.lepton")
    fpga = lepton_edge.runtime.load(path, devices=["vitis"])
    x = rng.integers(-128, 128, (4, 3, 7, 7)).astype(np.int8)
    got = fpga.run({"x": x})["y"]
    c = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    v = np.pad(dequant_table(c["sx"], c["zx"])[x.astype(int) + 128],
               ((0, 0), (0, 0), (1, 1), (1, 1)))
    valid = np.pad(np.ones((7, 7), F), 1)
    want = np.empty((4, 3, 4, 4), np.int8)
    for i in range(4):
        for j in range(4):
            s = np.zeros((4, 3), F)
            for ky in range(3):
                for kx in range(3):
                    s = s + v[:, :, 2 * i + ky, 2 * j + kx]  # the CPU's order, in float32
            n = 9 if count_include_pad else int(valid[2 * i:2 * i + 3, 2 * j:2 * j + 3].sum())
            want[:, :, i, j] = quantize_f32(s / F(n), c["sy"], int(c["zy"]))
    np.testing.assert_array_equal(got, want)


def test_alveo_profile_builds_the_dataflow_form_end_to_end(tmp_path: Path) -> None:
    """-t u250 asks for dataflow and 32 lanes; the artifact runs bit-exact with the CPU."""
    model = residual_model()
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu", "u250"])
    path = art.save(tmp_path / "m.lepton")
    fpga = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    assert [p.device for p in fpga.placement.values()] == ["fpga-sim:0"]
    kernel = next(data for name, data in art.files.items() if name.endswith("kernel.cpp"))
    assert b"#pragma HLS DATAFLOW" in kernel and b"xilinx_u250" not in kernel
    makefile = next(d for n, d in art.files.items() if n.endswith("build/Makefile"))
    assert b"xilinx_u250_gen3x16_xdma_4_1_202210_1" in makefile
    (sg,) = fpga.manifest["subgraphs"]
    meta = next(b for b in sg["builds"] if b["target"] == "vitis")["meta"]
    assert meta["settings"] == {"parallelism": 32, "dataflow": True}
    est = meta["estimate"]["total"]
    assert est["interval"] < est["cycles"]  # layers overlap across samples
    cpu = cpu_reference(model, tmp_path)
    feeds = _feeds(fpga, 4)
    got, want = fpga.run(feeds), cpu.run(feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_shipped_cmake_rebuilds_the_same_simulation(tmp_path: Path) -> None:
    """The build's CMakeLists.txt compiles kernel.cpp (dataflow form, our hls::stream
    stand-in) into a csim.so that computes what the shipped one computes."""
    model = lepton_edge.load(residual_model())
    (sub,) = [sg.proto for sg in lepton_edge.partition(model, ["zcu104"]).subgraphs]
    build = VitisTarget().compile(sub, Profile("t", "vitis", "", {"dataflow": True}))
    folder = tmp_path / "src"
    for name, data in build.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    for args in (["-S", str(folder), "-B", str(tmp_path / "b")], ["--build", str(tmp_path / "b")]):
        done = subprocess.run(["cmake", *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
    rebuilt = dict(build.files, **{"csim.so": (tmp_path / "b" / "csim.so").read_bytes()})
    x = rng.integers(-128, 128, (3, 4, 6, 6)).astype(np.int8)
    shipped = _run_build(build, tmp_path / "a", [x])
    again = _run_build(type(build)(build.target, build.profile, rebuilt, build.meta),
                       tmp_path / "c", [x])
    for a, b in zip(shipped, again, strict=True):
        np.testing.assert_array_equal(a, b)
