"""How many threads TVM's CPU thread pool starts with.

TVM 0.27 sizes its pool as half the logical CPU count on x86 (it assumes every core has two
hyper-threads), so on a VM with 2 vCPUs and 1 thread per core every compiled kernel ran on
one thread: BERT-base took 321 ms instead of 180 ms here. lepton-edge sets TVM_NUM_THREADS to
the physical cores this process may run on, before TVM is imported, unless the user set it.
"""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process may use (Linux sysfs topology;
    elsewhere the logical CPU count)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))  # no topology: count the CPU itself
    return max(1, len(cores))


def default_tvm_threads() -> None:
    """TVM_NUM_THREADS = physical_cores(), unless already set (by the user, or for a bench)."""
    if not os.environ.get("TVM_NUM_THREADS"):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
