"""quantize(model, calibration) -> Model: calibrated post-training int8, as QDQ ONNX.

onnxruntime's quantization tools already do calibration (MinMax, Percentile, Entropy) and QDQ
insertion well, so we drive them rather than rewrite them. What they lack, and what lives
here: calibration data in the forms users have it, a fixed-scale mode, a per-layer error
report (SQNR and cosine of every quantized tensor against fp32), the reason each node stayed
float, and an automatic mode that keeps the most damaged layers in float until the output
meets an accuracy budget.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lepton_edge.compress.calibrate import calibration_batches
from lepton_edge.errors import InputError, ModelError
from lepton_edge.model import Model, load
from lepton_edge.reference import reference_session

METHODS = ("minmax", "percentile", "entropy")
# The layers whose weights are quantized; the candidates for keeping float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerError:
    tensor: str
    node: str
    op_type: str
    kind: str  # "activation" or "weight"
    sqnr_db: float
    cosine: float


@dataclass(frozen=True)
class QuantReport:
    """What quantization did and how much each quantized tensor differs from fp32."""

    method: str
    layers: tuple[LayerError, ...]
    kept_float: dict[str, str]  # node -> reason
    output_cosine: dict[str, float]  # model output -> cosine vs fp32 on the calibration data
    steps: tuple[str, ...] = field(default_factory=tuple)

    def table(self) -> str:
        rows = [f"{'tensor':<40} {'node':<24} {'kind':<10} {'SQNR dB':>8} {'cosine':>8}"]
        for layer in sorted(self.layers, key=lambda x: x.sqnr_db):
            rows.append(f"{layer.tensor[:40]:<40} {layer.node[:24]:<24} {layer.kind:<10} "
                        f"{layer.sqnr_db:8.2f} {layer.cosine:8.5f}")
        rows.append("outputs: " + ", ".join(f"{k} cosine {v:.5f}"
                                             for k, v in self.output_cosine.items()))
        for node, reason in self.kept_float.items():
            rows.append(f"float: {node}: {reason}")
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """A PNG bar chart of SQNR per quantized tensor (lowest first)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        layers = sorted(self.layers, key=lambda x: x.sqnr_db)
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(layers) + 1)))
        colors = ["tab:orange" if x.kind == "weight" else "tab:blue" for x in layers]
        ax.barh([f"{x.tensor[:30]} ({x.kind[0]})" for x in layers],
                [x.sqnr_db for x in layers], color=colors)
        ax.set_xlabel("SQNR vs fp32 (dB, higher is better)")
        ax.set_title(f"int8 quantization error per tensor ({self.method})")
        ax.invert_yaxis()
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def quantize(
    model: Model | Any,
    calibration: Any,
    *,
    method: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = False,
    scale: float | None = None,
    keep_float: tuple[str, ...] | list[str] = (),
    min_output_cosine: float | None = None,
    percentile: float = 99.999,
    batch_size: int = 16,
    progress: bool = False,
) -> Model:
    """Quantize `model` to int8 QDQ ONNX, calibrated on `calibration`.

    Weights are symmetric int8 (per output channel with `per_channel`); activations are int8,
    asymmetric unless `symmetric_activations`. `scale` fixes every activation's scale (zero
    point 0) instead of calibrating it. `keep_float` names nodes to leave in float. With
    `min_output_cosine`, the layers with the worst error are kept in float one by one until
    every output's cosine similarity to fp32 on the calibration data reaches the budget.
    The returned Model carries the QuantReport as `model.report`.
    """
    if not isinstance(model, Model):
        model = load(model)
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; choose one of {METHODS}")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"scale must be a positive number, got {scale}")
    node_names = {n.name for n in model.proto.graph.node}
    unknown = sorted(set(keep_float) - node_names)
    if unknown:
        raise InputError(f"keep_float names unknown node(s) {unknown}; nodes are listed by "
                         "`lepton-edge explain`")
    if any(not n.name for n in model.proto.graph.node):
        model = _with_node_names(model)
    batches = calibration_batches(calibration, model.inputs, batch_size)
    reference = _run_with_intermediates(model.proto, batches)

    kept = {n: "kept float by request" for n in keep_float}
    steps: list[str] = []
    while True:
        quantized = _quantize_once(model, batches, method, per_channel, symmetric_activations,
                                   scale, list(kept), percentile, progress)
        report = _report(model, quantized, batches, reference, method, kept, steps)
        worst = min(report.output_cosine.values()) if report.output_cosine else 1.0
        if min_output_cosine is None or worst >= min_output_cosine:
            break
        candidate = _worst_layer(report, kept)
        if candidate is None:
            raise ModelError(
                f"cannot reach output cosine {min_output_cosine}: with every weighted layer "
                f"in float it is {worst:.5f}; relax the budget or use another method")
        kept[candidate] = f"kept float to meet output cosine >= {min_output_cosine}"
        steps.append(f"output cosine {worst:.5f} < {min_output_cosine}: keep {candidate} float")
    result = load(quantized)
    object.__setattr__(result, "report", report)
    return result


