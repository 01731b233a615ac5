"""lepton-edge's own float8/float4/int4/int2 conversions (lowering/narrow.py) against ml_dtypes
and onnx's reference helpers: every bit pattern for decoding, a dense float32 sweep (every
bfloat16-grid value, every midpoint between neighbouring narrow values and its float32
neighbours, NaN, +-inf, +-0, subnormals, out of range) for encoding. All encoders are built
into one Relax module by narrow.convert_cast itself and compiled once."""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from lepton_edge.lowering import narrow

T = onnx.TensorProto
FLOAT8 = [T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ]
INTS = [T.INT4, T.UINT4, T.INT2, T.UINT2]


def sweep() -> np.ndarray:
    """float32 values that exercise every rounding decision of every narrow format."""
    grid = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)  # all exponents
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(
        np.float32)
    parts = [grid, noise, np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45,
                                    -1e-45, 3.4e38, -3.4e38, 2.0 ** 63, -(2.0 ** 63), 1e10,
                                    123456789.0, -8.5, -7.5, 7.5, 8.5, 2.5, -2.5],
                                   np.float32)]
    for fmt in narrow.FORMATS.values():
        if fmt.kind != "float":
            continue
        values = np.unique(narrow.decode_table(fmt, "float64"))
        values = values[np.isfinite(values)]
        mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)  # exact in float32
        top = np.float32(values[-1] + (values[-1] - values[-2]) / 2)  # the overflow tie
        for m in [*mids, top]:
            parts.append(np.array([np.nextafter(m, -np.inf), m, np.nextafter(m, np.inf)],
                                  np.float32))
    x = np.concatenate(parts).astype(np.float32)
    return np.concatenate([x, -x])


@functools.cache
def encoded() -> tuple[np.ndarray, dict[tuple, np.ndarray]]:
    """x, and (format, saturate, round_mode) -> compiled encoder output bytes for x."""
    import tvm
    from tvm import relax

    x = sweep()
    keys = [(e, s, "up") for e in FLOAT8 for s in (0, 1)]
    keys += [(T.FLOAT4E2M1, 1, "up")] + [(e, 1, "up") for e in INTS]
    keys += [(T.FLOAT8E8M0, s, m) for s in (0, 1) for m in ("up", "down", "nearest")]
    keys += [(e, "int32", "") for e in INTS]  # from an integer source
    bb = relax.BlockBuilder()
    var = relax.Var("x", relax.TensorType([len(x)], "float32"))
    ints = relax.Var("i", relax.TensorType([len(x)], "int32"))
    with bb.function("main", [var, ints]):
        with bb.dataflow():
            outs = []
            for elem, sat, mode in keys:
                attrs = {narrow.MARK: narrow.FORMATS[elem].name.encode(), "saturate": sat,
                         "round_mode": mode.encode(), "to": T.UINT8}
                outs.append(narrow.convert_cast(bb, [ints if sat == "int32" else var],
                                                attrs, 25))
            gv = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(gv)
    ex = tvm.compile(bb.get(), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(int_sweep()))
    return x, {k: got[i].numpy() for i, k in enumerate(keys)}


def int_sweep() -> np.ndarray:
    x = sweep()
    return np.concatenate([np.arange(-300, 300), np.array([2**31 - 1, -2**31], np.int64),
                           np.zeros(len(x) - 602, np.int64)]).astype(np.int32)


