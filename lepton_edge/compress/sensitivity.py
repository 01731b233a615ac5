"""sensitivity_scan(model, calibration) -> SensitivityReport: how much each layer can be pruned.

Before `prune()` decides how much to take from each layer, it needs to know what each layer
tolerates. This module owns that question, for both kinds of pruning:

* what can be pruned (`analyse`): in unstructured mode every Conv / Gemm / MatMul with a
  constant weight; in structured mode the *channel groups* of the graph. A group is the set of
  output channels that must be removed together: one producer's output channels, or, where a
  residual Add (or any elementwise op) joins two branches, the union of both producers,
  which must keep the same channel set. The analysis follows each group's channels forward
  through everything that carries them (activations, BatchNormalization, pooling, depthwise
  convolutions, Concat at an offset, Flatten/Reshape into a Gemm) to the layers that consume
  them, and records every weight and parameter slice that depends on them (`Site`). A group
  whose channels reach a graph output or an op we do not know how to rewrite is pinned (not
  prunable) and the reason is kept.
* how much it hurts (`sensitivity_scan`): prune one unit alone at each ratio of a grid and
  measure the output change on calibration data with onnxruntime (relative L2 error of the
  outputs against the unpruned model, or the drop of a user metric).

Pruning a channel is evaluated as a *mask*: the layers that consume the channel get zero
weights for it (and its producers zero filters). That is exactly what removing the channel
physically computes, whatever BatchNormalization or a bias does to the channel on the way,
because the consumer no longer reads it; `prune()` checks its rewritten graph against it.

Importance inside a unit: L1 norm of the filters (structured) or |w| (unstructured); with the
torch module the model was exported from, first-order saliency |w * dL/dw| instead.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_edge.compress.calibrate import calibration_batches
from lepton_edge.errors import InputError, ModelError
from lepton_edge.model import Model, load

MODES = ("structured", "unstructured")
GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul")
# Ops that transform each channel on its own: channels pass through them unchanged.
UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Clip", "Identity", "Dropout", "Neg", "Abs",
    "Exp", "Log", "Sqrt", "Reciprocal", "ThresholdedRelu", "Cast", "Floor", "Ceil", "Round",
    "Sign", "Shrink",
})
POOL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                      "GlobalMaxPool", "GlobalLpPool"})
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow"})
NORM_PARAMS = {"BatchNormalization": 5, "InstanceNormalization": 3}
REDUCE_OPS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1",
                        "ReduceL2", "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare"})

Seg = tuple[int | None, int]  # (channel group, or None for channels never pruned; length)


@dataclass(frozen=True)
class Layout:
    """Which channel groups a tensor carries along `axis`, in order.

    After a Flatten, each channel spans `inner` consecutive features (C*H*W layout).
    """

    axis: int
    rank: int
    segs: tuple[Seg, ...]
    inner: int = 1

    @property
    def channels(self) -> int:
        return sum(n for _, n in self.segs)


@dataclass(frozen=True)
class Site:
    """A slice of node input `input` along `axis` that follows the channels of `layout`.

    kind: "out" (a producer's filters and bias), "in" (a consumer's weights for its input
    channels), "param" (a per-channel parameter: BatchNormalization, depthwise filters, a
    per-channel constant), "shape" (entry `layout.axis` of a Reshape's target shape, which
    flattens the channels), "group" (a depthwise Conv's `group` attribute).
    """

    node: str
    input: int
    axis: int
    layout: Layout
    kind: str


@dataclass(frozen=True)
class Layer:
    """A weighted node, with the channel layouts its MACs depend on."""

    node: str
    op_type: str
    weight: str
    macs: int  # per sample
    params: int
    out: Layout | None = None  # its output channels (producers and depthwise convs)
    inp: Layout | None = None  # the input channels it reduces over (Conv, Gemm, MatMul)


@dataclass(frozen=True)
class Unit:
    """What is pruned as one piece: a channel group or a layer's weights."""

    name: str
    nodes: tuple[str, ...]
    op_type: str
    size: int  # channels (structured) or weights (unstructured)
    macs: int  # MACs of the layers whose cost depends on it


@dataclass(frozen=True)
class LayerSensitivity:
    unit: Unit
    curve: tuple[tuple[float, float], ...]  # (ratio pruned, output change); inf: not possible
    saliency: float | None = None  # summed first-order saliency of its weights (torch only)


@dataclass(frozen=True)
class SensitivityReport:
    """Output change when each unit alone is pruned at each ratio of the grid."""

    mode: str
    metric: str
    importance: str
    layers: tuple[LayerSensitivity, ...]
    pinned: dict[str, str] = field(default_factory=dict)  # layer -> why it is not prunable

    def curve(self, name: str) -> tuple[tuple[float, float], ...]:
        return next(x.curve for x in self.layers if x.unit.name == name)

    def table(self) -> str:
        grid = [r for r, _ in self.layers[0].curve] if self.layers else []
        unit = "channels" if self.mode == "structured" else "weights"
        head = f"{'layer':<32} {'op':<8} {unit:>8} {'MACs':>10} " + " ".join(
            f"{r:>7.0%}" for r in grid)
        if any(x.saliency is not None for x in self.layers):
            head += f" {'saliency':>9}"
        rows = [f"{self.mode} pruning, {self.metric} when one layer alone is pruned "
                f"(importance: {self.importance})", head]
        for x in self.layers:
            cells = " ".join("    n/a" if math.isinf(c) else f"{c:7.4f}" for _, c in x.curve)
            row = (f"{x.unit.name[:32]:<32} {x.unit.op_type[:8]:<8} {x.unit.size:>8} "
                   f"{x.unit.macs:>10,} {cells}")
            if x.saliency is not None:
                row += f" {x.saliency:9.3g}"
            rows.append(row)
        for name, reason in self.pinned.items():
            rows.append(f"not prunable: {name}: {reason}")
        return "\n".join(rows)

    def plot(self, path: str | Path) -> Path:
        """A PNG of the sensitivity curves: output change against the ratio pruned."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for x in self.layers:
            points = [(r, c) for r, c in x.curve if math.isfinite(c)]
            ax.plot([0.0] + [r for r, _ in points], [0.0] + [max(c, 0.0) for _, c in points],
                    marker="o", markersize=3, label=x.unit.name[:40])
        ax.set_xlabel(f"fraction of {'channels' if self.mode == 'structured' else 'weights'} "
                      "pruned (this layer alone)")
        ax.set_ylabel(self.metric)
        ax.set_title(f"{self.mode} pruning sensitivity ({self.importance})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


class PruningGraph:
    """The prunable units of a model and everything that depends on them.

    `removed` plans map a unit name to the indices it loses: channel indices of the group
    (structured) or flat indices into the layer's weight (unstructured).
    """

    def __init__(self, model: Model, mode: str, exclude: tuple[str, ...] = ()) -> None:
        self.model = model
        self.mode = mode
        self.arrays = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
        self.shapes = _shapes(model.proto)
        self.sites: list[Site] = []
        self.layers: dict[str, Layer] = {}
        self.layouts: dict[str, Layout] = {}
        self.pinned: dict[str, str] = {}  # unit or layer -> reason
        self._parent: dict[int, int] = {}
        self._length: dict[int, int] = {}
        self._producers: dict[int, list[tuple[str, str, int, str | None]]] = {}
        self._pins: dict[int, str] = {}
        self._uses = _initializer_uses(model.proto)
        self._walk()
        self.units: dict[str, Unit] = {}
        self.roots: dict[str, int] = {}  # structured: unit -> channel group
        self._importance: dict[str, np.ndarray] = {}
        excluded = set(exclude)
        if mode == "structured":
            self._structured_units(excluded)
        else:
            self._unstructured_units(excluded)

    # -- analysis --------------------------------------------------------------------------

    def root(self, group: int) -> int:
        while self._parent[group] != group:
            self._parent[group] = self._parent[self._parent[group]]
            group = self._parent[group]
        return group

    def _new_group(self, length: int, producer: tuple[str, str, int, str | None]) -> int:
        gid = len(self._parent)
        self._parent[gid] = gid
        self._length[gid] = length
        self._producers[gid] = [producer]
        return gid

    def _pin(self, layout: Layout | None, reason: str) -> None:
        for gid, _ in layout.segs if layout else ():
            if gid is not None:
                self._pins.setdefault(self.root(gid), reason)

    def _union(self, a: Layout, b: Layout, where: str) -> bool:
        if (a.axis, a.inner, [n for _, n in a.segs]) != (b.axis, b.inner, [n for _, n in b.segs]):
            self._pin(a, f"{where} joins tensors with different channel layouts")
            self._pin(b, f"{where} joins tensors with different channel layouts")
            return False
        for (ga, _), (gb, _) in zip(a.segs, b.segs, strict=True):
            if ga is None or gb is None:
                group = ga if ga is not None else gb
                if group is not None:
                    self._pins.setdefault(self.root(group), f"{where} adds its channels to "
                                                            "channels that cannot be pruned")
                continue
            ra, rb = self.root(ga), self.root(gb)
            if ra != rb:
                self._parent[rb] = ra
                self._producers[ra] += self._producers.pop(rb)
                if rb in self._pins:
                    self._pins.setdefault(ra, self._pins.pop(rb))
        return True

    def _walk(self) -> None:
        graph = self.model.proto.graph
        for node in graph.node:
            self._visit(node)
        for out in graph.output:
            self._pin(self.layouts.get(out.name), f"its channels reach graph output '{out.name}'")

    def _const(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name) if name else None

    def _visit(self, node: onnx.NodeProto) -> None:
        layouts = {i: self.layouts[n] for i, n in enumerate(node.input) if n in self.layouts}
        op = node.op_type
        handled = False
        if op in WEIGHTED_OPS:
            handled = self._weighted(node, layouts)
        elif op in UNARY_OPS and set(layouts) <= {0}:
            handled = True
            if 0 in layouts:
                for out in node.output:
                    if out:
                        self.layouts[out] = layouts[0]
        elif op in POOL_OPS and set(layouts) == {0}:
            x = layouts[0]
            used = [o for o in node.output[1:] if o]
            if x.axis == 1 and x.inner == 1 and not used:
                self.layouts[node.output[0]] = x
                handled = True
        elif op in NORM_PARAMS and set(layouts) == {0}:
            x = layouts[0]
            if x.axis == 1 and x.inner == 1 and not [o for o in node.output[1:] if o]:
                params = node.input[1:NORM_PARAMS[op]]
                if all(self._const(p) is not None for p in params):
                    for i in range(1, len(params) + 1):
                        self.sites.append(Site(node.name, i, 0, x, "param"))
                    self.layouts[node.output[0]] = x
                    handled = True
        elif op in BINARY_OPS and layouts:
            handled = self._elementwise(node, layouts)
        elif op == "Concat" and layouts:
            handled = self._concat(node, layouts)
        elif op in ("Flatten", "Reshape") and set(layouts) == {0}:
            handled = self._flatten(node, layouts[0])
        elif op in REDUCE_OPS and set(layouts) == {0}:
            handled = self._reduce(node, layouts[0])
        if not handled:
            for x in layouts.values():
                self._pin(x, f"its channels reach {op} '{node.name}', which pruning cannot "
                             "rewrite")

    def _weighted(self, node: onnx.NodeProto, layouts: dict[int, Layout]) -> bool:
        op = node.op_type
        w = self._const(node.input[1]) if len(node.input) > 1 else None
        if w is None or w.dtype.kind != "f" or (op == "MatMul" and w.ndim != 2):
            return False
        out_shape = self.shapes.get(node.output[0])
        if op == "Conv":
            spatial = _numel(out_shape[2:]) if out_shape else 1
            macs = w.shape[0] * spatial * int(np.prod(w.shape[1:]))
        elif op == "Gemm":
            macs = w.size
        else:  # MatMul: x [..., K] @ w [K, O], per sample
            macs = w.size * (_numel(out_shape[1:-1]) if out_shape else 1)
        # Every weighted node is an unstructured unit; the rest decides its channels.
        layer = Layer(node.name, op, node.input[1], macs, w.size)
        self.layers[node.name] = layer
        x = layouts.get(0)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if set(layouts) - {0} or (bias is not None and self._const(bias) is None):
            return False
        if op == "Conv":
            group = _attr(node, "group", 1)
            if group == w.shape[0] and w.shape[1] == 1 and x is not None:
                # Depthwise: each output channel is its input channel filtered; the channels
                # of the input flow through and the filters follow them.
                if x.axis != 1 or x.inner != 1 or x.channels != group:
                    return False
                for i in (1, 2) if bias else (1,):
                    self.sites.append(Site(node.name, i, 0, x, "param"))
                self.sites.append(Site(node.name, -1, 0, x, "group"))
                self.layers[node.name] = replace(layer, out=x)
                self.layouts[node.output[0]] = x
                return True
            if group != 1:
                return x is None  # grouped: neither its inputs nor its outputs are pruned
            if x is not None and (x.axis != 1 or x.inner != 1):
                return False
            out_axis, in_axis, rank = 0, 1, w.ndim
        elif op == "Gemm":
            if _attr(node, "transA", 0) or (x is not None and x.axis != 1):
                return False
            out_axis, in_axis, rank = (0, 1, 2) if _attr(node, "transB", 0) else (1, 0, 2)
        else:
            if x is not None and x.axis != x.rank - 1:
                return False
            out_axis, in_axis = 1, 0
            rank = len(out_shape) if out_shape else (x.rank if x else 2)
        if x is not None:
            if self._shared(node.input[1]):
                return False
            self.sites.append(Site(node.name, 1, in_axis, x, "in"))
            layer = replace(layer, inp=x)
            self.layers[node.name] = layer
        channels = w.shape[out_axis]
        axis = 1 if op == "Conv" else rank - 1
        bias_axis = None
        if bias is not None:
            b = self._const(bias)
            if b.ndim and b.shape[-1] == channels:
                bias_axis = b.ndim - 1
            elif b.size != 1:  # a bias over more than the channels: keep the outputs whole
                self.layouts[node.output[0]] = Layout(axis, rank, ((None, channels),))
                return True
        if self._shared(node.input[1]) or (bias_axis is not None and self._shared(bias)):
            self.layouts[node.output[0]] = Layout(axis, rank, ((None, channels),))
            return True
        gid = self._new_group(channels, (node.name, node.input[1], out_axis,
                                         bias if bias_axis is not None else None))
        out = Layout(axis, rank, ((gid, channels),))
        self.sites.append(Site(node.name, 1, out_axis, out, "out"))
        if bias_axis is not None:
            self.sites.append(Site(node.name, 2, bias_axis, out, "out"))
        self.layers[node.name] = replace(layer, out=out)
        self.layouts[node.output[0]] = out
        return True

    def _shared(self, name: str) -> bool:
        """Masks zero an initializer in place, so one used elsewhere cannot be masked."""
        return len(self._uses.get(name, [])) > 1

    def _elementwise(self, node: onnx.NodeProto, layouts: dict[int, Layout]) -> bool:
        out_shape = self.shapes.get(node.output[0])
        if out_shape is None:
            return False
        rank = len(out_shape)
        aligned = {i: Layout(x.axis + rank - x.rank, rank, x.segs, x.inner)
                   for i, x in layouts.items()}
        first = next(iter(aligned.values()))
        for x in list(aligned.values())[1:]:
            if not self._union(first, x, f"{node.op_type} '{node.name}'"):
                return True  # pinned, but the op itself is understood
        size = first.channels * first.inner
        for i, name in enumerate(node.input):
            if i in aligned or not name:
                continue
            value = self._const(name)
            shape = list(value.shape) if value is not None else self.shapes.get(name)
            if shape is None:
                return False
            pos = first.axis - (rank - len(shape))
            if pos < 0 or shape[pos] == 1:
                continue
            if value is None or shape[pos] != size:
                return False
            self.sites.append(Site(node.name, i, pos, first, "param"))
        self.layouts[node.output[0]] = first
        return True

    def _concat(self, node: onnx.NodeProto, layouts: dict[int, Layout]) -> bool:
        out_shape = self.shapes.get(node.output[0])
        if out_shape is None:
            return False
        axis = _attr(node, "axis", 0) % len(out_shape)
        segs: list[Seg] = []
        for i, name in enumerate(node.input):
            x = layouts.get(i)
            if x is None:
                value = self._const(name)
                shape = list(value.shape) if value is not None else self.shapes.get(name)
                if shape is None or not isinstance(shape[axis], int):
                    return False
                segs.append((None, shape[axis]))
            elif x.axis != axis or x.inner != 1:
                return False
            else:
                segs += list(x.segs)
        self.layouts[node.output[0]] = Layout(axis, len(out_shape), tuple(segs))
        return True

    def _flatten(self, node: onnx.NodeProto, x: Layout) -> bool:
        in_shape = self.shapes.get(node.input[0])
        out_shape = self.shapes.get(node.output[0])
        if in_shape is None or out_shape is None or len(out_shape) != x.axis + 1:
            return False
        rest = in_shape[x.axis + 1:]
        if not all(isinstance(d, int) for d in rest):
            return False
        if node.op_type == "Flatten":
            if _attr(node, "axis", 1) % len(in_shape) != x.axis:
                return False
        else:
            shape = self._const(node.input[1])
            if shape is None or len(shape) != x.axis + 1:
                return False
            if list(in_shape[:x.axis]) != list(out_shape[:x.axis]) and -1 not in shape[:x.axis]:
                return False
            flat = x.channels * x.inner * _numel(rest)
            size = out_shape[x.axis]
            if shape[x.axis] not in (-1, flat) or (isinstance(size, int) and size != flat):
                return False
        out = Layout(x.axis, x.axis + 1, x.segs, x.inner * _numel(rest))
        if node.op_type == "Reshape":
            self.sites.append(Site(node.name, 1, 0, out, "shape"))
        self.layouts[node.output[0]] = out
        return True

    def _reduce(self, node: onnx.NodeProto, x: Layout) -> bool:
        """A reduction over other axes (e.g. global pooling as x.mean((2, 3))) keeps channels."""
        axes = _attr(node, "axes", None)
        if len(node.input) > 1 and node.input[1]:
            value = self._const(node.input[1])
            axes = None if value is None else value.tolist()
            if value is None:
                return False
        if not axes or x.inner != 1:  # no axes: everything is reduced (or nothing)
            return False
        axes = sorted({a % x.rank for a in axes})
        if x.axis in axes:
            return False
        keep = _attr(node, "keepdims", 1)
        axis = x.axis if keep else x.axis - sum(a < x.axis for a in axes)
        self.layouts[node.output[0]] = Layout(axis, x.rank if keep else x.rank - len(axes),
                                              x.segs)
        return True

    # -- units -----------------------------------------------------------------------------

    def _structured_units(self, excluded: set[str]) -> None:
        roots: dict[int, list[tuple[str, str, int, str | None]]] = {}
        for gid in self._parent:
            roots.setdefault(self.root(gid), [])
        for r in roots:
            roots[r] = self._producers[r]
        order = {n.name: i for i, n in enumerate(self.model.proto.graph.node)}
        for r, producers in sorted(roots.items(), key=lambda kv: min(
                order[p[0]] for p in kv[1])):
            producers = sorted(producers, key=lambda p: order[p[0]])
            nodes = tuple(p[0] for p in producers)
            name = "+".join(nodes)
            if r in self._pins:
                self.pinned[name] = self._pins[r]
                continue
            if excluded & set(nodes):
                self.pinned[name] = "excluded by request"
                continue
            macs = sum(layer.macs for layer in self.layers.values()
                       if any(self.root(g) == r for lay in (layer.out, layer.inp) if lay
                              for g, _ in lay.segs if g is not None))
            ops = sorted({self.layers[n].op_type for n in nodes})
            self.units[name] = Unit(name, nodes, "+".join(ops), self._length[r], macs)
            self.roots[name] = r
            self._importance[name] = self._channel_importance(producers, None)

    def _channel_importance(self, producers: list[tuple[str, str, int, str | None]],
                            saliency: dict[str, np.ndarray] | None) -> np.ndarray:
        total = 0.0
        for node, weight, axis, _bias in producers:
            if saliency is not None and node in saliency:
                score = saliency[node]
            else:
                w = np.abs(self.arrays[weight].astype(np.float64))
                score = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).sum(axis=1)
            mean = float(score.mean())
            total = total + (score / mean if mean > 0 else score)
        return np.asarray(total, dtype=np.float64)

    def _unstructured_units(self, excluded: set[str]) -> None:
        for name, layer in self.layers.items():
            if name in excluded:
                self.pinned[name] = "excluded by request"
                continue
            if self._shared(layer.weight):
                self.pinned[name] = f"its weight '{layer.weight}' is shared with another node"
                continue
            self.units[name] = Unit(name, (name,), layer.op_type, layer.params, layer.macs)
            self._importance[name] = np.abs(self.arrays[layer.weight].astype(np.float64)).ravel()

    def use_saliency(self, saliency: Saliency) -> list[str]:
        """Rank by first-order saliency where it is known; returns the units that have it."""
        have = []
        for name in self.units:
            if self.mode == "structured":
                producers = self._producers[self.roots[name]]
                if all(p[0] in saliency.channels for p in producers):
                    self._importance[name] = self._channel_importance(producers,
                                                                      saliency.channels)
                    have.append(name)
            elif self.layers[name].weight in saliency.weights:
                self._importance[name] = saliency.weights[self.layers[name].weight].ravel()
                have.append(name)
        return have

    def producers(self) -> list[tuple[str, str, int, str | None]]:
        return [p for name in self.units if self.mode == "structured"
                for p in self._producers[self.roots[name]]]

    # -- plans -----------------------------------------------------------------------------

    def count(self, unit: str, ratio: float) -> int:
        return int(round(ratio * self.units[unit].size))

    def removal(self, unit: str, ratio: float) -> np.ndarray:
        """The `ratio` least important channels (weights) of `unit`, sorted."""
        n = self.count(unit, ratio)
        order = np.argsort(self._importance[unit], kind="stable")
        return np.sort(order[:n])

    def positions(self, layout: Layout, removed: dict[str, np.ndarray]) -> np.ndarray:
        """Indices along `layout.axis` (flattened with `inner`) that `removed` takes away."""
        by_root = {self.roots[u]: idx for u, idx in removed.items() if u in self.roots}
        out, offset = [], 0
        for gid, n in layout.segs:
            idx = by_root.get(self.root(gid)) if gid is not None else None
            if idx is not None and len(idx):
                out.append(np.asarray(idx, dtype=np.int64) + offset)
            offset += n
        if not out:
            return np.zeros(0, dtype=np.int64)
        channels = np.concatenate(out)
        return (channels[:, None] * layout.inner + np.arange(layout.inner)).ravel()

    def masks(self, removed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Initializer -> keep mask: the masked reference of a plan (see module doc)."""
        masks: dict[str, np.ndarray] = {}
        if self.mode == "unstructured":
            for unit, idx in removed.items():
                weight = self.layers[unit].weight
                keep = np.ones(self.arrays[weight].size, dtype=bool)
                keep[np.asarray(idx, dtype=np.int64)] = False
                masks[weight] = keep.reshape(self.arrays[weight].shape)
            return masks
        nodes = {n.name: n for n in self.model.proto.graph.node}
        for site in self.sites:
            if site.kind not in ("in", "out"):
                continue
            pos = self.positions(site.layout, removed)
            if not len(pos):
                continue
            name = nodes[site.node].input[site.input]
            keep = masks.setdefault(name, np.ones(self.arrays[name].shape, dtype=bool))
            index: list[Any] = [slice(None)] * keep.ndim
            index[site.axis] = pos
            keep[tuple(index)] = False
        return masks

    def masked(self, removed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Initializer -> new values with the plan's weights zeroed."""
        return {name: np.where(keep, self.arrays[name], 0).astype(self.arrays[name].dtype)
                for name, keep in self.masks(removed).items()}

    def cost(self, counts: dict[str, int]) -> tuple[int, int]:
        """(MACs per sample, weights) of the prunable layers after removing `counts`."""
        if self.mode == "unstructured":
            params = sum(layer.params - counts.get(name, 0) for name, layer in self.layers.items())
            return sum(layer.macs for layer in self.layers.values()), params
        by_root = {self.roots[u]: n for u, n in counts.items() if u in self.roots}

        def kept(layout: Layout | None) -> float:
            if layout is None:
                return 1.0
            lost = sum(by_root.get(self.root(g), 0) for g, _ in layout.segs if g is not None)
            return 1.0 - lost / layout.channels

        macs = params = 0.0
        for layer in self.layers.values():
            factor = kept(layer.out) * kept(layer.inp)
            macs += layer.macs * factor
            params += layer.params * factor
        return int(round(macs)), int(round(params))


def analyse(model: Model, mode: str, exclude: tuple[str, ...] | list[str] = ()) -> PruningGraph:
    """The prunable units of `model` for `mode`; `exclude` names nodes to leave whole."""
    if mode not in MODES:
        raise InputError(f"unknown pruning mode '{mode}'; choose one of {MODES}")
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.proto.graph.node):
        raise ModelError("this model is already quantized (QDQ); prune the float model, then "
                         "quantize it: load -> prune -> quantize -> compile")
    names = {n.name for n in model.proto.graph.node}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise InputError(f"exclude names unknown node(s) {unknown}; nodes are listed by "
                         "`lepton-edge explain`")
    return PruningGraph(model, mode, tuple(exclude))


class OutputChange:
    """Runs variants of a model on calibration data and measures how far they moved."""

    def __init__(self, model: Model, batches: list[dict[str, np.ndarray]],
                 metric: Callable[[dict[str, np.ndarray]], float] | None = None) -> None:
        self.model = model
        self.batches = batches
        self.metric = metric
        self.reference = self.outputs(model.proto)
        self.baseline = metric(self.reference) if metric is not None else 0.0
        if metric is not None and not math.isfinite(self.baseline):
            raise InputError(f"the metric returned {self.baseline} on the unpruned model")

    @property
    def name(self) -> str:
        if self.metric is None:
            return "relative L2 output error"
        return f"drop of {getattr(self.metric, '__name__', 'metric')}"

    def outputs(self, proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
        try:
            session = onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                                   providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            runs = [session.run(names, feeds) for feeds in self.batches]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors name the node
            raise ModelError(f"onnxruntime cannot run the model on the calibration data: "
                             f"{exc}") from None
        return {n: np.concatenate([r[i] for r in runs]) for i, n in enumerate(names)}

    def of(self, outputs: dict[str, np.ndarray]) -> float:
        if self.metric is not None:
            return float(self.baseline - self.metric(outputs))
        noise = sum(float(np.sum((outputs[k].astype(np.float64) - v) ** 2))
                    for k, v in self.reference.items())
        signal = sum(float(np.sum(v.astype(np.float64) ** 2)) for v in self.reference.values())
        return math.sqrt(noise / max(signal, 1e-30))

    def with_values(self, values: dict[str, np.ndarray]) -> float:
        """The change when initializers are replaced by `values`."""
        return self.of(self.outputs(replace_initializers(self.model.proto, values)))


def replace_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]
                         ) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for tensor in out.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name], tensor.name))
    return out


