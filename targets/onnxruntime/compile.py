"""The onnxruntime 'build' of a subgraph is the subgraph's ONNX model itself."""

from __future__ import annotations

from typing import Any

import onnx

from lepton_edge.target import Build, Profile, Target


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return None  # load() already refused ops that no runtime provides

    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        import onnxruntime

        return Build(target=self.name, profile=profile.name,
                     files={"model.onnx": subgraph.SerializeToString()},
                     meta={"onnxruntime": onnxruntime.__version__})