def _with_node_names(model: Model) -> Model:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    return load(proto)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over our batches, with progress."""

    def __init__(self, batches: list[dict[str, np.ndarray]], progress: bool) -> None:
        self._batches = batches
        self._index = 0
        self._progress = progress

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._index >= len(self._batches):
            if self._progress:
                print(file=sys.stderr)
            return None
        self._index += 1
        if self._progress:
            print(f"\rcalibrating: batch {self._index}/{len(self._batches)}", end="",
                  file=sys.stderr, flush=True)
        return self._batches[self._index - 1]

    def rewind(self) -> None:
        self._index = 0


def _quantize_once(model: Model, batches: list[dict[str, np.ndarray]], method: str,
                   per_channel: bool, symmetric: bool, scale: float | None,
                   exclude: list[str], percentile: float, progress: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric or scale is not None,
                             "WeightSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    if method == "entropy":
        # onnxruntime's quantize_static cannot pass histogram sizes to its entropy calibrator,
        # whose defaults (128 bins, 128 quantized bins) leave exactly one candidate threshold:
        # the full range, i.e. MinMax (seen here: identical scales). We run the calibrator
        # with 2048 bins ourselves and hand its ranges over as rmin/rmax overrides.
        extra["TensorQuantOverrides"] = {
            name: [{"rmin": np.array(lo, np.float32), "rmax": np.array(hi, np.float32)}]
            for name, (lo, hi) in _entropy_ranges(model, batches, symmetric).items()}
        calib = CalibrationMethod.MinMax  # the ranges are fixed; MinMax only fills the rest
    if scale is not None:
        # Fixed-scale mode: every activation tensor gets this scale and zero point 0.
        overrides = {}
        weights = {t.name for t in model.proto.graph.initializer}
        for node in model.proto.graph.node:
            for name in list(node.input) + list(node.output):
                if name and name not in weights:
                    overrides[name] = [{"scale": np.array(scale, np.float32),
                                        "zero_point": np.array(0, np.int8)}]
        extra["TensorQuantOverrides"] = overrides
    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model.proto, src)
        # onnxruntime's calibrators print and log chatter; keep it off the user's stdout.
        quiet = contextlib.redirect_stdout(io.StringIO())
        try:
            with quiet, _root_log_level(logging.ERROR):
                quantize_static(
                    str(src), str(dst), _Reader(batches, progress),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=per_channel,
                    calibrate_method=calib, nodes_to_exclude=exclude, extra_options=extra,
                )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"quantization failed: {exc}") from None
        return onnx.load(dst)


@contextlib.contextmanager
def _root_log_level(level: int) -> Any:
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


def _entropy_ranges(model: Model, batches: list[dict[str, np.ndarray]], symmetric: bool
                    ) -> dict[str, tuple[float, float]]:
    """KL-divergence (entropy) thresholds per activation tensor, 2048-bin histograms."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory(prefix="lepton-entropy-") as tmp:
        src = Path(tmp) / "fp32.onnx"
        onnx.save(model.proto, src)
        quiet = contextlib.redirect_stdout(io.StringIO())
        with quiet, _root_log_level(logging.ERROR):
            calibrator = create_calibrator(
                src, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=CalibrationMethod.Entropy,
                extra_options={"num_bins": 2048, "num_quantized_bins": 255,
                               "symmetric": symmetric})
            calibrator.collect_data(_Reader(batches, progress=False))
            data = calibrator.compute_data()
    ranges = {}
    for name, value in data.data.items():
        lo, hi = value.range_value
        ranges[name] = (float(np.asarray(lo).ravel()[0]), float(np.asarray(hi).ravel()[0]))
    return ranges


