"""quantize(model, calibration) -> Model: calibrated post-training int8, as QDQ ONNX.

onnxruntime's quantization tools already do calibration (MinMax, Percentile, Entropy) and QDQ
insertion well, so we drive them rather than rewrite them. What they lack, and what lives
here: calibration data in the forms users have it, a fixed-scale mode, a per-layer error
report (SQNR and cosine of every quantized tensor against fp32), the reason each node stayed
float, and an automatic mode that keeps the most damaged layers in float until the output
meets an accuracy budget.

Which nodes get QDQ (`op_types`): onnxruntime's default quantizes every op type it registers
(Add, Mul, Softmax, LayerNormalization, ...). lepton-edge's lowering (lowering/int8.py) turns
only DequantizeLinear -> Conv/MatMul/Gemm (+bias, +Relu/Clip) -> QuantizeLinear into integer
kernels and int8 reshapes/transposes between them into plain data movement; every other QDQ
pair runs as float fake-quant, i.e. extra quantize/dequantize passes and extra rounding. So
the default, "lepton", decides per node (select_nodes): the integer kernels and the data
movement, pooling, Relu/Clip and residual Adds that lie between them are quantized, elementwise
chains whose results feed no integer kernel (GELU's interior, LayerNorm, Softmax) stay float,
and so do matmuls of two activations (attention), whose only integer form today is slower
than fp32. "all" is onnxruntime's behaviour.

Weight precision (`weight_bits`): 8 (default) quantizes weights to [-127, 127]; 7 to
[-64, 64] (onnxruntime's `reduce_range=True`), straight from the fp32 weights. The reason is
speed on x86 CPUs with AVX2 but no VNNI: their fastest int8 multiply-add, `vpmaddubsw`, adds
two uint8 x int8 products in saturating int16. lepton-edge's x86 int8 lowering uses it only
where a compile-time check on the constant weight proves that no pair of weights can saturate,
which holds for every weight in [-64, 64] (255 * (64 + 64) <= 32767) and almost never for
8-bit weights; otherwise it keeps an exact but slower int16 kernel. onnxruntime's own int8
kernels on such a CPU (Zen 3 here) saturate with 8-bit weights (digits logits off by up to 3.2
from the QDQ semantics) and are exact with 7-bit ones. The price: about twice the weight
rounding error (6 dB less weight SQNR). Activations are the same either way; with
op_types "all" or a list, the constant operands of the elementwise ops onnxruntime quantizes
(a bias Add's bias, LayerNormalization's scale) get its reduced range [-64, 64] too.
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
from lepton_edge.errors import InputError, InternalError, ModelError
from lepton_edge.model import Model, load
from lepton_edge.reference import reference_session

METHODS = ("minmax", "percentile", "entropy")
# The layers whose weights are quantized; the candidates for keeping float.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# op_types presets: "lepton" = select_nodes' per-node rules, "all" = onnxruntime's default.
OP_TYPE_PRESETS = ("lepton", "all")
# weight_bits -> the symmetric int8 range of the quantized weights, and what it is for.
WEIGHT_BITS = {
    8: (127, "full int8 range; the most accurate (default)"),
    7: (64, "onnxruntime's reduce_range: exact vpmaddubsw int8 kernels on AVX2 CPUs without "
            "VNNI (faster there), about twice the weight rounding error"),
}
# Ops lowering/int8.py turns into integer kernels (with a constant int8 weight).
KERNEL_OPS = ("Conv", "Gemm", "MatMul")
# Ops whose int8 result keeps its input's scale (onnxruntime quantizes them with the input's
# parameters): data movement and pooling. Between integer kernels they move int8 values
# (a quarter of float's bytes; reshapes/transposes are exact int8 copies in the lowering).
MOVEMENT_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice",
                          "Gather", "Split", "Pad", "MaxPool", "AveragePool", "Resize"})
# Activations the requantization absorbs (the clamp of quantize(relu|clip(conv/matmul))).
FUSED_ACTIVATIONS = ("Relu", "Clip")
# Measured on a 2-core Zen 3 (AVX2, no VNNI), encoder at sequence 128: an attention matmul of
# two int8 activations runs int16 x int16 on the generic schedule (no packed kernel: there is
# no constant weight to pack) in 0.14 ms per call against 0.05 ms in fp32.
_ACT_MATMUL_WHY = ("MatMul of two activations (attention): lepton-edge's integer form of it "
                   "(int16 x int16, generic schedule, no packed weight) is slower than fp32 "
                   "(0.14 vs 0.05 ms per call on AVX2); activation_matmuls=True quantizes it")


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
    quantized: dict[str, str] = field(default_factory=dict)  # node -> why it is int8
    op_types: str = "lepton"
    weight_bits: int = 8  # see WEIGHT_BITS
    per_channel: bool = True

    @property
    def weights(self) -> str:
        """The weight format in words: 'weights 7-bit ([-64, 64]), symmetric, per channel'."""
        qmax = WEIGHT_BITS[self.weight_bits][0]
        return (f"weights {self.weight_bits}-bit ([-{qmax}, {qmax}]), symmetric, "
                + ("per channel" if self.per_channel else "per tensor"))

    def table(self) -> str:
        rows = [f"{'tensor':<40} {'node':<24} {'kind':<10} {'SQNR dB':>8} {'cosine':>8}"]
        for layer in sorted(self.layers, key=lambda x: x.sqnr_db):
            rows.append(f"{layer.tensor[:40]:<40} {layer.node[:24]:<24} {layer.kind:<10} "
                        f"{layer.sqnr_db:8.2f} {layer.cosine:8.5f}")
        rows.append("outputs: " + ", ".join(f"{k} cosine {v:.5f}"
                                             for k, v in self.output_cosine.items()))
        rows.append(f"op_types: {self.op_types}")
        rows.append(f"{self.weights}: {WEIGHT_BITS[self.weight_bits][1]}")
        for node, reason in self.quantized.items():
            rows.append(f"int8: {node}: {reason}")
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
    op_types: str | tuple[str, ...] | list[str] = "lepton",
    activation_matmuls: bool = False,
    weight_bits: int = 8,
) -> Model:
    """Quantize `model` to int8 QDQ ONNX, calibrated on `calibration`.

    Weights are symmetric int8 (per output channel with `per_channel`); activations are int8,
    asymmetric unless `symmetric_activations`. `scale` fixes every activation's scale (zero
    point 0) instead of calibrating it. `keep_float` names nodes to leave in float. With
    `min_output_cosine`, the layers with the worst error are kept in float one by one until
    every output's cosine similarity to fp32 on the calibration data reaches the budget.

    `op_types` chooses which nodes get QDQ: "lepton" (default) the nodes lepton-edge's
    integer lowering pays off for (select_nodes: Conv/MatMul/Gemm with constant weights and
    the data movement, pooling, Relu/Clip and residual Adds between them; every other node
    stays float, with its reason in `report.kept_float`); "all" every op type onnxruntime
    registers (its own default); or a list of op types for onnxruntime's rules on just those.
    `activation_matmuls` also quantizes matmuls of two activations (attention) in "lepton".
    `weight_bits` is 8 (weights in [-127, 127], default) or 7 (weights in [-64, 64],
    onnxruntime's reduce_range, quantized from fp32): on AVX2 CPUs without VNNI 7-bit weights
    let lepton-edge use exact `vpmaddubsw` int8 kernels (see the module docstring), at about
    twice the weight rounding error; activations are quantized the same either way.
    The returned Model carries the QuantReport as `model.report`.
    """
    if not isinstance(model, Model):
        model = load(model)
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}'; choose one of {METHODS}")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise InputError(f"scale must be a positive number, got {scale}")
    _check_weight_bits(weight_bits)
    node_names = {n.name for n in model.proto.graph.node}
    unknown = sorted(set(keep_float) - node_names)
    if unknown:
        raise InputError(f"keep_float names unknown node(s) {unknown}; nodes are listed by "
                         "`lepton-edge explain`")
    op_types = _check_op_types(model, op_types, activation_matmuls)
    if any(not n.name for n in model.proto.graph.node):
        model = _with_node_names(model)
    batches = calibration_batches(calibration, model.inputs, batch_size)
    reference = _run_with_intermediates(model.proto, batches)

    kept = {n: "kept float by request" for n in keep_float}
    steps: list[str] = []
    while True:
        try:
            selection = select_nodes(model, op_types, activation_matmuls=activation_matmuls,
                                     keep_float=kept)
        except ModelError:
            if not steps:
                raise
            raise ModelError(
                f"cannot reach output cosine {min_output_cosine}: with every integer kernel "
                f"in float it is still below ({steps[-1]}); relax the budget or use another "
                "method") from None
        quantized = _quantize_once(model, batches, method, per_channel, symmetric_activations,
                                   scale, list(kept), percentile, progress, selection,
                                   int(weight_bits))
        report = _report(model, quantized, batches, reference, method, kept, steps, selection,
                         int(weight_bits), per_channel)
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


@dataclass(frozen=True)
class Selection:
    """Which nodes onnxruntime's quantizer is given, and why each node is int8 or float."""

    op_types: str  # "lepton", "all" or the op types joined by commas
    nodes: frozenset[str] | None  # None: every node of onnxruntime's op types
    ort_op_types: tuple[str, ...] | None  # None: onnxruntime's default list
    int8: dict[str, str]  # node -> why it is quantized (intended)
    floats: dict[str, str]  # node -> why it stays float
    exclude_output_quantization: tuple[str, ...] = ()


def _check_weight_bits(weight_bits: Any) -> None:
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, np.integer)) \
            or int(weight_bits) not in WEIGHT_BITS:
        allowed = "; ".join(f"{bits}: weights in [-{qmax}, {qmax}], {why}"
                            for bits, (qmax, why) in WEIGHT_BITS.items())
        raise InputError(f"weight_bits must be 8 or 7, got {weight_bits!r} ({allowed})")


