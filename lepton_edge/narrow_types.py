"""The narrow element types lepton-edge takes: float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz, e8m0),
float4e2m1, int4/uint4 and int2/uint2. The one table of them.

Everything that lists these types derives its list from `FORMATS`: the runtime's signatures
(ml_dtypes names), the compiler's rewrite (lowering/narrow.py), the CPU target's refusals,
the onnxruntime fallback (which of them cross its Python API) and the numeric reference. This
module imports neither onnx nor TVM: the runtime imports it (tests/unit/test_narrow_types.py
checks the ONNX element type numbers against onnx.TensorProto).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Format:
    """One narrow element type and the facts its conversions need."""

    elem: int  # ONNX TensorProto data type
    name: str  # ONNX's name, lower case ("float8e4m3fn")
    numpy: str  # the ml_dtypes type name ("float8_e4m3fn")
    kind: str  # "float" (sign, exponent, mantissa), "e8m0" (exponent only) or "int"
    bits: int
    mbits: int = 0
    bias: int = 0
    fnuz: bool = False  # no -0, no infinities, NaN is 0x80
    max_code: int = 0  # magnitude code of the largest finite value
    inf_code: int | None = None  # magnitude code of infinity, None when there is none
    nan_code: int = 0  # magnitude code of NaN (fnuz: the whole byte 0x80)
    saturating: bool = False  # no NaN/inf to overflow to (float4): always saturates

    @property
    def dtype(self) -> Any:
        """The ml_dtypes numpy dtype."""
        import ml_dtypes
        import numpy as np

        return np.dtype(getattr(ml_dtypes, self.numpy))

    @property
    def float8(self) -> bool:
        """A sign/exponent/mantissa float8: onnxruntime's Python API passes it as OrtValues
        of its bytes. The others (int4/uint4/int2/uint2/float4e2m1/float8e8m0) it cannot
        pass at all."""
        return self.kind == "float" and self.bits == 8

    @property
    def ort_type(self) -> str:
        """onnxruntime's name of a tensor of this type ("tensor(float8e4m3fn)")."""
        return f"tensor({self.name})"


FORMATS: dict[int, Format] = {f.elem: f for f in (
    Format(17, "float8e4m3fn", "float8_e4m3fn", "float", 8, mbits=3, bias=7, max_code=0x7E,
           nan_code=0x7F),
    Format(18, "float8e4m3fnuz", "float8_e4m3fnuz", "float", 8, mbits=3, bias=8, fnuz=True,
           max_code=0x7F, nan_code=0x80),
    Format(19, "float8e5m2", "float8_e5m2", "float", 8, mbits=2, bias=15, max_code=0x7B,
           inf_code=0x7C, nan_code=0x7E),
    Format(20, "float8e5m2fnuz", "float8_e5m2fnuz", "float", 8, mbits=2, bias=16, fnuz=True,
           max_code=0x7F, nan_code=0x80),
    Format(22, "int4", "int4", "int", 4),
    Format(21, "uint4", "uint4", "int", 4),
    Format(26, "int2", "int2", "int", 2),
    Format(25, "uint2", "uint2", "int", 2),
    Format(23, "float4e2m1", "float4_e2m1fn", "float", 4, mbits=1, bias=1, max_code=0x7,
           nan_code=0x8, saturating=True),
    Format(24, "float8e8m0", "float8_e8m0fnu", "e8m0", 8),
)}
BY_NAME = {f.name: f for f in FORMATS.values()}
# ml_dtypes names: taken and returned as ml_dtypes arrays, one element per byte
NUMPY_NAMES = frozenset(f.numpy for f in FORMATS.values())
# what onnxruntime's Python API cannot pass in or out (it packs them, and has no numpy type)
NOT_THROUGH_ORT = {e: f for e, f in FORMATS.items() if not f.float8}


def listed(formats: Any) -> str:
    """The formats' names joined by '/' ("int4/uint4"), for messages."""
    return "/".join(f.name for f in formats)
