"""prune(model, calibration) -> Model: sensitivity-based pruning, structured or unstructured.

The first compression stage: load -> prune -> quantize -> compile. It scans how much each
prunable unit tolerates (`sensitivity.py`), chooses per-unit ratios under a global budget and
applies them:

* budgets: a target overall `sparsity` (fraction of the Conv/Gemm/MatMul weights removed), a
  target `mac_reduction` (structured only: unstructured zeros do not make dense kernels do less
  work), or a `threshold` on the output change (the seed's `set_pruning_threshold(0.2)`).
  `ratios` sets them by hand instead, without a scan.
* structured: whole output channels / neurons are removed from the graph, with everything that
  depends on them (consumers' input channels, BatchNormalization, biases, per-channel
  constants, depthwise convolutions, residual Adds, Concat offsets, Flatten/Reshape -> Gemm).
  The result is a smaller ONNX model; it is checked against the masked reference on the
  calibration data before it is returned.
* unstructured: the least important weights become zeros. The shapes stay, so dense
  kernels do the same work, but the compiled artifact is a deflate-compressed zip and the
  zeros compress (digits CNN at 50%: 43-47% less compressed weight storage,
  benchmarks/prune_digits.py).

`finetune()` recovers accuracy with the torch module the model came from: it trains with the
pruned weights held at zero, then applies the same plan to the trained weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from lepton_edge.compress.calibrate import calibration_batches
from lepton_edge.compress.sensitivity import (
    GRID, OutputChange, PruningGraph, SensitivityReport, analyse, check_grid,
    first_order_saliency, named_nodes, replace_initializers, scan, torch_tensors,
)
from lepton_edge.errors import InputError, InternalError, ModelError
from lepton_edge.model import Model, load

# The pruned graph must compute what the masked original computes; only the order of float
# additions differs.
VERIFY_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PrunePlan:
    """What was removed, against the analysed original; `finetune` re-applies it."""

    graph: PruningGraph
    removed: dict[str, np.ndarray]  # unit -> channel indices or flat weight indices
    change: OutputChange


@dataclass(frozen=True)
class PruneReport:
    """What pruning removed and what it cost on the calibration data."""

    mode: str
    ratios: dict[str, float]  # unit -> fraction of its channels (weights) removed
    sizes: dict[str, tuple[int, int]]  # unit -> (removed, total)
    macs: tuple[int, int]  # per sample, before and after
    weights: tuple[int, int]  # Conv/Gemm/MatMul weights before and after (nonzero if unstructured)
    output_change: float
    metric: str
    sensitivity: SensitivityReport | None = None
    steps: tuple[str, ...] = ()
    accuracy: dict[str, float] = field(default_factory=dict)  # filled by finetune(evaluate=)
    plan: PrunePlan | None = field(default=None, repr=False, compare=False)

    @property
    def removed(self) -> dict[str, tuple[int, ...]]:
        """Unit -> the channel indices (structured) or flat weight indices it lost."""
        if self.plan is None:
            return {}
        return {u: tuple(int(i) for i in idx) for u, idx in self.plan.removed.items()}

    @property
    def mac_reduction(self) -> float:
        return 1.0 - self.macs[1] / self.macs[0] if self.macs[0] else 0.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.weights[1] / self.weights[0] if self.weights[0] else 0.0

    def table(self) -> str:
        unit = "channels" if self.mode == "structured" else "weights"
        rows = [f"{self.mode} pruning: MACs {self.macs[0]:,} -> {self.macs[1]:,} "
                f"(-{self.mac_reduction:.1%}), weights {self.weights[0]:,} -> "
                f"{self.weights[1]:,} (-{self.sparsity:.1%}); {self.metric} "
                f"{self.output_change:.4f} on the calibration data",
                f"{'layer':<40} {'ratio':>6} {unit + ' removed':>18}"]
        for name, ratio in self.ratios.items():
            removed, total = self.sizes[name]
            rows.append(f"{name[:40]:<40} {ratio:6.1%} {f'{removed}/{total}':>18}")
        rows += [f"step: {s}" for s in self.steps]
        if self.accuracy:
            rows.append("accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                 self.accuracy.items()))
        return "\n".join(rows)


def prune(
    model: Model | Any,
    calibration: Any,
    *,
    mode: str = "structured",
    sparsity: float | None = None,
    mac_reduction: float | None = None,
    threshold: float | None = None,
    ratios: dict[str, float] | None = None,
    exclude: tuple[str, ...] | list[str] = (),
    metric: Callable[[dict[str, np.ndarray]], float] | None = None,
    grid: tuple[float, ...] | list[float] = GRID,
    module: Any = None,
    batch_size: int = 16,
    progress: bool = False,
) -> Model:
    """Prune `model` under one budget, measured on `calibration` data; returns a new Model.

    Give exactly one of `sparsity` (fraction of the Conv/Gemm/MatMul weights to remove),
    `mac_reduction` (fraction of MACs, structured only), `threshold` (the largest output
    change allowed: relative L2 error of the outputs, or the drop of `metric(outputs)`, a
    score where higher is better) or `ratios` ({layer: fraction} by hand, no scan). Layers
    named in `exclude` are left whole. With `module`, the torch.nn.Module the model was
    exported from, channels and weights are ranked by first-order saliency. The returned
    Model carries a PruneReport as `model.report`, its sensitivity scan included.
    """
    if not isinstance(model, Model):
        model = load(model)
    budgets = {"sparsity": sparsity, "mac_reduction": mac_reduction, "threshold": threshold,
               "ratios": ratios}
    given = [k for k, v in budgets.items() if v is not None]
    if len(given) != 1:
        raise InputError("give exactly one of sparsity, mac_reduction, threshold or ratios "
                         f"(got {given or 'none'})")
    for name in ("sparsity", "mac_reduction"):
        value = budgets[name]
        if value is not None and not 0.0 < value < 1.0:
            raise InputError(f"{name} must lie strictly between 0 and 1, got {value}")
    if threshold is not None and not (threshold >= 0 and math.isfinite(threshold)):
        raise InputError(f"threshold must be a non-negative number, got {threshold}")
    if mac_reduction is not None and mode == "unstructured":
        raise InputError("mac_reduction needs mode='structured': zeroed weights do not reduce "
                         "the MACs dense kernels compute; use sparsity for unstructured pruning")
    grid = check_grid(grid)
    model = named_nodes(model)
    graph = analyse(model, mode, exclude)
    if not graph.units:
        raise ModelError(f"nothing in this model can be pruned ({mode}): "
                         + "; ".join(f"{k}: {v}" for k, v in graph.pinned.items()))
    batches = calibration_batches(calibration, model.inputs, batch_size)
    change = OutputChange(model, batches, metric)
    steps: list[str] = []
    sensitivity = None
    if ratios is not None:
        chosen = _requested(graph, ratios)
        if module is not None:
            graph.use_saliency(first_order_saliency(module, graph, batches))
    else:
        sensitivity = scan(graph, change, grid, module, progress)
        curves = {x.unit.name: x.curve for x in sensitivity.layers}
        if threshold is not None:
            chosen = _within_threshold(graph, curves, change, threshold, steps)
        else:
            kind = "sparsity" if sparsity is not None else "mac_reduction"
            chosen = _within_budget(graph, curves, kind, float(sparsity or mac_reduction))
    removed = {u: graph.removal(u, r) for u, r in chosen.items() if graph.count(u, r)}
    proto = apply_plan(graph, removed, change)
    result = load(proto)
    counts = {u: len(idx) for u, idx in removed.items()}
    report = PruneReport(
        mode=mode, ratios={u: r for u, r in chosen.items() if r},
        sizes={u: (counts.get(u, 0), graph.units[u].size) for u, r in chosen.items() if r},
        macs=(graph.cost({})[0], graph.cost(counts)[0]),
        weights=(graph.cost({})[1], graph.cost(counts)[1]),
        output_change=change.of(change.outputs(result.proto)), metric=change.name,
        sensitivity=sensitivity, steps=tuple(steps),
        plan=PrunePlan(graph, removed, change))
    object.__setattr__(result, "report", report)
    return result


def _requested(graph: PruningGraph, ratios: dict[str, float]) -> dict[str, float]:
    """Ratios named by unit or by any of its nodes; refuse ones that empty a layer.

    Every problem is reported in one error."""
    by_node = {n: u for u, unit in graph.units.items() for n in unit.nodes}
    chosen: dict[str, float] = {}
    problems: list[str] = []
    what = "channels" if graph.mode == "structured" else "weights"
    for name, ratio in ratios.items():
        unit = name if name in graph.units else by_node.get(name)
        if unit is None:
            why = graph.pinned.get(name) or next(
                (v for k, v in graph.pinned.items() if name in k.split("+")), None)
            problems.append(f"cannot prune '{name}': " + (why or "not a prunable layer")
                            + f"; prunable: {sorted(graph.units)}")
        elif not (0.0 <= ratio <= 1.0 and math.isfinite(ratio)):
            problems.append(f"ratio {ratio} for layer '{name}' must lie in [0, 1)")
        elif graph.count(unit, ratio) >= graph.units[unit].size:
            size = graph.units[unit].size
            problems.append(
                f"ratio {ratio} for layer '{name}' would remove all {size} of its {what} "
                f"(round({ratio} x {size}) = {graph.count(unit, ratio)}); a layer must keep at "
                f"least one: use a ratio below {1 - 0.5 / size:.4g}")
        elif unit in chosen and chosen[unit] != ratio:
            problems.append(f"conflicting ratios {chosen[unit]} and {ratio} for '{unit}', "
                            "whose channels are pruned together")
        else:
            chosen[unit] = ratio
    if problems:
        raise InputError("; ".join(problems))
    return chosen


def _envelope(curve: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """The curve made non-decreasing (pruning more is never cheaper), up to its last
    possible point."""
    out: list[tuple[float, float]] = [(0.0, 0.0)]
    for ratio, value in curve:
        if math.isinf(value):
            break
        out.append((ratio, max(value, out[-1][1])))
    return out


def _within_budget(graph: PruningGraph, curves: dict[str, Any], kind: str, target: float
                   ) -> dict[str, float]:
    """Greedy: take the next grid step with the least output change per budget gained."""
    env = {}
    for u, c in curves.items():  # grid points that round to the same count are one step
        points = _envelope(c)
        env[u] = [p for i, p in enumerate(points)
                  if i == 0 or graph.count(u, p[0]) > graph.count(u, points[i - 1][0])]
    step = dict.fromkeys(env, 0)
    base_macs, base_weights = graph.cost({})

    def achieved(state: dict[str, int]) -> float:
        macs, weights = graph.cost({u: graph.count(u, env[u][i][0]) for u, i in state.items()})
        return 1.0 - (macs / base_macs if kind == "mac_reduction" else weights / base_weights)

    current = 0.0
    while current < target:
        best = None
        for u, i in step.items():
            if i + 1 >= len(env[u]):
                continue
            gain = achieved({**step, u: i + 1}) - current
            if gain <= 0:
                continue
            cost = (env[u][i + 1][1] - env[u][i][1]) / gain
            if best is None or (cost, -gain) < best[0]:
                best = ((cost, -gain), u)
        if best is None:
            raise InputError(
                f"{kind} {target} cannot be reached: pruning every prunable layer at the "
                f"grid's largest ratio reaches {current:.1%}; lower the target or extend the "
                "grid")
        step[best[1]] += 1
        current = achieved(step)
    return {u: env[u][i][0] for u, i in step.items()}


def _within_threshold(graph: PruningGraph, curves: dict[str, Any], change: OutputChange,
                      threshold: float, steps: list[str]) -> dict[str, float]:
    """Each unit at the largest ratio whose change alone is within the threshold; then back
    off the most damaging unit, one grid step at a time, until the whole model is within."""
    env = {u: _envelope(c) for u, c in curves.items()}
    step = {u: max(i for i, (_, v) in enumerate(e) if v <= threshold) for u, e in env.items()}
    while True:
        removed = {u: graph.removal(u, env[u][i][0]) for u, i in step.items() if i}
        total = change.with_values(graph.masked(removed)) if removed else 0.0
        if total <= threshold:
            return {u: env[u][i][0] for u, i in step.items()}
        worst = max((u for u in step if step[u]), key=lambda u: env[u][step[u]][1])
        step[worst] -= 1
        steps.append(f"{change.name} {total:.4f} > {threshold} with every layer at its own "
                     f"limit: {worst} back to {env[worst][step[worst]][0]:.0%}")


def apply_plan(graph: PruningGraph, removed: dict[str, np.ndarray],
               change: OutputChange | None = None) -> onnx.ModelProto:
    """The pruned model: zeroed weights (unstructured) or a smaller graph (structured)."""
    if graph.mode == "unstructured":
        return replace_initializers(graph.model.proto, graph.masked(removed))
    proto = _shrink(graph, removed)
    if change is not None and removed:
        # The rewrite must compute exactly what the masked original computes.
        want = change.outputs(replace_initializers(graph.model.proto, graph.masked(removed)))
        got = change.outputs(proto)
        for name, value in want.items():
            err = float(np.linalg.norm(got[name] - value) / max(np.linalg.norm(value), 1e-30))
            if got[name].shape != value.shape or err > VERIFY_TOLERANCE:
                raise InternalError(f"structured pruning changed output '{name}' beyond the "
                                    f"masked reference (relative error {err:.3g})")
    return proto


def _shrink(graph: PruningGraph, removed: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Remove the planned channels physically, and everything that depends on them."""
    proto = onnx.ModelProto()
    proto.CopyFrom(graph.model.proto)
    nodes = {n.name: n for n in proto.graph.node}
    cuts: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    values: dict[tuple[str, int], np.ndarray] = {}
    for site in graph.sites:
        pos = graph.positions(site.layout, removed)
        if not len(pos):
            continue
        node = nodes[site.node]
        kept = site.layout.channels * site.layout.inner - len(pos)
        if site.kind == "group":
            for attr in node.attribute:
                if attr.name == "group":
                    attr.i = kept
        elif site.kind == "shape":
            shape = graph.arrays[node.input[1]].copy()
            if shape[site.layout.axis] != -1:
                shape[site.layout.axis] = kept
            values[(site.node, 1)] = shape
        else:
            cuts.setdefault((site.node, site.input), []).append((site.axis, pos))
    for (name, i), parts in cuts.items():
        array = graph.arrays[nodes[name].input[i]]
        for axis, pos in parts:
            array = np.delete(array, pos, axis=axis)
        values[(name, i)] = array
    _set_inputs(proto, nodes, values)
    for name, layout in graph.layouts.items():
        pos = graph.positions(layout, removed)
        if len(pos):
            _set_dim(proto, name, layout.axis, layout.channels * layout.inner - len(pos))
    return proto


