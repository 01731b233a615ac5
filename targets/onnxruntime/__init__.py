"""The fallback executor: onnxruntime's CPU provider runs subgraphs no target compiled.

It is a target like the others (so placement and the manifest treat it uniformly) with the
lowest priority; `partition()` assigns it only the nodes no requested target supports.
"""

from lepton_edge.target import TargetPlugin

PLUGIN = TargetPlugin(
    name="onnxruntime",
    priority=0,
    description="fallback executor: onnxruntime CPU for nodes no compiled target supports",
    target="lepton_edge_targets.onnxruntime.compile:OnnxRuntimeTarget",
    device="lepton_edge_targets.onnxruntime.device:OnnxRuntimeDevice",
)
