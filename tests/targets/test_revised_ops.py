"""Ops revised or added after opset 25 that lepton-edge compiles itself (issue #6).

BitShift-28, CumProd-26, BitCast-26 and Mod-28 get converters of their own
(lowering/dynamic_ops.py, reached through the private names plan.py gives them), newer ops with
an ONNX function body (CausalConvWithState-27, LinearAttention-27, ...) are expanded at the
model's opset, and Scan is unrolled (lowering/bodies.py). Each model holds many cases (dtypes,
attributes, edge values) so it is compiled once; every subgraph must be placed on the cpu
target (no onnxruntime), and the outputs are compared with onnx's reference implementation,
with numpy written here, and with onnxruntime where it implements the op.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx.reference import ReferenceEvaluator

import lepton_edge

RNG = np.random.default_rng(11)


def _model(nodes: list[onnx.NodeProto], inputs: list[tuple[str, int, list[Any]]],
           outputs: list[tuple[str, int]], opset: int) -> onnx.ModelProto:
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                         [h.make_tensor_value_info(n, t, None) for n, t in outputs])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 11
    return onnx.shape_inference.infer_shapes(model)  # (types the outputs)


def _compiled(model: onnx.ModelProto, tmp_path: Path) -> Any:
    loaded = lepton_edge.load(model)
    plan = lepton_edge.partition(loaded, ["cpu"])
    assert {sg.target for sg in plan.subgraphs} == {"cpu"}, plan.explain()
    path = tmp_path / "m.lepton"
    lepton_edge.compile(loaded, ["cpu"], golden_count=0).save(path)
    session = lepton_edge.runtime.load(path, fallback=False)
    assert {p.device for p in session.placement.values()} == {"cpu:0"}
    return session


def _reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        outs = ReferenceEvaluator(model).run(None, feeds)
    return {o.name: np.asarray(v) for o, v in zip(model.graph.output, outs, strict=True)}


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """onnxruntime's outputs, or None where it does not implement the op at this opset."""
    try:
        session = ort.InferenceSession(model.SerializeToString())
    except Exception:  # noqa: BLE001 - NOT_IMPLEMENTED for the newest opsets
        return None
    outs = session.run(None, feeds)
    return {o.name: v for o, v in zip(model.graph.output, outs, strict=True)}


def _same_bits(got: np.ndarray, want: np.ndarray, name: str) -> None:
    """Equal values, NaN where NaN, and the sign of every zero."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if got.dtype.kind == "f":
        assert np.array_equal(np.isnan(got), np.isnan(want)), (name, got, want)
        ok = ~np.isnan(want)
        np.testing.assert_array_equal(got[ok], want[ok], err_msg=name)
        zero = ok & (want == 0)
        np.testing.assert_array_equal(np.signbit(got[zero]), np.signbit(want[zero]), err_msg=name)
    else:
        np.testing.assert_array_equal(got, want, err_msg=name)


# ------------------------------------------------------------------------------ BitShift

_SHIFT_TYPES = [(T.INT8, np.int8), (T.INT16, np.int16), (T.INT32, np.int32), (T.INT64, np.int64),
                (T.UINT8, np.uint8), (T.UINT16, np.uint16), (T.UINT32, np.uint32),
                (T.UINT64, np.uint64)]


def _shift_numpy(x: np.ndarray, y: np.ndarray, left: bool) -> np.ndarray:
    """BitShift-28 by Python integers: the spec's arithmetic right shift, wraparound left
    shift, and sign fill (-1 / 0) for shift amounts < 0 or >= the type's bits."""
    bits = x.dtype.itemsize * 8
    out = []
    for a, s in zip(np.broadcast_to(x, np.broadcast_shapes(x.shape, y.shape)).ravel().tolist(),
                    np.broadcast_to(y, np.broadcast_shapes(x.shape, y.shape)).ravel().tolist(),
                    strict=True):
        if s < 0 or s >= bits:
            v = -1 if (not left and a < 0) else 0
        else:
            v = (a << s) if left else (a >> s)  # Python's >> is arithmetic
            v &= (1 << bits) - 1
            if x.dtype.kind == "i" and v >= 1 << (bits - 1):
                v -= 1 << bits
        out.append(v)
    return np.array(out, dtype=x.dtype).reshape(np.broadcast_shapes(x.shape, y.shape))


