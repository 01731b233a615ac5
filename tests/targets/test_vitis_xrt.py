"""The vitis device on a board: the generated pyxrt host binding, checked against a fake pyxrt.

No XRT exists here. The fake module (injected into sys.modules by these tests only) records
every call and stands in for the board with the build's own C-simulation library acting as
the kernel: buffers have separate host and device copies, so a missing sync loses the data.
"""

from __future__ import annotations

import ctypes
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

import lepton_edge
from lepton_edge.errors import DeviceError
from lepton_edge_targets.vitis.device import VitisDevice
from tests.targets.test_vitis import cpu_reference, vitis_registered  # noqa: F401
from tests.targets.test_vitis_kernels import two_input_model

rng = np.random.default_rng(5)


def fake_pyxrt(csim: Path, kernel: str, log: list[tuple]) -> types.ModuleType:
    """A pyxrt whose xclbin holds `kernel`, run by the C-simulation library `csim`."""
    mod = types.ModuleType("pyxrt")

    class Direction:
        XCL_BO_SYNC_BO_TO_DEVICE = "to_device"
        XCL_BO_SYNC_BO_FROM_DEVICE = "from_device"

    class State:
        ERT_CMD_STATE_COMPLETED = "completed"

    class DeviceInfoKeys:
        name = "name"

    class Device:
        def __init__(self, index: int) -> None:
            log.append(("device", index))

        def get_info(self, key: str) -> str:
            return "xilinx_fake_board"

        def register_xclbin(self, xclbin: Xclbin) -> None:
            log.append(("register_xclbin", xclbin.path))

    class KernelInfo:
        def get_name(self) -> str:
            return kernel

    class Xclbin:
        def __init__(self, path: str) -> None:
            self.path = path
            log.append(("xclbin", path))

        def get_kernels(self) -> list[KernelInfo]:
            return [KernelInfo()]

        def get_uuid(self) -> str:
            return "uuid-1"

    class HwContext:
        def __init__(self, device: Device, uuid: str) -> None:
            log.append(("hw_context", uuid))

    class Bo:
        normal = "normal"

        def __init__(self, device: Device, nbytes: int, flags: str, group: int) -> None:
            self.host = np.zeros(nbytes, np.int8)
            self.device = np.zeros(nbytes, np.int8)
            log.append(("bo", nbytes, flags, group))

        def write(self, data: bytes, offset: int) -> None:
            self.host[offset:offset + len(data)] = np.frombuffer(data, np.int8)

        def sync(self, direction: str) -> None:
            log.append(("sync", direction))
            if direction == Direction.XCL_BO_SYNC_BO_TO_DEVICE:
                self.device[:] = self.host
            else:
                self.host[:] = self.device

        def read(self, nbytes: int, offset: int) -> np.ndarray:
            return self.host[offset:offset + nbytes].copy()

    class Run:
        def wait(self) -> str:
            log.append(("wait",))
            return State.ERT_CMD_STATE_COMPLETED

    class Kernel:
        def __init__(self, context: HwContext, name: str) -> None:
            log.append(("kernel", name))
            self.lib = ctypes.CDLL(str(csim))
            self.fn = getattr(self.lib, name)

        def group_id(self, arg: int) -> int:
            return 10 + arg

        def __call__(self, *args: object) -> Run:
            *bos, batch = args
            log.append(("run", len(bos), batch))
            self.fn.argtypes = [ctypes.c_void_p] * len(bos) + [ctypes.c_int]
            self.fn(*[bo.device.ctypes.data for bo in bos], batch)  # device memory only
            return Run()

    mod.device, mod.xclbin, mod.hw_context, mod.kernel, mod.bo = (Device, Xclbin, HwContext,
                                                                  Kernel, Bo)
    mod.xclBOSyncDirection, mod.ert_cmd_state = Direction, State
    mod.xrt_info_device = DeviceInfoKeys
    mod.enumerate_devices = lambda: 1
    return mod


@pytest.fixture()
def artifact(tmp_path: Path) -> tuple[Path, Path, object, str]:
    """A two-input, two-output kernel compiled for cpu + zcu104, its csim.so on disk, the
    model (its weights are random: the reference must use the same one), the kernel name."""
    model = two_input_model()
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu", "zcu104"])
    path = art.save(tmp_path / "m.lepton")
    (sg,) = art.manifest["subgraphs"]
    kernel = next(b for b in sg["builds"] if b["target"] == "vitis")["meta"]["kernel"]
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("vitis/csim.so"))
        csim = tmp_path / "csim.so"
        csim.write_bytes(z.read(name))
    return path, csim, model, kernel


