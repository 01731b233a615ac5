"""Partitioning and load-time placement, with a fake accelerator registered like a real one.

The fake accelerator supports only Conv and Relu. Its "build" is the subgraph's ONNX and its
device runs it with onnx's ReferenceEvaluator (a different engine from onnxruntime, which is
the reference here), so a wrong split or wrong wiring shows up as wrong numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.errors import DeviceError, TargetError, UnsupportedOpsError
from lepton_edge.target import (
    Build, Device, DeviceInfo, Executable, Profile, Target, TargetPlugin, get_plugin, register,
    unregister,
)
from tests.conftest import assert_close, ort_run

REPO = Path(__file__).resolve().parents[2]
rng = np.random.default_rng(1)


class FakeTarget(Target):
    name = "fakeacc"
    ops = {"Conv", "Relu"}

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return None if node.op_type in self.ops else f"fakeacc has no {node.op_type} kernel"

    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        return Build(target=self.name, profile=profile.name,
                     files={"graph.onnx": subgraph.SerializeToString()}, meta={"fake": True})


class FakeDevice(Device):
    kind = "fakeacc"
    present = True
    fail_on_call: int | None = None
    fail_on_load = False
    calls = 0

    def probe(self) -> list[DeviceInfo]:
        return [DeviceInfo(kind=self.kind, name="fakeacc:0", present=FakeDevice.present,
                           reason="" if FakeDevice.present else "no fake card plugged in")]

    def load(self, info: DeviceInfo, files: dict[str, Path], meta: dict[str, Any]) -> Executable:
        if FakeDevice.fail_on_load:
            raise RuntimeError("fake firmware refused the build")
        return FakeExecutable(files["graph.onnx"])


class FakeExecutable(Executable):
    def __init__(self, path: Path) -> None:
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(path)
        self.evaluator = ReferenceEvaluator(model)
        self.names = [i.name for i in model.graph.input]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        FakeDevice.calls += 1
        if FakeDevice.fail_on_call is not None and FakeDevice.calls == FakeDevice.fail_on_call:
            raise RuntimeError("fake device lost (DMA timeout)")
        return list(self.evaluator.run(None, dict(zip(self.names, inputs, strict=True))))


@pytest.fixture(autouse=True)
def fake_target():
    register(TargetPlugin(name="fakeacc", priority=50, description="test accelerator",
                          target=f"{__name__}:FakeTarget", device=f"{__name__}:FakeDevice"))
    FakeDevice.present, FakeDevice.fail_on_call, FakeDevice.fail_on_load = True, None, False
    FakeDevice.calls = 0
    yield
    unregister("fakeacc")


def const(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def conv_model(extra_node: onnx.NodeProto | list[onnx.NodeProto] | None = None,
               extra_inits: tuple[onnx.TensorProto, ...] = (), opset: int = 17
               ) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu (fakeacc) -> Flatten -> Gemm -> Softmax (cpu only)."""
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["a"], ["b"], name="relu1"),
        helper.make_node("Conv", ["b", "c2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c"], ["d"], name="relu2"),
        helper.make_node("Flatten", ["d"], ["e"], name="flatten"),
        helper.make_node("Gemm", ["e", "fc"], ["f"], transB=1, name="fc"),
    ]
    last = "f"
    if extra_node is not None:
        extra = extra_node if isinstance(extra_node, list) else [extra_node]
        nodes.extend(extra)
        last = extra[-1].output[0]
    nodes.append(helper.make_node("Softmax", [last], ["y"], axis=1, name="softmax"))
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [const("c1", 4, 2, 3, 3), const("c2", 4, 4, 3, 3), const("fc", 4, 144)])
    graph.initializer.extend(extra_inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds(batch: int) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((batch, 2, 6, 6)).astype(np.float32)}