def assert_same_bytes(got: np.ndarray, want: np.ndarray, x: np.ndarray, fmt: narrow.Format
                      ) -> None:
    """Byte-exact, except that any NaN encoding of the format counts as NaN."""
    want_b = want.view(np.uint8)
    if fmt.kind != "int":
        nan_w = np.isnan(want.astype(np.float32))
        nan_g = np.isnan(got.view(fmt.dtype).astype(np.float32))
        bad = (nan_w != nan_g) | (~nan_w & (got != want_b))
    else:
        bad = got != (want_b & ((1 << fmt.bits) - 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise AssertionError(f"{fmt.name}: {int(bad.sum())} of {len(x)} differ; first "
                             f"x={x[i]!r} ({x[i:i + 1].view(np.uint32)[0]:#010x}): got "
                             f"{got[i]:#04x}, expected {want_b[i]:#04x}")


def test_decode_tables_are_ml_dtypes_over_all_256_bytes() -> None:
    codes = np.arange(256, dtype=np.uint8)
    for fmt in narrow.FORMATS.values():
        for target in ("float32", "float16", "float64"):
            table = narrow.decode_table(fmt, target)
            want = codes.view(fmt.dtype).astype(target)
            np.testing.assert_array_equal(table, want)  # NaN where NaN
            assert table.dtype == np.dtype(target)
        assert np.isnan(narrow.decode_table(fmt, "float32")).sum() == {
            "float8e4m3fn": 2, "float8e5m2": 6, "float8e4m3fnuz": 1, "float8e5m2fnuz": 1,
            "float8e8m0": 1}.get(fmt.name, 0)


@pytest.mark.parametrize("elem", FLOAT8)
@pytest.mark.parametrize("saturate", [0, 1])
def test_float8_encoding_matches_ml_dtypes_and_onnx_saturate(elem: int, saturate: int) -> None:
    x, got = encoded()
    fmt = narrow.FORMATS[elem]
    with np.errstate(all="ignore"):
        want = (numpy_helper.saturate_cast(x, fmt.dtype) if saturate
                else x.astype(fmt.dtype))  # ml_dtypes: overflow -> NaN (fn) or inf (e5m2)
    assert_same_bytes(got[(elem, saturate, "up")], want, x, fmt)


def test_float4_encoding_matches_ml_dtypes() -> None:
    x, got = encoded()
    fmt = narrow.FORMATS[T.FLOAT4E2M1]
    with np.errstate(all="ignore"):
        want = x.astype(fmt.dtype)
    # float4 has no NaN: compare the bytes as ml_dtypes writes them, NaN inputs included
    np.testing.assert_array_equal(got[(T.FLOAT4E2M1, 1, "up")], want.view(np.uint8))


@pytest.mark.parametrize("elem", INTS)
def test_int_encoding_matches_ml_dtypes(elem: int) -> None:
    x, got = encoded()
    fmt = narrow.FORMATS[elem]
    with np.errstate(all="ignore"):
        want = x.astype(fmt.dtype)
    assert_same_bytes(got[(elem, 1, "up")], want, x, fmt)


@pytest.mark.parametrize("elem", INTS)
def test_int_encoding_from_integers_keeps_the_low_bits(elem: int) -> None:
    _, got = encoded()
    fmt = narrow.FORMATS[elem]
    want = int_sweep().astype(fmt.dtype)  # ml_dtypes wraps
    assert_same_bytes(got[(elem, "int32", "")], want, int_sweep(), fmt)


@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
@pytest.mark.parametrize("saturate", [0, 1])
def test_e8m0_encoding_matches_onnx(mode: str, saturate: int) -> None:
    x, got = encoded()
    want = numpy_helper.to_float8e8m0(x, bool(saturate), mode)
    np.testing.assert_array_equal(got[(T.FLOAT8E8M0, saturate, mode)], want.view(np.uint8))


def test_reason_names_what_is_compiled() -> None:
    types = {"x": T.FLOAT, "y": T.FLOAT8E4M3FN, "z": T.INT4, "s": T.FLOAT, "d": T.DOUBLE,
             "st": T.STRING}
    shapes = {"x": [2, 3], "s": [], "y": [2, 3], "z": [3]}
    assert narrow.reason(helper.make_node("Cast", ["x"], ["y"], to=T.FLOAT8E4M3FN),
                         types, shapes) is None
    assert narrow.reason(helper.make_node("Cast", ["y"], ["d"], to=T.DOUBLE), types) is None
    assert narrow.reason(helper.make_node("Relu", ["x"], ["x2"]), types) is None  # not narrow
    assert "only in Cast, CastLike, QuantizeLinear and DequantizeLinear" in narrow.reason(
        helper.make_node("Identity", ["y"], ["y2"]), types)
    assert "to float8e4m3fn only" in narrow.reason(
        helper.make_node("Cast", ["d"], ["y"], to=T.FLOAT8E4M3FN), types)
    assert narrow.reason(helper.make_node("DequantizeLinear", ["y", "s"], ["x"]), types,
                         shapes) is None
    cast = helper.make_node("Cast", ["x"], ["z"], to=T.INT4)
    reshape = helper.make_node("Reshape", ["z", "s"], ["z2"])
    assert narrow.reason(cast, types, shapes, [cast]) is None
    assert "int4 value 'z' is also used by Reshape" in narrow.reason(cast, types, shapes,
                                                                     [cast, reshape])
    assert "blocked" in narrow.reason(
        helper.make_node("DequantizeLinear", ["z", "s"], ["x"], block_size=2), types, shapes)


def test_to_bytes_leaves_no_narrow_type_and_marks_the_encoders() -> None:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=T.FLOAT8E5M2, saturate=0),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["d"], axis=0)],
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [3]),
         helper.make_tensor_value_info("q", T.INT4, [2, 3])],
        [helper.make_tensor_value_info("y", T.FLOAT8E5M2, [3]),
         helper.make_tensor_value_info("d", T.FLOAT, [2, 3])],
        initializer=[numpy_helper.from_array(np.array([0.5, 2.0], np.float32), "s"),
                     numpy_helper.from_array(np.array([1, -1], ml_dtypes.int4), "zp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    out = narrow.to_bytes(model)
    types = narrow._value_types(out.graph)  # noqa: SLF001
    assert not [n for n, t in types.items() if t in narrow.FORMATS]
    assert types["x"] == T.FLOAT and types["q"] == T.UINT8 and types["y"] == T.UINT8
    marked = [n for n in out.graph.node if any(a.name == narrow.MARK for a in n.attribute)]
    assert [(n.op_type, n.output[0]) for n in marked] == [("Cast", "y")]
    assert sum(n.op_type == "Gather" for n in out.graph.node) == 2  # x and its zero point
    zp = next(t for t in out.graph.initializer if t.name == "zp")
    assert zp.data_type == T.UINT8 and list(numpy_helper.to_array(zp)) == [1, 15]
    assert narrow.to_bytes(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("a", T.FLOAT, [1])],
        [helper.make_tensor_value_info("b", T.FLOAT, [1])]))).graph.node[0].op_type == "Relu"


