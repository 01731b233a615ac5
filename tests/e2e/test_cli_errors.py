"""The `lepton-edge` command as a user runs it: a real process, its exit code and its output.

User errors are one `error: ...` line on stderr and exit 1; usage errors exit 2; no traceback
unless --debug. One small MLP is compiled in-process once for the module; each command runs
as a subprocess of the installed console script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

import lepton_edge
from tests.conftest import mlp
from lepton_edge import cli


def unknown_ops_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Foo", ["x"], ["a"], name="foo"),
             helper.make_node("Bar", ["a"], ["b"], name="bar"),
             helper.make_node("Baz", ["b"], ["y"], name="baz", domain="com.acme")]
    graph = helper.make_graph(
        nodes, "unknown_ops",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.acme", 1)])


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with mlp.onnx, its compiled mlp.lepton and unknown_ops.onnx."""
    folder = tmp_path_factory.mktemp("cli")
    onnx.save_model(mlp(), str(folder / "mlp.onnx"))
    onnx.save_model(unknown_ops_model(), str(folder / "unknown_ops.onnx"))
    lepton_edge.compile(lepton_edge.load(folder / "mlp.onnx"), ["cpu"]).save(
        folder / "mlp.lepton")
    return folder


def lepton_edge_cmd() -> list[str]:
    script = Path(sys.executable).with_name("lepton-edge")
    if script.is_file():
        return [str(script)]
    found = shutil.which("lepton-edge")
    return [found] if found else [sys.executable, "-m", "lepton_edge.cli"]


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", COLUMNS="200")
    return subprocess.run([*lepton_edge_cmd(), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def user_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1 with exactly one `error:` line, the last on stderr, and no traceback."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for word in words:
        assert word in errors[0], f"{word!r} not in {errors[0]!r}"
    return errors[0]


# ----------------------------------------------------------------------------- user errors


def test_compile_missing_model(tmp_path: Path) -> None:
    result = run("compile", "missing.onnx", cwd=tmp_path)
    line = user_error(result, "model file not found", "missing.onnx")
    assert result.stderr.strip() == line, "only the error line"
    assert result.stdout == ""
    assert not (tmp_path / "missing.lepton").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", "compile", "missing.onnx", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "ModelError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model file not found")


def test_compile_not_onnx(tmp_path: Path) -> None:
    (tmp_path / "notes.onnx").write_text("not a model\n")
    user_error(run("compile", "notes.onnx", cwd=tmp_path), "notes.onnx", "ONNX model")


@pytest.mark.parametrize("command", ["compile", "explain"])
def test_unknown_ops_are_all_named(work: Path, command: str) -> None:
    result = run(command, "unknown_ops.onnx", cwd=work)
    user_error(result, "3 unsupported operator(s)", "Foo", "Bar", "Baz (com.acme)")
    assert not (work / "unknown_ops.lepton").exists()


def test_unknown_target_lists_the_known_ones(work: Path, tmp_path: Path) -> None:
    result = run("compile", work / "mlp.onnx", "-t", "tpu", "-o", tmp_path / "x.lepton",
                 cwd=tmp_path)
    user_error(result, "unknown target or profile 'tpu'", "targets: ", "cpu", "onnxruntime",
               "profiles: ", "lepton-edge targets")
    assert not (tmp_path / "x.lepton").exists()


def test_run_tampered_artifact(work: Path, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.lepton"
    with zipfile.ZipFile(work / "mlp.lepton") as src, \
            zipfile.ZipFile(tampered, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("lib.so"):
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            dst.writestr(info.filename, data)
    np.save(tmp_path / "x.npy", np.ones((1, 4), np.float32))
    for command in (["run", tampered, "--input", "x=x.npy"], ["inspect", tampered],
                    ["unpack", tampered, tmp_path / "out"]):
        result = run(*command, cwd=tmp_path)
        user_error(result, "does not match its sha256", "lib.so", "recompile")
    assert not (tmp_path / "out").exists()


def test_inspect_malformed_manifest(work: Path, tmp_path: Path) -> None:
    """A manifest edited to drop what `inspect` reads is a user error, not a KeyError."""
    edited = tmp_path / "edited.lepton"
    with zipfile.ZipFile(work / "mlp.lepton") as src, \
            zipfile.ZipFile(edited, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "manifest.json":
                manifest = json.loads(data)
                del manifest["subgraphs"][0]["builds"][0]["priority"]
                data = json.dumps(manifest).encode()
            dst.writestr(info.filename, data)
    user_error(run("inspect", edited, cwd=tmp_path), "manifest.json is malformed",
               "lacks a target, priority or files")


def test_run_garbage_artifact(tmp_path: Path) -> None:
    (tmp_path / "junk.lepton").write_bytes(b"\x00junk" * 100)
    user_error(run("run", "junk.lepton", "--check", cwd=tmp_path),
               "is not a lepton-edge artifact or is corrupt")


def test_run_wrong_dtype(work: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "wrong_dtype.npy", np.ones((2, 4), np.float64))
    result = run("run", work / "mlp.lepton", "--input", "x=wrong_dtype.npy", cwd=tmp_path)
    user_error(result, "input 'x' has dtype float64, expected float32", ".astype('float32')")
    assert result.stdout == ""


def test_unpack_into_a_non_empty_folder(work: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    user_error(run("unpack", work / "mlp.lepton", tmp_path, cwd=tmp_path), "is not empty")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("args", [[], ["compile"], ["frobnicate"], ["run", "a", "--bogus"]])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = run(*args, cwd=tmp_path) if args else run("--bogus-flag", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Usage:" in result.stderr or "Error:" in result.stderr


def test_main_maps_user_errors_in_process(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["compile", "missing.onnx"])
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: model file not found: missing.onnx\n"


# ----------------------------------------------------------------------------- happy paths


def test_inspect(work: Path) -> None:
    result = run("inspect", "mlp.lepton", cwd=work)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mlp.lepton: verified (5 files" in out and "schema 1" in out
    assert "inputs: x: float32[N, 4]" in out and "outputs: y: float32[N, 3]" in out
    assert "build cpu [" in out and "golden cases: 2" in out


def test_run_check_and_write_outputs(work: Path, tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = run("run", work / "mlp.lepton", "--check", "--input", "x=x.npy",
                 "--output", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "self-test PASS on 2 golden case(s)" in result.stdout
    assert "y: float32[6, 3]" in result.stdout
    assert "placed sg0 -> " in result.stderr
    got = np.load(tmp_path / "out" / "y.npy", allow_pickle=False)
    session = onnxruntime.InferenceSession(mlp().SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(["y"], {"x": x})[0], rtol=1e-4, atol=1e-6)


def test_unpack(work: Path, tmp_path: Path) -> None:
    dest = tmp_path / "unpacked"
    result = run("unpack", work / "mlp.lepton", dest, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "extracted 5 verified files and the manifest" in result.stdout
    with zipfile.ZipFile(work / "mlp.lepton") as zf:
        for info in zf.infolist():
            assert (dest / info.filename).read_bytes() == zf.read(info), info.filename
    extracted = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert extracted == sorted(["manifest.json", "builds/sg0/cpu/lib.so",
                                "golden/0/inputs/0.npy", "golden/0/outputs/0.npy",
                                "golden/1/inputs/0.npy", "golden/1/outputs/0.npy"])


def test_targets_lists_cpu(tmp_path: Path) -> None:
    result = run("targets", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "targets:" in result.stdout and "cpu" in result.stdout
    assert "profiles (use with -t):" in result.stdout
