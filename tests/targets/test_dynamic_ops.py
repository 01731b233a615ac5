"""lowering/dynamic_ops.py: nodes whose axes / pads / k / shape / split arrive at run time.

Each model is compiled once through the public API (load -> compile -> save -> runtime.load)
and must be placed whole on the CPU target (no onnxruntime fallback); then several run-time
values are fed to the same artifact and every result is compared with onnxruntime. Values the
op does not allow must stop the run with an error naming the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import lepton_edge
from lepton_edge.errors import DeviceError

RNG = np.random.default_rng(7)


def _model(node: onnx.NodeProto, inputs: list[tuple[str, int, list[int]]], outputs: list[str],
           opset: int = 18, rank: int = 3) -> onnx.ModelProto:
    """Outputs have `rank` dims, each named (known only at run time)."""
    graph = h.make_graph(
        [node], "g", [h.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [h.make_tensor_value_info(o, T.INT64 if o == "i" else T.FLOAT,
                                  [f"{o}{d}" for d in range(rank)]) for o in outputs])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 10
    return onnx.shape_inference.infer_shapes(model)


class Compiled:
    """One model compiled to an artifact, run against onnxruntime on many feeds."""

    def __init__(self, model: onnx.ModelProto, tmp_path: Path) -> None:
        self.model = model
        path = tmp_path / "m.lepton"
        lepton_edge.compile(lepton_edge.load(model), targets=["cpu"], golden_count=0).save(path)
        self.session = lepton_edge.runtime.load(path, fallback=False)
        devices = {p.device for p in self.session.placement.values()}
        assert devices == {"cpu:0"}, self.session.placement  # every node compiled by TVM
        self.ort = ort.InferenceSession(model.SerializeToString())

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        want = self.ort.run(None, feeds)
        got = self.session.run(feeds)
        for out, expected in zip(self.model.graph.output, want, strict=True):
            value = np.asarray(got[out.name])
            assert value.shape == expected.shape, (feeds, out.name)
            np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6)

    def check_reference(self, feeds: dict[str, np.ndarray]) -> None:
        """Against onnx's reference implementation (where onnxruntime departs from it)."""
        from onnx.reference import ReferenceEvaluator

        want = ReferenceEvaluator(self.model).run(None, feeds)
        got = self.session.run(feeds)
        for out, expected in zip(self.model.graph.output, want, strict=True):
            np.testing.assert_allclose(np.asarray(got[out.name]), expected, rtol=1e-5,
                                       atol=1e-6)


def _axes(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


X3 = RNG.standard_normal((2, 3, 4)).astype(np.float32)


@pytest.mark.parametrize("keepdims", [1, 0])
def test_reduce_sum_runtime_axes(tmp_path: Path, keepdims: int) -> None:
    node = h.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=keepdims)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("axes", T.INT64, [2])], ["y"],
                        rank=3 if keepdims else 1), tmp_path)
    for axes in [(0, 1), (-1, 0), (2, -2), (1, 2), (-3, -1)]:
        c.check({"x": X3, "axes": _axes(*axes)})


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceProd", "ReduceL2",
                                "ReduceLogSumExp"])
def test_reduce_family_runtime_axis(tmp_path: Path, op: str) -> None:
    node = h.make_node(op, ["x", "axes"], ["y"], keepdims=0)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("axes", T.INT64, [1])], ["y"],
                        rank=2), tmp_path)
    x = X3.copy()
    if op in ("ReduceMax", "ReduceLogSumExp"):
        x[1, :, 2] = -np.inf  # an all -inf slice reduces to -inf, not -FLT_MAX or NaN
    for axis in (0, 1, -1):
        c.check({"x": x, "axes": _axes(axis)})


@pytest.mark.parametrize("noop", [0, 1])
def test_reduce_empty_axes(tmp_path: Path, noop: int) -> None:
    node = h.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0,
                       noop_with_empty_axes=noop)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("axes", T.INT64, [0])], ["y"],
                        rank=3 if noop else 0), tmp_path)
    c.check({"x": X3, "axes": _axes()})


def test_reduce_bad_axes_stop_the_run(tmp_path: Path) -> None:
    node = h.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("axes", T.INT64, [2])], ["y"]),
                 tmp_path)
    with pytest.raises(DeviceError, match=r"axes value is outside \[-rank, rank-1\]"):
        c.session.run({"x": X3, "axes": _axes(0, 3)})
    with pytest.raises(DeviceError, match="axes repeats an axis"):
        c.session.run({"x": X3, "axes": _axes(2, -1)})
    c.check({"x": X3, "axes": _axes(0, 2)})  # the session is still usable