def test_one_table_of_narrow_types_agrees_with_onnx_and_ml_dtypes() -> None:
    from lepton_edge import narrow_types, reference, signature
    from lepton_edge_targets.cpu import support
    from lepton_edge_targets.onnxruntime import compile as ort_compile

    names = {"FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
             "FLOAT4E2M1", "INT4", "UINT4", "INT2", "UINT2"}
    assert {T.DataType.Name(e) for e in narrow_types.FORMATS} == names
    for elem, fmt in narrow_types.FORMATS.items():
        assert T.DataType.Name(elem).lower() == fmt.name
        assert helper.tensor_dtype_to_np_dtype(elem) == fmt.dtype  # the ml_dtypes type
        assert fmt.dtype.itemsize == 1 and signature.is_narrow(fmt.dtype)
        assert support._UNSUPPORTED_TYPES[elem] == fmt.name  # noqa: SLF001
    assert narrow.FORMATS is narrow_types.FORMATS
    assert signature.NARROW_DTYPES == {str(f.dtype) for f in narrow.FORMATS.values()}
    float8 = {T.FLOAT8E4M3FN, T.FLOAT8E4M3FNUZ, T.FLOAT8E5M2, T.FLOAT8E5M2FNUZ}
    assert set(reference.FLOAT8.values()) == float8
    assert all(reference.FLOAT8[f"tensor({narrow.FORMATS[e].name})"] == e for e in float8)
    assert set(narrow_types.NOT_THROUGH_ORT) == set(narrow.FORMATS) - float8
    assert ort_compile.NOT_THROUGH_ORT is narrow_types.NOT_THROUGH_ORT


def test_the_runtime_imports_the_narrow_table_without_onnx_or_tvm() -> None:
    import subprocess
    import sys

    code = ("import sys, lepton_edge.runtime\n"
            "assert 'lepton_edge.narrow_types' in sys.modules\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('onnx', 'tvm') or "
            "m.startswith('lepton_edge.lowering')])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
