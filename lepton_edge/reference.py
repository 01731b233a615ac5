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
    """An onnxruntime CPU session over `model` with every graph optimization disabled.

    A model with int4/uint4/int2/uint2/float4e2m1/float8e8m0 graph inputs or outputs gets
    onnx's reference evaluator instead: onnxruntime's Python API cannot pass those types."""
    import onnxruntime

    if any(v.type.tensor_type.elem_type in _NOT_THROUGH_ORT
           for v in list(model.graph.input) + list(model.graph.output)
           if v.type.HasField("tensor_type")):
        return _EvaluatorSession(model)

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    from lepton_edge_targets.onnxruntime.device import FLOAT8

    if any(v.type in FLOAT8 for v in session.get_inputs() + session.get_outputs()):
        return _Float8Session(session)
    return session


class _Float8Session:
    """An onnxruntime session taking float8 values as ml_dtypes arrays or their uint8 bytes,
    and returning them as bytes (its Python API passes them only as OrtValues, see the
    onnxruntime device), as lepton-edge's artifact stores them."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        from lepton_edge_targets.onnxruntime.device import run_float8

        return run_float8(self._session, output_names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


_NOT_THROUGH_ORT = {getattr(onnx.TensorProto, n) for n in (
    "INT4", "UINT4", "INT2", "UINT2", "FLOAT4E2M1", "FLOAT8E8M0") if hasattr(onnx.TensorProto, n)}


_NARROW = _NOT_THROUGH_ORT | {getattr(onnx.TensorProto, n) for n in (
    "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")}


class _EvaluatorSession:
    """onnx.reference.ReferenceEvaluator with onnxruntime's run(output_names, feeds)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self._evaluator = ReferenceEvaluator(model)
        self._types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input
                       if v.type.HasField("tensor_type")}

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """Narrow inputs as ml_dtypes arrays or their uint8 bytes; narrow outputs returned
        as their uint8 bytes (as _Float8Session)."""
        import numpy as np
        from onnx.helper import tensor_dtype_to_np_dtype

        feeds = {n: (np.asarray(v).view(tensor_dtype_to_np_dtype(self._types[n]))
                     if self._types.get(n) in _NARROW and np.asarray(v).dtype == np.uint8
                     else v) for n, v in feeds.items()}
        outputs = self._evaluator.run(output_names, feeds)
        from lepton_edge.signature import is_narrow

        return [np.asarray(v).view(np.uint8) if is_narrow(np.asarray(v).dtype) else v
                for v in outputs]
