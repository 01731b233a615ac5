"""The onnxruntime 'build' of a subgraph is the subgraph's ONNX model itself.

Compiling checks that the installed onnxruntime can load it, so a subgraph it cannot run
(e.g. ops at an opset newer than it supports) fails at compile time, naming the nodes,
instead of on the device.
"""

from __future__ import annotations

from typing import Any

import onnx

from lepton_edge.errors import TargetError
from lepton_edge.model import MAX_OPSET
from lepton_edge.narrow_types import NOT_THROUGH_ORT, listed
from lepton_edge.target import Build, Profile, Target


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return None  # load() already refused ops that no runtime provides

    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        try:
            import onnxruntime
        except ImportError as exc:
            raise TargetError(
                f"onnxruntime is not installed ({exc}), and nodes {_listed(subgraph)} need the "
                "onnxruntime fallback: pip install onnxruntime" + _re_export(subgraph)
            ) from None
        _check_boundary_types(subgraph)
        data = subgraph.SerializeToString()
        _check_loadable(data, subgraph)
        return Build(target=self.name, profile=profile.name, files={"model.onnx": data},
                     meta={"onnxruntime": onnxruntime.__version__})


def _check_boundary_types(subgraph: onnx.ModelProto) -> None:
    """A TargetError naming the values when a packed sub-byte tensor would cross into or out
    of onnxruntime (it cannot be passed through its Python API)."""
    # (float8 crosses as OrtValues of its bytes: lepton_edge.reference.run_float8)
    bad = [f"'{v.name}' ({NOT_THROUGH_ORT[v.type.tensor_type.elem_type].name})"
           for v in list(subgraph.graph.input) + list(subgraph.graph.output)
           if v.type.HasField("tensor_type")
           and v.type.tensor_type.elem_type in NOT_THROUGH_ORT]
    if bad:
        raise TargetError(
            f"nodes {_listed(subgraph)} need the onnxruntime fallback, but the values "
            f"{', '.join(bad)} would cross into or out of it, and onnxruntime's Python API "
            f"cannot pass {listed(NOT_THROUGH_ORT.values())} tensors; convert them "
            "with Cast to int8/uint8/float inside the model before those nodes")


def _check_loadable(data: bytes, subgraph: onnx.ModelProto) -> None:
    """Build (and drop) an onnxruntime session for the subgraph, or a TargetError saying why."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own error kinds
        text = " ".join(str(exc).split())
        opset = _opset(subgraph)
        fix = (f"install an onnxruntime that runs these ops at ai.onnx opset {opset}"
               if opset > MAX_OPSET else "check the model with onnxruntime directly")
        raise TargetError(
            f"onnxruntime {onnxruntime.__version__} cannot load nodes {_listed(subgraph)}: "
            f"{text[-300:]}; {fix}{_re_export(subgraph)}") from None


def _listed(subgraph: onnx.ModelProto) -> str:
    nodes = [f"{n.name or '<unnamed>'} ({n.op_type})" for n in subgraph.graph.node]
    return ", ".join(nodes[:8]) + (f" and {len(nodes) - 8} more" if len(nodes) > 8 else "")


def _opset(subgraph: onnx.ModelProto) -> int:
    return max((o.version for o in subgraph.opset_import if o.domain in ("", "ai.onnx")),
               default=0)


def _re_export(subgraph: onnx.ModelProto) -> str:
    if _opset(subgraph) > MAX_OPSET:
        return f", or re-export the model at opset <= {MAX_OPSET}"
    return ""
