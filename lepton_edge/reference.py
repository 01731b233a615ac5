"""The numeric oracle: onnxruntime computing exactly the ONNX semantics.

Graph optimizations are off. With them on, onnxruntime fuses QDQ into its own int8 kernels,
which on CPUs without VNNI differ from the spec (seen here: logits off by 2.7 on the int8
digits CNN, where the optimizations-off run equals onnx.reference exactly). Golden outputs,
quantization reports and the tests all compare against this one session kind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from lepton_edge.narrow_types import FORMATS, NOT_THROUGH_ORT


def reference_session(model: onnx.ModelProto) -> Any:
    """An onnxruntime CPU session over `model` with every graph optimization disabled.

    A model with narrow graph inputs or outputs onnxruntime's Python API cannot pass
    (narrow_types.NOT_THROUGH_ORT: int4/uint4/int2/uint2/float4e2m1/float8e8m0) gets onnx's
    reference evaluator instead."""
    import onnxruntime

    if any(v.type.tensor_type.elem_type in NOT_THROUGH_ORT
           for v in list(model.graph.input) + list(model.graph.output)
           if v.type.HasField("tensor_type")):
        return _EvaluatorSession(model)

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    if any(v.type in FLOAT8 for v in session.get_inputs() + session.get_outputs()):
        return _Float8Session(session)
    return session


class _Float8Session:
    """An onnxruntime session taking float8 values as ml_dtypes arrays or their uint8 bytes,
    and returning them as bytes (its Python API passes them only as OrtValues, see
    run_float8), as lepton-edge's artifact stores them."""

    def __init__(self, session: Any) -> None:
        self._session = session

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        return run_float8(self._session, output_names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


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
                     if self._types.get(n) in FORMATS and np.asarray(v).dtype == np.uint8
                     else v) for n, v in feeds.items()}
        outputs = self._evaluator.run(output_names, feeds)
        from lepton_edge.signature import is_narrow

        return [np.asarray(v).view(np.uint8) if is_narrow(np.asarray(v).dtype) else v
                for v in outputs]


# float8 crosses onnxruntime's Python API only as OrtValues: inputs are made from their
# bytes, outputs read back as bytes (uint8), which is how the session passes narrow values
# between subgraphs anyway; the onnxruntime fallback device uses this too (its numpy
# conversion knows float8e4m3fn only). onnxruntime's type name -> ONNX element type.
FLOAT8 = {f.ort_type: e for e, f in FORMATS.items() if f.float8}


def float8_values(session: Any) -> tuple[dict[str, int], list[str]]:
    """The session's float8 inputs (name -> ONNX element type) and float8 output names."""
    return ({i.name: FLOAT8[i.type] for i in session.get_inputs() if i.type in FLOAT8},
            [o.name for o in session.get_outputs() if o.type in FLOAT8])


def run_float8(session: Any, output_names: list[str] | None, feeds: dict[str, Any],
               float8: tuple[dict[str, int], list[str]] | None = None) -> list[Any]:
    """session.run, with float8 inputs given and outputs returned as uint8 bytes (or
    ml_dtypes arrays for inputs: their bytes are taken). `float8`: float8_values(session),
    when the caller keeps it."""
    ins, outs = float8 if float8 is not None else float8_values(session)
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