def _set_inputs(proto: onnx.ModelProto, nodes: dict[str, onnx.NodeProto],
                values: dict[tuple[str, int], np.ndarray]) -> None:
    """Give node inputs new constant values: in place where the initializer has one user,
    else as a new initializer; then drop initializers nobody uses."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    for (node_name, i), value in values.items():
        node = nodes[node_name]
        name = node.input[i]
        if users.get(name, 0) == 1:
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
            continue
        new = f"{name}.pruned.{node_name}"
        while new in taken:
            new += "_"
        taken.add(new)
        graph.initializer.append(numpy_helper.from_array(value, new))
        node.input[i] = new
    used = {n for node in graph.node for n in node.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    shapes = {t.name: list(t.dims) for t in keep}
    # Exporters may describe initializers in value_info too; the tensors say it already.
    infos = [v for v in graph.value_info if v.name not in inits and v.name not in shapes]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    inputs = [v for v in graph.input if v.name not in inits or v.name in shapes]
    del graph.input[:]
    graph.input.extend(inputs)
    for value in graph.input:  # old IR versions list initializers as graph inputs too
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, shapes[value.name], strict=False):
                d.Clear()
                d.dim_value = size


def _set_dim(proto: onnx.ModelProto, name: str, axis: int, size: int) -> None:
    for value in list(proto.graph.value_info) + list(proto.graph.output):
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims):
                dims[axis].Clear()
                dims[axis].dim_value = size


def finetune(
    module: Any,
    pruned: Model,
    train_step: Callable[[Any, Any], Any],
    data: Iterable[Any],
    *,
    epochs: int = 1,
    evaluate: Callable[[Model], float] | None = None,
) -> Model:
    """Recover accuracy after pruning by training the torch module `pruned` came from.

    The module's weights that the plan removes are zeroed and held at zero after every
    `train_step(module, batch)` (the caller owns the optimizer, loss and labels). After
    `epochs` passes over `data` the module is exported again, which must give the graph the
    plan was made on (same nodes and initializers), and the same plan is applied to it: the
    result has the structure of `pruned` and computes what the trained, masked module
    computes. With `evaluate(model) -> accuracy`, the report records it for the unpruned,
    pruned and fine-tuned models.
    """
    import torch

    report = getattr(pruned, "report", None)
    if not isinstance(report, PruneReport) or report.plan is None:
        raise InputError("finetune needs the Model that prune() returned (it carries the plan)")
    if epochs < 0:
        raise InputError(f"epochs must be >= 0, got {epochs}")
    plan = report.plan
    original = plan.graph.model
    masks = plan.graph.masks(plan.removed)
    found = torch_tensors(module, original, list(masks))
    missing = sorted(set(masks) - set(found))
    if missing:
        raise ModelError(f"cannot find the torch tensors behind {missing} in "
                         f"{type(module).__name__}; pass the module the model was exported "
                         "from")
    held = [(found[name][0], torch.from_numpy(keep.T if found[name][1] else keep))
            for name, keep in masks.items()]

    def hold() -> None:
        with torch.no_grad():
            for tensor, keep in held:
                tensor.mul_(keep.to(tensor.device, tensor.dtype))

    hold()
    module.train()
    for _ in range(epochs):
        for batch in data:
            train_step(module, batch)
            hold()
    module.eval()
    feeds = plan.change.batches[0]
    example = tuple(torch.from_numpy(np.ascontiguousarray(feeds[s.name]))
                    for s in original.inputs)
    trained = named_nodes(load(module, example, input_names=[s.name for s in original.inputs],
                               output_names=[s.name for s in original.outputs],
                               opset=original.opset))
    if _structure(trained) != _structure(original):
        raise ModelError("the trained module exports to a different graph than the one "
                         "pruned (nodes or initializers differ), so the plan cannot be applied "
                         "to it; prune the model exported from this module with "
                         "lepton_edge.load(module, example_inputs)")
    regraph = PruningGraph(trained, plan.graph.mode)
    result = load(apply_plan(regraph, plan.removed, plan.change))
    accuracy = dict(report.accuracy)
    if evaluate is not None:
        accuracy = {"unpruned": float(evaluate(original)), "pruned": float(evaluate(pruned)),
                    "fine-tuned": float(evaluate(result))}
    new_report = replace(
        report, output_change=plan.change.of(plan.change.outputs(result.proto)),
        steps=report.steps + (f"fine-tuned {epochs} epoch(s) with the pruned weights held at "
                              "zero",),
        accuracy=accuracy, plan=PrunePlan(regraph, plan.removed, plan.change))
    object.__setattr__(result, "report", new_report)
    return result


def _structure(model: Model) -> tuple[list[tuple[str, str]], dict[str, list[int]]]:
    return ([(n.name, n.op_type) for n in model.proto.graph.node],
            {t.name: list(t.dims) for t in model.proto.graph.initializer})