def _check_op_types(model: Model, op_types: Any, activation_matmuls: bool) -> Any:
    if isinstance(op_types, str):
        if op_types not in OP_TYPE_PRESETS:
            raise InputError(f"op_types must be one of {OP_TYPE_PRESETS} or a list of op types, "
                             f"got '{op_types}'")
    else:
        op_types = tuple(op_types)
        if not op_types or not all(isinstance(t, str) and t for t in op_types):
            raise InputError("op_types must be 'lepton', 'all' or a non-empty list of op type "
                             f"names, got {op_types!r}")
        present = {n.op_type for n in model.proto.graph.node}
        missing = sorted(set(op_types) - present)
        if missing:
            raise InputError(f"op_types names op type(s) {missing} that the model does not "
                             f"have; it has {sorted(present)}")
    if activation_matmuls and op_types != "lepton":
        raise InputError("activation_matmuls=True applies to op_types='lepton' only (with "
                         "'all' or a list, onnxruntime's rules decide)")
    return op_types


def select_nodes(model: Model, op_types: Any = "lepton", *, activation_matmuls: bool = False,
                 keep_float: dict[str, str] | None = None) -> Selection:
    """Decide per node whether it gets QDQ, with the reason (see the module docstring).

    "lepton": quantize
    - Conv (2-D), MatMul and Gemm whose weight is constant: lowering/int8.py's integer kernels
      (activation x activation MatMuls only with `activation_matmuls`);
    - data movement and pooling (MOVEMENT_OPS), Relu/Clip and residual Adds (two activation
      inputs) whose result reaches such a kernel through ops of these kinds: int8 between
      kernels; onnxruntime quantizes a movement op only when its input is int8 already, so
      movement right after float math stays float and is quantized where the kernel reads it;
    and nothing else. MatMul results are not quantized by the MatMul itself (onnxruntime's
    OpTypesToExcludeOutputQuantization): exporters write a linear layer as MatMul + bias Add,
    and quantize(add(matmul, bias)) is one integer kernel only without a QDQ pair between them;
    a MatMul result that stays float is accumulated in int32 and scaled once.
    """
    kept = dict(keep_float or {})
    graph = model.proto.graph
    if op_types == "all":
        return Selection("all", None, None, {}, kept)
    if not isinstance(op_types, str):
        chosen = set(op_types)
        int8 = {n.name: f"{n.op_type} is in op_types (onnxruntime's QDQ rules)"
                for n in graph.node if n.op_type in chosen and n.name not in kept}
        floats = {n.name: f"{n.op_type} is not in op_types" for n in graph.node
                  if n.op_type not in chosen}
        floats.update(kept)
        return Selection(",".join(op_types), frozenset(int8), tuple(sorted(chosen)), int8,
                         floats)

    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}
    producers = {o: n for n in graph.node for o in n.output}
    int8: dict[str, str] = {}
    floats: dict[str, str] = {}
    kernels: set[str] = set()
    for node in graph.node:
        if node.name in kept or node.op_type not in KERNEL_OPS + ("ConvTranspose",):
            continue
        why = _kernel_reason(node, constants, ranks, activation_matmuls)
        if why.startswith("int8"):
            kernels.add(node.name)
            int8[node.name] = why.removeprefix("int8: ")
        else:
            floats[node.name] = why

    # Backwards over the (topologically sorted) graph: which tensors reach a kernel's
    # activation input through movement, Relu/Clip and residual Adds only.
    feeds: dict[str, str] = {}  # tensor -> the kernel it reaches

    def transparent(node: onnx.NodeProto) -> bool:
        if node.name in kept:
            return False
        if node.op_type in MOVEMENT_OPS or node.op_type in FUSED_ACTIVATIONS:
            return True
        return _residual_add(node, constants)

    for node in reversed(graph.node):
        if node.name in kernels:
            feeds.setdefault(node.input[0], node.name)
            if node.op_type == "MatMul" and node.input[1] not in constants:
                feeds.setdefault(node.input[1], node.name)
        elif transparent(node) and node.output and node.output[0] in feeds:
            data = node.input if node.op_type == "Add" else node.input[:1]
            for name in data:
                if name:
                    feeds.setdefault(name, feeds[node.output[0]])

    for node in graph.node:
        name, op = node.name, node.op_type
        if name in kept or name in int8 or name in floats:
            continue
        out = node.output[0] if node.output else ""
        data_in = [i for i in node.input if i and i not in constants]
        reached = feeds.get(out)
        if op in ("Shape", "Size"):
            floats[name] = f"{op} reads only the tensor's shape: nothing to quantize"
        elif data_in and not any(types.get(i) in floating for i in data_in):
            floats[name] = "computes on integer/bool values (shapes, indices): nothing to quantize"
        elif reached is not None and op in MOVEMENT_OPS:
            int8[name] = f"data movement between integer kernels (feeds {reached}): int8"
        elif reached is not None and op in FUSED_ACTIVATIONS:
            src = producers.get(node.input[0])
            int8[name] = (f"{op} on the way to {reached}: absorbed by the requantization of "
                          f"{src.name if src is not None else node.input[0]}")
        elif reached is not None and _residual_add(node, constants):
            int8[name] = (f"residual Add feeding {reached}: int8 in and out (one fused pass; the "
                          "QDQ Add the Vitis target runs)")
        elif op == "Add" and _bias_of(node, producers, constants, kernels) is not None:
            mm = _bias_of(node, producers, constants, kernels)
            floats[name] = (f"bias Add of {mm}: part of its integer kernel (the bias is folded "
                            "into the int32 accumulator when the result is requantized), so "
                            "no QDQ pair between them")
        elif op in MOVEMENT_OPS or op in FUSED_ACTIVATIONS:
            floats[name] = (f"{op} whose result reaches no integer kernel: stays float (QDQ "
                            "here would only add quantize/dequantize passes)")
        elif reached is not None:
            floats[name] = (f"{op} computes in float (no integer kernel for it); its result is "
                            f"quantized where {reached} reads it")
        else:
            floats[name] = (f"{op} computes in float: its result feeds no integer kernel, so "
                            "QDQ around it would only add quantize/dequantize passes "
                            "(op_types='all' quantizes it as onnxruntime does)")
    floats.update(kept)
    if not int8:
        raise ModelError("nothing to quantize for lepton-edge's integer lowering: no Conv, "
                         "MatMul or Gemm with a constant weight ("
                         + "; ".join(f"{k}: {v}" for k, v in list(floats.items())[:3])
                         + "); op_types='all' quantizes with onnxruntime's rules anyway")
    ops = tuple(sorted({n.op_type for n in graph.node if n.name in int8}))
    return Selection("lepton", frozenset(int8), ops, int8, floats, ("MatMul",))