def test_cumsum_runtime_axis(tmp_path: Path) -> None:
    node = h.make_node("CumSum", ["x", "axis"], ["y"], exclusive=1, reverse=1)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("axis", T.INT32, [])], ["y"],
                        opset=14), tmp_path)
    for axis in (0, 1, 2, -1):
        c.check({"x": X3, "axis": np.array(axis, np.int32)})
    with pytest.raises(DeviceError, match="CumSum: axis is outside"):
        c.session.run({"x": X3, "axis": np.array(3, np.int32)})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_runtime_pads(tmp_path: Path, mode: str) -> None:
    node = h.make_node("Pad", ["x", "pads", "value"], ["y"], mode=mode)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("pads", T.INT64, [6]),
                               ("value", T.FLOAT, [])], ["y"]), tmp_path)
    value = np.array(1.5, np.float32)
    for pads in [(0, 1, 2, 1, 0, 3), (1, -1, 0, 0, 1, -2), (0, 0, 0, 0, 0, 0)]:
        c.check({"x": X3, "pads": _axes(*pads), "value": value})
    with pytest.raises(DeviceError, match="negative pads remove more than the whole axis"):
        c.session.run({"x": X3, "pads": _axes(0, -2, 0, 0, -2, 0), "value": value})


def test_topk_runtime_k(tmp_path: Path) -> None:
    node = h.make_node("TopK", ["x", "k"], ["v", "i"], axis=1, largest=0)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 5, 3]), ("k", T.INT64, [1])], ["v", "i"],
                        opset=11), tmp_path)
    x = np.round(RNG.standard_normal((2, 5, 3)), 1).astype(np.float32)
    x[0, 3] = x[0, 1]  # ties: the lower index comes first
    for k in (0, 2, 5):
        c.check({"x": x, "k": _axes(k)})
    with pytest.raises(DeviceError, match="TopK: k is negative or larger than the axis"):
        c.session.run({"x": x, "k": _axes(6)})


def test_reshape_runtime_shape(tmp_path: Path) -> None:
    node = h.make_node("Reshape", ["x", "shape"], ["y"])
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("shape", T.INT64, [3])], ["y"]),
                 tmp_path)
    for shape in [(4, -1, 2), (0, 4, 3), (1, 1, 24), (-1, 0, 4)]:
        c.check({"x": X3, "shape": _axes(*shape)})
    with pytest.raises(DeviceError, match="element count"):
        c.session.run({"x": X3, "shape": _axes(5, -1, 1)})


def test_split_runtime_sizes(tmp_path: Path) -> None:
    node = h.make_node("Split", ["x", "split"], ["a", "b"], axis=-1)
    c = Compiled(_model(node, [("x", T.FLOAT, [2, 3, 4]), ("split", T.INT64, [2])],
                        ["a", "b"]), tmp_path)
    for split in [(1, 3), (4, 0), (2, 2)]:
        c.check({"x": X3, "split": _axes(*split)})
    with pytest.raises(DeviceError, match="do not add up"):
        c.session.run({"x": X3, "split": _axes(1, 1)})


# ----------------------------------------------------------------------- Resize and friends

X4 = RNG.standard_normal((1, 2, 5, 6)).astype(np.float32)


def _scales(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


@pytest.mark.parametrize("attrs", [
    {"mode": "linear"},
    {"mode": "cubic", "coordinate_transformation_mode": "align_corners"},
    {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
    {"mode": "linear", "antialias": 1},
])
def test_resize_runtime_scales(tmp_path: Path, attrs: dict) -> None:
    """Up- and downsampling (fractional output widths too) with one artifact."""
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)
    c = Compiled(_model(node, [("x", T.FLOAT, [1, 2, 5, 6]), ("scales", T.FLOAT, [4])], ["y"],
                        opset=19, rank=4), tmp_path)
    for scales in [(1, 1, 2, 3), (1, 1, 0.6, 0.5), (1, 1, 1.7, 0.35), (1, 1, 1, 1)]:
        feeds = {"x": X4, "scales": _scales(*scales)}
        if attrs.get("coordinate_transformation_mode") == "align_corners":
            # ONNX (its reference and backend test data) divides by the fractional output
            # width scale * length; onnxruntime by the integer one
            c.check_reference(feeds)
        else:
            c.check(feeds)


def test_resize_runtime_sizes_roi_and_axes(tmp_path: Path) -> None:
    node = h.make_node("Resize", ["x", "roi", "", "sizes"], ["y"], mode="linear",
                       coordinate_transformation_mode="tf_crop_and_resize", axes=[3, 2],
                       extrapolation_value=-2.0)
    c = Compiled(_model(node, [("x", T.FLOAT, [1, 2, 5, 6]), ("roi", T.FLOAT, [4]),
                               ("sizes", T.INT64, [2])], ["y"], opset=19, rank=4), tmp_path)
    for roi, sizes in [((0, 0, 1, 1), (4, 7)), ((0.2, -0.1, 0.9, 1.3), (9, 3))]:
        c.check({"x": X4, "roi": _scales(*roi), "sizes": _axes(*sizes)})


def test_resize_that_shrinks_with_constant_scales_compiles_correctly(tmp_path: Path) -> None:
    """TVM 0.27's converter is wrong here (see targets/cpu/support.py); ours is not."""
    scales = onnx.numpy_helper.from_array(_scales(1, 1, 0.6, 0.45), "scales")
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", exclude_outside=1,
                       coordinate_transformation_mode="half_pixel_symmetric")
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("x", T.FLOAT, [1, 2, 5, 6])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1, 2, 3, 2])], [scales])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])
    model.ir_version = 10
    c = Compiled(model, tmp_path)
    c.check({"x": X4})
    c.check({"x": -X4})


