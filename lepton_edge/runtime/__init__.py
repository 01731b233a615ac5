"""The on-device side: open a verified artifact, place subgraphs on devices, run.

Imports nothing from the compiler side (no onnx checker, no torch): a device needs numpy,
the TVM runtime, and onnxruntime only for subgraphs placed on the fallback executor.
"""

from lepton_edge.runtime.devices import cpu_info, probe_devices
from lepton_edge.runtime.session import Placement, SelfTestReport, Session, load

__all__ = ["Placement", "SelfTestReport", "Session", "cpu_info", "load", "probe_devices"]