def test_no_xrt_here_is_reported_and_the_board_is_absent(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyxrt", None)  # import pyxrt -> ImportError
    infos = {i.name: i for i in VitisDevice().probe()}
    assert not infos["vitis-xrt"].present
    assert "pyxrt cannot be imported" in infos["vitis-xrt"].reason
    assert infos["fpga-sim:0"].details["simulation"] is True
    assert infos["fpga-sim:0"].details["hardware_present"] is False


def test_board_runs_the_generated_pyxrt_host_code(artifact, tmp_path: Path,
                                                  monkeypatch) -> None:
    path, csim, model, kernel = artifact
    log: list[tuple] = []
    monkeypatch.setitem(sys.modules, "pyxrt", fake_pyxrt(csim, kernel, log))
    xclbin = tmp_path / f"{kernel}.xclbin"
    xclbin.write_bytes(b"not a real xclbin: the fake pyxrt never reads it")
    monkeypatch.setenv("LEPTON_VITIS_XCLBIN", str(xclbin))
    session = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    assert [p.device for p in session.placement.values()] == ["vitis-xrt:0"]
    feeds = {n: rng.integers(-128, 128, (6, 16)).astype(np.int8) for n in ("a", "b")}
    got = session.run(feeds)
    want = cpu_reference(model, tmp_path).run(feeds)
    for name in ("y", "sq"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    # the call sequence: open, register, context, kernel; per run: one buffer per port in
    # its bank, inputs written and synced to the device, run(batch), wait, outputs synced back
    setup = log[:6]  # probe opens device 0 for its name, then the load
    assert setup == [("device", 0), ("device", 0), ("xclbin", str(xclbin)), ("register_xclbin", str(xclbin)),
                     ("hw_context", "uuid-1"), ("kernel", kernel)]
    run = log[6:]
    assert run == [("bo", 96, "normal", 10), ("sync", "to_device"),
                   ("bo", 96, "normal", 11), ("sync", "to_device"),
                   ("bo", 48, "normal", 12), ("bo", 96, "normal", 13),
                   ("run", 4, 6), ("wait",), ("sync", "from_device"), ("sync", "from_device")]


def test_board_without_xclbin_never_runs_the_simulation_silently(artifact, monkeypatch) -> None:
    path, csim, _, kernel = artifact
    monkeypatch.setitem(sys.modules, "pyxrt", fake_pyxrt(csim, kernel, []))
    monkeypatch.delenv("LEPTON_VITIS_XCLBIN", raising=False)
    monkeypatch.delenv("LEPTON_VITIS_SIMULATE", raising=False)
    session = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    (placement,) = session.placement.values()
    assert placement.device == "cpu:0"
    assert "no xclbin for this build" in placement.reason
    assert "C simulation never stands in" in placement.reason
    with pytest.raises(DeviceError, match="no xclbin for this build"):
        lepton_edge.runtime.load(path, devices=["vitis", "cpu"], fallback=False)
    monkeypatch.setenv("LEPTON_VITIS_SIMULATE", "1")  # the simulation, asked for on purpose
    session = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    assert [p.device for p in session.placement.values()] == ["fpga-sim:0"]


def test_xclbin_of_another_kernel_is_refused_not_run(artifact, tmp_path: Path,
                                                     monkeypatch) -> None:
    """LEPTON_VITIS_XCLBIN as a folder; an xclbin without this build's kernel is refused by
    name (it would run other weights and ports), and the subgraph falls back aloud."""
    path, csim, _, kernel = artifact
    monkeypatch.setitem(sys.modules, "pyxrt", fake_pyxrt(csim, "lepton_0123456789ab", []))
    folder = tmp_path / "xclbins"
    folder.mkdir()
    monkeypatch.setenv("LEPTON_VITIS_XCLBIN", str(folder))
    session = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    (placement,) = session.placement.values()
    assert placement.device == "cpu:0" and f"folder with {kernel}.xclbin" in placement.reason
    (folder / f"{kernel}.xclbin").write_bytes(b"x")
    with pytest.warns(RuntimeWarning, match=f"has no kernel {kernel}"):
        session = lepton_edge.runtime.load(path, devices=["vitis", "cpu"])
    assert [p.device for p in session.placement.values()] == ["cpu:0"]
    assert any("loading on vitis-xrt:0 failed" in e for e in session.events)
