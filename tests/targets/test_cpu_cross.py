"""The CPU target's AArch64 cross build (profile rpi4) on a non-AArch64 host.

The build must be an AArch64 ELF shared object, the runtime on this machine must refuse it
with a DeviceError (not crash loading a foreign-arch library), and a missing cross compiler
must be a TargetError naming the Debian package to install.
"""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge.target import Profile, host_arch, profiles

EM_AARCH64 = 183
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_DYN = 3

pytestmark = pytest.mark.skipif(
    host_arch() == "aarch64", reason="cross-build tests need a non-AArch64 host")


def conv_relu() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32),
                                "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def elf_header(data: bytes) -> dict[str, int]:
    """The ELF identification and e_type/e_machine of a 64-bit little-endian object."""
    assert len(data) >= 64, "too short for an ELF64 header"
    assert data[:4] == b"\x7fELF", f"not an ELF file (starts with {data[:4]!r})"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    return {"class": data[4], "data": data[5], "type": e_type, "machine": e_machine}


@pytest.fixture(scope="module")
def rpi4() -> Profile:
    return profiles()["rpi4"]


@pytest.fixture(scope="module")
def rpi4_artifact(rpi4: Profile, tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = rpi4.get("cross_compiler")
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not on PATH; install the Debian package "
                    f"{rpi4.get('package')} (apt-get install {rpi4.get('package')})")
    # fallback=False: a failed cross build must fail here, not turn into an onnxruntime build.
    art = lepton_edge.compile(conv_relu(), ["rpi4"], fallback=False)
    return art.save(tmp_path_factory.mktemp("cross") / "conv_relu.lepton")


def test_rpi4_build_is_aarch64_shared_object(rpi4_artifact: Path) -> None:
    with zipfile.ZipFile(rpi4_artifact) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        builds = [b for sg in manifest["subgraphs"] for b in sg["builds"]]
        assert [(b["target"], b["profile"]) for b in builds] == [("cpu", "rpi4")]
        build = builds[0]
        assert build["meta"]["arch"] == "aarch64"
        header = elf_header(zf.read(build["files"]["lib.so"]))
    assert header["class"] == ELFCLASS64
    assert header["data"] == ELFDATA2LSB
    assert header["type"] == ET_DYN
    assert header["machine"] == EM_AARCH64


def test_runtime_refuses_aarch64_build_on_this_host(rpi4_artifact: Path) -> None:
    with pytest.raises(lepton_edge.DeviceError, match="build is for aarch64"):
        lepton_edge.runtime.load(rpi4_artifact)


def test_missing_cross_compiler_names_package() -> None:
    from lepton_edge_targets.cpu.compile import CpuTarget

    profile = Profile(name="fake-a72", target="cpu", description="", settings={
        "arch": "aarch64", "cross_compiler": "no-such-g++", "package": "g++-no-such",
        "triple": "aarch64-linux-gnu", "mcpu": "cortex-a72"})
    with pytest.raises(lepton_edge.TargetError, match=r"no-such-g\+\+.*apt install g\+\+-no-such"):
        CpuTarget().compile(conv_relu(), profile)


def test_missing_cross_compiler_through_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import lepton_edge_targets.cpu.compile as cpu_compile

    monkeypatch.setattr(cpu_compile.shutil, "which", lambda _name: None)
    with pytest.raises(lepton_edge.TargetError, match="g\\+\\+-aarch64-linux-gnu"):
        lepton_edge.compile(conv_relu(), ["rpi4"], fallback=False)
