"""The C++ deployment sample (samples/cpp_deploy) builds with CMake and matches onnxruntime.

The model is compiled straight with TVM here (not through lepton_edge) so that this test checks
only the C++ side: loading a Relax VM library with libtvm_runtime and the .npy I/O.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]


def tiny_model(two_outputs: bool) -> onnx.ModelProto:
    """y = relu(x @ W + B) with a symbolic batch "N"; optionally also returns the pre-activation."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "B")
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])]
    if two_outputs:
        outputs.append(helper.make_tensor_value_info("pre", TensorProto.FLOAT, ["N", 5]))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["mm"]),
         helper.make_node("Add", ["mm", "B"], ["pre"]),
         helper.make_node("Relu", ["pre"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], outputs, [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def compile_to_so(model: onnx.ModelProto, path: Path) -> Path:
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(model, keep_params_in_input=False)
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v2"}))
    ex.export_library(str(path))
    return path


@pytest.fixture(scope="module")
def lepton_deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Configure and build the repo's CMake project; return the lepton_deploy binary."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler (g++) is installed")
    build = tmp_path_factory.mktemp("cpp_build")
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build), f"-DLEPTON_PYTHON={sys.executable}",
                 "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(build), "--target", "lepton_deploy", "-j", "4"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    binary = build / "lepton_deploy"
    assert binary.is_file()
    return binary


def run(binary: Path, *args: Path, **env: str) -> subprocess.CompletedProcess:
    # No LD_LIBRARY_PATH: the binary finds libtvm_runtime/libtvm_ffi through its RUNPATH.
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", **env})


@pytest.mark.parametrize("two_outputs", [False, True], ids=["one_output", "tuple_output"])
def test_cpp_deploy_matches_onnxruntime(lepton_deploy: Path, tmp_path: Path, two_outputs: bool):
    model = tiny_model(two_outputs)
    so = compile_to_so(model, tmp_path / "model.so")
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)

    proc = run(lepton_deploy, so, tmp_path / "x.npy", tmp_path / "y.npy")
    assert proc.returncode == 0, proc.stderr
    got = np.load(tmp_path / "y.npy", allow_pickle=False)

    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    want = session.run(["y"], {"x": x})[0]
    assert got.dtype == np.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_cpp_deploy_thread_pool_gets_the_physical_cores(lepton_deploy: Path, tmp_path: Path):
    """Like lepton_edge/threads.py: TVM_NUM_THREADS = physical cores unless the user set it
    (TVM alone starts half the logical CPUs on x86: 1 on this 2-vCPU VM)."""
    from lepton_edge.threads import physical_cores

    so = compile_to_so(tiny_model(False), tmp_path / "model.so")
    np.save(tmp_path / "x.npy", np.ones((2, 4), np.float32))
    proc = run(lepton_deploy, so, tmp_path / "x.npy", tmp_path / "y.npy")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["threads", str(physical_cores())], proc.stdout
    proc = run(lepton_deploy, so, tmp_path / "x.npy", tmp_path / "y.npy", TVM_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["threads", "1"], proc.stdout


def test_cpp_deploy_rejects_bad_input(lepton_deploy: Path, tmp_path: Path):
    so = compile_to_so(tiny_model(False), tmp_path / "model.so")

    np.save(tmp_path / "x64.npy", np.zeros((3, 4), np.float64))
    proc = run(lepton_deploy, so, tmp_path / "x64.npy", tmp_path / "out.npy")
    assert proc.returncode != 0
    assert "<f8" in proc.stderr and "float32" in proc.stderr, proc.stderr
    assert not (tmp_path / "out.npy").exists()

    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    proc = run(lepton_deploy, so, tmp_path / "junk.npy", tmp_path / "out.npy")
    assert proc.returncode != 0 and "not a .npy file" in proc.stderr, proc.stderr

    np.save(tmp_path / "x.npy", np.zeros((3, 4), np.float32))
    proc = run(lepton_deploy, tmp_path / "missing.so", tmp_path / "x.npy", tmp_path / "out.npy")
    assert proc.returncode != 0 and "missing.so" in proc.stderr, proc.stderr
