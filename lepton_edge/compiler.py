"""compile(model, targets) -> Artifact: build every subgraph for every target that takes it.

Fat artifacts: each subgraph gets a build from every requested target that supports all of
its nodes, so the runtime can choose by the devices it finds. Subgraphs no target compiles
carry an onnxruntime build. Golden inputs and onnxruntime's outputs for them travel along.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from lepton_edge import __version__, artifact
from lepton_edge.errors import InputError, LeptonError, TargetError
from lepton_edge.model import Model, load
from lepton_edge.plan import FALLBACK, Plan, partition
from lepton_edge.reference import reference_session
from lepton_edge.signature import TensorSpec, check_feeds
from lepton_edge.target import Build, Profile, get_plugin


@dataclass
class Artifact:
    """A compiled model in memory: the manifest and its files. `save()` writes a .lepton."""

    manifest: dict[str, Any]
    files: dict[str, bytes]
    plan: Plan | None = field(default=None, repr=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return artifact.write(path, self.manifest, self.files)

    @property
    def builds(self) -> list[tuple[str, str, str]]:
        """(subgraph, target, profile) for every build in the artifact."""
        return [(sg["id"], b["target"], b["profile"]) for sg in self.manifest["subgraphs"]
                for b in sg["builds"]]

    def summary(self) -> str:
        lines = [f"{len(self.manifest['subgraphs'])} subgraph(s), {len(self.files)} files, "
                 f"{sum(len(d) for d in self.files.values()):,} bytes"]
        for sg in self.manifest["subgraphs"]:
            targets = ", ".join(f"{b['target']}[{b['profile']}]" for b in sg["builds"])
            lines.append(f"  {sg['id']}: {sg['node_count']} nodes -> {targets}")
            for target, reason in sg.get("build_errors", {}).items():
                lines.append(f"    {target} build failed: {reason}")
        return "\n".join(lines)


def compile(  # noqa: A001 - the public verb of the pipeline
    model: Model | Any,
    targets: list[str] | tuple[str, ...] = ("cpu",),
    *,
    fallback: bool = True,
    golden_inputs: list[dict[str, np.ndarray]] | None = None,
    golden_count: int = 2,
    tune: int = 0,
    tuning_db: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    batch_buckets: Sequence[int] | None = None,
) -> Artifact:
    """Compile `model` for `targets` (target or profile names) into one Artifact.

    `fallback` lets nodes that no target supports run on onnxruntime; without it they are
    an UnsupportedOpsError. `golden_inputs` (a list of feed dicts) are stored with
    onnxruntime's outputs for them; by default `golden_count` seeded random inputs are made.
    `tune` is the MetaSchedule trial budget for targets that tune (the CPU); records persist
    in `tuning_db` (default ~/.cache/lepton-edge/tuning/<target>/) and are reused, so
    compiling the same layers again is fast. `tune=0` with a `tuning_db` applies it only.
    `batch_buckets`: batch sizes for which an untuned CPU build of a model with a symbolic
    batch gets a static entry function (the same kernels, static shapes: no run-time shape
    work in the VM), which the runtime calls for inputs of exactly that batch; default (1,),
    () for none. Tuned builds specialise the batch to 1 and 64 (tune_and_build).
    """
    if not isinstance(model, Model):
        model = load(model)
    say = log or (lambda _msg: None)
    plan = partition(model, targets, fallback=fallback)
    # A missing toolchain is the user's to fix, never a reason to fall back quietly.
    for plugin, profile in plan.targets:
        plugin.make_target().check_toolchain(profile)
    files: dict[str, bytes] = {}
    subgraphs = []
    if tune < 0:
        raise InputError(f"tune must be >= 0 trials, got {tune}")
    if batch_buckets is not None:
        batch_buckets = tuple(batch_buckets)
        bad = [b for b in batch_buckets if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if bad:
            raise InputError(f"batch_buckets must be positive integers (batch sizes), got {bad}; "
                             "pass e.g. (1,) or (1, 8), or () for no static entries")
        if tune or tuning_db:
            raise InputError("batch_buckets applies to untuned builds; a tuned build "
                             "(tune / tuning_db) specialises the batch to 1 and 64 itself: "
                             "leave batch_buckets out")
    options = {"tune": tune, "tuning_db": str(tuning_db) if tuning_db else None, "log": log,
               "batch_buckets": batch_buckets}
    profiles = {plugin.name: dataclasses.replace(profile, settings={**profile.settings,
                                                                    **options})
                for plugin, profile in plan.targets}
    for sg in plan.subgraphs:
        builds: list[Build] = []
        errors: dict[str, str] = {}
        wanted = list(sg.candidates) if sg.target != FALLBACK else []
        for name in wanted:
            say(f"compiling {sg.id} ({len(sg.nodes)} nodes) for {name} [{profiles[name].name}]")
            try:
                builds.append(get_plugin(name).make_target().compile(sg.proto, profiles[name]))
            except TargetError as exc:
                errors[name] = str(exc)
        if not builds:
            if wanted and not fallback:
                raise TargetError(
                    f"{sg.id} ({', '.join(sorted(sg.op_counts))}) could not be built: "
                    + "; ".join(f"{t}: {r}" for t, r in errors.items())
                )
            if errors:
                warnings.warn(
                    f"{sg.id} runs on onnxruntime because every build failed: "
                    + "; ".join(f"{t}: {r}" for t, r in errors.items()), stacklevel=2)
            try:  # the nodes as the model has them, not as rewritten for TVM
                builds.append(get_plugin(FALLBACK).make_target().compile(
                    sg.fallback_proto or sg.proto,
                    Profile(name=FALLBACK, target=FALLBACK, description="")))
            except TargetError as exc:
                raise TargetError(f"{sg.id} cannot run on the onnxruntime fallback: {exc}"
                                  ) from None
        entries = []
        for build in builds:
            plugin = get_plugin(build.target)
            names = {}
            for fname, data in build.files.items():
                path = f"builds/{sg.id}/{build.target}/{fname}"
                files[path] = data
                names[fname] = path
            entries.append({"target": build.target, "profile": build.profile,
                            "priority": plugin.priority, "files": names, "meta": build.meta})
        subgraphs.append({
            "id": sg.id, "target": sg.target, "level": sg.level,
            "node_count": len(sg.nodes), "nodes": list(sg.nodes), "op_counts": sg.op_counts,
            "macs": sg.macs, "inputs": list(sg.inputs), "outputs": list(sg.outputs),
            "builds": entries, "build_errors": errors,
        })
    golden = _golden(model, golden_inputs, golden_count, files)
    manifest = {
        "format": artifact.FORMAT,
        "schema_version": artifact.SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        # opset: the ai.onnx opset (0: none declared); opsets: every domain's, as declared
        "model": {"name": model.name, "sha256": model.sha256, "opset": model.opset,
                  "opsets": {o.domain or "ai.onnx": o.version
                             for o in model.proto.opset_import},
                  "source": Path(model.source).name, "nodes": len(model.proto.graph.node),
                  "metadata": model.metadata},
        "inputs": [s.to_json() for s in model.inputs],
        "outputs": [s.to_json() for s in model.outputs],
        "subgraphs": subgraphs,
        "reasons": plan.reasons,
        "golden": golden,
        "output_quant_step": _output_steps(model),
        "quantized": any(n.op_type == "QuantizeLinear" for n in model.proto.graph.node),
    }
    return Artifact(manifest=manifest, files=files, plan=plan)


def _output_steps(model: Model) -> dict[str, float]:
    """Quantization step of each output made by a DequantizeLinear with a scalar scale.

    Integer kernels may differ from ONNX's float QDQ semantics by one step there (rounding
    of the float accumulation), so the self-test accepts that much on those outputs.
    """
    inits = {t.name: t for t in model.proto.graph.initializer}
    producers = {o: n for n in model.proto.graph.node for o in n.output}
    steps = {}
    for spec in model.outputs:
        node = producers.get(spec.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            scale = onnx.numpy_helper.to_array(inits[node.input[1]])
            if scale.size == 1:
                steps[spec.name] = float(scale.ravel()[0])
    return steps


def _versions() -> dict[str, str]:
    import tvm

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return {"lepton_edge": __version__, "tvm": tvm.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort_version, "numpy": np.__version__,
            "python": sys.version.split()[0]}


def example_feeds(specs: tuple[TensorSpec, ...], batch: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs for a signature; symbolic dimensions take the value `batch`."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for spec in specs:
        # a sequence gets two elements; an element of unknown rank is a vector
        shape = [d if isinstance(d, int) else batch for d in (("n",) if spec.shape is None else spec.shape)]
        dtype = np.dtype(spec.dtype)
        values = []
        for _ in range(2 if spec.is_sequence else 1):
            if dtype.kind == "O":  # string tensors
                values.append(np.full(shape, "a", dtype=object))
            elif dtype.kind == "f":
                values.append(rng.standard_normal(shape).astype(dtype))
            else:  # integer inputs are often indices: zeros are always in range
                values.append(np.zeros(shape, dtype))
        feeds[spec.name] = values if spec.is_sequence else values[0]
    return feeds


def _golden(model: Model, given: list[dict[str, np.ndarray]] | None, count: int,
            files: dict[str, bytes]) -> list[dict[str, Any]]:

    feeds_list = given if given is not None else [
        example_feeds(model.inputs, batch=1 + i, seed=i) for i in range(count)]
    if not feeds_list:
        return []
    try:  # the golden outputs are the ONNX semantics (see lepton_edge/reference.py)
        session = reference_session(model.proto)
    except Exception as exc:  # noqa: BLE001
        raise LeptonError(f"onnxruntime cannot run the model to record golden outputs: {exc}"
                          ) from None
    golden = []
    for index, feeds in enumerate(feeds_list):
        try:
            arrays, _ = check_feeds(model.inputs, feeds)
        except InputError as exc:
            raise InputError(f"golden input {index}: {exc}") from None
        try:
            outputs = session.run([o.name for o in model.outputs], arrays)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors name the node
            raise LeptonError(
                f"onnxruntime could not run the model on golden input {index} to record its "
                f"reference outputs: {exc}. Check the model with onnxruntime, or pass "
                "golden_count=0 to compile without golden I/O") from None
        entry: dict[str, Any] = {"inputs": {}, "outputs": {}}
        for kind, named in (("inputs", arrays),
                            ("outputs", dict(zip([o.name for o in model.outputs], outputs,
                                                 strict=True)))):
            for i, (name, value) in enumerate(named.items()):
                # arrays, sequences (lists) and absent optionals (None): see store_value
                entry[kind][name] = artifact.store_value(files, f"golden/{index}/{kind}/{i}.npy",
                                                         value)
        golden.append(entry)
    return golden