def test_plan_splits_model_by_support() -> None:
    plan = lepton_edge.partition(lepton_edge.load(conv_model()), ["cpu", "fakeacc"])
    assert [(sg.target, sg.nodes) for sg in plan.subgraphs] == [
        ("fakeacc", ("conv1", "relu1", "conv2", "relu2")),
        ("cpu", ("flatten", "fc", "softmax")),
    ]
    first, second = plan.subgraphs
    assert first.candidates == ("fakeacc", "cpu")
    assert second.candidates == ("cpu",)
    assert first.inputs == ("x",) and first.outputs == ("d",)
    assert second.inputs == ("d",) and second.outputs == ("y",)
    assert first.macs == 4 * 36 * (2 * 9) + 4 * 36 * (4 * 9)  # per sample: out x (Cin x k x k)
    assert plan.transfers() == [("d", "sg0", "sg1")]
    for sg in plan.subgraphs:  # each subgraph is a valid standalone model
        onnx.checker.check_model(sg.proto, full_check=True)
    assert plan.reasons["flatten"] == {"fakeacc": "fakeacc has no Flatten kernel"}


def test_artifact_has_builds_for_both_targets_and_places_on_fake(build) -> None:
    model = lepton_edge.load(conv_model())
    path, session = build(model, ["cpu", "fakeacc"])
    assert lepton_edge.compile(model, ["cpu", "fakeacc"]).builds == [
        ("sg0", "fakeacc", "fakeacc"), ("sg0", "cpu", "x86-64-native"),
        ("sg1", "cpu", "x86-64-native")]
    placement = session.placement
    assert placement["sg0"].device == "fakeacc:0" and placement["sg1"].device == "cpu:0"
    for batch in (1, 5):
        f = feeds(batch)
        assert_close(session.run(f), ort_run(model.proto, f))
    assert FakeDevice.calls == 2  # one call per run; self-test is not run by default


def test_absent_device_places_on_cpu_and_strict_mode_raises(build) -> None:
    model = lepton_edge.load(conv_model())
    path, _ = build(model, ["cpu", "fakeacc"])
    FakeDevice.present = False
    session = lepton_edge.runtime.load(path)
    assert session.placement["sg0"].device == "cpu:0"
    assert "no fake card plugged in" in session.placement["sg0"].reason
    f = feeds(3)
    assert_close(session.run(f), ort_run(model.proto, f))
    assert FakeDevice.calls == 0
    with pytest.raises(DeviceError, match=r"cannot place 1 subgraph.*sg0.*no fake card"):
        lepton_edge.runtime.load(path, fallback=False)


def test_device_failing_on_third_call_falls_back_without_losing_requests(build) -> None:
    model = lepton_edge.load(conv_model())
    _, session = build(model, ["cpu", "fakeacc"])
    FakeDevice.fail_on_call = 3
    requests = [feeds(2) for _ in range(5)]
    with pytest.warns(RuntimeWarning, match="fakeacc:0 failed while running"):
        results = [session.run(f) for f in requests]
    for f, got in zip(requests, results, strict=True):
        assert_close(got, ort_run(model.proto, f))
    assert session.placement["sg0"].device == "cpu:0"
    assert "fell back after a run failure" in session.placement["sg0"].reason
    assert len(session.events) == 1 and "DMA timeout" in session.events[0]
    assert FakeDevice.calls == 3  # never retried after the failure


def test_failure_without_fallback_raises(build) -> None:
    model = lepton_edge.load(conv_model())
    path, _ = build(model, ["cpu", "fakeacc"])
    session = lepton_edge.runtime.load(path, fallback=False)
    FakeDevice.fail_on_call = 1
    with pytest.raises(DeviceError, match="sg0 failed on fakeacc:0"):
        session.run(feeds(1))


def test_device_failing_at_load_falls_back(build) -> None:
    model = lepton_edge.load(conv_model())
    path, _ = build(model, ["cpu", "fakeacc"])
    FakeDevice.fail_on_load = True
    with pytest.warns(RuntimeWarning, match="firmware refused"):
        session = lepton_edge.runtime.load(path)
    assert session.placement["sg0"].device == "cpu:0"
    assert session.self_test().passed


