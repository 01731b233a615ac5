"""Run a subgraph's ONNX with onnxruntime's CPU execution provider."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return run_float8(self._session, None, dict(zip(self._inputs, inputs, strict=True)))


# float8 crosses onnxruntime's Python API only as OrtValues: inputs are made from their
# bytes, outputs read back as bytes (uint8), which is how the session passes narrow values
# between subgraphs anyway (its numpy conversion knows float8e4m3fn only).
FLOAT8 = {"tensor(float8e4m3fn)": 17, "tensor(float8e4m3fnuz)": 18, "tensor(float8e5m2)": 19,
          "tensor(float8e5m2fnuz)": 20}


def run_float8(session: Any, output_names: list[str] | None, feeds: dict[str, Any]
               ) -> list[Any]:
    """session.run, with float8 inputs given and outputs returned as uint8 bytes (or
    ml_dtypes arrays for inputs: their bytes are taken)."""
    ins = {i.name: FLOAT8[i.type] for i in session.get_inputs() if i.type in FLOAT8}
    outs = [o for o in session.get_outputs() if o.type in FLOAT8]
    if not ins and not outs:
        return session.run(output_names, feeds)
    import onnxruntime

    feeds = dict(feeds)
    for name, elem in ins.items():
        if name in feeds:
            data = np.ascontiguousarray(np.asarray(feeds[name]).view(np.uint8))
            feeds[name] = onnxruntime.OrtValue.ortvalue_from_numpy_with_onnx_type(data, elem)
    if not outs:
        return session.run(output_names, feeds)
    for name, value in feeds.items():
        if not isinstance(value, onnxruntime.OrtValue):
            feeds[name] = onnxruntime.OrtValue.ortvalue_from_numpy(np.asarray(value))
    names = output_names or [o.name for o in session.get_outputs()]
    return [_float8_bytes(v) if v.data_type() in FLOAT8 else v.numpy()
            for v in session.run_with_ort_values(names, feeds)]


def _float8_bytes(value: Any) -> np.ndarray:
    import ctypes

    data = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
    return np.frombuffer(data, np.uint8).reshape(value.shape()).copy()