def test_bitshift_28_signed_and_out_of_range_shifts(tmp_path: Path) -> None:
    nodes, inputs, outputs, feeds = [], [], [], {}
    for elem, dt in _SHIFT_TYPES:
        info = np.iinfo(dt)
        bits = np.dtype(dt).itemsize * 8
        x = np.array([info.min, info.min + 1, -5 if info.min else 5, -1 if info.min else 1,
                      0, 1, 7, info.max], dt)
        shifts = [0, 1, 3, bits - 1, bits, bits + 3] + ([-1, -bits] if info.min else [2, 1])
        y = np.array(shifts, dt)
        name = np.dtype(dt).name
        feeds[f"x_{name}"], feeds[f"s_{name}"] = x.reshape(1, 8), y.reshape(8, 1)  # broadcast
        inputs += [(f"x_{name}", elem, [1, 8]), (f"s_{name}", elem, [8, 1])]
        for direction in ("LEFT", "RIGHT"):
            out = f"{direction.lower()}_{name}"
            nodes.append(h.make_node("BitShift", [f"x_{name}", f"s_{name}"], [out],
                                     direction=direction))
            outputs.append((out, elem))
    model = _model(nodes, inputs, outputs, 28)
    session = _compiled(model, tmp_path)
    assert session.placement  # every subgraph on the cpu (checked in _compiled)
    got = session.run(feeds)
    want = _reference(model, feeds)
    for out, _ in outputs:
        name = out.split("_", 1)[1]
        mine = _shift_numpy(feeds[f"x_{name}"], feeds[f"s_{name}"], out.startswith("left"))
        _same_bits(want[out], mine, f"{out}: onnx reference vs numpy")
        _same_bits(got[out], mine, out)


# ------------------------------------------------------------------------------- CumProd


def _cumprod_numpy(x: np.ndarray, axis: int, exclusive: bool, reverse: bool) -> np.ndarray:
    y = np.flip(x, axis) if reverse else x
    if exclusive:
        ones = np.ones_like(np.take(y, [0], axis=axis))
        y = np.concatenate([ones, np.take(y, range(y.shape[axis] - 1), axis=axis)], axis=axis)
    out = np.cumprod(y, axis=axis, dtype=x.dtype)
    return np.flip(out, axis) if reverse else out


def test_cumprod_26_attributes_types_and_runtime_axis(tmp_path: Path) -> None:
    x64 = RNG.uniform(0.5, 1.5, (2, 3, 4))
    x32 = np.array([[1, -2, 3, 4], [5, 0, -1, 2], [2, 2, 2, 2]], np.int32)
    feeds = {"x64": x64, "x32": x32, "xf": RNG.uniform(-2, 2, (3, 5)).astype(np.float32),
             "axis": np.array(1, np.int64)}
    nodes, outputs, cases = [], [], []
    for excl in (0, 1):
        for rev in (0, 1):
            for axis in (0, 2, -1):
                out = f"d_{excl}{rev}_{axis}"
                const = f"ax_{out}"
                nodes += [h.make_node("Constant", [], [const],
                                      value=onnx.numpy_helper.from_array(np.array(axis,
                                                                                  np.int32))),
                          h.make_node("CumProd", ["x64", const], [out], exclusive=excl,
                                      reverse=rev)]
                outputs.append((out, T.DOUBLE))
                cases.append((out, "x64", axis, excl, rev))
            out = f"i_{excl}{rev}"
            nodes.append(h.make_node("CumProd", ["x32", "axis"], [out], exclusive=excl,
                                     reverse=rev))
            outputs.append((out, T.INT32))
            cases.append((out, "x32", 1, excl, rev))
    nodes.append(h.make_node("CumProd", ["xf", "axis"], ["f"], reverse=1))
    outputs.append(("f", T.FLOAT))
    cases.append(("f", "xf", 1, 0, 1))
    model = _model(nodes, [("x64", T.DOUBLE, [2, 3, 4]), ("x32", T.INT32, [3, 4]),
                           ("xf", T.FLOAT, [3, 5]), ("axis", T.INT64, [])], outputs, 26)
    session = _compiled(model, tmp_path)
    got = session.run(feeds)
    want = _reference(model, feeds)
    for out, src, axis, excl, rev in cases:
        mine = _cumprod_numpy(feeds[src], axis, bool(excl), bool(rev))
        np.testing.assert_allclose(want[out], mine, rtol=1e-6, err_msg=out)
        np.testing.assert_allclose(got[out], mine, rtol=1e-6, err_msg=out)
        assert got[out].dtype == mine.dtype
    # the run-time axis is checked against the rank
    with pytest.raises(Exception, match="CumProd: axis is outside"):
        session.run({**feeds, "axis": np.array(2, np.int64)})


