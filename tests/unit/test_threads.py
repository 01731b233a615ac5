"""lepton_edge.threads: TVM's pool gets the physical cores, not TVM's x86 guess (half the CPUs)."""

from __future__ import annotations

import os
import subprocess
import sys

from lepton_edge import threads


def test_physical_cores_is_within_the_usable_cpus():
    assert 1 <= threads.physical_cores() <= len(os.sched_getaffinity(0))


def test_a_user_setting_is_kept_and_a_missing_one_is_filled(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "7")
    threads.default_tvm_threads()
    assert os.environ["TVM_NUM_THREADS"] == "7"
    monkeypatch.delenv("TVM_NUM_THREADS")
    threads.default_tvm_threads()
    assert os.environ["TVM_NUM_THREADS"] == str(threads.physical_cores())


def test_tvm_pool_uses_the_physical_cores_after_import():
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = ("import lepton_edge, tvm; from lepton_edge.threads import physical_cores; "
            "print(tvm.get_global_func('runtime.NumThreads')(), physical_cores())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == out[1], out