def _run_with_intermediates(proto: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
                            names: list[str] | None = None, limit: int = 8
                            ) -> dict[str, list[np.ndarray]]:
    """Run `proto` on the first `limit` batches, returning outputs and intermediate tensors."""

    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    have = {o.name for o in exposed.graph.output}
    types = {v.name: v for v in exposed.graph.value_info}
    wanted = names if names is not None else [o for n in exposed.graph.node for o in n.output]
    for name in wanted:
        if name and name not in have:
            exposed.graph.output.append(types.get(name) or onnx.ValueInfoProto(name=name))
            have.add(name)
    session = reference_session(exposed)
    out_names = [o.name for o in session.get_outputs()]
    values: dict[str, list[np.ndarray]] = {n: [] for n in out_names}
    for feeds in batches[:limit]:
        for name, value in zip(out_names, session.run(out_names, feeds), strict=True):
            values[name].append(value)
    return values


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = reference.astype(np.float64).ravel()
    noise = float(np.sum((ref - approx.astype(np.float64).ravel()) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = float(np.linalg.norm(x) * np.linalg.norm(y))
    return 1.0 if denom == 0.0 else float(np.dot(x, y) / denom)


def _report(model: Model, quantized: onnx.ModelProto, batches: list[dict[str, np.ndarray]],
            reference: dict[str, list[np.ndarray]], method: str, kept: dict[str, str],
            steps: list[str]) -> QuantReport:
    from onnxruntime.quantization.registry import QDQRegistry

    graph = quantized.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, str] = {}
    ops = {n.name: n.op_type for n in model.proto.graph.node}
    for node in model.proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, node.name)
    # DequantizeLinear(QuantizeLinear(T)) is the int8 stand-in for activation T.
    activation_dq: dict[str, str] = {}
    weight_dq: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        src = producers.get(node.input[0])
        if src is not None and src.op_type == "QuantizeLinear":
            activation_dq.setdefault(src.input[0], node.output[0])
        elif node.input[0] in inits:
            weight_dq.append(node)
    quant_values = _run_with_intermediates(
        quantized, batches, names=list(activation_dq.values()))
    layers: list[LayerError] = []
    for tensor, dq_name in activation_dq.items():
        if tensor not in reference or dq_name not in quant_values:
            continue
        ref = np.concatenate([v.ravel() for v in reference[tensor]])
        got = np.concatenate([v.ravel() for v in quant_values[dq_name]])
        node = _producer_name(model, tensor) or consumers.get(tensor, "")
        layers.append(LayerError(tensor, node, ops.get(node, "input"), "activation",
                                 sqnr_db(ref, got), cosine(ref, got)))
    original_inits = {t.name: t for t in model.proto.graph.initializer}
    for node in weight_dq:
        q = onnx.numpy_helper.to_array(inits[node.input[0]]).astype(np.float64)
        s = onnx.numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        zp = (onnx.numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
              if len(node.input) > 2 and node.input[2] else np.zeros_like(s))
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if s.ndim == 1 and s.size > 1:
            shape = [1] * q.ndim
            shape[axis] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        deq = (q - zp) * s
        original_name = node.input[0].removesuffix("_quantized")
        if original_name not in original_inits:
            continue
        ref = onnx.numpy_helper.to_array(original_inits[original_name])
        user = consumers.get(original_name, "")
        layers.append(LayerError(original_name, user, ops.get(user, ""), "weight",
                                 sqnr_db(ref, deq), cosine(ref, deq)))
    kept_float = dict(kept)
    quantized_nodes = _quantized_nodes(model, quantized)
    for node in model.proto.graph.node:
        if node.name in kept_float or node.name in quantized_nodes:
            continue
        if node.op_type not in QDQRegistry:
            kept_float[node.name] = f"no int8 handler for {node.op_type} (stays float)"
        elif node.op_type in WEIGHTED_OPS:
            kept_float[node.name] = "quantizer left it float (unsupported attributes or inputs)"
    outputs = {o.name: cosine(np.concatenate([v.ravel() for v in reference[o.name]]),
                              np.concatenate([v.ravel() for v in quant_values[o.name]]))
               for o in model.proto.graph.output if o.name in quant_values}
    return QuantReport(method=method, layers=tuple(layers), kept_float=kept_float,
                       output_cosine=outputs, steps=tuple(steps))


def _producer_name(model: Model, tensor: str) -> str:
    for node in model.proto.graph.node:
        if tensor in node.output:
            return node.name
    return ""


def _quantized_nodes(model: Model, quantized: onnx.ModelProto) -> set[str]:
    """Original nodes whose float inputs all arrive through DequantizeLinear."""
    producers = {o: n for n in quantized.graph.node for o in n.output}
    inits = {t.name for t in quantized.graph.initializer}
    done = set()
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data_inputs = [i for i in node.input if i and i not in inits]
        if data_inputs and all(producers.get(i) is not None
                               and producers[i].op_type == "DequantizeLinear"
                               for i in data_inputs):
            done.add(node.name)
    return done


def _worst_layer(report: QuantReport, kept: dict[str, str]) -> str | None:
    weighted = [x for x in report.layers
                if x.op_type in WEIGHTED_OPS and x.node and x.node not in kept]
    if not weighted:
        return None
    return min(weighted, key=lambda x: x.sqnr_db).node