# ------------------------------------------------------------------------------- BitCast

_BITCASTS = [  # (source numpy type, source elem, target elem, target numpy type)
    (np.float32, T.FLOAT, T.INT32, np.int32), (np.int32, T.INT32, T.FLOAT, np.float32),
    (np.float64, T.DOUBLE, T.UINT64, np.uint64), (np.int64, T.INT64, T.DOUBLE, np.float64),
    (np.int8, T.INT8, T.UINT8, np.uint8), (np.uint16, T.UINT16, T.FLOAT16, np.float16),
    (np.float16, T.FLOAT16, T.INT16, np.int16), (np.uint32, T.UINT32, T.INT32, np.int32),
    (np.bool_, T.BOOL, T.UINT8, np.uint8), (np.uint8, T.UINT8, T.BOOL, np.bool_),
]


def test_bitcast_26_between_types_of_one_width(tmp_path: Path) -> None:
    nodes, inputs, outputs, feeds, views = [], [], [], {}, {}
    for i, (src, src_elem, dst_elem, dst) in enumerate(_BITCASTS):
        if src is np.bool_:
            x = np.array([True, False, True, True, False, False])
        elif src is np.uint8:
            x = np.array([0, 1, 0, 1, 1, 0], np.uint8)
        elif np.dtype(src).kind == "f":
            x = np.array([1.0, -0.0, np.inf, np.nan, -2.5, 3e-5], src)
        else:
            info = np.iinfo(src)
            x = np.array([info.min, -1 if info.min else 1, 0, 1, min(1 << 10, info.max),
                          info.max], src)
            if dst is np.float16:  # keep to bit patterns that are not NaN (their payloads may
                x = np.array([0, 0x3C00, 0x8000, 0x7BFF, 0xFC00, 0x0001], src)  # differ)
            elif dst is np.float32:
                x = np.array([0, 0x3F800000, -(1 << 31), 0x7F7FFFFF, 1, -0x40800000], src)
        feeds[f"x{i}"] = x.reshape(2, 3)
        inputs.append((f"x{i}", src_elem, [2, 3]))
        nodes.append(h.make_node("BitCast", [f"x{i}"], [f"y{i}"], to=dst_elem))
        outputs.append((f"y{i}", dst_elem))
        views[f"y{i}"] = feeds[f"x{i}"].view(dst)  # little-endian bytes, reinterpreted
    model = _model(nodes, inputs, outputs, 26)
    got = _compiled(model, tmp_path).run(feeds)
    want = _reference(model, feeds)
    for name, view in views.items():
        assert got[name].dtype == view.dtype, name
        np.testing.assert_array_equal(got[name].view(np.uint8), view.view(np.uint8), name)
        np.testing.assert_array_equal(want[name].view(np.uint8), view.view(np.uint8), name)


# ----------------------------------------------------------------------------------- Mod

_MOD_FLOATS = [(T.FLOAT, np.float32), (T.DOUBLE, np.float64), (T.FLOAT16, np.float16)]
_MOD_INTS = [(T.INT8, np.int8), (T.INT32, np.int32), (T.INT64, np.int64), (T.UINT8, np.uint8),
             (T.UINT32, np.uint32)]