def sensitivity_scan(
    model: Model | Any,
    calibration: Any,
    *,
    mode: str = "structured",
    grid: tuple[float, ...] | list[float] = GRID,
    metric: Callable[[dict[str, np.ndarray]], float] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    module: Any = None,
    batch_size: int = 16,
    progress: bool = False,
) -> SensitivityReport:
    """Prune each prunable unit alone at every ratio of `grid` and measure the output change.

    The change is the relative L2 error of all outputs against the unpruned model on the
    calibration data, or, with `metric(outputs) -> score` (higher is better, outputs
    concatenated over the calibration batches by name), the drop of that score. With
    `module`, the torch.nn.Module `model` was exported from, channels and weights are
    ranked by first-order saliency instead of magnitude.
    """
    if not isinstance(model, Model):
        model = load(model)
    grid = check_grid(grid)
    model = named_nodes(model)
    graph = analyse(model, mode, exclude)
    batches = calibration_batches(calibration, model.inputs, batch_size)
    return scan(graph, OutputChange(model, batches, metric), grid, module, progress)


def scan(graph: PruningGraph, change: OutputChange, grid: tuple[float, ...], module: Any,
         progress: bool) -> SensitivityReport:
    importance = "L1 norm of filters" if graph.mode == "structured" else "|w|"
    saliency = Saliency({}, {})
    if module is not None:
        saliency = first_order_saliency(module, graph, change.batches)
        ranked = graph.use_saliency(saliency)
        importance = (f"first-order saliency |w*dL/dw| ({len(ranked)}/{len(graph.units)} "
                      "layers matched to torch parameters, the rest by magnitude)")
    layers = []
    total = len(graph.units) * len(grid)
    for u, (name, unit) in enumerate(graph.units.items()):
        curve = []
        for g, ratio in enumerate(grid):
            if progress:
                print(f"\rsensitivity: {name[:40]} {ratio:.0%} ({u * len(grid) + g + 1}/"
                      f"{total})", end="", file=sys.stderr, flush=True)
            if graph.count(name, ratio) >= unit.size:
                curve.append((ratio, math.inf))  # it would remove every channel
                continue
            curve.append((ratio, change.with_values(
                graph.masked({name: graph.removal(name, ratio)}))))
        weights = ([graph.layers[n].weight for n in unit.nodes])
        total_saliency = (float(sum(saliency.weights[w].sum() for w in weights
                                    if w in saliency.weights)) if module is not None else None)
        layers.append(LayerSensitivity(unit, tuple(curve), total_saliency))
    if progress:
        print(file=sys.stderr)
    return SensitivityReport(graph.mode, change.name, importance, tuple(layers),
                             dict(graph.pinned))


