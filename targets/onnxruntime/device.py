"""Run a subgraph's ONNX with onnxruntime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge.reference import float8_values, run_float8
from lepton_edge.target import Device, DeviceInfo, Executable


class OnnxRuntimeDevice(Device):
    kind = "onnxruntime"

    def probe(self) -> list[DeviceInfo]:
        try:
            import onnxruntime
        except ImportError as exc:
            return [DeviceInfo(kind=self.kind, name="onnxruntime", present=False,
                               reason=f"onnxruntime is not installed ({exc})")]
        return [DeviceInfo(kind=self.kind, name="onnxruntime:cpu", present=True,
                           details={"version": onnxruntime.__version__})]

    def load(self, info: DeviceInfo, files: dict[str, Path], build_meta: dict[str, Any]
             ) -> Executable:
        return OnnxRuntimeExecutable(files["model.onnx"])


class OnnxRuntimeExecutable(Executable):
    def __init__(self, model_path: Path) -> None:
        import onnxruntime

        self._session = onnxruntime.InferenceSession(
            str(model_path), providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._float8 = float8_values(self._session)  # looked up once, not per run

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return run_float8(self._session, None, dict(zip(self._inputs, inputs, strict=True)),
                          self._float8)