def test_mod_28_float_special_cases_and_integer_signs(tmp_path: Path) -> None:
    inf, nan = np.inf, np.nan
    a = [5.5, -5.5, 5.5, -5.5, 0.0, -0.0, 0.0, -0.0, inf, -inf, 3.0, 3.0, -3.0, -3.0, nan,
         1.0, 4.0, -4.0, 7.25, 1e-3]
    b = [2.0, 2.0, -2.0, -2.0, 3.0, 3.0, -3.0, -3.0, 2.0, 2.0, 0.0, -0.0, inf, -inf, 1.0,
         nan, 2.0, 2.0, -0.5, 3.0]
    nodes, inputs, outputs, feeds, checks = [], [], [], {}, []
    for elem, dt in _MOD_FLOATS:
        name = np.dtype(dt).name
        feeds[f"a_{name}"], feeds[f"b_{name}"] = np.array(a, dt), np.array(b, dt)
        inputs += [(f"a_{name}", elem, [len(a)]), (f"b_{name}", elem, [len(b)])]
        for fmod in (0, 1):
            out = f"m{fmod}_{name}"
            nodes.append(h.make_node("Mod", [f"a_{name}", f"b_{name}"], [out], fmod=fmod))
            outputs.append((out, elem))
            checks.append((out, name, fmod))
    for elem, dt in _MOD_INTS:
        name = np.dtype(dt).name
        info = np.iinfo(dt)
        if info.min:
            ia = np.array([7, -7, 7, -7, 0, info.min, info.min, info.max, 5, -5], dt)
            ib = np.array([3, 3, -3, -3, 5, -1, 7, -2, 0, 0], dt)  # x % 0 and MIN % -1
        else:
            ia = np.array([7, 0, info.max, 5, 9, 1, 200 % (info.max + 1), 3, 5, 0], dt)
            ib = np.array([3, 5, 7, 0, 9, 2, 7, 1, 4, 0], dt)
        feeds[f"a_{name}"], feeds[f"b_{name}"] = ia, ib
        inputs += [(f"a_{name}", elem, [10]), (f"b_{name}", elem, [10])]
        for fmod in (0, 1):
            out = f"m{fmod}_{name}"
            nodes.append(h.make_node("Mod", [f"a_{name}", f"b_{name}"], [out], fmod=fmod))
            outputs.append((out, elem))
            checks.append((out, name, fmod))
    model = _model(nodes, inputs, outputs, 28)
    got = _compiled(model, tmp_path).run(feeds)
    want = _reference(model, feeds)
    for out, name, fmod in checks:
        x, y = feeds[f"a_{name}"], feeds[f"b_{name}"]
        with np.errstate(all="ignore"):
            mine = (np.fmod(x, y) if fmod else np.mod(x, y)).astype(x.dtype)
        if x.dtype.kind in "iu":
            mine[y == 0] = 0  # numpy's (and lepton-edge's) x % 0; the spec leaves it open
        if fmod:  # x = -0 with y > 0: the spec allows either zero
            loose = (x == 0) & np.signbit(x) & (y > 0) if x.dtype.kind == "f" else None
            if loose is not None:
                got[out] = got[out].copy()
                got[out][loose] = mine[loose]
        ok = np.ones(len(x), bool) if x.dtype.kind == "f" else y != 0
        _same_bits(want[out][ok], mine[ok], f"{out}: onnx reference vs numpy")
        _same_bits(got[out], mine, out)


# -------------------------------------------------------- function bodies and Scan unrolled


def test_causal_conv_with_state_27_expands_on_the_cpu(tmp_path: Path) -> None:
    nodes = [h.make_node("CausalConvWithState", ["x", "w", "bias", "past"], ["y", "state"],
                         activation="silu")]
    model = _model(nodes, [("x", T.FLOAT, [2, 4, 6]), ("w", T.FLOAT, [4, 1, 3]),
                           ("bias", T.FLOAT, [4]), ("past", T.FLOAT, [2, 4, 2])],
                   [("y", T.FLOAT), ("state", T.FLOAT)], 27)
    feeds = {"x": RNG.standard_normal((2, 4, 6)).astype(np.float32),
             "w": RNG.standard_normal((4, 1, 3)).astype(np.float32),
             "bias": RNG.standard_normal(4).astype(np.float32),
             "past": RNG.standard_normal((2, 4, 2)).astype(np.float32)}
    got = _compiled(model, tmp_path).run(feeds)
    for name, want in _reference(model, feeds).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("rule", ["gated_delta", "linear"])
