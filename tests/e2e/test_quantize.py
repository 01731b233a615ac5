"""Post-training int8 quantization to QDQ ONNX: structure, numbers, report, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lepton_edge
from tests.conftest import spec_output
from lepton_edge.compress.quantize import quantize
from lepton_edge.errors import InputError

REPO = Path(__file__).resolve().parents[2]
DIGITS = REPO / "samples/digits"


@pytest.fixture(scope="module")
def digits():
    x = np.load(DIGITS / "x_test.npy")
    y = np.load(DIGITS / "y_test.npy")
    return lepton_edge.load(DIGITS / "digits.onnx"), x, y


def spec_run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return spec_output(proto, {"image": x})


def test_minmax_qdq_structure_accuracy_and_compiled_numbers(digits, tmp_path: Path) -> None:
    model, x, y = digits
    q = quantize(model, x[:128])
    counts = q.op_counts()
    assert counts["Conv"] == 2 and counts["Gemm"] == 2
    assert counts["QuantizeLinear"] >= 5 and counts["DequantizeLinear"] >= 9
    # per-channel symmetric int8 weights: a scale per output channel, zero points 0
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    conv_w = [n for n in inits if n.endswith("_quantized") and inits[n].ndim == 4]
    assert conv_w and all(inits[n].dtype == np.int8 for n in conv_w)
    fp32 = float((spec_run(model.proto, x).argmax(1) == y).mean())
    int8 = spec_run(q.proto, x)
    assert abs(float((int8.argmax(1) == y).mean()) - fp32) <= 0.005
    assert q.report.output_cosine["logits"] > 0.999
    assert {layer.kind for layer in q.report.layers} == {"activation", "weight"}
    # compiled: conv/gemm run as integer kernels; the logits stay within one output
    # quantization step of ONNX's float QDQ semantics, and the accuracy is as good
    art = lepton_edge.compile(q, ["cpu"])
    session = lepton_edge.runtime.load(art.save(tmp_path / "q.lepton"), self_test=True)
    meta = art.manifest["subgraphs"][0]["builds"][0]["meta"]
    assert [k.split(" ")[0] for k in meta["int8_kernels"]] == ["conv2d", "conv2d", "matmul",
                                                               "matmul"]
    step = art.manifest["output_quant_step"]["logits"]
    got = session.run({"image": x})["logits"]
    assert np.abs(got - int8).max() <= step * (1 + 1e-5)
    assert abs(float((got.argmax(1) == y).mean()) - fp32) <= 0.005


def activation_scales(q) -> list[float]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    return [float(inits[n.input[1]]) for n in q.proto.graph.node if n.op_type == "QuantizeLinear"]


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_other_calibration_methods(digits, method: str) -> None:
    model, x, y = digits
    q = quantize(model, x[:64], method=method)
    # entropy clips outliers by design, the logits included: a lower cosine, same accuracy
    assert q.report.method == method
    assert q.report.output_cosine["logits"] > (0.99 if method == "percentile" else 0.9)
    # each method really chooses its own ranges (onnxruntime's entropy defaults did not)
    minmax = activation_scales(quantize(model, x[:64], method="minmax"))
    assert activation_scales(q) != minmax
    assert max(a / b for a, b in zip(activation_scales(q), minmax, strict=True)) <= 1.0 + 1e-6
    assert float((spec_run(q.proto, x).argmax(1) == y).mean()) >= 0.95


def test_fixed_scale_sets_every_activation_scale(digits) -> None:
    model, x, _ = digits
    q = quantize(model, x[:32], scale=0.05)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.proto.graph.initializer}
    scales = [inits[n.input[1]] for n in q.proto.graph.node if n.op_type == "QuantizeLinear"]
    assert scales and all(np.allclose(s, 0.05) for s in scales)


def test_keep_float_and_automatic_budget(digits) -> None:
    model, x, _ = digits
    first_gemm = next(n.name for n in model.proto.graph.node if n.op_type == "Gemm")
    q = quantize(model, x[:64], keep_float=[first_gemm])
    assert q.report.kept_float[first_gemm] == "kept float by request"
    node = next(n for n in q.proto.graph.node if n.name == first_gemm)
    weight = node.input[1]
    assert weight in {t.name for t in q.proto.graph.initializer}  # float weight, no DQ
    with pytest.raises(InputError, match="unknown node"):
        quantize(model, x[:8], keep_float=["no_such_node"])
    auto = quantize(model, x[:64], min_output_cosine=0.99999)
    assert auto.report.steps, "the budget should have forced at least one layer to float"
    assert min(auto.report.output_cosine.values()) >= 0.99999
    assert any("to meet output cosine" in r for r in auto.report.kept_float.values())


def test_report_plot_and_calibration_forms(digits, tmp_path: Path) -> None:
    model, x, _ = digits
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"batch{i}.npy", x[i * 8:(i + 1) * 8])
    q = quantize(model, folder)
    png = q.report.plot(tmp_path / "err.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    q2 = quantize(model, [{"image": x[:8]}, {"image": x[8:16]}])
    assert q2.report.layers
    with pytest.raises(InputError, match="calibration batch 0: bad inputs.*dtype float64"):
        quantize(model, x[:8].astype(np.float64))


def test_cli_quantize_then_compile(digits, tmp_path: Path) -> None:
    _, x, _ = digits
    np.save(tmp_path / "calib.npy", x[:64])
    cli = [sys.executable, "-m", "lepton_edge.cli"]
    out = subprocess.run(cli + ["quantize", str(DIGITS / "digits.onnx"), "-o",
                                str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npy"),
                                "--plot", str(tmp_path / "q.png")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "SQNR dB" in out.stdout and (tmp_path / "q.png").exists()
    out = subprocess.run(cli + ["compile", str(tmp_path / "q.onnx"), "-o",
                                str(tmp_path / "q.lepton")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(cli + ["explain", str(tmp_path / "q.onnx")], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert "sg0 on cpu: int8 kernels: conv2d x2, matmul x2" in out.stdout
    assert "QDQ left as float: QuantizeLinear of nn.max_pool2d" in out.stdout
    out = subprocess.run(cli + ["run", str(tmp_path / "q.lepton"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "self-test PASS" in out.stdout, out.stdout + out.stderr


def test_bert_shaped_encoder_int8_keeps_cosine(tmp_path: Path) -> None:
    """A 2-layer encoder (attention + LayerNorm + GELU): int8 kernels for every linear layer,
    output cosine >= 0.99 against fp32 on held-out inputs."""
    torch = pytest.importorskip("torch")
    from lepton_edge.compress.quantize import cosine

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                             dropout=0.0, activation="gelu", batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    model = lepton_edge.load(encoder, torch.randn(2, 16, 64), input_names=["tokens"],
                             output_names=["hidden"])
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 16, 64)).astype(np.float32)
    test = rng.standard_normal((8, 16, 64)).astype(np.float32)
    q = quantize(model, calib)
    art = lepton_edge.compile(q, ["cpu"])
    meta = art.manifest["subgraphs"][0]["builds"][0]["meta"]
    kernels = meta["int8_kernels"]  # per layer: in-projection, out-projection, 2 FFN, QK^T, AV
    assert len(kernels) == 12 and sum("activation x activation" in k for k in kernels) == 4
    session = lepton_edge.runtime.load(art.save(tmp_path / "enc.lepton"), self_test=True)
    fp32 = spec_output(model.proto, {"tokens": test})
    assert cosine(session.run({"tokens": test})["hidden"], fp32) >= 0.99
