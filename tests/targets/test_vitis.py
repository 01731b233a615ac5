"""The vitis target: int8 QDQ subgraphs -> TVM TIR -> HLS C++, checked by C simulation.

The C simulation must be bit-exact with the CPU int8 build of the same artifact (both lower
the subgraph through lepton_edge/lowering/int8.py and TVM's LegalizeOps), and used only when
named in devices=.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.errors import TargetError
from lepton_edge.target import Profile, plugins, register, unregister
from lepton_edge_targets.vitis import PLUGIN

rng = np.random.default_rng(11)


@pytest.fixture(autouse=True, scope="module")
def vitis_registered():
    """Register the plug-in unless its entry point already did."""
    added = "vitis" not in plugins()
    if added:
        register(PLUGIN)
    yield
    if added:
        unregister("vitis")


def qdq_float_model(kind: str, *, groups: int = 1, relu: bool = False) -> onnx.ModelProto:
    """float in -> Q -> DQ -> Conv/Gemm (+bias) [-> Relu] -> Q -> DQ -> float out."""
    sx, zx, sy, zy = 0.02, -7, 0.05, 3
    if kind == "conv":
        c = groups if groups > 1 else 3  # groups > 1: depthwise
        o = groups if groups > 1 else 6
        w_shape, x_shape, y_shape = (o, c // groups, 3, 3), ["N", c, 7, 7], ["N", o, 4, 4]
    else:
        c, o = 24, 10
        w_shape, x_shape, y_shape = (o, c), ["N", c], ["N", o]
    w_q = rng.integers(-127, 128, w_shape).astype(np.int8)
    sw = rng.uniform(0.005, 0.02, o).astype(np.float32)
    b_q = rng.integers(-2000, 2000, o).astype(np.int32)
    sb = (np.float32(sx) * sw).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(sx, np.float32), "sx"),
        numpy_helper.from_array(np.array(zx, np.int8), "zx"),
        numpy_helper.from_array(np.array(sy, np.float32), "sy"),
        numpy_helper.from_array(np.array(zy, np.int8), "zy"),
        numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(sw, "sw"),
        numpy_helper.from_array(np.zeros(o, np.int8), "zw"),
        numpy_helper.from_array(b_q, "b_q"), numpy_helper.from_array(sb, "sb"),
        numpy_helper.from_array(np.zeros(o, np.int32), "zb"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "sx", "zx"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "sb", "zb"], ["b"], axis=0),
    ]
    if kind == "conv":
        nodes.append(helper.make_node("Conv", ["x_dq", "w", "b"], ["acc"], pads=[1, 1, 1, 1],
                                      strides=[2, 2], group=groups))
    else:
        nodes.append(helper.make_node("Gemm", ["x_dq", "w", "b"], ["acc"], transB=1))
    last = "acc"
    if relu:
        nodes.append(helper.make_node("Relu", ["acc"], ["r"]))
        last = "r"
    nodes += [helper.make_node("QuantizeLinear", [last, "sy", "zy"], ["y_q"]),
              helper.make_node("DequantizeLinear", ["y_q", "sy", "zy"], ["y"])]
    graph = helper.make_graph(
        nodes, f"qdq_{kind}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _inputs(session, batch: int = 3) -> np.ndarray:
    shape = [batch if isinstance(d, str) else d for d in session.inputs[0].shape]
    x = rng.uniform(-3.0, 3.0, shape).astype(np.float32)
    # exact halves of the input scale exercise round-half-to-even at the entry
    x.ravel()[:8] = (np.arange(8, dtype=np.float32) + np.float32(0.5)) * np.float32(0.02)
    return x


def _compile(model: onnx.ModelProto, tmp_path: Path) -> Path:
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu", "zcu104"])
    return art.save(tmp_path / "model.lepton")


CASES = {
    "conv": dict(kind="conv"),
    "conv_relu": dict(kind="conv", relu=True),
    "depthwise_conv": dict(kind="conv", groups=8),
    "gemm_relu": dict(kind="gemm", relu=True),
}


def cpu_reference(model: Any, tmp_path: Path):
    """The reference: the CPU int8 build of the whole model, every subgraph on the CPU."""
    art = lepton_edge.compile(model if isinstance(model, lepton_edge.Model)
                              else lepton_edge.load(model), ["cpu"])
    session = lepton_edge.runtime.load(art.save(tmp_path / "cpu_reference.lepton"))
    assert {p.device for p in session.placement.values()} == {"cpu:0"}, art.summary()
    return session


def _placement(session) -> list[tuple[tuple[str, ...], str]]:
    """(op types of the subgraph, device) for every subgraph, in order."""
    ops = {sg["id"]: tuple(sorted(sg["op_counts"])) for sg in session.manifest["subgraphs"]}
    return [(ops[sg_id], p.device) for sg_id, p in session.placement.items()]


@pytest.mark.parametrize("case", list(CASES))
def test_csim_is_bit_exact_with_cpu_int8(case: str, tmp_path: Path) -> None:
    model = qdq_float_model(**CASES[case])
    path = _compile(model, tmp_path)
    fpga = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    # the reference: the CPU int8 build of the whole model
    cpu = cpu_reference(model, tmp_path)
    # float -> int8 at the entry and int8 -> float at the exit on the host CPU, the integer
    # kernel on the FPGA (its simulation here)
    core = ("Conv" if "conv" in case else "Gemm", "DequantizeLinear", "QuantizeLinear") + (
        ("Relu",) if "relu" in case else ())
    assert _placement(fpga) == [(("QuantizeLinear",), "cpu:0"),
                                (tuple(sorted(core)), "fpga-sim:0"),
                                (("DequantizeLinear",), "cpu:0")], fpga.placement
    assert "cpu" in str(cpu.placement)
    x = _inputs(fpga)
    got, want = fpga.run({"x": x})["y"], cpu.run({"x": x})["y"]
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want), np.abs(got - want).max()
    # another batch size through the same per-sample kernel
    x1 = _inputs(fpga, batch=1)
    assert np.array_equal(fpga.run({"x": x1})["y"], cpu.run({"x": x1})["y"])


def test_cpu_is_used_unless_vitis_is_named(tmp_path: Path) -> None:
    path = _compile(qdq_float_model("conv"), tmp_path)
    session = lepton_edge.runtime.load(path)
    placement = str(session.placement)
    assert "fpga-sim" not in placement and "cpu" in placement, placement


def test_generated_source_and_board_folder(tmp_path: Path) -> None:
    path = _compile(qdq_float_model("conv", relu=True), tmp_path)
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        base = next(n for n in names if n.endswith("vitis/kernel.cpp")).rsplit("/", 1)[0]
        kernel = z.read(f"{base}/kernel.cpp").decode()
        makefile = z.read(f"{base}/build/Makefile").decode()
        readme = z.read(f"{base}/build/README.md").decode()
        connectivity = z.read(f"{base}/build/connectivity.cfg").decode()
        host = z.read(f"{base}/host_xrt.py").decode()
        assert f"{base}/kernel.h" in names and f"{base}/csim.so" in names
        assert not any("hls_stream.h" in n for n in names)  # sequential form: no streams
    assert "#pragma HLS PIPELINE II=1" in kernel and "#pragma HLS UNROLL" in kernel
    assert "#pragma HLS ARRAY_PARTITION" in kernel and "factor=8" in kernel
    assert "#pragma HLS INTERFACE m_axi port=in0 offset=slave bundle=gmem0" in kernel
    assert "#pragma HLS INTERFACE m_axi port=out0 offset=slave bundle=gmem1" in kernel
    assert "#pragma HLS INTERFACE s_axilite port=return" in kernel
    assert "#pragma HLS DATAFLOW" not in kernel and "hls::stream" not in kernel
    info = lepton_edge.runtime.load(path, devices=["vitis"] + ["cpu"])
    vitis_sg = next(sg for sg in info.manifest["subgraphs"]
                    if any(b["target"] == "vitis" for b in sg["builds"]))
    meta = next(b for b in vitis_sg["builds"] if b["target"] == "vitis")["meta"]
    name = meta["kernel"]  # unique per kernel: lepton_<hash of its source>
    assert re.fullmatch(r"lepton_[0-9a-f]{12}", name), name
    assert f'extern "C" void {name}(const int8_t* in0, int8_t* out0, int batch)' in kernel
    # the kernels are the TIR PrimFuncs of the lowered subgraph, printed in order
    tir = meta["tir_kernels"]
    assert any("conv2d" in k for k in tir), tir
    for i, prim in enumerate(tir):
        assert f"// kernel {i}: TIR PrimFunc {prim} (" in kernel
        assert f"static void k{i}_{prim}(" in kernel
    assert re.search(r"static const int8_t c\d+\[162\] = ", kernel)  # 6x3x3x3 weights: ROM
    assert "v++ -c" in makefile and f"-k {name}" in makefile and "v++ -l" in makefile
    assert "xilinx_zcu104_base_202320_1" in makefile
    assert f"sp={name}_1.in0:DDR" in connectivity and f"sp={name}_1.out0:DDR" in connectivity
    assert "NOT synthesized" in readme and "LEPTON_VITIS_XCLBIN" in readme
    assert "pyxrt.hw_context" in host and "register_xclbin" in host and f'"{name}"' in host
    assert meta["xclbin"] == f"build/{name}.xclbin"
    assert meta["estimate"]["total"]["macs"] == 6 * 4 * 4 * 3 * 9
    assert meta["synthesized"] is False
    assert [p["dtype"] for p in meta["inputs"] + meta["outputs"]] == ["int8", "int8"]


def test_parallelism_setting_and_budget() -> None:
    from lepton_edge_targets.vitis.compile import VitisTarget

    model = lepton_edge.load(qdq_float_model("gemm"))
    plan = lepton_edge.partition(model, ["zcu104"])
    (sub,) = [sg.proto for sg in plan.subgraphs if sg.target == "vitis"]
    build = VitisTarget().compile(sub, Profile("tiny", "vitis", "", {"parallelism": 4}))
    assert "factor=4" in build.files["kernel.cpp"].decode()
    total = build.meta["estimate"]["total"]
    # 10 outputs x ceil(24 / 4) chunks + 10 pipeline fill, + 24 + 10 bytes loaded/stored
    # the matmul: 10 outputs x (1 init + ceil(24 / 4) pipelined chunks), its requantize
    # epilogue 10, + 24 + 10 elements loaded/stored; DSPs: 4 MAC lanes + the 64-bit multiply
    (mm,) = [k for k in build.meta["estimate"]["kernels"] if k["macs"]]
    assert (mm["macs"], mm["cycles"], mm["dsp"]) == (240, 10 * (1 + 6) + 10, 4 + 4)
    assert total["macs"] == 240 and total["cycles"] == sum(
        k["cycles"] for k in build.meta["estimate"]["kernels"]) + 34
    assert total["lut"] > 0 and total["ff"] > 0 and total["bram_18k"] == 0  # 240 B: LUT ROM
    tiny = Profile("tiny", "vitis", "", {"parallelism": 16, "budget": {"dsp": 8,
                                                                         "bram_18k": 10}})
    with pytest.raises(TargetError, match=r"dsp 20 > budget 8.*kernel \d \(\w*matmul\w*\): 240 MACs"):
        VitisTarget().compile(sub, tiny)
    small = Profile("small", "vitis", "", {"parallelism": 4, "budget": {"lut": 1000}})
    with pytest.raises(TargetError, match=r"lut \d+ > budget 1000"):
        VitisTarget().compile(sub, small)
    with pytest.raises(TargetError, match="parallelism must be an integer >= 1"):
        VitisTarget().compile(sub, Profile("bad", "vitis", "", {"parallelism": 0}))


def test_unsupported_nodes_have_reasons() -> None:
    from lepton_edge.plan import graph_view
    from lepton_edge_targets.vitis.support import unsupported_reason

    model = lepton_edge.load(qdq_float_model("conv"))
    view = graph_view(model)
    softmax = helper.make_node("Softmax", ["y"], ["z"])
    assert "no HLS generator for Softmax" in unsupported_reason(softmax, view)
    reasons = {n.name or n.output[0]: unsupported_reason(n, view) for n in model.proto.graph.node}
    # the float boundary is host work; every node of the integer kernel is taken
    host = {k: v for k, v in reasons.items() if v is not None}
    assert set(host) == {"x_q", "y"}, host
    assert "float -> int8 conversion of 'x'" in host["x_q"] and "host CPU" in host["x_q"]
    assert "int8 -> float conversion of a model output ('y')" in host["y"]


def test_small_cnn_with_maxpool_and_flatten_is_bit_exact(tmp_path: Path) -> None:
    """int8 in/out: Conv+Relu -> depthwise Conv -> MaxPool -> Flatten -> Gemm, all on vitis."""
    from tests.targets.test_int8_lowering import qdq_cnn

    model, _ = qdq_cnn()
    path = _compile(model, tmp_path)
    fpga = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    cpu = cpu_reference(model, tmp_path)
    assert [p.device for p in fpga.placement.values()] == ["fpga-sim:0"]
    shape = [2 if isinstance(d, str) else d for d in fpga.inputs[0].shape]
    x = rng.integers(-128, 128, shape).astype(np.int8)
    name = fpga.inputs[0].name
    got, want = fpga.run({name: x}), cpu.run({name: x})
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_digits_int8_artifact_places_conv_gemm_on_the_fpga_simulation(tmp_path: Path) -> None:
    """The issue's end-to-end check: the quantized digits CNN compiled for cpu + zcu104 puts
    its conv/gemm kernel (with the MaxPool/Reshape glue between them) on the FPGA C
    simulation and the float boundary on the CPU, bit-exact with the CPU int8 build."""
    from lepton_edge.compress.quantize import quantize

    repo = Path(__file__).resolve().parents[2]
    x = np.load(repo / "samples/digits/x_test.npy")
    y = np.load(repo / "samples/digits/y_test.npy")
    q = quantize(lepton_edge.load(repo / "samples/digits/digits.onnx"), x[:64])
    art = lepton_edge.compile(q, ["cpu", "zcu104"])
    path = art.save(tmp_path / "digits_int8.lepton")
    fpga = lepton_edge.runtime.load(path, devices=["vitis", "cpu"], self_test=True)
    assert _placement(fpga) == [
        (("QuantizeLinear",), "cpu:0"),
        (("Conv", "DequantizeLinear", "Gemm", "MaxPool", "QuantizeLinear", "Reshape"),
         "fpga-sim:0"),
        (("DequantizeLinear",), "cpu:0")], fpga.placement
    kernel_sg = fpga.manifest["subgraphs"][1]
    assert kernel_sg["op_counts"]["Conv"] == 2 and kernel_sg["op_counts"]["Gemm"] == 2
    meta = next(b for b in kernel_sg["builds"] if b["target"] == "vitis")["meta"]
    ops = [next(op for op in ("conv2d", "max_pool2d", "matmul") if op in k)
           for k in meta["tir_kernels"] if any(op in k for op in ("conv2d", "pool", "matmul"))]
    assert ops == ["conv2d", "conv2d", "max_pool2d", "matmul", "matmul"], meta["tir_kernels"]
    assert meta["estimate"]["total"]["macs"] == kernel_sg["macs"]  # MACs read off the TIR
    assert [p["dtype"] for p in meta["inputs"] + meta["outputs"]] == ["int8", "int8"]
    # the reference: the CPU int8 build of the same model
    cpu = cpu_reference(q, tmp_path)
    got, want = fpga.run({"image": x})["logits"], cpu.run({"image": x})["logits"]
    np.testing.assert_array_equal(got, want)
    assert float((got.argmax(1) == y).mean()) >= 0.97


def test_explain_shows_fpga_estimates_and_why_nodes_stay_on_the_cpu(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lepton_edge.cli import cli

    onnx.save(qdq_float_model("conv", relu=True), tmp_path / "m.onnx")
    result = CliRunner().invoke(cli, ["explain", str(tmp_path / "m.onnx"), "-t", "cpu",
                                      "-t", "kv260"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sg1: 6 nodes on vitis" in out and "sg0: 1 nodes on cpu" in out
    assert re.search(r"sg1 on vitis: vitis kernel from TIR: [\w >-]*conv2d\w*; 1 in, 1 out \(AXI\); "
                     r"parallelism 8", out), out
    estimate = next(line for line in out.splitlines() if "sg1 on vitis: estimate:" in line)
    for key in ("2,592 MACs/sample", "cycles latency", "DSP", "BRAM18K", "LUT", "FF"):
        assert key in estimate, estimate
    assert "fits the kv260 budget (dsp " in out
    assert "QuantizeLinear_0: vitis: float -> int8 conversion of 'x'" in out
    assert "DequantizeLinear_7: vitis: int8 -> float conversion of a model output ('y')" in out