def test_linear_attention_27_scan_unrolled_on_the_cpu(tmp_path: Path, rule: str) -> None:
    """GQA (4 query heads, 2 KV heads), 3 tokens, a past state; the ONNX body's Scan over the
    tokens is unrolled."""
    b, t, hq, hkv, dk, dv = 1, 3, 4, 2, 4, 3
    ins = [("query", T.FLOAT, [b, t, hq * dk]), ("key", T.FLOAT, [b, t, hkv * dk]),
           ("value", T.FLOAT, [b, t, hkv * dv]), ("past_state", T.FLOAT, [b, hkv, dk, dv])]
    names = ["query", "key", "value", "past_state"]
    if rule == "gated_delta":
        ins += [("decay", T.FLOAT, [b, t, hkv]), ("beta", T.FLOAT, [b, t, hkv])]
        names += ["decay", "beta"]
    nodes = [h.make_node("LinearAttention", names, ["output", "present_state"],
                         q_num_heads=hq, kv_num_heads=hkv, update_rule=rule)]
    model = _model(nodes, ins, [("output", T.FLOAT), ("present_state", T.FLOAT)], 27)
    feeds = {n: (RNG.standard_normal(s) * 0.5).astype(np.float32) for n, _, s in ins}
    if "decay" in feeds:
        feeds["decay"] = -np.abs(feeds["decay"])
        feeds["beta"] = 1 / (1 + np.exp(-feeds["beta"]))
    got = _compiled(model, tmp_path).run(feeds)
    for name, want in _reference(model, feeds).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5, err_msg=name)


def test_scan_with_static_length_is_unrolled(tmp_path: Path) -> None:
    """Two states, two scan inputs (one read backwards, one along axis 1), two scan outputs
    (one written backwards along axis 1), and a value read from outside the body."""
    body = h.make_graph(
        [h.make_node("Add", ["s_in", "a_t"], ["s_out"]),
         h.make_node("Mul", ["p_in", "b_t"], ["m"]),
         h.make_node("Add", ["m", "bias"], ["p_out"]),
         h.make_node("Identity", ["s_out"], ["y1"]),
         h.make_node("Sub", ["p_out", "s_out"], ["y2"])],
        "body", [h.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("s_in", "p_in", "a_t",
                                                                      "b_t")],
        [h.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("s_out", "p_out", "y1", "y2")])
    nodes = [h.make_node("Scan", ["s0", "p0", "a", "bt"], ["s", "p", "ys1", "ys2"], body=body,
                         num_scan_inputs=2, scan_input_directions=[1, 0],
                         scan_input_axes=[0, 1], scan_output_axes=[0, 1],
                         scan_output_directions=[0, 1])]
    model = _model(nodes, [("s0", T.FLOAT, [3]), ("p0", T.FLOAT, [3]), ("a", T.FLOAT, [4, 3]),
                           ("bt", T.FLOAT, [3, 4]), ("bias", T.FLOAT, [3])],
                   [("s", T.FLOAT), ("p", T.FLOAT), ("ys1", T.FLOAT), ("ys2", T.FLOAT)], 17)
    feeds = {n: RNG.standard_normal(s).astype(np.float32)
             for n, s in (("s0", (3,)), ("p0", (3,)), ("a", (4, 3)), ("bt", (3, 4)),
                          ("bias", (3,)))}
    got = _compiled(model, tmp_path).run(feeds)
    want = _ort(model, feeds)
    assert want is not None
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_private_converter_names_match() -> None:
    from lepton_edge.lowering import bodies, dynamic_ops

    assert {op: v for op, (v, _) in dynamic_ops._REVISED_CONVERTERS.items()} == \
        bodies.REVISED_OWN
    for op in bodies.REVISED_OWN:
        assert bodies.private_name(op) in dynamic_ops._CONVERTERS
        assert onnx.defs.get_schema(op, onnx.defs.onnx_opset_version()).since_version == \
            bodies.REVISED_OWN[op], f"{op} was revised again: check its converter"


