"""A QDQ transformer block (multi-head attention + LayerNorm + GELU FFN) compiled to int8.

Every int8 tensor of the block is also a graph output, so each integer kernel can be checked
bit-exactly against numpy given the very int8 inputs the compiled code used: the six weight
matmuls (int8 x int8 -> int32 + bias, fixed-point requantize), the two attention matmuls
(activation x activation) and the head split/merge (int8 data movement). The float stages
between them (softmax, LayerNorm, GELU, run in float32 as the ONNX model says) are checked
against a float64 numpy model of the same ONNX math, also from the compiled inputs: equal
except where the exact value lies within float32 rounding of a quantization tie, never more
than one step. The whole block's output is within one quantization step of onnxruntime
running the same QDQ model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.lowering.int8 import fixed_point_multiplier, requantize_reference
from lepton_edge.reference import reference_session

B, S, D, H, F = 2, 8, 16, 2, 32
DH = D // H
WEIGHTS = {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "w1": (D, F), "w2": (F, D)}
# int8 tensors of the block, in order; each is a graph output
STAGES = ["q_q", "k_q", "v_q", "qh_q", "kt_q", "vh_q", "s_q", "p_q", "a_q", "am_q", "o_q",
          "h_q", "f1_q", "g_q", "f2_q", "y_q"]


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layernorm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)


def _quantize_f64(x: np.ndarray, scale: float, zp: int) -> tuple[np.ndarray, np.ndarray]:
    """ONNX QuantizeLinear of an exact value; also the distance of x/scale to a .5 tie."""
    v = x / np.float64(np.float32(scale))
    tie_distance = np.abs(np.abs(v - np.floor(v)) - 0.5)
    return np.clip(np.round(v) + zp, -128, 127).astype(np.int8), tie_distance


def transformer_block(seed: int = 0):
    """The QDQ model and its parameters (int8 weights, int32 biases, scales, zero points)."""
    rng = np.random.default_rng(seed)
    p: dict = {"sx": 0.02, "zx": -3}
    inits, nodes = [], []

    def const(name, value, dtype):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def dq(src, scale, zp, out, axis=None):
        nodes.append(helper.make_node("DequantizeLinear", [src, scale, zp], [out],
                                      **({} if axis is None else {"axis": axis})))
        return out

    def q(src, name, scale, zp):
        p["s_" + name], p["z_" + name] = scale, zp
        const("s_" + name, scale, np.float32)
        const("z_" + name, zp, np.int8)
        nodes.append(helper.make_node("QuantizeLinear", [src, "s_" + name, "z_" + name],
                                      [name]))
        return name

    def qdq_input(name):  # DQ of an int8 stage with its own scale/zero point
        return dq(name, "s_" + name, "z_" + name, name + "_f")

    def linear(src_q, src_scale, w, out, scale, zp):
        w_f = rng.standard_normal(WEIGHTS[w]) / math.sqrt(WEIGHTS[w][0])
        sw = (np.abs(w_f).max(0) / 127).astype(np.float32)
        w_q = np.clip(np.round(w_f / sw), -127, 127).astype(np.int8)
        sb = (np.float32(src_scale) * sw).astype(np.float32)
        b_q = rng.integers(-300, 300, WEIGHTS[w][1]).astype(np.int32)
        p[w] = (w_q, sw, b_q)
        const(w + "_q", w_q, np.int8)
        const(w + "_s", sw, np.float32)
        const(w + "_z", np.zeros_like(w_q[0]), np.int8)
        const(w + "_b", b_q, np.int32)
        const(w + "_bs", sb, np.float32)
        const(w + "_bz", np.zeros_like(b_q), np.int32)
        dq(w + "_q", w + "_s", w + "_z", w + "_f", axis=1)
        dq(w + "_b", w + "_bs", w + "_bz", w + "_bf", axis=0)
        src_f = "x_q_f" if src_q == "x_q" else qdq_input(src_q)
        nodes.append(helper.make_node("MatMul", [src_f, w + "_f"], [w + "_mm"]))
        nodes.append(helper.make_node("Add", [w + "_mm", w + "_bf"], [w + "_acc"]))
        return q(w + "_acc", out, scale, zp)

    def move(src, out, steps):  # DQ -> Reshape/Transpose... -> Q with the same scale
        cur = qdq_input(src)
        for i, (op, arg) in enumerate(steps):
            nxt = f"{out}_m{i}"
            if op == "Reshape":
                nodes.append(helper.make_node("Reshape", [cur, const(nxt + "_shape", arg,
                                                                     np.int64)], [nxt]))
            else:
                nodes.append(helper.make_node("Transpose", [cur], [nxt], perm=arg))
            cur = nxt
        return q(cur, out, p["s_" + src], p["z_" + src])

    const("sx", p["sx"], np.float32)
    const("zx", p["zx"], np.int8)
    p["s_x_q"], p["z_x_q"] = p["sx"], p["zx"]
    dq("x_q", "sx", "zx", "x_q_f")
    linear("x_q", p["sx"], "wq", "q_q", 0.03, 2)
    linear("x_q", p["sx"], "wk", "k_q", 0.03, -1)
    linear("x_q", p["sx"], "wv", "v_q", 0.025, 0)
    split = [("Reshape", [0, 0, H, DH])]
    move("q_q", "qh_q", split + [("Transpose", [0, 2, 1, 3])])
    move("k_q", "kt_q", split + [("Transpose", [0, 2, 3, 1])])
    move("v_q", "vh_q", split + [("Transpose", [0, 2, 1, 3])])
    nodes.append(helper.make_node("MatMul", [qdq_input("qh_q"), qdq_input("kt_q")], ["s"]))
    q("s", "s_q", 0.1, 0)
    nodes.append(helper.make_node("Mul", [qdq_input("s_q"),
                                          const("inv_sqrt_dh", 1 / math.sqrt(DH), np.float32)],
                                  ["s_scaled"]))
    nodes.append(helper.make_node("Softmax", ["s_scaled"], ["prob"], axis=-1))
    q("prob", "p_q", 1 / 255, -128)
    nodes.append(helper.make_node("MatMul", [qdq_input("p_q"), qdq_input("vh_q")], ["att"]))
    q("att", "a_q", 0.02, 1)
    move("a_q", "am_q", [("Transpose", [0, 2, 1, 3]), ("Reshape", [0, 0, D])])
    linear("am_q", p["s_am_q"], "wo", "o_q", 0.025, 0)
    gamma, beta = const("gamma", np.ones(D), np.float32), const("beta", np.zeros(D), np.float32)
    nodes.append(helper.make_node("Add", [qdq_input("o_q"), "x_q_f"], ["res1"]))
    nodes.append(helper.make_node("LayerNormalization", ["res1", gamma, beta], ["ln1"],
                                  axis=-1, epsilon=1e-5))
    q("ln1", "h_q", 0.03, 0)
    linear("h_q", p["s_h_q"], "w1", "f1_q", 0.03, -2)
    f1 = qdq_input("f1_q")
    for op, ins, out in [("Div", [f1, const("sqrt2", math.sqrt(2), np.float32)], "g_div"),
                         ("Erf", ["g_div"], "g_erf"),
                         ("Add", ["g_erf", const("one", 1.0, np.float32)], "g_1p"),
                         ("Mul", [f1, "g_1p"], "g_mul"),
                         ("Mul", ["g_mul", const("half", 0.5, np.float32)], "gelu")]:
        nodes.append(helper.make_node(op, ins, [out]))
    q("gelu", "g_q", 0.02, -100)
    linear("g_q", p["s_g_q"], "w2", "f2_q", 0.03, 0)
    nodes.append(helper.make_node("Add", [qdq_input("f2_q"), "h_q_f"], ["res2"]))
    nodes.append(helper.make_node("LayerNormalization", ["res2", gamma, beta], ["ln2"],
                                  axis=-1, epsilon=1e-5))
    q("ln2", "y_q", 0.03, 0)
    shapes = {"q_q": [B, S, D], "k_q": [B, S, D], "v_q": [B, S, D], "qh_q": [B, H, S, DH],
              "kt_q": [B, H, DH, S], "vh_q": [B, H, S, DH], "s_q": [B, H, S, S],
              "p_q": [B, H, S, S], "a_q": [B, H, S, DH], "am_q": [B, S, D], "o_q": [B, S, D],
              "h_q": [B, S, D], "f1_q": [B, S, F], "g_q": [B, S, F], "f2_q": [B, S, D],
              "y_q": [B, S, D]}
    graph = helper.make_graph(
        nodes, "qdq_transformer_block",
        [helper.make_tensor_value_info("x_q", TensorProto.INT8, [B, S, D])],
        [helper.make_tensor_value_info(n, TensorProto.INT8, shapes[n]) for n in STAGES], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, p


def _requant(acc: np.ndarray, scale: np.ndarray, out: str, p: dict) -> np.ndarray:
    m0, shift = fixed_point_multiplier(np.asarray(scale, np.float64)
                                       / np.float64(np.float32(p["s_" + out])))
    return requantize_reference(acc, m0, shift, p["z_" + out])


def _linear_ref(x_q: np.ndarray, src: str, w: str, out: str, p: dict) -> np.ndarray:
    w_q, sw, b_q = p[w]
    acc = (x_q.astype(np.int64) - p["z_" + src]) @ w_q.astype(np.int64) + b_q
    return _requant(acc, np.float64(np.float32(p["s_" + src])) * sw.astype(np.float64), out, p)


def _act_matmul_ref(a: np.ndarray, sa: str, b: np.ndarray, sb: str, out: str, p: dict
                    ) -> np.ndarray:
    acc = (a.astype(np.int64) - p["z_" + sa]) @ (b.astype(np.int64) - p["z_" + sb])
    scale = np.float64(np.float32(p["s_" + sa])) * np.float64(np.float32(p["s_" + sb]))
    return _requant(acc, np.array(scale), out, p)


def _deq(name: str, got: dict, p: dict) -> np.ndarray:
    return (got[name].astype(np.float64) - p["z_" + name]) * np.float64(np.float32(p["s_" + name]))


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory):
    model, p = transformer_block()
    art = lepton_edge.compile(model, ["cpu"], fallback=False)
    path = art.save(tmp_path_factory.mktemp("int8_block") / "block.lepton")
    session = lepton_edge.runtime.load(path, fallback=False)
    x_q = np.random.default_rng(1).integers(-128, 128, (B, S, D)).astype(np.int8)
    return model, p, session, x_q, session.run({"x_q": x_q})


def test_block_compiles_to_integer_kernels(compiled) -> None:
    _, _, session, _, _ = compiled
    meta = session.manifest["subgraphs"][0]["builds"][0]["meta"]
    kernels = sorted(meta["int8_kernels"])
    assert kernels.count("matmul -> int8 x int8 -> int32") == 6, kernels
    assert kernels.count("matmul -> int8 x int8 -> int32 (activation x activation)") == 2, \
        kernels


def test_integer_kernels_are_bit_exact(compiled) -> None:
    _, p, _, x_q, got = compiled
    for w, src, out in [("wq", "x_q", "q_q"), ("wk", "x_q", "k_q"), ("wv", "x_q", "v_q"),
                        ("wo", "am_q", "o_q"), ("w1", "h_q", "f1_q"), ("w2", "g_q", "f2_q")]:
        inp = x_q if src == "x_q" else got[src]
        np.testing.assert_array_equal(got[out], _linear_ref(inp, src, w, out, p), err_msg=out)
    np.testing.assert_array_equal(
        got["s_q"], _act_matmul_ref(got["qh_q"], "qh_q", got["kt_q"], "kt_q", "s_q", p))
    np.testing.assert_array_equal(
        got["a_q"], _act_matmul_ref(got["p_q"], "p_q", got["vh_q"], "vh_q", "a_q", p))
    # head split/merge: int8 data movement, exact
    split = lambda t: t.reshape(B, S, H, DH)  # noqa: E731
    np.testing.assert_array_equal(got["qh_q"], split(got["q_q"]).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(got["kt_q"], split(got["k_q"]).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got["vh_q"], split(got["v_q"]).transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(got["am_q"], got["a_q"].transpose(0, 2, 1, 3).reshape(B, S, D))


def test_float_stages_match_the_onnx_math(compiled) -> None:
    """softmax / LayerNorm / GELU from the compiled int8 inputs, in float64: equal, except
    within float32 rounding of a quantization tie (and then one step)."""
    _, p, _, x_q, got = compiled
    x = (x_q.astype(np.float64) - p["zx"]) * np.float64(np.float32(p["sx"]))
    s = _deq("s_q", got, p) * np.float64(np.float32(1 / math.sqrt(DH)))
    e = np.exp(s - s.max(-1, keepdims=True))
    stages = {
        "p_q": e / e.sum(-1, keepdims=True),
        "h_q": _layernorm(_deq("o_q", got, p) + x),
        "g_q": _gelu(_deq("f1_q", got, p)),
        "y_q": _layernorm(_deq("f2_q", got, p) + _deq("h_q", got, p)),
    }
    for name, exact in stages.items():
        want, tie_distance = _quantize_f64(exact, p["s_" + name], p["z_" + name])
        diff = np.abs(got[name].astype(int) - want.astype(int))
        assert diff.max() <= 1, name
        # a float32 computation may land on either side of a tie it is this close to
        assert np.all(tie_distance[diff > 0] < 1e-3), (name, tie_distance[diff > 0])
        assert (diff > 0).mean() < 0.01, name


def test_block_output_within_one_step_of_onnxruntime(compiled) -> None:
    model, _, _, x_q, got = compiled
    want = dict(zip(STAGES, reference_session(model).run(STAGES, {"x_q": x_q})))
    for name in STAGES:  # every int8 tensor of the block, not only the output
        diff = np.abs(got[name].astype(int) - want[name].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (name, diff.max())