def check_grid(grid: tuple[float, ...] | list[float]) -> tuple[float, ...]:
    values = tuple(sorted(float(r) for r in grid))
    if not values or not all(0.0 < r < 1.0 for r in values):
        raise InputError(f"grid ratios must lie strictly between 0 and 1, got {list(grid)}")
    return values


def named_nodes(model: Model) -> Model:
    """Pruning plans refer to nodes by name; give unnamed nodes one."""
    if all(n.name for n in model.proto.graph.node):
        return model
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for i, node in enumerate(proto.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    return load(proto)


# -- torch: first-order saliency ---------------------------------------------------------------

@dataclass(frozen=True)
class Saliency:
    weights: dict[str, np.ndarray]  # weight initializer -> |w * dL/dw| per element
    channels: dict[str, np.ndarray]  # producer node -> per output channel

def torch_tensors(module: Any, model: Model, names: list[str]) -> dict[str, tuple[Any, bool]]:
    """Initializer -> (the module's parameter or buffer behind it, stored transposed?).

    A tensor with exactly the initializer's values wins (under its own name first; the
    transpose counts, for a Linear exported as MatMul). Failing that, the tensor with the
    initializer's name and shape: torch.onnx.export keeps parameter names but may fold
    BatchNorm into a convolution's weights, which scales each output channel and so keeps
    which entries are zero, all that masks need. Call it before training changes the values.
    """
    arrays = {t.name: t for t in model.proto.graph.initializer}
    tensors: dict[str, Any] = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    data = {k: t.detach().cpu().numpy() for k, t in tensors.items() if t.dtype.is_floating_point}
    found: dict[str, tuple[Any, bool]] = {}
    for name in names:
        value = numpy_helper.to_array(arrays[name])
        equal = [(key, False) for key, d in data.items()
                 if d.shape == value.shape and np.array_equal(d, value)]
        plain = {key for key, _ in equal}
        equal += [(key, True) for key, d in data.items()
                  if key not in plain and d.ndim == 2 and d.T.shape == value.shape
                  and np.array_equal(d.T, value)]
        named = [m for m in equal if m[0] == name]
        if named or len(equal) == 1:  # several equal tensors (all-zero biases): ambiguous
            key, transposed = (named or equal)[0]
            found[name] = (tensors[key], transposed)
        elif name in data and data[name].shape == value.shape:
            found[name] = (tensors[name], False)
    return found


def first_order_saliency(module: Any, graph: PruningGraph,
                         batches: list[dict[str, np.ndarray]], projections: int = 4,
                         seed: int = 0) -> Saliency:
    """|w * dL/dw| per weight (and per output channel of each producer), from torch.

    Without labels there is no task loss, so L is a random projection <r, y> of the outputs
    (r ~ N(0, 1), a few per batch): the mean of (w * dL/dw)^2 over r is the squared first-order
    change of the outputs when w is zeroed, ||dy/dw * w||^2, i.e. the seed's Sensitivity(w) =
    dOutput/dw scaled by w. For channels the filter's terms (and its bias's) are summed before
    squaring, the first-order change of removing the whole channel. Layers whose weights are
    not found in the module are absent.
    """
    import torch

    weights = sorted({layer.weight for layer in graph.layers.values()})
    producers = graph.producers()
    biases = [p[3] for p in producers if p[3]]
    found = torch_tensors(module, graph.model, weights + biases)
    elem = {w: 0.0 for w in weights if w in found}
    chan = {p[0]: 0.0 for p in producers if p[1] in found and (not p[3] or p[3] in found)}
    generator = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    try:
        for feeds in batches:
            args = [torch.from_numpy(np.ascontiguousarray(feeds[s.name]))
                    for s in graph.model.inputs]
            for _ in range(projections):
                module.zero_grad(set_to_none=True)
                outputs = module(*args)
                flat = _tensors(outputs)
                loss = sum((torch.randn(o.shape, generator=generator) * o).sum() for o in flat)
                loss.backward()
                terms = {}
                for name, (tensor, transposed) in found.items():
                    grad = tensor.grad
                    if grad is None:
                        continue
                    term = (tensor.detach() * grad).cpu().numpy().astype(np.float64)
                    terms[name] = term.T if transposed else term
                for name in elem:
                    if name in terms:
                        elem[name] = elem[name] + terms[name] ** 2
                for node, weight, axis, bias in producers:
                    if node not in chan or weight not in terms:
                        continue
                    t = np.moveaxis(terms[weight], axis, 0)
                    per = t.reshape(t.shape[0], -1).sum(axis=1)
                    if bias and bias in terms:
                        per = per + terms[bias].reshape(-1)
                    chan[node] = chan[node] + per ** 2
    finally:
        module.zero_grad(set_to_none=True)
        module.train(was_training)
    count = max(1, len(batches) * projections)
    return Saliency({k: np.sqrt(v / count) for k, v in elem.items() if not isinstance(v, float)},
                    {k: np.sqrt(v / count) for k, v in chan.items() if not isinstance(v, float)})


def _tensors(outputs: Any) -> list[Any]:
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    if isinstance(outputs, list | tuple):
        return [t for o in outputs for t in _tensors(o)]
    return [outputs]


# -- graph facts -------------------------------------------------------------------------------

def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _numel(dims: Any) -> int:
    return int(np.prod([d if isinstance(d, int) else 1 for d in dims])) if dims else 1


def _shapes(proto: onnx.ModelProto) -> dict[str, list[int | str]]:
    shapes: dict[str, list[int | str]] = {}
    graph = proto.graph
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                  for d in t.shape.dim]
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _initializer_uses(proto: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    inits = {t.name for t in proto.graph.initializer}
    uses: dict[str, list[tuple[str, int]]] = {}
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                uses.setdefault(name, []).append((node.name, i))
    for out in proto.graph.output:
        if out.name in inits:
            uses.setdefault(out.name, []).append(("<output>", 0))
    return uses