def test_reverse_sequence_28_relabelled_and_expanded(tmp_path: Path) -> None:
    """ReverseSequence-28 only added bfloat16: relabelled to 25, where TVM has no converter
    and lowering/bodies.py's GatherElements body takes it (both axis layouts)."""
    nodes = [h.make_node("ReverseSequence", ["x", "lens_b"], ["time_major"], time_axis=0,
                         batch_axis=1),
             h.make_node("ReverseSequence", ["xb", "lens_b"], ["batch_major"], time_axis=1,
                         batch_axis=0)]
    model = _model(nodes, [("x", T.FLOAT, [4, 3, 2]), ("xb", T.INT64, [3, 4]),
                           ("lens_b", T.INT64, [3])],
                   [("time_major", T.FLOAT), ("batch_major", T.INT64)], 28)
    feeds = {"x": RNG.standard_normal((4, 3, 2)).astype(np.float32),
             "xb": np.arange(12, dtype=np.int64).reshape(3, 4),
             "lens_b": np.array([4, 1, 2], np.int64)}
    got = _compiled(model, tmp_path).run(feeds)
    want = _reference(model, feeds)
    # numpy: reverse the first lens[b] steps of sequence b
    mine = feeds["x"].copy()
    for b, n in enumerate(feeds["lens_b"]):
        mine[:n, b] = feeds["x"][:n, b][::-1]
    np.testing.assert_array_equal(want["time_major"], mine)
    np.testing.assert_array_equal(got["time_major"], mine)
    np.testing.assert_array_equal(got["batch_major"], [[3, 2, 1, 0], [4, 5, 6, 7],
                                                       [9, 8, 10, 11]])
    np.testing.assert_array_equal(got["batch_major"], want["batch_major"])


def test_mod_of_a_symbolic_dim_stays_shape_arithmetic(tmp_path: Path) -> None:
    """Mod over shape values (N % 8, as padding arithmetic does) is TVM's integer expression,
    not lepton-edge's tensor kernel (which cannot take a symbolic value): it compiles, on cpu."""
    consts = [h.make_node("Constant", [], [n], value=onnx.numpy_helper.from_array(
        np.array(v, np.int64))) for n, v in (("i0", 0), ("k", 8))]
    nodes = consts + [
        h.make_node("Shape", ["x"], ["s"]), h.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        h.make_node("Mod", ["n", "k"], ["m"]), h.make_node("Cast", ["m"], ["mf"], to=T.FLOAT),
        h.make_node("Add", ["x", "mf"], ["y"])]
    model = _model(nodes, [("x", T.FLOAT, ["N"])], [("y", T.FLOAT)], 17)
    session = _compiled(model, tmp_path)
    for n in (3, 8, 13):
        x = RNG.standard_normal(n).astype(np.float32)
        np.testing.assert_array_equal(session.run({"x": x})["y"], x + np.float32(n % 8))


def test_nodes_replacing_a_node_get_the_wrong_on_tvm_checks() -> None:
    """A body (function expansion, unrolled Scan) with an Expand whose shape is computed at run
    time is refused like a top-level one; with static shapes it is accepted."""
    from lepton_edge.plan import GraphView
    from lepton_edge_targets.cpu.support import _nodes_reason

    outer = h.make_node("Fake", ["x", "y"], ["z"], name="outer")
    inner = [h.make_node("Shape", ["x"], ["s"]), h.make_node("Expand", ["y", "s"], ["z"])]

    def view(x_shape: list[Any]) -> GraphView:
        return GraphView(value_types={"x": T.FLOAT, "y": T.FLOAT},
                         value_shapes={"x": tuple(x_shape), "y": (1,)}, initializers={},
                         opset=17)

    why = _nodes_reason(outer, inner, view(["N", 3]))
    assert why is not None and "Fake becomes Expand" in why and "run time" in why
    assert _nodes_reason(outer, inner, view([2, 3])) is None


