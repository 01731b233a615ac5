"""Channel-blocked float32 convolutions (lowering/nchwc.py): same results as onnxruntime for
the convolution kinds a CNN has (regular, strided, padded, 1x1, depthwise, with channel counts
that are and are not multiples of the vector width, bias / ReLU / clip / residual epilogues,
pools between convolutions, symbolic batch, Max / Min, broadcast constants, and ops not
verified in NCHWc, which read NCHW while the convolutions around them stay blocked), and the
structure: the nchwc rule schedules the converted kernels and a chain of convolutions pays
layout transforms only at its ends."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.lowering import nchwc, schedules
from lepton_edge.lowering import relax as lowering
from tests.conftest import assert_close, ort_run

rng = np.random.default_rng(7)
TARGET = {"kind": "llvm", "mcpu": "haswell"}  # AVX2: 8 float lanes


def const(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def cnn() -> onnx.ModelProto:
    """3-channel stem (stays NCHW) -> residual 3x3 pair -> max pool -> strided 3x3 ->
    depthwise -> clip -> 1x1 -> average pool -> 10-channel 1x1 (stays NCHW) -> global pool;
    a second output taps the chain after the depthwise convolution."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r0"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "wd", "bd"], ["cd"], pads=[1, 1, 1, 1], group=24),
        helper.make_node("Clip", ["cd", "lo", "hi"], ["depthwise"]),
        helper.make_node("Conv", ["depthwise", "w4"], ["c4"]),
        helper.make_node("AveragePool", ["c4"], ["p4"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p4", "w5", "b5"], ["c5"]),
        helper.make_node("GlobalAveragePool", ["c5"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes, "nchwc_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 20, 28])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 10, 1, 1]),
         helper.make_tensor_value_info("depthwise", TensorProto.FLOAT, ["N", 24, 5, 7])],
        [const("w0", 16, 3, 3, 3), const("b0", 16), const("w1", 16, 16, 3, 3), const("b1", 16),
         const("w2", 16, 16, 3, 3), const("b2", 16), const("w3", 24, 16, 3, 3),
         const("b3", 24), const("wd", 24, 1, 3, 3), const("bd", 24), const("w4", 32, 24, 1, 1),
         const("w5", 10, 32, 1, 1), const("b5", 10),
         numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6.0, np.float32), "hi")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(model: lepton_edge.Model, batch: int) -> dict[str, np.ndarray]:
    return {spec.name: rng.standard_normal(
        [batch if isinstance(d, str) else d for d in spec.shape]).astype(np.float32)
        for spec in model.inputs}


def test_nchwc_cnn_matches_onnxruntime(build) -> None:
    model = lepton_edge.load(cnn())
    _, session = build(model, golden_count=1)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    for batch in (1, 3):  # symbolic batch: one build, any size
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


def odd_convs() -> onnx.ModelProto:
    """Convolutions next to the converted ones: a grouped convolution (stays NCHW), a
    10-channel input (NCHW input, NCHWc output), asymmetric padding, a strided 1x1 and a
    strided depthwise convolution."""
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], pads=[0, 1, 2, 1]),
        helper.make_node("Conv", ["a", "wg", "bg"], ["g"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("Conv", ["g", "wp", "bp"], ["p"], strides=[2, 2]),
        helper.make_node("Relu", ["p"], ["pr"]),
        helper.make_node("Conv", ["pr", "wd"], ["d"], pads=[1, 0, 1, 1], strides=[2, 2],
                         group=24),
        helper.make_node("GlobalAveragePool", ["d"], ["pooled"]),
    ]
    graph = helper.make_graph(
        nodes, "odd_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10, 13, 18])],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 24, 1, 1]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 24, 4, 4])],
        [const("wa", 16, 10, 3, 3), const("wg", 16, 8, 3, 3), const("bg", 16),
         const("wp", 24, 16, 1, 1), const("bp", 24), const("wd", 24, 1, 3, 3)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_odd_convolutions_match_onnxruntime(build) -> None:
    model = lepton_edge.load(odd_convs())
    _, session = build(model, golden_count=1)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    for batch in (1, 2):
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


def tiled_convs() -> onnx.ModelProto:
    """Register tiles that do not divide the output (extra columns or pixels computed and
    never stored): rows of 26 and 13 columns (3x3, strided 3x3, 1x1 with a residual add),
    a stem of 26 columns, small planes tiled as one row of pixels (11x7 strided 3x3 with 3
    channel blocks, 1x1 with 2), with bias / ReLU / residual / swish (the convolution read
    twice) epilogues."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4"], ["c4"]),
        helper.make_node("Add", ["c4", "r3"], ["s4"]),
        helper.make_node("Relu", ["s4"], ["r4"]),
        helper.make_node("Conv", ["r4", "w5", "b5"], ["c5"], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c5"], ["r5"]),
        helper.make_node("Conv", ["r5", "w6", "b6"], ["c6"]),
        helper.make_node("Sigmoid", ["c6"], ["g6"]),
        helper.make_node("Mul", ["c6", "g6"], ["swish"]),
    ]
    graph = helper.make_graph(
        nodes, "tiled_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 41, 26])],
        [helper.make_tensor_value_info("swish", TensorProto.FLOAT, ["N", 16, 11, 7]),
         helper.make_tensor_value_info("r4", TensorProto.FLOAT, ["N", 32, 21, 13])],
        [const("w0", 16, 3, 3, 3), const("b0", 16), const("w1", 32, 16, 3, 3),
         const("b1", 32), const("w2", 32, 32, 3, 3), const("w3", 32, 32, 3, 3),
         const("b3", 32), const("w4", 32, 32, 1, 1), const("w5", 24, 32, 3, 3),
         const("b5", 24), const("w6", 16, 24, 1, 1), const("b6", 16)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tiles_that_do_not_divide_the_output_match_onnxruntime(build) -> None:
    # every convolution above computes extra columns or pixels: (blocks, oh, ow, taps,
    # blocked input) -> flat (one row of pixels) or not
    layers = {(2, 41, 26, 9, False): False, (4, 41, 26, 9, True): False,
              (4, 21, 13, 9, True): False, (4, 21, 13, 1, True): False,
              (3, 11, 7, 9, True): True, (2, 11, 7, 1, True): True}
    for (blocks, oh, ow, taps, blocked), flat in layers.items():
        _, t_w, is_flat, computed = nchwc.output_tiling(blocks, oh, ow, taps, blocked)
        assert is_flat == flat and computed > (oh * ow if flat else ow)
        assert computed % t_w == 0
    target = tvm.target.Target(TARGET)
    report = schedules.ScheduleReport()
    tvm.compile(lowering.import_onnx(tiled_convs()), target=target,
                relax_pipeline=schedules.cpu_pipeline(target, report=report))
    convs = {name: rule for name, rule in report.rules.items() if "conv2d_nchwc" in name}
    assert len(convs) == 7 and set(convs.values()) == {"nchwc"}, report.rules
    assert not report.refused, report.refused
    _matches_onnxruntime(build, tiled_convs())


def test_depthwise_convolutions_reading_their_input_in_place_match_onnxruntime(build) -> None:
    """A depthwise plane larger than DEPTHWISE_PLANE_BYTES (stride 1, asymmetric padding)
    and a strided one read the input with a bounds check instead of a padded copy."""
    assert 132 * 134 * 8 * 4 > nchwc.DEPTHWISE_PLANE_BYTES
    nodes = [
        helper.make_node("Conv", ["x", "wd", "bd"], ["d"], pads=[1, 2, 1, 0], group=8),
        helper.make_node("Relu", ["d"], ["r"]),
        helper.make_node("Conv", ["r", "ws"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2],
                         group=8),
    ]
    graph = helper.make_graph(
        nodes, "depthwise_in_place",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 130, 132])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, ["N", 8, 65, 66]),
         helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 8, 130, 132])],
        [const("wd", 8, 1, 3, 3), const("bd", 8), const("ws", 8, 1, 3, 3)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = _converted(proto)
    assert len(re.findall(r"call_tir\((cls\.)?conv2d_nchwc_depthwise", mod["main"].script())) == 2
    kernels = [f.script() for gv, f in mod.functions_items() if "depthwise" in gv.name_hint]
    assert len(kernels) == 2 and not any(nchwc.PAD_BLOCK in k for k in kernels)
    _matches_onnxruntime(build, proto)


def _calls(mod: tvm.IRModule, name: str) -> list[str]:
    """Lines of the Relax main function calling ``name`` (TVMScript text)."""
    text = mod["main"].script(show_meta=False)
    return [line for line in text.splitlines() if f"R.{name}(" in line]


def _converted(proto: onnx.ModelProto) -> tvm.IRModule:
    mod = lowering.import_onnx(proto)
    return schedules.ConvertConvLayout(tvm.target.Target(TARGET))(mod)


def test_a_conv_chain_pays_layout_transforms_only_at_its_ends() -> None:
    mod = _converted(cnn())
    text = mod["main"].script(show_meta=False)
    # 6 convolutions converted (the 3-channel stem with an NCHW input), the 10-channel one not
    assert len(re.findall(r"R\.call_tir\((cls\.)?conv2d_nchwc", text)) == 6, text
    assert len(_calls(mod, "nn.conv2d")) == 1
    # Activation layout transforms: the tap of the depthwise output and the input of the
    # 10-channel convolution; none between the converted convolutions, the pools, the
    # residual add and the ReLU6 (clip as maximum / minimum) in between. (The others act on
    # bias constants and fold while compiling.)
    activations = [ln for ln in _calls(mod, "layout_transform") if "(N," in ln.split("=")[0]]
    assert len(activations) == 2, activations
    assert all("lambda i0, i1, i2, i3, i4:" in ln for ln in activations)  # back to NCHW
    assert _calls(mod, "maximum") and _calls(mod, "minimum")  # Clip, still in NCHWc
    assert not [ln for ln in text.splitlines() if "call_tir(cls.maximum" in ln]


def scheduled_build(model: onnx.ModelProto, target_spec: object
                    ) -> tuple[schedules.ScheduleReport, tvm.IRModule]:
    """Build `model` for `target_spec` with the CPU pipeline: its ScheduleReport and the
    module as the default schedules left it."""
    target = tvm.target.Target(target_spec)
    report = schedules.ScheduleReport()
    captured = {}

    def keep(mod: tvm.IRModule, tgt: object, **kw: object) -> tvm.IRModule:
        captured["mod"] = original(mod, tgt, **kw)
        return captured["mod"]

    original = schedules.apply_default_schedules
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(schedules, "apply_default_schedules", keep)
        tvm.compile(lowering.import_onnx(model), target=target,
                    relax_pipeline=schedules.cpu_pipeline(target, report=report))
    return report, captured["mod"]


def test_converted_kernels_are_scheduled_by_the_nchwc_rule() -> None:
    report, scheduled = scheduled_build(cnn(), TARGET)
    convs = {name: rule for name, rule in report.rules.items() if "conv2d_nchwc" in name}
    assert len(convs) == 6 and set(convs.values()) == {"nchwc"}, report.rules
    # the pools between the convolutions, on NCHWc tensors, vectorized along the lanes
    assert report.rules["max_pool2d"] == report.rules["avg_pool2d"] == "nchwc-pool"
    for name in ("max_pool2d", "avg_pool2d"):
        assert "T.vectorized(T.int64(8))" in scheduled[name].script()
    for name in convs:
        func = scheduled[name]
        text = func.script()
        assert "T.vectorized(T.int64(8))" in text and "T.unroll(" in text, name
        # The epilogue (bias, ReLU, residual add, clip) joins the register tile's write-back:
        # the kernel allocates its local accumulators and the padded input, nothing else
        # (each schedule its own: a kernel with a symbolic batch holds a parallel and a serial
        # one, and the second one's buffers are named with a suffix)
        allocs = [ln.strip() for ln in text.splitlines() if "T.sblock_alloc_buffer(" in ln]
        assert any('scope="local"' in a for a in allocs), (name, allocs)
        assert all('scope="local"' in a or re.match(rf"{nchwc.PAD_BLOCK}(_\d+)? =", a)
                   for a in allocs), (name, allocs)


def test_integer_and_grouped_convolutions_are_left_as_they_are() -> None:
    from tvm import relax

    def module(dtype: str, wdtype: str, groups: int, out_dtype: str) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 16, 8, 8), dtype))
        weight = rng.integers(-3, 3, (16, 16 // groups, 3, 3)).astype(wdtype)
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=[1, 1, 1, 1],
                                               groups=groups, out_dtype=out_dtype))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return bb.get()

    for mod in (module("uint8", "int8", 1, "int32"),  # the int8 lowering's kernels
                module("float32", "float32", 2, "float32")):  # grouped, not depthwise
        converted, count = nchwc.convert_conv_layout(mod, 8)
        assert count == 0 and converted.same_as(mod)
    _, count = nchwc.convert_conv_layout(module("float32", "float32", 1, "float32"), 8)
    assert count == 1


def test_layout_switch_turns_the_conversion_off(monkeypatch) -> None:
    monkeypatch.setenv("LEPTON_NCHWC", "0")
    mod = _converted(cnn())
    assert len(_calls(mod, "nn.conv2d")) == 7 and not _calls(mod, "layout_transform")


@pytest.mark.parametrize("blocks, width", [(8, 56), (4, 28), (32, 14), (64, 7), (3, 5),
                                           (1, 1), (160, 7), (2, 112)])
def test_tile_shapes_fit_the_registers_and_divide_the_loops(blocks: int, width: int) -> None:
    t_c, t_w = nchwc.tile_shape(blocks, width)
    assert blocks % t_c == 0 and width % t_w == 0
    assert t_c * t_w <= nchwc.TILE_ACCUMULATORS and t_c * t_w + t_c + 1 <= 16
    if width % 4 == 0 and blocks % 2 == 0:
        assert t_c * t_w >= 8  # enough independent accumulators to hide the FMA latency


@pytest.mark.parametrize("blocks, width", [(8, 56), (16, 28), (64, 49), (3, 5), (1, 1),
                                           (18, 196), (2, 112), (160, 51), (5, 7)])
def test_wide_tiles_fit_the_registers_and_waste_little(blocks: int, width: int) -> None:
    t_c, t_w = nchwc.wide_tile_shape(blocks, width)
    assert blocks % t_c == 0 and t_w <= width
    # accumulators + the broadcast input values + one filter vector: AVX2's 16 registers
    assert t_c * t_w <= nchwc.TILE_ACCUMULATORS and t_c * t_w + t_w + 1 <= 16
    computed = -(-width // t_w) * t_w
    assert computed - width < t_w
    if width >= 12:
        assert computed <= width * 1.1
    if blocks % 2 == 0 and width >= 12:
        assert t_c * t_w >= 8  # enough independent accumulators to hide the FMA latency
    if blocks % 4 == 0 and width % 3 == 0:
        assert (t_c, t_w) == (4, 3)  # 12 accumulators, 7 loads per 12 FMAs


def test_packed_filters_keep_every_weight() -> None:
    weight = rng.standard_normal((16, 24, 3, 3)).astype(np.float32)
    packed = nchwc.pack_filter(weight, 8, depthwise=False)
    assert packed.shape == (2, 3, 3, 3, 8, 8)
    assert packed[1, 2, 0, 1, 5, 3] == weight[8 + 3, 16 + 5, 0, 1]
    stem = nchwc.pack_filter(weight[:, :3], 8, depthwise=False, blocked=False)
    assert stem.shape == (2, 3, 3, 3, 8) and stem[1, 2, 0, 1, 3] == weight[11, 2, 0, 1]
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    assert nchwc.pack_filter(dw, 8, depthwise=True)[1, 2, 0, 3] == dw[11, 0, 2, 0]


def _conv_then(op: onnx.NodeProto, out_shape: list[object], *inits: onnx.TensorProto
               ) -> onnx.ModelProto:
    """x -> Conv (8 -> 16 channels, NCHWc) -> ``op`` (reading "c") -> y."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), op],
        "conv_then", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [const("w", 16, 8, 3, 3), *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _axes(*values: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), "axes")


def _between_convs(nodes: list[onnx.NodeProto], *inits: onnx.TensorProto) -> onnx.ModelProto:
    """x -> Conv "c" -> Conv "c2" (16 channels, NCHWc) -> ``nodes`` (reading "c" / "c2",
    writing "t", 16 channels) -> Conv -> y."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["c", "w2"], ["c2"], pads=[1, 1, 1, 1]), *nodes,
         helper.make_node("Conv", ["t", "w3"], ["y"], pads=[1, 1, 1, 1])],
        "between_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 6, 7])],
        [const("w", 16, 8, 3, 3), const("w2", 16, 16, 3, 3), const("w3", 16, 16, 3, 3),
         *inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _activation_transforms(mod: tvm.IRModule) -> list[str]:
    """The layout_transform lines of ``mod`` acting on activations (batch ``N``)."""
    return [ln for ln in _calls(mod, "layout_transform") if "(N," in ln.split("=")[0]]


def _matches_onnxruntime(build, proto: onnx.ModelProto) -> None:
    model = lepton_edge.load(proto)
    _, session = build(model, golden_count=0)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    for batch in (1, 3):  # symbolic batch: one build, any size
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


def test_max_and_min_of_conv_outputs_stay_blocked(build) -> None:
    """ONNX Max / Min (imported as a reduction of a stack) become maximum / minimum, which
    keep NCHWc: the only activation transforms are the model's input and output."""
    proto = _between_convs([helper.make_node("Max", ["c", "c2"], ["m"]),
                            helper.make_node("Min", ["m", "c2", "c"], ["t"])])
    mod = _converted(proto)
    text = mod["main"].script(show_meta=False)
    assert len(re.findall(r"R\.call_tir\((cls\.)?conv2d_nchwc", text)) == 3, text
    assert len(_activation_transforms(mod)) == 2, text
    assert _calls(mod, "maximum") and _calls(mod, "minimum") and not _calls(mod, "stack")
    _matches_onnxruntime(build, proto)


def test_a_spatial_attention_map_reads_nchw_and_the_other_convs_stay_blocked(build) -> None:
    """Mul by a sigmoid ``[N, 1, H, W]`` map (from a 1-channel convolution, which stays NCHW):
    the product runs in NCHW; the other three convolutions keep NCHWc and the nchwc rule."""
    proto = _between_convs([helper.make_node("Conv", ["c2", "ws", "bs"], ["s"],
                                             pads=[1, 1, 1, 1]),
                            helper.make_node("Sigmoid", ["s"], ["map"]),
                            helper.make_node("Mul", ["c2", "map"], ["t"])],
                           const("ws", 1, 16, 3, 3), const("bs", 1))
    mod = _converted(proto)
    text = mod["main"].script(show_meta=False)
    assert len(re.findall(r"R\.call_tir\((cls\.)?conv2d_nchwc", text)) == 3, text
    assert len(_calls(mod, "nn.conv2d")) == 1  # the 1-channel map
    multiply = _calls(mod, "multiply")
    assert len(multiply) == 1 and "(N, 16, 6, 7)" in multiply[0]  # in NCHW
    target = tvm.target.Target(TARGET)
    report = schedules.ScheduleReport()
    tvm.compile(lowering.import_onnx(proto), target=target,
                relax_pipeline=schedules.cpu_pipeline(target, report=report))
    convs = {name: rule for name, rule in report.rules.items() if "conv2d_nchwc" in name}
    # two kernels: the second and the last convolution have the same shapes and share one
    assert len(convs) == 2 and set(convs.values()) == {"nchwc"}, report.rules
    _matches_onnxruntime(build, proto)


@pytest.mark.parametrize("proto", [
    _conv_then(helper.make_node("ReduceMean", ["c", "axes"], ["y"]), ["N", 1, 6, 7], _axes(1)),
    _conv_then(helper.make_node("Concat", ["c", "c"], ["y"], axis=1), ["N", 32, 6, 7]),
    _between_convs([helper.make_node("Split", ["c2", "split"], ["a", "b"], axis=1),
                    helper.make_node("Concat", ["b", "a"], ["t"], axis=1)],
                   numpy_helper.from_array(np.array([8, 8], np.int64), "split")),
    _between_convs([helper.make_node("InstanceNormalization", ["c2", "scale", "bias"], ["t"])],
                   const("scale", 16), const("bias", 16)),
    _between_convs([helper.make_node("ReduceMax", ["c2", "axes"], ["r"]),
                    helper.make_node("Sub", ["c2", "r"], ["t"])], _axes(2, 3)),
    _between_convs([helper.make_node("ReduceMin", ["c2", "axes"], ["r"]),
                    helper.make_node("Add", ["c2", "r"], ["t"])], _axes(2, 3)),
], ids=["mean-channels", "concat", "split", "instance-norm", "reduce-max", "reduce-min"])
def test_ops_not_verified_in_nchwc_read_nchw(build, proto: onnx.ModelProto) -> None:
    """An op outside FOLLOWS_LAYOUT gets its operands back in NCHW; the convolutions stay
    converted and the numbers are onnxruntime's."""
    mod = lowering.import_onnx(proto)
    convs = sum(node.op_type == "Conv" for node in proto.graph.node)
    converted, count = nchwc.convert_conv_layout(mod, 8)
    assert count == convs
    assert "stop_lift_params" not in converted.script()  # the NCHW markers are gone
    _matches_onnxruntime(build, proto)


def test_a_failing_layout_conversion_is_named_and_leaves_nchw(monkeypatch) -> None:
    from tvm import relax

    mod = lowering.import_onnx(_conv_then(helper.make_node("Relu", ["c"], ["y"]),
                                          ["N", 16, 6, 7]))

    def failing(*_args: object) -> object:
        def fail(_mod: object) -> object:
            raise tvm.error.InternalError("traceback...\nCheck failed: some layout")
        return fail

    monkeypatch.setattr(relax.transform, "ConvertLayout", failing)
    with pytest.raises(nchwc.NotConvertible, match="ConvertLayout failed at .*: Check failed"):
        nchwc.convert_conv_layout(mod, 8)
    logged: list[str] = []
    kept = schedules.ConvertConvLayout(tvm.target.Target(TARGET), logged.append)(mod)
    assert kept.same_as(mod) and "kept in NCHW" in logged[0] and "some layout" in logged[0]
    # without a log (the Python API): a warning
    with pytest.warns(UserWarning, match="kept in NCHW .*some layout"):
        schedules.ConvertConvLayout(tvm.target.Target(TARGET))(mod)


def test_elementwise_ops_and_broadcast_constants_keep_nchwc(build) -> None:
    """Add of a [C, 1, 1] constant, Div by a [W] one, (constant [H, W]) - x, Sigmoid, Relu
    and a product of two blocked tensors between convolutions: no activation transform but at
    the model's ends (the constants are blocked while compiling). Then, numbers only: PRelu
    with a per-channel slope, Tanh (imported as a polynomial with a ``where``, which reads
    NCHW) and a GlobalAveragePool."""
    proto = _between_convs(
        [helper.make_node("Add", ["c2", "kc"], ["a"]),
         helper.make_node("Div", ["a", "kw"], ["d"]),
         helper.make_node("Sub", ["khw", "d"], ["s"]),
         helper.make_node("Sigmoid", ["s"], ["g"]),
         helper.make_node("Relu", ["c"], ["h"]),
         helper.make_node("Mul", ["g", "h"], ["t"])],
        const("kc", 16, 1, 1), numpy_helper.from_array(
            (rng.uniform(0.5, 2.0, 7) * rng.choice([-1, 1], 7)).astype(np.float32), "kw"),
        const("khw", 6, 7))
    mod = _converted(proto)
    assert len(_activation_transforms(mod)) == 2, mod["main"].script(show_meta=False)
    for op in ("add", "divide", "subtract", "sigmoid", "nn.relu", "multiply"):
        assert all("(N, 2, 6, 7, 8)" in ln for ln in _calls(mod, op)), op
    _matches_onnxruntime(build, proto)
    prelu = _between_convs([helper.make_node("PRelu", ["c2", "slope"], ["p"]),
                            helper.make_node("GlobalAveragePool", ["p"], ["q"]),
                            helper.make_node("Tanh", ["c"], ["h"]),
                            helper.make_node("Mul", ["h", "q"], ["t"])],
                           const("slope", 16, 1, 1))
    _matches_onnxruntime(build, prelu)


def test_a_global_pool_reads_nchwc_directly() -> None:
    proto = _conv_then(helper.make_node("ReduceMean", ["c", "axes"], ["y"]), ["N", 16, 1, 1],
                       _axes(2, 3))
    _, count = nchwc.convert_conv_layout(lowering.import_onnx(proto), 8)
    assert count == 1


def test_digits_cnn_with_its_dense_layers_matches_onnxruntime(build) -> None:
    """The sample digits CNN: NCHWc convolutions, then dense layers whose rows (the batch) are
    known only at run time, tiled wide along the columns (schedules._wide_tile)."""
    model = lepton_edge.load(Path(__file__).resolve().parents[2]
                             / "samples/digits/digits.onnx")
    _, session = build(model, golden_count=0)
    for batch in (1, 5, 64):
        feeds = {"image": rng.standard_normal((batch, 1, 8, 8)).astype(np.float32)}
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


@pytest.mark.parametrize(("extent", "tile", "panel", "want"), [
    (64, 16, 16, 64), (64, 16, None, 64), (10, 10, None, 10), (1000, 16, None, 40),
    (48, 16, 16, 48), (48, 24, 24, 48), (24, 24, 24, 24), (128, 16, 32, 64)])
def test_wide_tiles_hold_whole_vectors_and_panels(extent: int, tile: int, panel: int | None,
                                                   want: int) -> None:
    got = schedules._wide_tile(extent, tile, 8, 8, panel)
    assert got == want
    assert extent % got == 0 and got >= tile
    assert got == tile or (got % 8 == 0 and got <= 64)
    if panel is not None and got != tile:
        assert got % panel == 0 or panel % got == 0


def test_a_layout_inference_failure_names_the_op(monkeypatch) -> None:
    """Without the rewrite of Max to maximum, TVM's layout inference of the imported
    reduction fails: the reason names that op."""
    monkeypatch.setattr(nchwc, "stacked_extrema_as_ops", lambda mod: mod)
    mod = lowering.import_onnx(_between_convs([helper.make_node("Max", ["c", "c2"], ["t"])]))
    with pytest.raises(nchwc.NotConvertible, match="ConvertLayout failed at relax.max: "):
        nchwc.convert_conv_layout(mod, 8)


@pytest.mark.parametrize("blocks, oh, taps", [(20, 7, 1), (40, 7, 1), (120, 7, 1), (160, 7, 1),
                                              (64, 7, 9), (32, 14, 9), (12, 7, 1), (3, 7, 9)])
def test_small_planes_split_their_channels_into_balanced_parallel_tiles(blocks: int, oh: int,
                                                                        taps: int) -> None:
    """A small plane runs its channel tiles in parallel: an odd count below
    PLANE_MIN_PARALLEL (5 tiles of 4 blocks on MobileNetV2's 160-channel 7x7 layers: 3 + 2 on
    two threads) takes tiles of fewer blocks, never single-block ones, when that evens it."""
    t_c, t_w, flat, computed = nchwc.output_tiling(blocks, oh, oh, taps, True)
    assert flat and blocks % t_c == 0 and computed % t_w == 0
    tiles = blocks // t_c
    if any(blocks % t == 0 and (blocks // t) % 2 == 0 for t in (2, 3, 4)):
        assert tiles % 2 == 0 or tiles >= nchwc.PLANE_MIN_PARALLEL, (t_c, t_w)
    else:
        assert (t_c, tiles) == (3, 1)  # 3 blocks: nothing better than one tile
    if blocks % 4 == 0 and ((blocks // 4) % 2 == 0
                            or blocks // 4 >= nchwc.PLANE_MIN_PARALLEL):
        assert t_c == 4  # balanced already: the tile with the most channel blocks
    assert nchwc.output_tiling(20, 7, 7, 1, True)[:2] == (2, 5)


def test_a_balanced_small_plane_runs_its_tiles_in_parallel_and_matches_numpy() -> None:
    """The 160-channel 7x7 pointwise kernel (20 blocks in 10 tiles of 2, not 5 of 4): its
    parallel loop has 10 iterations at batch 1, and it computes the convolution."""
    from tvm import te
    from tvm.s_tir import Schedule

    x = te.placeholder((1, 4, 7, 7, 8), name="x")
    w = te.placeholder((20, 4, 1, 1, 8, 8), name="w")
    y = nchwc.conv2d_nchwc_te(x, w, (1, 1), (0, 0, 0, 0), False)
    out = te.compute(y.shape, lambda *i: te.max(y(*i), 0.0), name="relu")
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func([x, w, out])}))
    target = tvm.target.Target(TARGET)
    assert nchwc.schedule_nchwc(sch, target)
    assert re.findall(r"T\.parallel\((\d+)\)", sch.mod.script()) == ["10"]
    lib = tvm.compile(sch.mod, target=target)
    data = rng.standard_normal((1, 32, 7, 7)).astype(np.float32)
    weight = rng.standard_normal((160, 32, 1, 1)).astype(np.float32)
    blocked = data.reshape(1, 4, 8, 7, 7).transpose(0, 1, 3, 4, 2)
    args = [tvm.runtime.tensor(np.ascontiguousarray(blocked)),
            tvm.runtime.tensor(nchwc.pack_filter(weight, 8, depthwise=False)),
            tvm.runtime.tensor(np.zeros((1, 20, 7, 7, 8), np.float32))]
    lib["main"](*args)
    want = np.maximum(np.einsum("oi,nihw->nohw", weight[:, :, 0, 0], data), 0)
    got = args[2].numpy().transpose(0, 1, 4, 2, 3).reshape(1, 160, 7, 7)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_balanced_small_planes_match_onnxruntime(build) -> None:
    """MobileNetV2's tail in small: 7x7 pointwise layers with 160 and 96 output channels
    (20 and 12 blocks, tiled 2 blocks at a time) with ReLU6 and a residual add."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"]),
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"]),
        helper.make_node("Add", ["c1", "x"], ["y"]),
        helper.make_node("Conv", ["y", "w2"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "balanced_planes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 160, 7, 7])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 96, 7, 7])],
        [const("w0", 160, 160, 1, 1), const("b0", 160), const("w1", 160, 160, 1, 1),
         const("b1", 160), const("w2", 96, 160, 1, 1),
         numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6, np.float32), "hi")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert [nchwc.output_tiling(b, 7, 7, 1, True)[0] for b in (20, 12)] == [2, 2]
    _matches_onnxruntime(build, proto)


AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}  # 16 float lanes, 32 vector registers


def _host_has_avx512() -> bool:
    return schedules.vector_bits(tvm.target.Target(
        {"kind": "llvm", "mcpu": lowering.system_cpu()})) == 512


def sixteens() -> onnx.ModelProto:
    """Channels that are multiples of 16 (AVX-512's NCHW16c): a 3x3 pair on a 28-wide plane
    (4 x 4 tiles with 32 registers), a strided 3x3 to a 7x7 plane (one row of 49 pixels in
    2 x 7 tiles), a residual add, ReLU6 and a depthwise layer."""
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "x"], ["s1"]),
        helper.make_node("Conv", ["s1", "w2"], ["c2"], pads=[1, 1, 1, 1], strides=[4, 4]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"]),
        helper.make_node("Conv", ["r2", "wd"], ["y"], pads=[1, 1, 1, 1], group=32),
    ]
    graph = helper.make_graph(
        nodes, "sixteens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 28, 28])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 7, 7])],
        [const("w0", 64, 64, 3, 3), const("b0", 64), const("w1", 64, 64, 3, 3), const("b1", 64),
         const("w2", 32, 64, 3, 3), const("wd", 32, 1, 3, 3),
         numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6, np.float32), "hi")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_avx512_blocks_16_channels_or_8_when_that_blocks_more_convolutions() -> None:
    """AVX-512: NCHW16c when every convolution is a multiple of 16 channels, and for a model
    with 24-channel layers (MobileNetV2's 56x56x24) once they are zero-padded to 32
    (pad_channels, tests/targets/test_nchwc_pad.py); without that padding, NCHW8c, all its
    convolutions blocked, not those left in NCHW. AVX2 keeps NCHW8c."""
    assert nchwc.block_lanes(lowering.import_onnx(sixteens()), 16) == 16
    assert nchwc.block_lanes(lowering.import_onnx(cnn()), 16) == 8
    assert nchwc.block_lanes(lowering.import_onnx(cnn()), 8) == 8
    target = tvm.target.Target(AVX512)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nchwc, "PAD_CHANNELS", False)
        mod = schedules.ConvertConvLayout(target)(lowering.import_onnx(cnn()))
    assert len(re.findall(r"R\.call_tir\((?:cls\.)?conv2d_nchwc\w*, .*out_\w+="
                          r"R\.Tensor\(\(N, \d+, \d+, \d+, 8\)", mod["main"].script())) == 6
    for proto, lanes in ((cnn(), 16), (sixteens(), 16)):
        mod = schedules.ConvertConvLayout(target)(lowering.import_onnx(proto))
        text = mod["main"].script(show_meta=False)
        blocked = re.findall(r"R\.call_tir\((?:cls\.)?conv2d_nchwc\w*, .*out_\w+="
                             r"R\.Tensor\(\((\w+), (\d+), (\d+), (\d+), (\d+)\)", text)
        assert len(blocked) == (6 if proto.graph.name == "nchwc_cnn" else 4), text
        assert {int(b[-1]) for b in blocked} == {lanes}


@pytest.mark.parametrize("blocks, width", [(4, 56), (8, 28), (16, 14), (32, 49), (6, 112),
                                           (2, 112), (80, 49), (3, 5), (1, 1)])
def test_avx512_tiles_use_32_registers(blocks: int, width: int) -> None:
    """With AVX-512's 32 registers: up to TILE_ACCUMULATORS_32 accumulators, the broadcast
    values and a filter vector in registers, no more than one tile of extra columns; wider
    tiles than AVX2's 12 accumulators where the shape allows (ResNet-18's 56-wide 3x3 layer:
    4 x 4, not 4 x 3 computing 57 columns; measured 3-14% faster on ResNet-18's and
    MobileNetV2's blocked convolutions, 1 thread)."""
    t_c, t_w = nchwc.wide_tile_shape(blocks, width, registers=32)
    assert blocks % t_c == 0 and t_w <= width
    assert t_c * t_w <= nchwc.TILE_ACCUMULATORS_32 and t_c * t_w + t_w + 1 <= 32
    assert -(-width // t_w) * t_w - width < t_w
    if blocks % 4 == 0 and width % 4 == 0:
        assert t_c * t_w >= 16
    assert nchwc.wide_tile_shape(4, 56, registers=32) == (4, 4)
    # an NCHW input (the stem) keeps AVX2's tiles; AVX2 targets keep theirs
    assert nchwc.output_tiling(2, 112, 112, 9, False, 32)[:2] \
        == nchwc.output_tiling(2, 112, 112, 9, False)[:2] == nchwc.wide_tile_shape(2, 112)
    assert nchwc.output_tiling(4, 56, 56, 9, True)[:2] == (4, 3)


def test_avx512_kernels_schedule_the_wide_tiles() -> None:
    """The 4 x 4 tile of 16 lanes on AVX-512: the nchwc rule unrolls 16 accumulators of
    T.vectorized(16)."""
    report, scheduled = scheduled_build(sixteens(), AVX512)
    convs = {name: rule for name, rule in report.rules.items() if "conv2d_nchwc" in name}
    assert len(convs) == 4 and set(convs.values()) == {"nchwc"}, report.rules
    texts = [scheduled[name].script() for name in convs]
    assert all("T.vectorized(T.int64(16))" in t for t in texts)
    # the 28-wide 3x3 layers: 4 channel blocks x 4 columns (t_c x t_w unrolled loops)
    assert sum("T.unroll(T.int64(4))" in t and "T.unroll(T.int64(7))" not in t
               for t in texts) >= 2


@pytest.mark.skipif(not _host_has_avx512(), reason="needs an AVX-512 host")
def test_avx512_blocked_convolutions_match_onnxruntime(build) -> None:
    """On an AVX-512 host (the build targets it): NCHW16c with 32-register tiles, and the
    24-channel CNN in NCHW8c."""
    _matches_onnxruntime(build, sixteens())
    _matches_onnxruntime(build, cnn())


def _scheduled_conv(batch: int, cin: int, cout: int, size: int, k: int, target: dict) -> str:
    """The nchwc rule's kernel (TVMScript) of a padded k x k convolution in NCHW16c."""
    from tvm import te
    from tvm.s_tir import Schedule

    x = te.placeholder((batch, cin // 16, size, size, 16), name="x")
    w = te.placeholder((cout // 16, cin // 16, k, k, 16, 16), name="w")
    y = nchwc.conv2d_nchwc_te(x, w, (1, 1), (k // 2,) * 4, False, 32)
    out = te.compute(y.shape, lambda *i: te.max(y(*i), 0.0), name="relu")
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func([x, w, out])}))
    assert nchwc.schedule_nchwc(sch, tvm.target.Target(target))
    return sch.mod.script()


def test_avx512_a_small_plane_of_one_channel_tile_pads_in_the_parallel_loop() -> None:
    """AVX-512, a small output plane (flat) whose output channels are one register tile (the
    digits CNN's 8x8 16 -> 32 layer at batch 64): each image is padded inside the parallel
    loop by the thread that convolves it, not in a serial pass over the batch before it; a
    plane with more channel tiles (and AVX2) keeps the pass."""
    pad = f'T.sblock("{nchwc.PAD_BLOCK}'
    digits = _scheduled_conv(64, 16, 32, 8, 3, AVX512)
    assert digits.index(pad) > digits.index("T.parallel(")
    plane = _scheduled_conv(1, 64, 128, 7, 3, AVX512)  # 8 blocks, tiles of fewer
    assert plane.index(pad) < plane.index("T.parallel(")
    avx2 = _scheduled_conv(64, 16, 32, 8, 3, TARGET)
    assert avx2.index(pad) < avx2.index("T.parallel(")


def test_avx512_small_plane_kernels_match_numpy() -> None:
    """Small-plane kernels (one channel tile, padded in the parallel loop on AVX-512; two
    tiles) compiled for this host compute the convolution."""
    from tvm import te
    from tvm.s_tir import Schedule

    target = tvm.target.Target({"kind": "llvm", "mcpu": lowering.system_cpu()})
    for batch, cin, cout, size in ((5, 16, 32, 8), (2, 32, 64, 7)):
        x = te.placeholder((batch, cin // 16, size, size, 16), name="x")
        w = te.placeholder((cout // 16, cin // 16, 3, 3, 16, 16), name="w")
        y = nchwc.conv2d_nchwc_te(x, w, (1, 1), (1, 1, 1, 1), False, 32)
        sch = Schedule(tvm.IRModule({"main": te.create_prim_func([x, w, y])}))
        assert nchwc.schedule_nchwc(sch, target)
        kernel = tvm.compile(sch.mod, target=target)
        data = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
        weight = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
        xb = data.reshape(batch, cin // 16, 16, size, size).transpose(0, 1, 3, 4, 2)
        args = [tvm.runtime.tensor(np.ascontiguousarray(xb)),
                tvm.runtime.tensor(nchwc.pack_filter(weight, 16, depthwise=False)),
                tvm.runtime.tensor(np.zeros((batch, cout // 16, size, size, 16), np.float32))]
        kernel(*args)
        got = args[2].numpy().transpose(0, 1, 4, 2, 3).reshape(batch, cout, size, size)
        padded = np.pad(data, ((0, 0), (0, 0), (1, 1), (1, 1)))
        want = np.zeros_like(got)
        for ky in range(3):
            for kx in range(3):
                want += np.einsum("nchw,oc->nohw", padded[:, :, ky:ky + size, kx:kx + size],
                                  weight[:, :, ky, kx])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


def _flatten_classifier(also_output: bool) -> onnx.ModelProto:
    """x -> Conv (8 -> 16, NCHWc) -> Relu -> Flatten -> Gemm (a constant 672 x 10 weight)
    -> y; with `also_output`, the flattened NCHW activations are an output too."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "bg"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])]
    if also_output:
        outputs.append(helper.make_tensor_value_info("f", TensorProto.FLOAT, ["N", 672]))
    graph = helper.make_graph(
        nodes, "flatten_classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 6, 7])], outputs,
        [const("w", 16, 8, 3, 3), const("wg", 672, 10), const("bg", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("also_output", [False, True])
def test_a_flatten_classifier_reads_the_blocked_activations(build, also_output: bool) -> None:
    """The classifier's weight rows are permuted at compile time to the NCHWc order
    (nchwc.fold_flatten_transforms): no transform back to NCHW before it, unless the NCHW
    activations are needed elsewhere (an output here); the same numbers either way."""
    proto = _flatten_classifier(also_output)
    mod = _converted(proto)
    blocked_reshapes = [ln for ln in _calls(mod, "reshape") if "R.reshape(lv" in ln]
    back = [ln for ln in _calls(mod, "layout_transform") if "lambda i0, i1, i2, i3, i4:" in ln]
    assert blocked_reshapes, mod["main"].script(show_meta=False)
    assert len(back) == (1 if also_output else 0), back  # blocked -> NCHW
    model = lepton_edge.load(proto)
    _, session = build(model, golden_count=0)
    for batch in (1, 3):
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


def test_the_folded_weight_rows_follow_the_blocked_order() -> None:
    """The permutation itself, against numpy: x [N, C/c, H, W, c] flattened in its own order
    times the permuted weight equals the NCHW flatten times the original weight."""
    from tvm import relax

    lanes, blocks, height, width, k = 8, 2, 3, 5, 4
    weight = rng.standard_normal((blocks * lanes * height * width, k)).astype(np.float32)
    bb = relax.BlockBuilder()
    n = tvm.tirx.Var("N", "int64")
    x = relax.Var("x", relax.TensorType([n, blocks, height, width, lanes], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            nchw = bb.emit(relax.op.layout_transform(
                x, lambda i0, i1, i2, i3, i4: (i0, i1 * lanes + i4, i2, i3)))
            flat = bb.emit(relax.op.reshape(nchw, [n, blocks * lanes * height * width]))
            out = bb.emit_output(bb.emit(relax.op.matmul(flat, relax.const(weight))))
        bb.emit_func_output(out)
    mod, count = nchwc.fold_flatten_transforms(bb.get())
    assert count == 1 and not _calls(mod, "layout_transform")
    (permuted,) = [c.value.numpy() for c in _constants(mod["main"])
                   if hasattr(c.value, "numpy")]
    xv = rng.standard_normal((2, blocks, height, width, lanes)).astype(np.float32)
    as_nchw = xv.transpose(0, 1, 4, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(xv.reshape(2, -1) @ permuted, as_nchw @ weight, rtol=1e-5,
                               atol=1e-5)


def _constants(func: object) -> list[object]:
    from tvm import relax
    from tvm.ir.expr import Constant

    found: list[object] = []
    relax.analysis.post_order_visit(
        func, lambda e: found.append(e) if isinstance(e, Constant) else None)
    return found
