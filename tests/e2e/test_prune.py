"""Sensitivity-based pruning: channel removal through residual, concat, BN and flatten graphs
(checked against a masked reference built here, by hand), budgets, refusals, fine-tuning,
and the prune -> quantize -> compile chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from tests.conftest import spec_output
from lepton_edge.compress.prune import finetune, prune
from lepton_edge.compress.quantize import quantize
from lepton_edge.compress.sensitivity import analyse
from lepton_edge.errors import InputError, ModelError

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "samples/digits"
rng = np.random.default_rng(0)


def const(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def bn(prefix: str, c: int) -> list[onnx.TensorProto]:
    # beta and mean far from zero: a channel whose conv is zeroed is not zero after BN
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in (
        ("s", 1 + 0.2 * rng.standard_normal(c)), ("b", 0.5 * rng.standard_normal(c)),
        ("m", 0.5 * rng.standard_normal(c)), ("v", 0.5 + rng.random(c)))]


def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x] + [f"{prefix}_{k}" for k in "sbmv"], [y],
                            name=prefix)


def node(op: str, inputs: list[str], output: str, name: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=name, **attrs)


def make(nodes: list, inits: list, x_shape: list, y_shape: list) -> lepton_edge.Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                              inits)
    return lepton_edge.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def residual_model(pool: str = "flatten") -> lepton_edge.Model:
    """Conv-BN-Relu, a residual block (Add with the block input), a per-channel Mul, a
    depthwise conv, global pooling + Flatten (or ReduceMean, as torch's x.mean((2, 3))), Gemm."""
    nodes = [
        node("Conv", ["x", "w0", "b0"], "t0", "c0", pads=[1, 1, 1, 1]), bn_node("bn0", "t0", "t1"),
        node("Relu", ["t1"], "r0", "relu0"),
        node("Conv", ["r0", "w1", "b1"], "t2", "c1", pads=[1, 1, 1, 1]), bn_node("bn1", "t2", "t3"),
        node("Relu", ["t3"], "r1", "relu1"),
        node("Conv", ["r1", "w2"], "t4", "c2", pads=[1, 1, 1, 1]), bn_node("bn2", "t4", "t5"),
        node("Add", ["t5", "r0"], "s", "add"), node("Mul", ["s", "k"], "s2", "scale"),
        node("Relu", ["s2"], "r2", "relu2"),
        node("Conv", ["r2", "wd", "bd"], "d", "dw", pads=[1, 1, 1, 1], group=8),
        node("Relu", ["d"], "r3", "relu3"),
        *([node("GlobalAveragePool", ["r3"], "g", "gap"), node("Flatten", ["g"], "f", "flatten")]
          if pool == "flatten" else [node("ReduceMean", ["r3"], "f", "mean", axes=[2, 3],
                                          keepdims=0)]),
        node("Gemm", ["f", "wf", "bf"], "y", "fc", transB=1),
    ]
    inits = [const("w0", 8, 3, 3, 3), const("b0", 8), const("w1", 8, 8, 3, 3), const("b1", 8),
             const("w2", 8, 8, 3, 3), const("k", 1, 8, 1, 1), const("wd", 8, 1, 3, 3),
             const("bd", 8), const("wf", 10, 8), const("bf", 10),
             *bn("bn0", 8), *bn("bn1", 8), *bn("bn2", 8)]
    return make(nodes, inits, ["N", 3, 8, 8], ["N", 10])


def concat_model() -> lepton_edge.Model:
    """Two branches concatenated, a conv over them, a concat with the (unprunable) input,
    MaxPool, Reshape [-1, C*H*W] -> Gemm (transB=0)."""
    nodes = [
        node("Conv", ["x", "wa", "ba"], "ta", "a", pads=[1, 1, 1, 1]),
        node("Relu", ["ta"], "ra", "relu_a"),
        node("Conv", ["x", "wb", "bb"], "tb", "b"), node("Relu", ["tb"], "rb", "relu_b"),
        node("Concat", ["ra", "rb"], "u", "cat", axis=1),
        node("Conv", ["u", "wc", "bc"], "tc", "c", pads=[1, 1, 1, 1]),
        node("Relu", ["tc"], "rc", "relu_c"),
        node("Concat", ["rc", "x"], "v", "cat2", axis=1),
        node("Conv", ["v", "wd"], "td", "d"), node("Relu", ["td"], "rd", "relu_d"),
        node("MaxPool", ["rd"], "p", "pool", kernel_shape=[2, 2], strides=[2, 2]),
        node("Reshape", ["p", "shape"], "f", "flatten"),
        node("Gemm", ["f", "wf", "bf"], "y", "fc"),
    ]
    inits = [const("wa", 6, 3, 3, 3), const("ba", 6), const("wb", 4, 3, 1, 1), const("bb", 4),
             const("wc", 5, 10, 3, 3), const("bc", 5), const("wd", 4, 8, 1, 1),
             const("wf", 36, 10), const("bf", 10),
             numpy_helper.from_array(np.array([-1, 36], np.int64), "shape")]
    return make(nodes, inits, ["N", 3, 6, 6], ["N", 10])


def mlp_model() -> lepton_edge.Model:
    nodes = [node("Gemm", ["x", "w1", "b1"], "h1", "g1", transB=1),
             node("Relu", ["h1"], "a1", "relu"), node("MatMul", ["a1", "w2"], "h2", "m"),
             node("Add", ["h2", "b2"], "h3", "bias"), node("Tanh", ["h3"], "a2", "tanh"),
             node("Gemm", ["a2", "w3", "b3"], "y", "g2")]
    inits = [const("w1", 32, 16), const("b1", 32), const("w2", 32, 24), const("b2", 24),
             const("w3", 24, 10), const("b3", 10)]
    return make(nodes, inits, ["N", 16], ["N", 10])


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return spec_output(proto, {"x": x})


def masked(model: lepton_edge.Model, cuts: dict[str, tuple[int, list[int]]]) -> onnx.ModelProto:
    """The original model with the consumers' weights for removed channels set to zero."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for tensor in proto.graph.initializer:
        if tensor.name in cuts:
            axis, index = cuts[tensor.name]
            value = numpy_helper.to_array(tensor).copy()
            np.moveaxis(value, axis, 0)[index] = 0
            tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    return proto


def shapes(model: lepton_edge.Model) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.proto.graph.initializer}


@pytest.mark.parametrize("pool", ["flatten", "reduce"])
def test_residual_add_bn_depthwise_matches_masked_reference(pool: str) -> None:
    model = residual_model(pool)
    graph = analyse(model, "structured")
    assert set(graph.units) == {"c0+c2", "c1"}  # the residual Add ties c0 and c2 together
    assert graph.pinned == {"fc": "its channels reach graph output 'y'"}
    pruned = prune(model, rng.standard_normal((8, 3, 8, 8)).astype(np.float32),
                   ratios={"c2": 0.5, "c1": 0.25})
    removed = pruned.report.removed
    assert [len(removed["c0+c2"]), len(removed["c1"])] == [4, 2]
    got = shapes(pruned)
    assert got["w0"] == [4, 3, 3, 3] and got["w2"] == [4, 6, 3, 3] and got["w1"] == [6, 4, 3, 3]
    assert got["wd"] == [4, 1, 3, 3] and got["k"] == [1, 4, 1, 1] and got["wf"] == [10, 4]
    assert got["bn0_s"] == got["bn2_v"] == [4] and got["bn1_m"] == [6]
    dw = next(n for n in pruned.proto.graph.node if n.name == "dw")
    assert [a.i for a in dw.attribute if a.name == "group"] == [4]
    onnx.checker.check_model(pruned.proto, full_check=True)
    reference = masked(model, {"w1": (1, list(removed["c0+c2"])),
                               "wf": (1, list(removed["c0+c2"])),
                               "w2": (1, list(removed["c1"]))})
    x = rng.standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(pruned.proto, x), run(reference, x), rtol=1e-5, atol=1e-6)


def test_concat_offsets_and_reshape_gemm_match_masked_reference() -> None:
    model = concat_model()
    x = rng.standard_normal((8, 3, 6, 6)).astype(np.float32)
    pruned = prune(model, x, ratios={"a": 0.5, "b": 0.5, "c": 0.4, "d": 0.5})
    r = {k: list(v) for k, v in pruned.report.removed.items()}
    assert [len(r[k]) for k in "abcd"] == [3, 2, 2, 2]
    got = shapes(pruned)
    assert got["wc"] == [3, 5, 3, 3] and got["wd"] == [2, 6, 1, 1] and got["wf"] == [18, 10]
    shape = next(t for t in pruned.proto.graph.initializer if t.name == "shape")
    assert numpy_helper.to_array(shape).tolist() == [-1, 18]
    # the concat shifts b's channels by a's 6; each of d's channels is 9 rows of the Gemm
    reference = masked(model, {"wc": (1, r["a"] + [6 + i for i in r["b"]]),
                               "wd": (1, r["c"]),
                               "wf": (0, [c * 9 + s for c in r["d"] for s in range(9)])})
    np.testing.assert_allclose(run(pruned.proto, x), run(reference, x), rtol=1e-5, atol=1e-6)


def test_gemm_matmul_chain_matches_masked_reference() -> None:
    model = mlp_model()
    x = rng.standard_normal((16, 16)).astype(np.float32)
    pruned = prune(model, x, ratios={"g1": 0.5, "m": 0.25})
    r = pruned.report.removed
    assert shapes(pruned)["w2"] == [16, 18] and shapes(pruned)["b2"] == [18]
    reference = masked(model, {"w2": (0, list(r["g1"])), "w3": (0, list(r["m"]))})
    np.testing.assert_allclose(run(pruned.proto, x), run(reference, x), rtol=1e-5, atol=1e-6)


def test_refuses_a_ratio_that_removes_every_channel() -> None:
    model = residual_model()
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    with pytest.raises(InputError) as err:
        prune(model, x, ratios={"c1": 1.0})
    assert str(err.value) == (
        "ratio 1.0 for layer 'c1' would remove all 8 of its channels (round(1.0 x 8) = 8); a "
        "layer must keep at least one: use a ratio below 0.9375")
    with pytest.raises(InputError, match=r"ratio 0.97 for layer 'c2' would remove all 8"):
        prune(model, x, ratios={"c2": 0.97})
    with pytest.raises(InputError, match=r"cannot prune 'fc': its channels reach graph output"):
        prune(model, x, ratios={"fc": 0.5})
    with pytest.raises(InputError, match="exactly one of"):
        prune(model, x, sparsity=0.5, threshold=0.1)
    with pytest.raises(ModelError, match="already quantized"):
        prune(quantize(model, x), x, sparsity=0.5)


def test_threshold_mode_keeps_the_output_change_within_the_threshold(tmp_path: Path) -> None:
    model = concat_model()
    x = rng.standard_normal((32, 3, 6, 6)).astype(np.float32)
    pruned = prune(model, x, threshold=0.2)
    report = pruned.report
    assert report.ratios and report.mac_reduction > 0
    ref, got = run(model.proto, x), run(pruned.proto, x)
    change = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert change == pytest.approx(report.output_change, rel=1e-4) and change <= 0.2
    for unit, ratio in report.ratios.items():  # each layer alone is within it too
        assert dict(report.sensitivity.curve(unit))[ratio] <= 0.2
    tighter = prune(model, x, threshold=0.05).report
    assert tighter.macs[1] >= report.macs[1] and tighter.output_change <= 0.05
    assert "relative L2 output error" in report.sensitivity.table()
    png = report.sensitivity.plot(tmp_path / "sens.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_budgets_mac_reduction_and_unstructured_sparsity() -> None:
    model = residual_model()
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    report = prune(model, x, mac_reduction=0.3).report
    assert report.mac_reduction >= 0.3 and report.sensitivity.mode == "structured"
    sparse = prune(model, x, mode="unstructured", sparsity=0.5)
    weights = [numpy_helper.to_array(t) for t in sparse.proto.graph.initializer
               if t.name in ("w0", "w1", "w2", "wd", "wf")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros >= 0.5 and sparse.report.sparsity == pytest.approx(zeros)
    assert shapes(sparse) == shapes(model)
    with pytest.raises(InputError, match="mac_reduction needs mode='structured'"):
        prune(model, x, mode="unstructured", mac_reduction=0.3)


def test_torch_saliency_and_finetune_hook() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 8 * 8, 10))
    x = np.load(DIGITS / "x_test.npy")[:256]
    y = np.load(DIGITS / "y_test.npy")[:256]
    model = lepton_edge.load(net, torch.zeros(2, 1, 8, 8), input_names=["x"])
    pruned = prune(model, x[:64], sparsity=0.3, module=net)
    assert "first-order saliency" in pruned.report.sensitivity.importance
    assert pruned.report.sensitivity.layers[0].saliency > 0
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def step(module, batch):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(module(batch[0]), batch[1])
        loss.backward()
        optimizer.step()

    def accuracy(m: lepton_edge.Model) -> float:
        return float((run(m.proto, x).argmax(1) == y).mean())

    data = [(torch.from_numpy(x[i:i + 32]), torch.from_numpy(y[i:i + 32]))
            for i in range(0, len(x), 32)]
    tuned = finetune(net, pruned, step, data, epochs=3, evaluate=accuracy)
    assert list(tuned.report.accuracy) == ["unpruned", "pruned", "fine-tuned"]
    assert tuned.report.accuracy["fine-tuned"] > tuned.report.accuracy["pruned"]
    assert shapes(tuned) == shapes(pruned)
    # the physically pruned result computes what the trained, masked torch module computes
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(tuned.proto, x), want, rtol=1e-4, atol=1e-4)


def test_prune_quantize_compile_chain(tmp_path: Path) -> None:
    model = lepton_edge.load(DIGITS / "digits.onnx")
    x, y = np.load(DIGITS / "x_test.npy"), np.load(DIGITS / "y_test.npy")
    pruned = prune(model, x[:64], ratios={"node_conv2d": 0.25, "node_conv2d_1": 0.25})
    assert pruned.report.mac_reduction > 0.4
    q = quantize(pruned, x[:128])
    art = lepton_edge.compile(q, ["cpu"])
    session = lepton_edge.runtime.load(art.save(tmp_path / "p.lepton"), self_test=True)
    fp32 = float((run_image(model.proto, x).argmax(1) == y).mean())
    got = float((session.run({"image": x})["logits"].argmax(1) == y).mean())
    assert got >= fp32 - 0.01


def run_image(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def test_cli_prune_then_quantize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lepton_edge import cli

    np.save(tmp_path / "calib.npy", np.load(DIGITS / "x_test.npy")[:64])
    calib = ["--calib", str(tmp_path / "calib.npy")]
    cli.main(["prune", str(DIGITS / "digits.onnx"), "-o", str(tmp_path / "p.onnx"), *calib,
              "--mac-reduction", "0.3", "--plot", str(tmp_path / "s.png")])
    out = capsys.readouterr().out
    assert "structured pruning: MACs 337,536 ->" in out and (tmp_path / "s.png").exists()
    cli.main(["quantize", str(tmp_path / "p.onnx"), "-o", str(tmp_path / "q.onnx"), *calib])
    pruned = lepton_edge.load(tmp_path / "p.onnx")
    assert pruned.op_counts()["Conv"] == 2 and lepton_edge.load(tmp_path / "q.onnx")
    cli.main(["compile", str(tmp_path / "q.onnx"), "-o", str(tmp_path / "q.lepton")])
    cli.main(["run", str(tmp_path / "q.lepton"), "--check"])
    assert "self-test PASS" in capsys.readouterr().out
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["prune", str(DIGITS / "digits.onnx"), "-o", str(tmp_path / "bad.onnx"),
                  *calib, "--ratio", "node_conv2d=1.0"])
    assert exit_.value.code == 1
    assert capsys.readouterr().err == (
        "error: ratio 1.0 for layer 'node_conv2d' would remove all 16 of its channels "
        "(round(1.0 x 16) = 16); a layer must keep at least one: use a ratio below 0.9688\n")