def _kernel_reason(node: onnx.NodeProto, constants: set[str], ranks: dict[str, int],
                   activation_matmuls: bool) -> str:
    """'int8: why' for a Conv/MatMul/Gemm lowering/int8.py makes an integer kernel, else why
    not."""
    op = node.op_type
    if op == "ConvTranspose":
        return ("ConvTranspose: no integer kernel in lepton-edge's lowering, QDQ would run as "
                "float fake-quant (op_types='all' quantizes it)")
    weight = node.input[1] if len(node.input) > 1 else ""
    if op == "Conv":
        if weight not in constants:
            return "Conv with a non-constant weight: no integer kernel for it"
        rank = ranks.get(weight, 4)
        if rank != 4:
            return (f"Conv{rank - 2}d: lepton-edge's integer kernels are 2-D convolutions; "
                    "QDQ would run as float fake-quant")
        return "int8: Conv with a constant weight -> int8 x int8 -> int32 kernel"
    if op == "Gemm":
        if weight not in constants or node.input[0] in constants:
            return "Gemm without a constant weight B: no integer kernel for it"
        return "int8: Gemm with a constant weight -> int8 x int8 -> int32 kernel"
    if node.input[0] in constants:
        return ("MatMul with the constant on the left: the integer kernel takes the weight as "
                "the second operand")
    if weight in constants:
        return "int8: MatMul with a constant weight -> int8 x int8 -> int32 kernel"
    if activation_matmuls:
        return ("int8: MatMul of two activations (activation_matmuls=True) -> int16 x int16 "
                "-> int32 kernel")
    return _ACT_MATMUL_WHY