def test_planning_rewrites_each_node_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU support check and the compiled subgraph share one rewrite per node
    (GraphView.lowering): each Scan unrolled and each function body expanded once, and the
    subgraph holds exactly the nodes the check judged; two Scans in one subgraph get
    distinct value names."""
    from lepton_edge.lowering import bodies

    calls: dict[str, list[str]] = {"unroll_scan": [], "expand_revised": []}
    for name in calls:
        real = getattr(bodies, name)

        def counted(node: onnx.NodeProto, *args: Any, _real: Any = real, _name: str = name
                    ) -> Any:
            calls[_name].append(node.name)
            return _real(node, *args)

        monkeypatch.setattr(bodies, name, counted)
    body = h.make_graph([h.make_node("Add", ["s_in", "a_t"], ["s_out"]),
                         h.make_node("Identity", ["s_out"], ["y"])], "body",
                        [h.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("s_in", "a_t")],
                        [h.make_tensor_value_info(n, T.FLOAT, [3]) for n in ("s_out", "y")])
    nodes = [h.make_node("Scan", ["s0", "a"], ["s1", "ys1"], name="scan1", body=body,
                         num_scan_inputs=1),
             h.make_node("Scan", ["s1", "a"], ["s2", "ys2"], name="scan2", body=body,
                         num_scan_inputs=1),
             h.make_node("CausalConvWithState", ["x", "w", "bias", "past"], ["c", "state"],
                         name="conv", activation="silu")]
    model = _model(nodes, [("s0", T.FLOAT, [3]), ("a", T.FLOAT, [4, 3]),
                           ("x", T.FLOAT, [2, 4, 6]), ("w", T.FLOAT, [4, 1, 3]),
                           ("bias", T.FLOAT, [4]), ("past", T.FLOAT, [2, 4, 2])],
                   [("c", T.FLOAT), ("ys1", T.FLOAT), ("ys2", T.FLOAT)], 27)
    plan = lepton_edge.partition(lepton_edge.load(model), ["cpu"])
    assert [sg.target for sg in plan.subgraphs] == ["cpu"], plan.explain()
    assert sorted(calls["unroll_scan"]) == ["scan1", "scan2"]
    assert calls["expand_revised"] == ["conv"]
    (sg,) = plan.subgraphs
    onnx.checker.check_model(sg.proto)  # one name per value across both unrolled Scans
    ops = [n.op_type for n in sg.proto.graph.node]
    assert "Scan" not in ops and "CausalConvWithState" not in ops and ops.count(
        "Add") >= 8
    assert [n.op_type for n in sg.fallback_proto.graph.node] == ["Scan", "Scan",
                                                                 "CausalConvWithState"]


def test_renamed_revised_ops_keep_a_valid_subgraph_and_fallback() -> None:
    """Why BitShift-28 and Mod-28 keep their private names although the plain names use the
    same converters: relabelled to opset 25 as they are, a signed BitShift is an invalid model
    and onnxruntime refuses float Mod with fmod=0 at run time. Renamed, the compiled subgraph
    checks at 25 and its fallback keeps the model's own opset-28 nodes, which onnxruntime
    runs."""
    nodes = [h.make_node("BitShift", ["x", "s"], ["y"], direction="RIGHT"),
             h.make_node("Mod", ["a", "b"], ["m"], fmod=0)]
    model = _model(nodes, [("x", T.INT8, [3]), ("s", T.INT8, [3]), ("a", T.FLOAT, [3]),
                           ("b", T.FLOAT, [3])], [("y", T.INT8), ("m", T.FLOAT)], 28)
    plan = lepton_edge.partition(lepton_edge.load(model), ["cpu"])
    (sg,) = plan.subgraphs
    assert sg.target == "cpu"
    assert {(n.domain, n.op_type) for n in sg.proto.graph.node} == {
        ("lepton.revised", "BitShift_28"), ("lepton.revised", "Mod_28")}
    assert [o.version for o in sg.proto.opset_import if o.domain == ""] == [25]
    onnx.checker.check_model(sg.proto, full_check=True)
    assert sg.fallback_proto is not None
    feeds = {"x": np.array([-8, 7, -1], np.int8), "s": np.array([1, 2, 9], np.int8),
             "a": np.array([5.5, -5.5, -0.0], np.float32),
             "b": np.array([2.0, 2.0, 3.0], np.float32)}
    got = ort.InferenceSession(sg.fallback_proto.SerializeToString()).run(["y", "m"], feeds)
    want = _reference(model, feeds)
    _same_bits(got[0], want["y"], "y")
    _same_bits(got[1], want["m"], "m")