def test_resize_bad_scales_stop_the_run(tmp_path: Path) -> None:
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    c = Compiled(_model(node, [("x", T.FLOAT, [1, 2, 5, 6]), ("scales", T.FLOAT, [4])], ["y"],
                        opset=19, rank=4), tmp_path)
    c.check({"x": X4, "scales": _scales(1, 1, 0.5, 2.5)})
    with pytest.raises(DeviceError, match="scales value is not positive"):
        c.session.run({"x": X4, "scales": _scales(1, 1, -1, 2)})


def test_range_runtime_limit_and_a_window_function(tmp_path: Path) -> None:
    """A run-time length feeding arithmetic that FuseOps would fuse across the match_cast
    defining it (see dynamic_ops._fence_symbolic_dims)."""
    nodes = [h.make_node("HannWindow", ["n"], ["w"], periodic=1),
             h.make_node("Range", ["start", "limit", "delta"], ["r"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("n", T.INT64, []),
                                      h.make_tensor_value_info("start", T.INT64, []),
                                      h.make_tensor_value_info("limit", T.INT64, []),
                                      h.make_tensor_value_info("delta", T.INT64, [])],
                         [h.make_tensor_value_info("w", T.FLOAT, ["a"]),
                          h.make_tensor_value_info("r", T.INT64, ["b"])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 10
    c = Compiled(model, tmp_path)

    def scalar(v: int) -> np.ndarray:
        return np.array(v, np.int64)
    for n, (start, limit, delta) in [(10, (0, 7, 2)), (1, (5, -4, -3)), (3, (2, 2, 1))]:
        c.check({"n": scalar(n), "start": scalar(start), "limit": scalar(limit),
                 "delta": scalar(delta)})
    with pytest.raises(DeviceError, match="Range: delta is 0"):
        c.session.run({"n": scalar(3), "start": scalar(0), "limit": scalar(3),
                       "delta": scalar(0)})


def test_constant_of_shape_runtime_shape(tmp_path: Path) -> None:
    value = onnx.numpy_helper.from_array(np.array([7], np.int32), "value")
    node = h.make_node("ConstantOfShape", ["shape"], ["y"], value=value)
    graph = h.make_graph([node], "g", [h.make_tensor_value_info("shape", T.INT64, [2])],
                         [h.make_tensor_value_info("y", T.INT32, ["a", "b"])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])
    model.ir_version = 10
    c = Compiled(model, tmp_path)
    for shape in [(2, 3), (0, 4), (1, 1)]:
        c.check({"shape": _axes(*shape)})
    with pytest.raises(DeviceError):
        c.session.run({"shape": _axes(-2, 3)})


def test_affine_grid_runtime_size(tmp_path: Path) -> None:
    node = h.make_node("AffineGrid", ["theta", "size"], ["grid"], align_corners=0)
    c = Compiled(_model(node, [("theta", T.FLOAT, [2, 2, 3]), ("size", T.INT64, [4])],
                        ["grid"], opset=20, rank=4), tmp_path)
    theta = RNG.standard_normal((2, 2, 3)).astype(np.float32)
    for size in [(2, 3, 4, 5), (2, 1, 1, 3)]:
        c.check({"theta": theta, "size": _axes(*size)})


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_constant_scales_with_a_runtime_batch(tmp_path: Path, mode: str) -> None:
    """The usual exporter form: the batch stays symbolic, the resized dims static."""
    scales = onnx.numpy_helper.from_array(_scales(1, 1, 2, 1.5), "scales")
    node = h.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode)
    relu = h.make_node("Relu", ["y"], ["z"])
    graph = h.make_graph([node, relu], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 2, 5, 6])],
                         [h.make_tensor_value_info("z", T.FLOAT, ["N", 2, 10, 9])], [scales])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])
    model.ir_version = 10
    c = Compiled(model, tmp_path)
    for batch in (1, 3):
        c.check({"x": RNG.standard_normal((batch, 2, 5, 6)).astype(np.float32)})


def test_center_crop_pad_runtime_shape(tmp_path: Path) -> None:
    """Its body pads by run-time amounts, takes the Shape of the result and slices: Shape of a
    tensor with run-time dims is an int64 tensor here (dynamic_ops.convert_shape)."""
    node = h.make_node("CenterCropPad", ["x", "shape"], ["y"])
    c = Compiled(_model(node, [("x", T.FLOAT, [4, 5, 3]), ("shape", T.INT64, [3])], ["y"],
                        opset=18), tmp_path)
    x = RNG.standard_normal((4, 5, 3)).astype(np.float32)
    for shape in [(2, 7, 3), (5, 2, 1), (4, 5, 3)]:
        c.check({"x": x, "shape": _axes(*shape)})