def _residual_add(node: onnx.NodeProto, constants: set[str]) -> bool:
    return (node.op_type == "Add" and len(node.input) == 2
            and not any(i in constants for i in node.input))


def _bias_of(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], constants: set[str],
             kernels: set[str]) -> str | None:
    """The MatMul/Gemm kernel whose result this Add adds a constant bias to, else None."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for mm, bias in (node.input, node.input[::-1]):
        src = producers.get(mm)
        if bias in constants and src is not None and src.name in kernels \
                and src.op_type in ("MatMul", "Gemm"):
            return src.name
    return None


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
                   exclude: list[str], percentile: float, progress: bool,
                   selection: Selection, weight_bits: int = 8) -> onnx.ModelProto:
    from onnxruntime.quantization import (
        CalibrationMethod, QuantFormat, QuantType, quantize_static,
    )

    calib = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
             "entropy": CalibrationMethod.Entropy}[method]
    extra: dict[str, Any] = {"ActivationSymmetric": symmetric or scale is not None,
                             "WeightSymmetric": True}
    if selection.exclude_output_quantization:
        extra["OpTypesToExcludeOutputQuantization"] = list(selection.exclude_output_quantization)
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
                    reduce_range=weight_bits == 7,
                    calibrate_method=calib, nodes_to_exclude=exclude, extra_options=extra,
                    op_types_to_quantize=(list(selection.ort_op_types)
                                          if selection.ort_op_types else None),
                    nodes_to_quantize=(sorted(selection.nodes)
                                       if selection.nodes is not None else None),
                )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"quantization failed: {exc}") from None
        quantized = onnx.load(dst)
    if weight_bits != 8:
        _check_weight_range(quantized, weight_bits)
    return quantized


def _check_weight_range(proto: onnx.ModelProto, weight_bits: int) -> None:
    """Every int8 constant a DequantizeLinear reads lies in the weight_bits range.

    onnxruntime's reduce_range=True gives [-64, 64]; lepton-edge's exact vpmaddubsw kernels
    rely on it only after their own compile-time check, but a quantizer that silently gave
    8-bit weights here would make the option a no-op, so it is checked where it is made."""
    qmax = WEIGHT_BITS[weight_bits][0]
    inits = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        tensor = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if tensor is None or tensor.data_type != onnx.TensorProto.INT8:
            continue
        q = onnx.numpy_helper.to_array(tensor)
        if q.size and int(np.abs(q.astype(np.int32)).max()) > qmax:
            raise InternalError(
                f"onnxruntime's quantizer gave '{tensor.name}' values up to "
                f"{int(np.abs(q.astype(np.int32)).max())}, outside the {weight_bits}-bit range "
                f"[-{qmax}, {qmax}] asked for (onnxruntime version change?)")


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
            steps: list[str], selection: Selection, weight_bits: int = 8,
            per_channel: bool = True) -> QuantReport:
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
            # a quantized model output: onnxruntime renames its float value
            # '<out>_QuantizeLinear_Input' and the DequantizeLinear result takes the output's name
            tensor = src.input[0]
            if tensor not in reference and tensor.endswith("_QuantizeLinear_Input"):
                tensor = tensor.removesuffix("_QuantizeLinear_Input")
            activation_dq.setdefault(tensor, node.output[0])
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
    kept_float, int8 = _decisions(model, quantized, kept, selection)
    outputs = {o.name: cosine(np.concatenate([v.ravel() for v in reference[o.name]]),
                              np.concatenate([v.ravel() for v in quant_values[o.name]]))
               for o in model.proto.graph.output if o.name in quant_values}
    return QuantReport(method=method, layers=tuple(layers), kept_float=kept_float,
                       output_cosine=outputs, steps=tuple(steps), quantized=int8,
                       op_types=selection.op_types, weight_bits=weight_bits,
                       per_channel=per_channel)


def _decisions(model: Model, quantized: onnx.ModelProto, kept: dict[str, str],
               selection: Selection) -> tuple[dict[str, str], dict[str, str]]:
    """(node -> why float, node -> why int8) for every node of `model`, as it turned out."""
    from onnxruntime.quantization.registry import QDQRegistry

    kept_float = dict(kept)
    int8: dict[str, str] = {}
    quantized_nodes = _quantized_nodes(model, quantized)
    remaining = {n.name: n for n in quantized.graph.node}
    producers = {o: n for n in quantized.graph.node for o in n.output}
    if selection.op_types == "all":
        for node in model.proto.graph.node:
            if node.name in kept_float:
                continue
            if node.name in quantized_nodes:
                int8[node.name] = "op_types='all': onnxruntime's QDQ rules"
            elif node.name not in remaining:
                int8[node.name] = "folded into the int8 result before it (onnxruntime removed it)"
            elif node.op_type not in QDQRegistry:
                kept_float[node.name] = f"no int8 handler for {node.op_type} (stays float)"
            elif node.op_type in WEIGHTED_OPS:
                kept_float[node.name] = ("quantizer left it float (unsupported attributes or "
                                         "inputs)")
        return kept_float, int8
    for node in model.proto.graph.node:
        name = node.name
        if name in kept_float:
            continue
        if name not in selection.int8:
            kept_float[name] = selection.floats.get(name, f"{node.op_type} is not selected")
        elif name in quantized_nodes:
            int8[name] = selection.int8[name]
        elif name not in remaining:  # a Relu/Clip onnxruntime folded into the scale before it
            int8[name] = selection.int8[name]
        elif node.op_type in KERNEL_OPS:
            kept_float[name] = "quantizer left it float (unsupported attributes or inputs)"
        else:
            src = producers.get(remaining[name].input[0])
            what = f"{src.op_type} '{src.name}'" if src is not None else "a graph input"
            kept_float[name] = (f"{node.op_type} on the float result of {what}: stays float, "
                                "quantized after it where the integer kernel reads it")
    return kept_float, int8


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
                if x.op_type in WEIGHTED_OPS and x.node and x.node not in kept
                and x.node in report.quantized]
    if not weighted:
        return None
    return min(weighted, key=lambda x: x.sqnr_db).node
