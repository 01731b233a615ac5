"""Zero-padded channels (lowering/nchwc.py, pad_channels): with AVX-512's 16-float blocks, a
24-channel layer (MobileNetV2's) computes 32 channels (zero filters), so that it and every
convolution reading it are blocked in NCHW16c instead of the whole model in NCHW8c. Same
results as onnxruntime (the padded module compiled for this host, whatever its vector width),
and the structure: which ops compute on the padded tensors, where the original channels are
sliced back, and that AVX2 (8 lanes) pads nothing."""

from __future__ import annotations

import re

import numpy as np
import onnx
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from lepton_edge.lowering import nchwc, schedules
from lepton_edge.lowering import relax as lowering
from tests.conftest import assert_close, ort_run

rng = np.random.default_rng(11)
AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}  # 16 float lanes


def const(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def bottleneck() -> onnx.ModelProto:
    """x (16 channels) -> 1x1 to 24 (+bias) -> ReLU -> depthwise 3x3 (+bias) -> ReLU6 -> 1x1
    24 -> 24 -> residual add -> times a per-channel constant -> 3x3 to 16 -> y; a second
    output, the global average pool of the 24-channel product (read in 24 channels)."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=24),
        helper.make_node("Clip", ["cd", "lo", "hi"], ["d6"]),
        helper.make_node("Conv", ["d6", "w1"], ["c1"]),
        helper.make_node("Add", ["c1", "r0"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["m"]),
        helper.make_node("Conv", ["m", "w2"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["m"], ["g"]),
    ]
    graph = helper.make_graph(
        nodes, "bottleneck24",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 6, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 6, 9]),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 24, 1, 1])],
        [const("w0", 24, 16, 1, 1), const("b0", 24), const("wd", 24, 1, 3, 3), const("bd", 24),
         const("w1", 24, 24, 1, 1), const("scale", 1, 24, 1, 1), const("w2", 16, 24, 3, 3),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _imported(proto: onnx.ModelProto) -> tvm.IRModule:
    return nchwc.stacked_extrema_as_ops(nchwc.clips_as_ops(lowering.import_onnx(proto)))


def _main(mod: tvm.IRModule) -> str:
    return mod["main"].script(show_meta=False)


def test_24_channel_layers_compute_32_channels() -> None:
    padded, count = nchwc.pad_channels(_imported(bottleneck()), 16)
    text = _main(padded)
    # the two 1x1 convolutions to 24 channels and the depthwise one between them
    assert count == 3
    convs = [ln for ln in text.splitlines() if "R.nn.conv2d(" in ln]
    assert [re.search(r"R\.Tensor\(\(N, (\d+),", ln).group(1) for ln in convs] \
        == ["32", "32", "32", "16"], text
    assert "groups=32" in text
    # bias, ReLU, clip, residual add and the per-channel product on 32 channels
    for op in ("add", "maximum", "minimum", "multiply"):
        lines = [ln for ln in text.splitlines() if f"R.{op}(" in ln]
        assert lines and all("(N, 32, " in ln for ln in lines), (op, text)
    # the global pool reads the original 24 channels
    (sliced,) = [ln for ln in text.splitlines() if "R.strided_slice(" in ln]
    assert "(N, 24, 6, 9)" in sliced
    # with 16 lanes every convolution can now be blocked (3 of 4 before)
    assert nchwc._convertible_count(_imported(bottleneck()), 16) == 1
    assert nchwc._convertible_count(padded, 16) == 4


def test_avx512_blocks_the_padded_model_in_nchw16c() -> None:
    mod = schedules.ConvertConvLayout(tvm.target.Target(AVX512))(
        lowering.import_onnx(bottleneck()))
    text = _main(mod)
    assert len(re.findall(r"R\.call_tir\((cls\.)?conv2d_nchwc", text)) == 4, text
    assert "R.nn.conv2d(" not in text
    assert re.search(r"R\.Tensor\(\(N, 2, 6, 9, 16\)", text), text  # 32 channels, NCHW16c


def test_8_lanes_pad_nothing() -> None:
    mod = _imported(bottleneck())
    assert nchwc.pad_channels(mod, 8) == (mod, 0)
    # channel counts that are multiples of 16 (or not of 8) stay as they are
    assert nchwc._padded_count(32, 16) is None and nchwc._padded_count(10, 16) is None
    assert nchwc._padded_count(24, 16) == 32 and nchwc._padded_count(40, 16) == 48


def test_padded_model_matches_onnxruntime() -> None:
    proto = bottleneck()
    padded, count = nchwc.pad_channels(_imported(proto), 16)
    assert count == 3
    target = tvm.target.Target({"kind": "llvm", "mcpu": lowering.system_cpu()})
    vm = relax.VirtualMachine(lowering._compile_untuned(padded, target, None), tvm.cpu())
    for batch in (1, 3):
        x = rng.standard_normal((batch, 16, 6, 9)).astype(np.float32)
        out = vm["main"](tvm.runtime.tensor(x, tvm.cpu()))
        got = {"y": out[0].numpy(), "g": out[1].numpy()}
        assert_close(got, ort_run(proto, {"x": x}))


def test_other_ops_read_the_original_channels() -> None:
    """A division (0 / 0 in padded channels) and a Concat (a tuple argument) read a sliced
    24-channel tensor; the convolutions around them still pad."""
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"]),
        helper.make_node("Div", ["c0", "den"], ["q"]),
        helper.make_node("Concat", ["q", "x"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w1"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "div_concat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 5, 7])],
        [const("w0", 24, 16, 1, 1), const("w1", 16, 40, 3, 3),
         numpy_helper.from_array(np.full((1, 24, 1, 1), 1.5, np.float32), "den")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    padded, count = nchwc.pad_channels(lowering.import_onnx(proto), 16)
    assert count == 1
    text = _main(padded)
    (sliced,) = [ln for ln in text.splitlines() if "R.strided_slice(" in ln]
    assert "(N, 24, 5, 7)" in sliced
    assert "(N, 24, 5, 7)" in next(ln for ln in text.splitlines() if "R.divide(" in ln)
    target = tvm.target.Target({"kind": "llvm", "mcpu": lowering.system_cpu()})
    vm = relax.VirtualMachine(lowering._compile_untuned(padded, target, None), tvm.cpu())
    x = rng.standard_normal((2, 16, 5, 7)).astype(np.float32)
    got = {"y": vm["main"](tvm.runtime.tensor(x, tvm.cpu())).numpy()}
    assert_close(got, ort_run(proto, {"x": x}))
