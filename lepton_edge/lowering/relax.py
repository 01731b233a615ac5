"""ONNX subgraph -> Relax IRModule -> compiled shared library, with TVM 0.27's API.

Every TVM compiler API name lepton-edge uses lives here (and in the targets' compile files),
so a TVM upgrade is one small change. The runtime side uses only `tvm.runtime`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import onnx

from lepton_edge.errors import TargetError


def supported_onnx_ops() -> frozenset[str]:
    """The ONNX op types TVM's Relax ONNX importer has a converter for."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return frozenset(onnx_frontend._get_convert_map())  # noqa: SLF001 - no public listing


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def system_cpu() -> str:
    """LLVM's name for this machine's CPU (e.g. "znver3", "skylake-avx512")."""
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def import_onnx(proto: onnx.ModelProto) -> Any:
    """Import a standalone ONNX (sub)graph into a Relax IRModule, weights as constants."""
    from lepton_edge.lowering import dynamic_ops, onnx_fixups

    try:
        # fold constant shape arithmetic, replace ops TVM lacks or gets wrong (onnx_fixups.py)
        proto = onnx_fixups.apply(proto)
        # TVM's importer, plus converters for axes/pads/k/... given at run time (dynamic_ops.py)
        return dynamic_ops.from_onnx(proto)
    except Exception as exc:  # noqa: BLE001 - the importer raises anything; name it for the user
        raise TargetError(f"TVM could not import the graph: {_first_line(exc)}") from exc


def lower_int8(mod: Any) -> tuple[Any, Any]:
    """Rewrite recognised QDQ patterns to integer kernels (see lowering/int8.py)."""
    from lepton_edge.lowering.int8 import lower_qdq_to_integer

    try:
        return lower_qdq_to_integer(mod)
    except Exception as exc:  # noqa: BLE001 - a pass bug must not pass silently
        raise TargetError(f"int8 lowering failed: {_first_line(exc)}") from exc


def build_llvm_library(
    mod: Any, target: dict[str, Any], cross_compiler: str | None = None, *,
    tune_trials: int | None = None, tuning_db: str | None = None,
    log: Any = None,
) -> bytes:
    """Compile a Relax module for an LLVM target and return the exported shared library.

    With `tune_trials` (0 = only apply the database) the kernels are tuned with MetaSchedule
    against the persistent database `tuning_db` (default ~/.cache/lepton-edge/tuning/...).
    """
    import tvm
    from tvm.support import cc

    if tune_trials is not None:
        from pathlib import Path as _Path

        from lepton_edge.lowering.tuning import tune_and_build

        executable = tune_and_build(mod, tvm.target.Target(target), trials=tune_trials,
                                    database_dir=_Path(tuning_db) if tuning_db else None,
                                    log=log)
    else:
        try:
            executable = _compile_untuned(mod, tvm.target.Target(target), log)
        except Exception as exc:  # noqa: BLE001
            raise TargetError(f"TVM failed to compile for {target}: {_first_line(exc)}"
                              ) from exc
    with tempfile.TemporaryDirectory(prefix="lepton-build-") as tmp:
        path = Path(tmp) / "lib.so"
        fcompile = cc.cross_compiler(cross_compiler) if cross_compiler else None
        try:
            if fcompile is None:
                executable.export_library(str(path))
            else:
                executable.export_library(str(path), fcompile=fcompile)
        except Exception as exc:  # noqa: BLE001
            raise TargetError(f"linking the shared library failed: {_first_line(exc)}") from exc
        return path.read_bytes()


def _compile_untuned(mod: Any, target: Any, log: Any) -> Any:
    """Compile without tuning: TVM's CPU pipeline plus lepton-edge's default schedules
    (lowering/schedules.py), unless LEPTON_DEFAULT_SCHEDULES=0 asks for TVM's plain loops."""
    import os

    import tvm

    if os.environ.get("LEPTON_DEFAULT_SCHEDULES", "1") == "0":
        return tvm.compile(mod, target=target)
    from lepton_edge.lowering.schedules import cpu_pipeline

    return tvm.compile(mod, target=target, relax_pipeline=cpu_pipeline(target, log=log))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the message after a traceback dump; the last line is the useful one.
    return (lines[-1] if lines else type(exc).__name__)[:500]
