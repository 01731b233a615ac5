"""Device discovery reports what is really here, and absent kinds with a reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lepton_edge.runtime.devices import cpu_info, nvidia_gpus, probe_devices


def test_cpu_info_matches_proc_cpuinfo() -> None:
    info = cpu_info()
    assert info.cores >= 1 and info.arch
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((line.split(":", 1)[1].split() for line in f
                      if line.lower().startswith(("flags", "features"))), [])
    assert set(info.isa) <= set(flags) | {"asimd", "asimddp", "sve", "sve2", "i8mm", "bf16"}
    if "avx2" in flags:
        assert "avx2" in info.isa


def test_probe_lists_cpu_present_and_absent_gpus_have_a_reason() -> None:
    probed = {d.kind: d for d in probe_devices()}
    assert probed["cpu"].present and probed["cpu"].details["arch"] == cpu_info().arch
    gpus, reason = nvidia_gpus()
    if not os.path.isdir("/proc/driver/nvidia/gpus"):
        assert gpus == [] and "no NVIDIA driver loaded" in reason


def test_devices_command_json() -> None:
    out = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "devices", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["cpu"]["isa"] == cpu_info().isa
    assert {"gpus", "tvm_cuda", "fpgas", "devices"} <= set(data)
    assert any(d["kind"] == "cpu" and d["present"] for d in data["devices"])
