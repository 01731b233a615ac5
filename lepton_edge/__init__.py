"""lepton-edge: compile a trained model once with Apache TVM, run it on the best device.

    model = lepton_edge.load("model.onnx")            # or a torch.nn.Module + example_inputs
    model = lepton_edge.prune(model, calib, mac_reduction=0.3)   # optional
    model = lepton_edge.quantize(model, calib)                   # optional, int8 QDQ
    art = lepton_edge.compile(model, targets=["cpu"])
    art.save("model.lepton")
    session = lepton_edge.runtime.load("model.lepton")
    outputs = session.run({"x": array})

The compiler side (load, partition, compile) is imported lazily so that
`import lepton_edge.runtime` on a device needs only numpy and the TVM runtime.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from lepton_edge.threads import default_tvm_threads  # noqa: E402

default_tvm_threads()  # before TVM is imported: its own default is half the CPUs on x86

from lepton_edge import errors, runtime  # noqa: E402
from lepton_edge.errors import (  # noqa: E402
    ArtifactError,
    DeviceError,
    InputError,
    LeptonError,
    ModelError,
    TargetError,
    UnsupportedOpsError,
)

_LAZY = {
    "load": ("lepton_edge.model", "load"),
    "Model": ("lepton_edge.model", "Model"),
    "partition": ("lepton_edge.plan", "partition"),
    "Plan": ("lepton_edge.plan", "Plan"),
    "prune": ("lepton_edge.compress.prune", "prune"),
    "quantize": ("lepton_edge.compress.quantize", "quantize"),
    "compile": ("lepton_edge.compiler", "compile"),
    "Artifact": ("lepton_edge.compiler", "Artifact"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lepton_edge' has no attribute '{name}'")


__all__ = [
    "ArtifactError", "DeviceError", "InputError", "LeptonError", "ModelError", "TargetError",
    "UnsupportedOpsError", "errors", "runtime", *_LAZY,
]