def test_devices_argument_restricts_placement(build) -> None:
    model = lepton_edge.load(conv_model())
    path, _ = build(model, ["cpu", "fakeacc"])
    session = lepton_edge.runtime.load(path, devices=["cpu"])
    assert {p.device for p in session.placement.values()} == {"cpu:0"}
    with pytest.raises(DeviceError, match="unknown device kind"):
        lepton_edge.runtime.load(path, devices=["tpu"])


def test_op_tvm_cannot_compile_runs_on_onnxruntime(build, tmp_path: Path) -> None:
    # Col2Im: no TVM converter, and no ONNX function body onnx_fixups could expand; here with
    # 1x1 blocks it only moves values: f (N, 4) -> (N, 1, 4) -> (N, 1, 2, 2) -> (N, 4)
    lpn = [helper.make_node("Reshape", ["f", "cols_shape"], ["cols"], name="to_cols"),
           helper.make_node("Col2Im", ["cols", "image", "block"], ["img"], name="lpn"),
           helper.make_node("Reshape", ["img", "flat_shape"], ["g"], name="flat")]
    inits = tuple(numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("cols_shape", [-1, 1, 4]), ("image", [2, 2]), ("block", [1, 1]),
        ("flat_shape", [-1, 4])))
    model = lepton_edge.load(conv_model(lpn, inits, opset=18))  # Col2Im: opset 18
    plan = lepton_edge.partition(model, ["cpu"])
    assert [(sg.target, sg.op_counts) for sg in plan.subgraphs] == [
        ("cpu", {"Conv": 2, "Relu": 2, "Flatten": 1, "Gemm": 1, "Reshape": 1}),
        ("onnxruntime", {"Col2Im": 1}),
        ("cpu", {"Reshape": 1, "Softmax": 1}),
    ]
    assert "no converter for Col2Im" in plan.reasons["lpn"]["cpu"]
    _, session = build(model, ["cpu"], golden_count=0)
    assert [p.target for p in session.placement.values()] == ["cpu", "onnxruntime", "cpu"]
    f = feeds(4)
    assert_close(session.run(f), ort_run(model.proto, f))
    with pytest.raises(UnsupportedOpsError, match=r"Col2Im \(node lpn\).*no converter"):
        lepton_edge.partition(model, ["cpu"], fallback=False)
    onnx.save(model.proto, tmp_path / "lpn.onnx")
    out = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "explain",
                          str(tmp_path / "lpn.onnx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "sg1: 1 nodes on onnxruntime fallback" in out.stdout
    assert "lpn: cpu: TVM 0.27's ONNX importer has no converter for Col2Im" in out.stdout


def test_subgraphs_never_form_a_cycle() -> None:
    # a (fake) -> b (cpu) -> c (fake), and a -> c directly: c cannot join a's subgraph.
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="a"),
             helper.make_node("Sigmoid", ["a"], ["b"], name="b"),
             helper.make_node("Add", ["a", "b"], ["s"], name="s"),
             helper.make_node("Relu", ["s"], ["y"], name="c")]
    graph = helper.make_graph(nodes, "diamond",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = lepton_edge.load(helper.make_model(graph,
                                               opset_imports=[helper.make_opsetid("", 17)]))
    plan = lepton_edge.partition(model, ["cpu", "fakeacc"])
    assert [(sg.target, sg.nodes) for sg in plan.subgraphs] == [
        ("fakeacc", ("a",)), ("cpu", ("b", "s")), ("fakeacc", ("c",))]
    assert [sg.level for sg in plan.subgraphs] == [0, 1, 2]


def test_registry_rejects_duplicates_and_names_known_targets() -> None:
    with pytest.raises(TargetError, match="already registered"):
        register(TargetPlugin(name="fakeacc", priority=1, description="",
                              target="x:Y", device="x:Y"))
    with pytest.raises(TargetError, match=r"unknown target 'tpu'; known targets: .*cpu.*fakeacc"):
        get_plugin("tpu")
    with pytest.raises(TargetError, match="no targets given"):
        lepton_edge.partition(lepton_edge.load(conv_model()), [])
    register(TargetPlugin(name="broken", priority=1, description="", target="no_such_mod:T",
                          device="no_such_mod:D"))
    try:  # registering is cheap; the missing toolchain shows only when the target is used
        with pytest.raises(TargetError, match="target 'broken' cannot be used here"):
            get_plugin("broken").make_target()
    finally:
        unregister("broken")


def test_runtime_imports_nothing_from_the_compiler(build) -> None:
    celu = helper.make_node("Celu", ["f"], ["g"], name="celu")
    path, _ = build(lepton_edge.load(conv_model(celu)), ["cpu"])
    code = (
        "import sys, numpy as np, lepton_edge.runtime as rt\n"
        f"s = rt.load({str(path)!r}, self_test=True)\n"
        "s.run({'x': np.zeros((1, 2, 6, 6), np.float32)})\n"
        # tvm's own package imports tvm.relax, and tvm_ffi imports torch when it is installed;
        # neither is ours to prevent. lepton-edge's compiler side and onnx must stay out.
        "bad = [m for m in sys.modules if m.split('.')[0] == 'onnx' or"
        " m in ('lepton_edge.model', 'lepton_edge.compiler', 'lepton_edge.plan',"
        " 'lepton_edge.lowering.relax', 'tvm.relax.frontend.onnx')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_failed_tvm_build_falls_back_to_onnxruntime_and_is_recorded(build, monkeypatch) -> None:
    from lepton_edge.lowering import relax

    def refuse(proto: onnx.ModelProto) -> None:
        raise TargetError("TVM could not import the graph: simulated converter bug")

    monkeypatch.setattr(relax, "import_onnx", refuse)
    model = lepton_edge.load(conv_model())
    with pytest.warns(UserWarning, match="sg0 runs on onnxruntime because every build failed"):
        art = lepton_edge.compile(model, ["cpu"])
    assert art.builds == [("sg0", "onnxruntime", "onnxruntime")]
    assert "simulated converter bug" in art.manifest["subgraphs"][0]["build_errors"]["cpu"]
    assert "cpu build failed: TVM could not import" in art.summary()
    with pytest.raises(TargetError, match="could not be built: cpu: TVM could not import"):
        lepton_edge.compile(model, ["cpu"], fallback=False)


def test_a_build_returning_a_wrong_shape_is_an_error_not_an_answer(build, monkeypatch) -> None:
    from lepton_edge_targets.cpu import device

    _, session = build(lepton_edge.load(conv_model()), ["cpu"])
    real = device.TvmVmExecutable.run
    monkeypatch.setattr(device.TvmVmExecutable, "run",
                        lambda self, inputs: [o[:, :3] for o in real(self, inputs)])
    with pytest.raises(DeviceError, match=r"returned wrong outputs \(output 'y' is "
                                          r"float32\[2, 3\], expected float32\[2, 4\]\)"):
        session.run(feeds(2))


class SimulatedDevice(FakeDevice):
    """Like an FPGA C simulation: runs builds, but must never stand in for hardware silently."""

    explicit_only = True


def test_explicit_only_device_is_used_only_when_named(build) -> None:
    unregister("fakeacc")
    register(TargetPlugin(name="fakeacc", priority=50, description="simulated accelerator",
                          target=f"{__name__}:FakeTarget", device=f"{__name__}:SimulatedDevice"))
    model = lepton_edge.load(conv_model())
    path, session = build(model, ["cpu", "fakeacc"])
    assert session.placement["sg0"].device == "cpu:0"
    assert "used only when named in devices=" in session.placement["sg0"].reason
    named = lepton_edge.runtime.load(path, devices=["fakeacc", "cpu"])
    assert named.placement["sg0"].device == "fakeacc:0"
    f = feeds(2)
    assert_close(named.run(f), ort_run(model.proto, f))
