"""Default CPU schedules (lowering/schedules.py): same results as onnxruntime, and the kernels
really are scheduled (parallel outer loop, vectorized inner loop), at batch 1 and a symbolic
batch N."""

from __future__ import annotations
from typing import Any


import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import tirx

import lepton_edge
from lepton_edge.lowering import relax as lowering
from lepton_edge.lowering import schedules
from tests.conftest import assert_close, ort_run
from tests.e2e.test_numerics import residual_bn_cnn, transformer_block

rng = np.random.default_rng(3)
TARGET = {"kind": "llvm", "mcpu": "haswell"}  # AVX2: runs on any x86 machine we test on


def const(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def convs() -> onnx.ModelProto:
    """One input, one output per convolution kind (each becomes its own kernel)."""
    nodes = [
        helper.make_node("Conv", ["x", "w3"], ["regular"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w3b"], ["valid"]),  # no padding, 3x3
        helper.make_node("Conv", ["x", "wdw"], ["depthwise"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Conv", ["x", "w3"], ["strided"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["x", "wg"], ["grouped"], pads=[0, 1, 2, 1], group=2),
        helper.make_node("Conv", ["x", "w1", "b1"], ["pointwise_s2"], strides=[2, 2]),
        helper.make_node("Conv", ["x", "w7"], ["big_s2"], pads=[3, 3, 3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["x", "w3"], ["strided_odd"], pads=[1, 1, 1, 0], strides=[2, 2]),
        helper.make_node("Conv", ["x", "w3"], ["stride3"], pads=[1, 1, 1, 1], strides=[3, 3]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["pw"]),
        helper.make_node("Relu", ["pw"], ["pointwise_relu"]),
    ]
    outs = {"regular": [16, 12, 16], "valid": [24, 10, 14], "depthwise": [8, 12, 16],
            "strided": [16, 6, 8], "grouped": [12, 12, 16], "pointwise_s2": [16, 6, 8],
            "big_s2": [8, 6, 8], "strided_odd": [16, 6, 8], "stride3": [16, 4, 6],
            "pointwise_relu": [16, 12, 16]}
    graph = helper.make_graph(
        nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 16])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", *s]) for o, s in outs.items()],
        [const("w3", 16, 8, 3, 3), const("w3b", 24, 8, 3, 3), const("wdw", 8, 1, 3, 3),
         const("wg", 12, 4, 3, 3), const("w1", 16, 8, 1, 1), const("b1", 16),
         const("w7", 8, 8, 7, 7)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def matmuls() -> onnx.ModelProto:
    """Dense with bias + GELU (erf) epilogue, Gemm transB, and a batched matmul of activations."""
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["m"]),
        helper.make_node("Add", ["m", "ba"], ["mb"]),
        helper.make_node("Erf", ["mb"], ["e"]),
        helper.make_node("Mul", ["mb", "e"], ["dense_erf"]),
        helper.make_node("Gemm", ["x2d", "wg", "bg"], ["gemm"], transB=1),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xt", "x"], ["batched"]),
    ]
    outs = {"dense_erf": [20, 48], "gemm": [24], "batched": [40, 40]}
    graph = helper.make_graph(
        nodes, "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 20, 40]),
         helper.make_tensor_value_info("x2d", TensorProto.FLOAT, ["N", 40])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", *s]) for o, s in outs.items()],
        [const("wa", 40, 48), const("ba", 48), const("wg", 24, 40), const("bg", 24)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def small_cnn() -> onnx.ModelProto:
    return residual_bn_cnn()


def _feeds(model: lepton_edge.Model, batch: int) -> dict[str, np.ndarray]:
    return {spec.name: rng.standard_normal(
        [batch if isinstance(d, str) else d for d in spec.shape]).astype(np.float32)
        for spec in model.inputs}


def _legalized(proto: onnx.ModelProto) -> tvm.IRModule:
    return _legalized_mod(lowering.import_onnx(proto))


def _legalized_mod(mod: tvm.IRModule) -> tvm.IRModule:
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = tvm.target.Target(TARGET)
    with target:
        return tvm.transform.Sequential([*cpu.library_dispatch_passes(target),
                                         *cpu.legalize_passes(target)])(mod)


def _loops(func: tirx.PrimFunc) -> list[tirx.For]:
    """Every For loop of a scheduled kernel (TIR has no Python visitor here)."""
    found: list[tirx.For] = []
    stack = [func.body]
    while stack:
        node = stack.pop()
        if isinstance(node, tirx.For):
            found.append(node)
        for attr in ("body", "block", "seq", "then_case", "else_case"):
            child = getattr(node, attr, None) if hasattr(node, attr) else None
            if child is None or isinstance(child, (int, str)):
                continue
            if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
                stack.extend(child)
            else:
                stack.append(child)
    return found


def _loop_kinds(func: tirx.PrimFunc) -> set[str]:
    names = {tirx.ForKind.PARALLEL: "parallel", tirx.ForKind.VECTORIZED: "vectorized",
             tirx.ForKind.UNROLLED: "unrolled", tirx.ForKind.SERIAL: "serial"}
    return {names.get(loop.kind, str(loop.kind)) for loop in _loops(func)}


@pytest.mark.parametrize("builder", [convs, matmuls, small_cnn, transformer_block])
def test_untuned_build_matches_onnxruntime(builder, build) -> None:
    proto = builder()
    model = lepton_edge.load(proto)
    _, session = build(model, golden_count=1)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    for batch in (1, 3):  # the batch dimension is symbolic: one build, any size
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


@pytest.fixture
def small_parallel_threshold(monkeypatch):
    """The test models are tiny: below the real threshold nothing would run in parallel."""
    monkeypatch.setattr(schedules, "PARALLEL_MIN_WORK", 1 << 8)


@pytest.mark.parametrize("builder, kernels", [(convs, 10), (matmuls, 3)])
def test_heavy_kernels_are_tiled_parallel_and_vectorized(builder, kernels: int,
                                                         small_parallel_threshold) -> None:
    mod = _legalized(builder())
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(mod, TARGET, report=report)
    contraction = [n for n, rule in report.rules.items() if rule == "contraction"]
    assert len(contraction) >= kernels, report.rules
    for gvar, func in scheduled.functions_items():
        if gvar.name_hint not in contraction:
            continue
        assert func.attrs["tirx.is_scheduled"]
        kinds = _loop_kinds(func)
        assert {"parallel", "vectorized"} <= kinds, (gvar.name_hint, kinds)


def test_int8_kernels_with_requantization_epilogue_are_scheduled(small_parallel_threshold
                                                                ) -> None:
    model = lepton_edge.load(residual_bn_cnn())
    quantized = lepton_edge.quantize(model, rng.standard_normal((4, 3, 16, 16)).astype(
        np.float32))
    mod, _ = lowering.lower_int8(lowering.import_onnx(quantized.proto))
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(_legalized_mod(mod), TARGET, report=report)
    integer = [n for n in report.rules if ("conv2d" in n or "matmul" in n) and "requantize" in n]
    assert len(integer) >= 5, report.rules  # 5 convolutions + the classifier, requantized
    for name in integer:
        assert report.rules[name] == "contraction", (name, report.rules[name])
        kinds = _loop_kinds(scheduled[name])
        # The classifier (N x 16 x 5 MACs) is too small for a thread-pool launch.
        assert {"parallel", "vectorized"} <= kinds if "conv2d" in name else "vectorized" in kinds


def _batch_branches(func: tirx.PrimFunc) -> tuple[Any, tirx.Stmt, tirx.Stmt] | None:
    """(condition, then, else) of a kernel scheduled twice for a symbolic batch
    (schedules._with_parallel_variant), or None."""
    body = func.body.block.body
    if not isinstance(body, tirx.IfThenElse):
        return None
    return body.condition, body.then_case, body.else_case


def _holds(cond: Any, batch: int) -> bool:
    """The value of a condition on the one symbolic dimension at ``batch``."""
    from tvm.sym import Analyzer

    analyzer = Analyzer()
    (n,) = {v.name: v for v in _free_vars(cond)}.values()
    analyzer.bind(n, tvm.tirx.IntImm("int64", batch))
    return bool(analyzer.simplify(cond))


def _free_vars(expr: Any) -> list[Any]:
    found, stack = [], [expr]
    while stack:
        cur = stack.pop()
        if isinstance(cur, tirx.Var):
            found.append(cur)
        for attr in ("a", "b", "value", "args"):
            child = getattr(cur, attr, None) if hasattr(cur, attr) else None
            if child is None or isinstance(child, (int, str, float)):
                continue
            stack.extend(child if isinstance(child, (list, tuple)) or
                         type(child).__name__ == "Array" else [child])
    return found


def test_small_kernels_stay_on_one_thread_at_small_batches() -> None:
    """Below PARALLEL_MIN_WORK a thread-pool launch costs more than the work: at batch 1 these
    matmuls run on one thread; at a batch whose work reaches it they run in parallel (one
    kernel, two schedules, chosen per call by N * per-sample work)."""
    mod = _legalized(matmuls())
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(mod, TARGET, report=report)
    seen = 0
    for gvar, func in scheduled.functions_items():
        if isinstance(func, tirx.PrimFunc) and "matmul" in gvar.name_hint:
            assert "vectorized" in _loop_kinds(func), gvar.name_hint
            branches = _batch_branches(func)
            assert branches is not None, (gvar.name_hint, _loop_kinds(func))
            cond, parallel, serial = branches
            assert not _holds(cond, 1) and _holds(cond, 4096), cond
            assert "parallel" not in _loop_kinds(func.with_body(serial))
            assert "parallel" in _loop_kinds(func.with_body(parallel))
            assert report.variants[gvar.name_hint] == "parallel for large batches"
            seen += 1
    assert seen == 3
    assert "3 of 3 small kernel(s) parallel for large batches" in report.summary()



def test_plain_tvm_loops_are_not_reported_as_scheduled() -> None:
    """The structural check above can fail: TVM's legalized loops are all serial."""
    mod = _legalized(convs())
    for _, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc):
            assert "parallel" not in _loop_kinds(func)
            assert "vectorized" not in _loop_kinds(func)


def test_int8_rules_are_tried_first_and_scheduled_kernels_are_skipped(monkeypatch) -> None:
    from lepton_edge.lowering import x86_int8

    seen: list[str] = []

    def claim_first_conv(sch, target) -> bool:
        seen.append("called")
        if len(seen) == 1:
            sch.annotate(sch.get_loops(sch.get_child_blocks(
                sch.get_sblock(sch.mod["main"].body.block.name_hint))[0])[0], "claimed", 1)
            return True
        return False

    monkeypatch.setattr(x86_int8, "int8_rules", lambda target: [claim_first_conv])
    mod = _legalized(convs())
    report = schedules.ScheduleReport()
    once = schedules.apply_default_schedules(mod, TARGET, report=report)
    assert list(report.rules.values()).count("int8:claim_first_conv") == 1
    # Everything is scheduled now: a second application changes nothing.
    again = schedules.ScheduleReport()
    twice = schedules.apply_default_schedules(once, TARGET, report=again)
    assert again.rules == {}
    assert twice.same_as(once)


def test_vector_width_comes_from_the_target_features() -> None:
    assert schedules.vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 256
    assert schedules.vector_bits(
        tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 512
    assert schedules.vector_bits(tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) == 128


def test_a_refused_rule_is_reported_and_the_next_rule_gets_a_fresh_kernel(
        monkeypatch, small_parallel_threshold) -> None:
    from lepton_edge.lowering import x86_int8

    def vectorize_a_reduction(sch, target) -> bool:
        root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
        for block in sch.get_child_blocks(root):
            loops = sch.get_loops(block)
            if len(loops) == 7:  # the conv2d block: n, f, y, x, rc, ry, rx
                sch.vectorize(loops[4])  # a reduction loop: TVM refuses (ScheduleError)
        return True

    monkeypatch.setattr(x86_int8, "int8_rules", lambda target: [vectorize_a_reduction])
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(_legalized(convs()), TARGET, report=report)
    assert report.refused, report.rules
    for name, why in report.refused.items():
        assert why[0].startswith("int8:vectorize_a_reduction: "), why
        assert report.rules[name] == "contraction"
        assert {"parallel", "vectorized"} <= _loop_kinds(scheduled[name])
    assert "refused" in report.summary()


def _vectorized_loads(func: tirx.PrimFunc) -> list[tuple[Any, list[Any]]]:
    """(buffer load, vectorized loop variables its last index depends on) for every load in a
    kernel; block iterators are followed to the loop expressions they are bound to."""
    found: list[tuple[Any, list[Any]]] = []
    stack: list[tuple[Any, list[Any], list[tuple[Any, Any]]]] = [(func.body, [], [])]
    while stack:
        node, vec, binds = stack.pop()
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.VECTORIZED:
            vec = [*vec, node.loop_var]
        if hasattr(node, "iter_values") and hasattr(node, "block"):
            binds = [*binds, *zip((iv.var for iv in node.block.iter_vars), node.iter_values)]
        if type(node).__name__ in ("BufferLoad", "TensorLoad"):
            used = schedules._vars_in(node.indices[-1])
            for var, value in binds:
                if any(u.same_as(var) for u in used):
                    used += schedules._vars_in(value)
            found.append((node, [v for v in vec if any(u.same_as(v) for u in used)]))
        for attr in ("body", "block", "seq", "then_case", "else_case", "value", "a", "b",
                     "args", "true_value", "false_value", "condition", "init"):
            try:
                child = getattr(node, attr, None)
            except Exception:  # noqa: BLE001 - a field this node type does not have
                child = None
            if child is None or isinstance(child, (int, float, str)):
                continue
            if isinstance(child, (list, tuple)) or type(child).__name__ == "Array":
                stack.extend((c, vec, binds) for c in child)
            else:
                stack.append((child, vec, binds))
    return found


def test_pointwise_filters_are_packed_and_vectorized_along_output_channels(
        small_parallel_threshold) -> None:
    from lepton_edge.lowering import layout

    mod = lowering.import_onnx(convs())
    packed, count = layout.pack_conv2d_weights(mod, lanes=8)
    assert count == 2  # "pw" and "pointwise_s2"; 3x3, 7x7, grouped and depthwise stay OIHW
    scheduled = schedules.apply_default_schedules(_legalized_mod(packed), TARGET)
    checked = 0
    for _, func in scheduled.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        for load, vec in _vectorized_loads(func):
            shape = [int(d) for d in load.source.shape] if all(
                isinstance(d, tirx.IntImm) for d in load.source.shape) else []
            if shape != [8, 1, 1, 16]:
                continue
            # the packed filter [C_in, 1, 1, C_out] is read as a vector along C_out
            assert vec, "packed filter read element by element"
            checked += 1
    assert checked >= 2, "no vectorized read of a packed pointwise filter"
    # Integer convolutions are never repacked (the int8 rules own them).
    model = lepton_edge.load(residual_bn_cnn())
    quantized = lepton_edge.quantize(model, rng.standard_normal((2, 3, 16, 16)).astype(
        np.float32))
    int_mod, _ = lowering.lower_int8(lowering.import_onnx(quantized.proto))
    int_convs = [c for c in _calls(int_mod, "relax.nn.conv2d")
                 if str(c.args[0].ty.dtype) != "float32"]
    _, int_count = layout.pack_conv2d_weights(int_mod, lanes=8)
    assert int_convs and int_count == 0


def _calls(mod: tvm.IRModule, op_name: str) -> list[Any]:
    from tvm import relax

    found: list[Any] = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(
                e, relax.Call) and getattr(e.op, "name", "") == op_name else None)
    return found


def test_kernels_keep_noalias_next_to_symbolic_shape_functions() -> None:
    """With a symbolic batch, VMShapeLower adds a shape function without ``tirx.noalias`` and
    TVM 0.27 then drops ``noalias`` from every kernel of the library (4-5x slower convolutions);
    the pipeline marks the shape function so the kernels keep it."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    mod = lowering.import_onnx(small_cnn())
    target = tvm.target.Target(TARGET)

    def noalias_count(finalize: list[Any]) -> int:
        @tvm.transform.module_pass(opt_level=0)
        def pipeline(m: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
            with target:
                return tvm.transform.Sequential([
                    *cpu.library_dispatch_passes(target), *cpu.legalize_passes(target),
                    schedules.DefaultSchedules(target), *cpu.dataflow_lower_passes(target),
                    *finalize])(m)

        ex = tvm.compile(mod, target=target, relax_pipeline=pipeline)
        # kernel entry points whose arguments are noalias (a count over the whole text also
        # sees LLVM's own attributes on internal functions, which vary with kernel size)
        return sum(1 for line in ex.mod.imports[0].inspect_source("ll").splitlines()
                   if line.startswith("define") and "@__tvm_ffi_" in line
                   and "noalias" in line)

    ours, plain = (noalias_count(schedules.finalize_passes(target)),
                   noalias_count(cpu.finalize_passes(target)))
    # TVM's own passes lose noalias on kernel arguments (if this fails, TVM fixed it and
    # MarkShapeFuncsNoAlias can go).
    assert ours > plain, (ours, plain)


def depthwise_large() -> onnx.ModelProto:
    """Depthwise 3x3 convolutions on planes large enough to be padded per channel inside the
    convolution (schedules.STAGE_MIN_PLANE), stride 1 and 2, with a ReLU6 epilogue."""
    nodes = [
        helper.make_node("Conv", ["x", "wdw"], ["s1"], pads=[1, 1, 1, 1], group=8),
        helper.make_node("Clip", ["s1", "lo", "hi"], ["dw_s1"]),
        helper.make_node("Conv", ["x", "wdw"], ["dw_s2"], pads=[1, 1, 1, 1], group=8,
                         strides=[2, 2]),
    ]
    graph = helper.make_graph(
        nodes, "depthwise", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           ["N", 8, 56, 56])],
        [helper.make_tensor_value_info("dw_s1", TensorProto.FLOAT, ["N", 8, 56, 56]),
         helper.make_tensor_value_info("dw_s2", TensorProto.FLOAT, ["N", 8, 28, 28])],
        [const("wdw", 8, 1, 3, 3), numpy_helper.from_array(np.array(0, np.float32), "lo"),
         numpy_helper.from_array(np.array(6, np.float32), "hi")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _parallel_loops(func: tirx.PrimFunc) -> list[Any]:
    return [loop for loop in _loops(func) if loop.kind == tirx.ForKind.PARALLEL]


def test_large_depthwise_pads_each_channel_inside_the_convolution(
        small_parallel_threshold) -> None:
    """One parallel loop over (batch, channel) per depthwise kernel: the padding (and the
    stride-2 de-interleaving) happens per channel inside it, not as passes of its own."""
    mod = _legalized(depthwise_large())
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(mod, TARGET, report=report)
    depthwise = [n for n in report.rules if "conv2d" in n]
    assert len(depthwise) == 2, report.rules
    for name in depthwise:
        assert report.rules[name] == "contraction", report.refused.get(name)
        loops = _parallel_loops(scheduled[name])
        assert len(loops) == 1, (name, len(loops))
        # The padded input is written under the parallel loop (fill and copy, vectorized).
        text = scheduled[name].script()
        body = text[text.index("T.parallel("):]
        assert "pad_temp_pad_const" in body and "T.vectorized" in body, name
    # Small planes keep the whole-input padding passes (staging measured slower there).
    small = schedules.apply_default_schedules(_legalized(convs()), TARGET)
    dw = [f for _, f in small.functions_items() if isinstance(f, tirx.PrimFunc)
          and [_const_shape(p) for p in f.params][1:2] == [[8, 1, 3, 3]]]
    assert len(dw) == 1 and len(_parallel_loops(dw[0])) >= 2


def _const_shape(buffer: Any) -> list[int | None]:
    return [int(d) if isinstance(d, tirx.IntImm) else None for d in buffer.shape]


def test_large_depthwise_matches_onnxruntime(build) -> None:
    model = lepton_edge.load(depthwise_large())
    _, session = build(model, golden_count=1)
    for batch in (1, 2):
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


def odd_matmuls() -> onnx.ModelProto:
    """Constant-weight matmuls of awkward shapes (packed in column panels where N allows),
    Gemms whose rows are symbolic (N x rows folded by a Reshape), and a batched matmul of
    activations: M = 1 (batch 1) and 7, K = 37, N = 40 (panels of 8), 48 and 72 (panels of 24),
    20 (no panel width: plain layout); with AVX-512's 16 lanes only N = 48 has panels."""
    nodes = [
        helper.make_node("MatMul", ["x", "w40"], ["m7_n40"]),
        helper.make_node("MatMul", ["x2d", "w48"], ["mb"]),
        helper.make_node("Add", ["mb", "b48"], ["rows_n48_bias"]),
        helper.make_node("MatMul", ["x", "w20"], ["n20_plain"]),
        helper.make_node("Gemm", ["x2d", "wg"], ["gemm_n72"], transB=1),
        helper.make_node("Reshape", ["x16", "flat"], ["x16f"]),
        helper.make_node("Gemm", ["x16f", "w48", "b48"], ["symbolic_rows"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["batched"]),
    ]
    outs = {"m7_n40": ["N", 7, 40], "rows_n48_bias": ["N", 48], "n20_plain": ["N", 7, 20],
            "gemm_n72": ["N", 72], "symbolic_rows": ["M", 48], "batched": ["N", 7, 7]}
    graph = helper.make_graph(
        nodes, "odd_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 7, 37]),
         helper.make_tensor_value_info("x2d", TensorProto.FLOAT, ["N", 37]),
         helper.make_tensor_value_info("x16", TensorProto.FLOAT, ["N", 16, 37])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in outs.items()],
        [const("w40", 37, 40), const("w48", 37, 48), const("b48", 48), const("w20", 37, 20),
         const("wg", 72, 37), numpy_helper.from_array(np.array([-1, 37], np.int64), "flat")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _numpy_odd_matmuls(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]
                       ) -> dict[str, np.ndarray]:
    """float64 numpy reference for odd_matmuls()."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    x, x2d, x16 = (feeds[n].astype(np.float64) for n in ("x", "x2d", "x16"))
    out = {"m7_n40": x @ w["w40"], "rows_n48_bias": x2d @ w["w48"] + w["b48"],
           "n20_plain": x @ w["w20"], "gemm_n72": x2d @ w["wg"].T,
           "symbolic_rows": x16.reshape(-1, 37) @ w["w48"] + w["b48"],
           "batched": x @ x.transpose(0, 2, 1)}
    return {k: v.astype(np.float32) for k, v in out.items()}


def test_packed_matmuls_of_odd_shapes_match_numpy(build) -> None:
    proto = odd_matmuls()
    messages: list[str] = []
    _, session = build(lepton_edge.load(proto), golden_count=1, log=messages.append)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    # The constant-weight matmuls whose N has a panel width at this CPU's vector width: 4 of
    # 6 with 8 lanes (AVX2; N = 20 has none), also 4 with 16 (AVX-512: N = 48 in 16-lane
    # panels, 40 and 72 in 8-lane ones: schedules.MATMUL_MIN_LANES).
    from lepton_edge.lowering.layout import matmul_tile
    from lepton_edge.lowering.relax import system_cpu

    lanes = schedules.vector_bits(tvm.target.Target({"kind": "llvm",
                                                     "mcpu": system_cpu()})) // 32
    panels = sum(matmul_tile(n, lanes, schedules.MATMUL_VECTORS, schedules.MATMUL_MIN_LANES)
                 is not None for n in (40, 48, 20, 72, 48))
    assert panels == {8: 4, 16: 4}.get(lanes, panels)
    assert sum(matmul_tile(n, 16, schedules.MATMUL_VECTORS) is not None
               for n in (40, 48, 20, 72, 48)) == 2  # 16-lane panels only
    assert any(f"weights of {panels} matmul(s) in column panels" in m for m in messages), messages
    for batch in (1, 5):  # M = 1 rows for the 2-D inputs at batch 1; 16 x batch folded rows
        feeds = _feeds(lepton_edge.load(proto), batch)
        assert_close(session.run(feeds), _numpy_odd_matmuls(proto, feeds), rel=1e-5)


def test_packed_weights_are_read_as_contiguous_panel_vectors(small_parallel_threshold) -> None:
    from lepton_edge.lowering import layout

    packed, count = layout.pack_matmul_weights(lowering.import_onnx(odd_matmuls()), lanes=8,
                                               vectors=3)
    assert count == 4
    # w48 feeds a MatMul and a Gemm: packed once, both kernels read the same constant
    from tvm import relax
    from tvm.ir.expr import Constant

    w48: list[Any] = []
    for _, func in packed.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: w48.append(e) if isinstance(
                e, Constant) and tuple(getattr(e.value, "shape", ())) == (2, 37, 24) else None)
    assert w48 and all(c.same_as(w48[0]) for c in w48), len(w48)
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(_legalized_mod(packed), TARGET,
                                                  report=report)
    readers = panel_readers(scheduled, report, [(5, 37, 8), (2, 37, 24), (3, 37, 24)])
    for funcs in readers.values():  # no run-time copy of the weight (a [K, N] weight gets one)
        assert all("_global" not in func.script() for func in funcs)


def panel_readers(scheduled: tvm.IRModule, report: schedules.ScheduleReport,
                  shapes: list[tuple[int, int, int]]
                  ) -> dict[tuple[int, int, int], list[Any]]:
    """{panel shape [N / t, K, t]: the kernels reading it}: every packed panel of `shapes` is
    read, by "contraction" kernels only, always as whole vectors."""
    readers: dict[tuple[int, int, int], list[Any]] = {}
    for gvar, func in scheduled.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        for load, vec in _vectorized_loads(func):
            shape = tuple(_const_shape(load.source))
            if shape in shapes:
                assert report.rules[gvar.name_hint] == "contraction", gvar.name_hint
                assert vec, f"{gvar.name_hint}: panel {shape} read element by element"
                readers.setdefault(shape, []).append(func)
    assert sorted(readers) == sorted(shapes), (sorted(readers), shapes)
    return readers


def test_avx512_packs_columns_of_8_lanes_in_narrow_panels(small_parallel_threshold) -> None:
    """AVX-512 (16 lanes): N = 40 and 72 (no multiple of 16, of 8 yes: a 1000-class
    classifier) are packed in panels of 8-lane vectors (schedules.MATMUL_MIN_LANES) and read
    with whole 8-lane vectors, not unpacked with the 10-lane pieces LLVM splits (MobileNetV2's
    1280 -> 1000 kernel: 0.55 -> 0.19 ms from memory, 1 thread, Zen 4); N = 20 stays plain."""
    from lepton_edge.lowering import layout

    packed, count = layout.pack_matmul_weights(lowering.import_onnx(odd_matmuls()), lanes=16,
                                               vectors=3, min_lanes=schedules.MATMUL_MIN_LANES)
    assert count == 4
    target = {"kind": "llvm", "mcpu": "skylake-avx512"}
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(_legalized_mod(packed), target, report=report)
    readers = panel_readers(scheduled, report, [(5, 37, 8), (3, 37, 24), (1, 37, 48)])
    for shape, funcs in readers.items():
        for func in funcs if shape[2] % 16 else ():
            lanes = {int(lp.extent) for lp in _loops(func) if lp.kind == tirx.ForKind.VECTORIZED}
            assert lanes == {8}, (shape, lanes)


def test_symbolic_rows_are_register_tiled_without_bounds_checks(
        small_parallel_threshold) -> None:
    """A Gemm over N * 16 folded rows: the row loop is split by 4 (a divisor of 16), for any N
    without a predicate, instead of one row per tile."""
    mod = _legalized(odd_matmuls())
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(mod, TARGET, report=report)
    found = 0
    for gvar, func in scheduled.functions_items():
        if report.rules.get(gvar.name_hint) != "contraction":
            continue
        rows = [p for p in func.params if hasattr(p, "shape") and len(p.shape) == 2
                and _const_shape(p)[0] is None and "16" in str(p.shape[0])]
        if not rows:
            continue
        unrolled = [int(lp.extent) for lp in _loops(func) if lp.kind == tirx.ForKind.UNROLLED
                    and isinstance(lp.extent, tirx.IntImm)]
        assert 4 in unrolled, (func.script(), unrolled)
        assert "T.where" not in func.script()
        found += 1
    assert found >= 1


def test_gelu_epilogue_joins_the_matmul_tile(small_parallel_threshold) -> None:
    """Dense + bias + x * erf(x): the erf reads the biased value twice; every epilogue stage
    is inlined into the register tile's write-back (one parallel loop, no whole-output
    intermediate buffers), and erf is the vectorizable rational, not a libm call."""
    mod = lowering.import_onnx(matmuls())
    target = tvm.target.Target(TARGET)
    mod = schedules.VectorMath()(mod)
    scheduled = schedules.apply_default_schedules(_legalized_mod(mod), target)
    dense = [f for g, f in scheduled.functions_items() if isinstance(f, tirx.PrimFunc)
             and "erf" in g.name_hint]
    assert len(dense) == 1
    text = dense[0].script()
    assert len(_parallel_loops(dense[0])) == 1
    assert "T.erf" not in text and "T.Select" in text
    # an intermediate in memory covering the whole output would be sized by the symbolic batch
    # N (the register tile's accumulator is declared so too, but in "local" scope)
    allocs = [line for line in text.splitlines() if "alloc_buffer(" in line]
    assert not any("alloc_buffer((N" in line and 'scope="local"' not in line
                   for line in allocs), allocs


def batch_dense() -> onnx.ModelProto:
    """Dense layers whose rows are the symbolic batch (no constant factor): 40 -> 64 (column
    panels of 16: 6-row tiles) with bias + ReLU, and 64 -> 10 (no panels: 12-row tiles of 5
    lanes), like digits' classifier."""
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["hidden"]),
        helper.make_node("Gemm", ["hidden", "w2", "b2"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "batch_dense", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 40])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [const("w1", 64, 40), const("b1", 64), const("w2", 10, 64), const("b2", 10)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_rows_match_numpy_for_any_row_count(build) -> None:
    """One build; row counts below a tile (the one-row schedule), whole tiles, whole tiles plus
    a remainder, and a remainder-only count the blocked schedule may not take."""
    proto = batch_dense()
    _, session = build(lepton_edge.load(proto), golden_count=1)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    for batch in (1, 5, 6, 7, 12, 13, 24, 31):
        x = rng.standard_normal((batch, 40)).astype(np.float32)
        hidden = np.maximum(x.astype(np.float64) @ w["w1"].T + w["b1"], 0.0)
        want = (hidden @ w["w2"].T + w["b2"]).astype(np.float32)
        got = session.run({"x": x})
        assert_close(got, {"logits": want}, rel=1e-5)


def _lowered_loops(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """The kernel after TVM's lowering up to loop partitioning and unrolling (the passes of
    tvm.s_tir.pipeline that shape the loops LLVM gets)."""
    from tvm import s_tir

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")
                        .with_attr("target", tvm.target.Target(TARGET))})
    return tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.StmtSimplify(), s_tir.transform.LowerOpaqueBlock(),
        tirx.transform.FlattenBuffer(), s_tir.transform.LoopPartition(),
        tirx.transform.VectorizeLoop(True), tirx.transform.UnrollLoop(),
        tirx.transform.StmtSimplify()])(mod)["main"]


def test_batch_rows_are_register_tiled_with_a_condition_free_main_loop() -> None:
    """Rows known only at run time: the kernel chooses per call between row tiles (6 rows x 16
    columns here) and one row at a time; after TVM's loop partitioning the row tiles' reduction
    loop holds the 12 vector updates with no bounds check, and the accumulators are a
    constant-size register tile (not a buffer sized by the batch)."""
    from lepton_edge.lowering import layout

    mod, count = layout.pack_matmul_weights(lowering.import_onnx(batch_dense()), lanes=8,
                                            vectors=3)
    assert count == 1  # 64 columns: panels of 16
    mod = _legalized_mod(mod)
    report = schedules.ScheduleReport()
    scheduled = schedules.apply_default_schedules(mod, TARGET, report=report)
    dense = [(g.name_hint, f) for g, f in scheduled.functions_items()
             if isinstance(f, tirx.PrimFunc) and "matmul" in g.name_hint]
    assert len(dense) == 2
    for name, func in dense:
        assert report.rules[name] == "contraction"
        text = func.script()
        assert "pragma_loop_partition_hint" in text, name  # the row-tile loop
        lowered = _lowered_loops(func)
        k_loops = [lp for lp in _loops(lowered) if isinstance(lp.extent, tirx.IntImm)
                   and int(lp.extent) in (40, 64) and isinstance(lp.body, tirx.SeqStmt)]
        clean = [lp for lp in k_loops if len(lp.body.seq) == 12
                 and all(isinstance(st, tirx.BufferStore) for st in lp.body.seq)]
        assert clean, (name, lowered.script())
        allocs = [line for line in lowered.script().splitlines() if "alloc_local" in line]
        assert allocs and not any("N" in line for line in allocs), allocs


def test_rational_erf_matches_math_erf(build) -> None:
    import math

    graph = helper.make_graph(
        [helper.make_node("Erf", ["x"], ["y"])], "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])])
    model = lepton_edge.load(helper.make_model(graph, opset_imports=[
        helper.make_opsetid("", 17)]))
    messages: list[str] = []
    _, session = build(model, golden_count=1, log=messages.append)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    assert any("erf: 1 float32 call" in m for m in messages), messages
    x = np.concatenate([np.linspace(-5, 5, 64 * 60, dtype=np.float32),
                        rng.standard_normal(64 * 3).astype(np.float32) * 3,
                        np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, 3.92, 40.0]
                                 * 8, np.float32)]).reshape(-1, 64)
    y = session.run({"x": x})["y"]
    want = np.array([math.erf(v) if not np.isnan(v) else np.nan for v in x.ravel().tolist()],
                    np.float64).reshape(x.shape)
    assert np.array_equal(np.isnan(y), np.isnan(want))
    finite = ~np.isnan(want)
    assert np.abs(y[finite] - want[finite]).max() <= 4e-7
    tiny = np.abs(x) < 1e-3  # relative accuracy near zero (erf(x) ~ 1.128 x)
    assert np.allclose(y[tiny], want[tiny], rtol=1e-6, atol=0)


def reductions() -> onnx.ModelProto:
    """Softmax over the last axis (vectorizable exp + vectorized max/sum) and over a middle
    axis (TVM's own), and last-axis reductions of a vector multiple (24) and not (13)."""
    nodes = [
        helper.make_node("Softmax", ["x"], ["softmax_last"], axis=-1),
        helper.make_node("Softmax", ["x"], ["softmax_mid"], axis=1),
        helper.make_node("ReduceSum", ["x", "last"], ["sum24"], keepdims=0),
        helper.make_node("ReduceMax", ["y", "last"], ["max13"], keepdims=0),
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["norm"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "reductions",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 24]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 13])],
        [helper.make_tensor_value_info("softmax_last", TensorProto.FLOAT, ["N", 5, 24]),
         helper.make_tensor_value_info("softmax_mid", TensorProto.FLOAT, ["N", 5, 24]),
         helper.make_tensor_value_info("sum24", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("max13", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("norm", TensorProto.FLOAT, ["N", 5, 24])],
        [numpy_helper.from_array(np.array([-1], np.int64), "last"), const("g", 24),
         const("b", 24)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_softmax_and_vectorized_reductions_match_onnxruntime(build) -> None:
    model = lepton_edge.load(reductions())
    messages: list[str] = []
    _, session = build(model, golden_count=1, log=messages.append)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    assert any("softmax: 1 float32 call" in m for m in messages), messages  # not axis=1
    for batch in (1, 3):
        feeds = _feeds(model, batch)
        feeds["x"][0, 0, :5] = -np.inf  # masked scores: exactly 0 after softmax
        feeds["x"][0, 1, 3] = 80.0  # a dominant logit
        feeds["x"][0, 2] *= 40.0  # exponents far below EXP_LOW for most entries
        want = ort_run(model.proto, feeds)
        got = session.run(feeds)
        for name in ("softmax_last", "softmax_mid", "sum24", "max13"):
            np.testing.assert_allclose(got[name], want[name], rtol=2e-6, atol=1e-7,
                                       err_msg=name)
        assert (got["softmax_last"][0, 0, :5] == 0).all()
        # LayerNorm of a row holding -inf is NaN in both; compare the other rows
        np.testing.assert_allclose(got["norm"][:, 1:], want["norm"][:, 1:], rtol=1e-5,
                                   atol=1e-5)
        assert np.array_equal(np.isnan(got["norm"]), np.isnan(want["norm"]))


def test_rational_exp_matches_numpy() -> None:
    """exp over the whole float32 range, +-inf and NaN, through a vectorized kernel."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def kernel(a: T.Buffer((4096,), "float32"), b: T.Buffer((4096,), "float32")) -> None:
        for i0 in range(512):
            for i1 in T.vectorized(8):
                b[i0 * 8 + i1] = schedules.rational_exp(a[i0 * 8 + i1])

    lib = tvm.compile(tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target(TARGET))
    x = np.concatenate([np.linspace(-90, 90, 4000, dtype=np.float32),
                        np.array([np.nan, np.inf, -np.inf, 0.0, 88.72, -86.6, 1e-8, -1e-8]
                                 * 12, np.float32)])
    out = tvm.runtime.tensor(np.zeros(4096, np.float32))
    lib["main"](tvm.runtime.tensor(x), out)
    y = out.numpy()
    want = np.exp(x.astype(np.float64))
    assert np.array_equal(np.isnan(y), np.isnan(x))
    normal = np.isfinite(x) & (x > schedules.EXP_LOW) & (x < schedules.EXP_HIGH)
    assert np.abs(y[normal] / want[normal] - 1).max() < 3e-7
    assert (y[x < schedules.EXP_LOW] == 0).all() and (y[x > schedules.EXP_HIGH] == np.inf).all()


def test_row_dispatch_kernels_allocate_shared_stages_once(build) -> None:
    """A Resize whose scales come at run time has symbolic output rows, so the contraction
    rule builds its two-schedule kernel (_dispatch); a stage both schedules share is
    allocated once (it was allocated twice: "resize_src has duplicate definitions", the
    build failed and fell back to onnxruntime; ONNX node test
    resize_downsample_scales_linear_half_pixel_symmetric)."""
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear",
                          coordinate_transformation_mode="half_pixel_symmetric")],
        "resize_runtime_scales",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 4]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, "H", "W"])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    _, session = build(lepton_edge.load(proto), golden_count=0, fallback=False)
    assert [p.target for p in session.placement.values()] == ["cpu"]
    x = np.array([[[[1.0, 2.0, 3.0, 4.0]]]], np.float32)
    for scales in ([1.0, 1.0, 1.0, 0.6], [1.0, 1.0, 2.0, 1.5]):
        feeds = {"x": x, "scales": np.array(scales, np.float32)}
        assert_close(session.run(feeds), ort_run(proto, feeds))


@pytest.mark.parametrize("builder", [convs, matmuls, small_cnn, batch_dense])
def test_large_batches_of_small_kernels_match_onnxruntime(builder, build) -> None:
    """The parallel branch of kernels scheduled twice (see above) gives the numbers too."""
    proto = builder()
    model = lepton_edge.load(proto)
    _, session = build(model, golden_count=1)
    for batch in (1, 300):
        feeds = _feeds(model, batch)
        assert_close(session.run(feeds), ort_run(model.proto, feeds))


def _first_parallel_batch(func: tirx.PrimFunc) -> int:
    """The smallest power-of-two batch at which a dispatched kernel takes its parallel branch."""
    cond = _batch_branches(func)[0]
    batch = 1
    while not _holds(cond, batch):
        batch *= 2
        assert batch <= 1 << 24, cond
    return batch


def test_avx512_symbolic_batch_kernels_go_parallel_from_parallel_min_work() -> None:
    """AVX-512 targets switch a symbolic-batch kernel to its parallel schedule once N * per-sample
    work reaches PARALLEL_MIN_WORK (schedules.batch_parallel_min_work: measured on Zen 4, 2
    threads, the digits CNN's small convs/pool and a batch-64 MLP ran faster parallel); AVX2
    keeps BATCH_PARALLEL_MIN_WORK: the same kernels go parallel at a 16x larger batch. (Last in
    this file: matmuls() draws from the shared rng, and earlier tests' feeds stay as they were.)"""
    avx2 = tvm.target.Target(TARGET)
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    assert schedules.batch_parallel_min_work(avx2) == schedules.BATCH_PARALLEL_MIN_WORK
    assert schedules.batch_parallel_min_work(avx512) == schedules.PARALLEL_MIN_WORK
    assert schedules.BATCH_PARALLEL_MIN_WORK // schedules.PARALLEL_MIN_WORK == 16
    mod = _legalized(matmuls())
    first = {}
    for target in (avx2, avx512):
        scheduled = schedules.apply_default_schedules(mod, target)
        first[str(target.attrs["mcpu"])] = {
            gvar.name_hint: _first_parallel_batch(func)
            for gvar, func in scheduled.functions_items()
            if isinstance(func, tirx.PrimFunc) and "matmul" in gvar.name_hint}
    assert len(first["haswell"]) == 3, first
    assert first["haswell"].keys() == first["skylake-avx512"].keys(), first
    for name, batch in first["haswell"].items():
        assert batch == 16 * first["skylake-avx512"][name], (name, first)


def test_a_reshape_keeps_one_schedule_so_it_can_become_a_view() -> None:
    """A pure reshape with a symbolic batch gets no second (parallel) schedule: the kernel
    holding two is no reshape pattern any more, and RewriteDataflowReshape would leave it a
    copy instead of a view (the digits CNN's flatten)."""
    from tvm import relax, te

    n = tirx.Var("N", "int64")
    dims = [tirx.IntImm("int64", d) for d in (2, 4, 4, 16)]
    x = te.placeholder((n, *dims), "float32", name="x")
    flat = te.compute((n, tirx.IntImm("int64", 512)),
                      lambda i, j: x[i, j // 256, j // 64 % 4, j // 16 % 4, j % 16],
                      name="T_reshape")
    func = te.create_prim_func([x, flat])
    assert relax.analysis.has_reshape_pattern(func)
    report = schedules.ScheduleReport()
    mod = schedules.apply_default_schedules(tvm.IRModule({"reshape": func}), TARGET,
                                            report=report)
    assert report.rules["reshape"] == "generic" and not report.variants, report
    assert _batch_branches(mod["reshape"]) is None
    assert relax.analysis.has_reshape_pattern(mod["reshape"])
