"""The numeric oracle: onnxruntime computing exactly the ONNX semantics.

Graph optimizations are off. With them on, onnxruntime fuses QDQ into its own int8 kernels,
which on CPUs without VNNI differ from the spec (seen here: logits off by 2.7 on the int8
digits CNN, where the optimizations-off run equals onnx.reference exactly). Golden outputs,
quantization reports and the tests all compare against this one session kind.
"""

from __future__ import annotations

from typing import Any

import onnx


def reference_session(model: onnx.ModelProto) -> Any:
    """An onnxruntime CPU session over `model` with every graph optimization disabled."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                        providers=["CPUExecutionProvider"])
