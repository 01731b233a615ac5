"""Build one ONNX subgraph for a CPU profile with TVM's LLVM backend."""

from __future__ import annotations

import shutil
from typing import Any

import onnx

from lepton_edge.errors import TargetError
from lepton_edge.lowering import relax
from lepton_edge.runtime.devices import cpu_info
from lepton_edge.target import Build, Profile, Target, host_arch
from lepton_edge_targets.cpu import support


class CpuTarget(Target):
    name = "cpu"

    def check_toolchain(self, profile: Profile) -> None:
        cross = profile.get("cross_compiler")
        if profile.get("arch", host_arch()) != host_arch():
            if not cross:
                raise TargetError(f"profile '{profile.name}' cross-compiles but names no compiler")
            if shutil.which(cross) is None:
                raise TargetError(
                    f"profile '{profile.name}' needs the cross compiler '{cross}', not found on "
                    f"PATH; install it (Debian: apt install {profile.get('package', cross)})"
                )

    def unsupported_reason(self, node: onnx.NodeProto, graph: Any) -> str | None:
        return support.unsupported_reason(node, graph)

    def notes(self, subgraph: onnx.ModelProto, profile: Profile | None = None) -> list[str]:
        del profile  # the int8 kernels do not depend on the CPU profile
        if not _has_qdq(subgraph):
            return []
        _, lowering = relax.lower_int8(relax.import_onnx(subgraph))
        counts: dict[str, int] = {}
        for kernel in lowering.lowered:
            counts[kernel.split(" ")[0]] = counts.get(kernel.split(" ")[0], 0) + 1
        lines = ["int8 kernels: " + (", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                                     or "none")]
        lines += [f"QDQ left as float: {why}" for why in lowering.kept_float]
        return lines

    def llvm_target(self, profile: Profile) -> tuple[dict[str, Any], dict[str, Any]]:
        """The TVM target dict for `profile`, and the facts a device checks before loading."""
        arch = profile.get("arch", host_arch())
        mcpu = profile.get("mcpu", "native")
        requires = list(profile.get("requires", []))
        if mcpu == "native":
            if arch != host_arch():
                raise TargetError(f"profile '{profile.name}': mcpu 'native' needs arch {arch}")
            mcpu = relax.system_cpu()
            # A native build uses every ISA extension this CPU has; the device must have them.
            requires = cpu_info().isa
        target: dict[str, Any] = {"kind": "llvm", "mcpu": mcpu}
        if profile.get("triple"):
            target["mtriple"] = profile.get("triple")
        if profile.get("mattr"):
            target["mattr"] = list(profile.get("mattr"))
        meta = {"arch": arch, "mcpu": mcpu, "requires": requires,
                "triple": profile.get("triple", "")}
        return target, meta

    def compile(self, subgraph: onnx.ModelProto, profile: Profile) -> Build:
        self.check_toolchain(profile)
        target, meta = self.llvm_target(profile)
        mod = relax.import_onnx(subgraph)
        lowering = None
        packed: list[str] = []
        kernels: list[str] = []  # packed[i]'s kernel name ("" when left as it was)
        if _has_qdq(subgraph):
            # x86: the exact float64 requantization where accumulators allow it (int8.py)
            mod, lowering = relax.lower_int8(mod, float_requantize=meta["arch"] == "x86_64")
        cross = profile.get("cross_compiler") if meta["arch"] != host_arch() else None
        trials = profile.get("tune")
        tuning_db = profile.get("tuning_db")
        if lowering is not None and meta["arch"] == "x86_64" and not trials and not tuning_db \
                and _use_dot_kernels(target):
            # untuned build; a tuned one packs after specialising the batch (tuning.py)
            mod, packed = _x86_dot_product_kernels(mod, target, kernels)
        if trials and cross:
            raise TargetError(
                f"cannot tune the cross build for '{profile.name}' here: kernels must be "
                "measured on the device itself; compile with tune=0 (--tune 0), or tune on the "
                "device and pass its database with tuning_db")
        tune = trials if trials else (0 if tuning_db else None)
        # untuned: static entry functions for the batch sizes most calls use (a tuned build
        # specialises its own buckets, tuning.py)
        entries = _batch_entries(profile) if tune is None else None
        from lepton_edge.lowering.schedules import ScheduleReport

        report = ScheduleReport()  # which rule scheduled each kernel (int8_dot_kernels)
        library = relax.build_llvm_library(mod, target, cross_compiler=cross, tune_trials=tune,
                                           tuning_db=tuning_db, log=profile.get("log"),
                                           report=report, batch_entries=entries)
        if cross is None:
            _check_loadable(library)
        if tune is not None:
            meta["tuned"] = {"trials": int(trials or 0), "database": str(tuning_db or "default")}
        if entries is not None and entries.made:  # the runtime calls them for their shapes
            meta["batch_entries"] = entries.made
            if profile.get("log") is not None:
                profile.get("log")("static batch entries: " + ", ".join(
                    f"{e['function']} (inputs {e['inputs']})" for e in entries.made))
        if entries is not None and entries.error:
            import warnings

            warnings.warn(f"no static batch {list(entries.sizes)} entry for this CPU build "
                          f"(those batches run the symbolic main, a little slower): "
                          f"{entries.error}", stacklevel=2)
        meta["tvm_target"] = target
        meta["tvm"] = relax.tvm_version()
        if lowering is not None:
            meta["int8_kernels"] = lowering.lowered
            meta["qdq_kept_float"] = lowering.kept_float
            if packed:  # what ran: a kernel no int8 rule scheduled says so
                from lepton_edge.lowering import x86_int8

                meta["int8_dot_kernels"] = x86_int8.scheduled_notes(packed, kernels,
                                                                    report.rules)
        return Build(target=self.name, profile=profile.name, files={"lib.so": library}, meta=meta)


def _batch_entries(profile: Profile) -> Any:
    """tuning.BatchEntries for the profile's `batch_buckets` (default: batch 1); None for ()."""
    from lepton_edge.lowering.tuning import UNTUNED_BUCKETS, BatchEntries

    sizes = profile.get("batch_buckets")
    sizes = UNTUNED_BUCKETS if sizes is None else tuple(sizes)
    return BatchEntries(sizes) if sizes else None


def _check_loadable(library: bytes) -> None:
    """Load the built library once, so a build the TVM runtime cannot load fails here (the
    subgraph then runs on onnxruntime) rather than on the device. (Zero-size constants, which
    TVM 0.27 writes but cannot read back, are mostly removed at import: lowering/relax.py.)"""
    import tempfile
    from pathlib import Path

    import tvm

    with tempfile.TemporaryDirectory(prefix="lepton-check-") as tmp:
        path = Path(tmp) / "lib.so"
        path.write_bytes(library)
        try:
            tvm.runtime.load_module(str(path))
        except Exception as exc:  # noqa: BLE001 - TVM raises its own error kinds
            text = str(exc).strip().splitlines()
            raise TargetError(
                "the TVM runtime cannot load the built library: "
                f"{text[-1] if text else type(exc).__name__}") from None


def _x86_dot_product_kernels(mod: Any, target: dict[str, Any], kernels: list[str]
                             ) -> tuple[Any, list[str]]:
    """uint8 x int8 matmul/conv2d -> packed-weight kernels (lowering/x86_int8.py). The
    default-schedule pass (lowering/schedules.py) tensorizes them with VNNI `vpdpbusd`, or
    the exact AVX2 equivalent, through x86_int8.int8_rules after fusing their epilogues."""
    import tvm

    from lepton_edge.lowering import x86_int8

    try:  # the target picks the layout (AVX2 without VNNI: int16 matmuls)
        return x86_int8.pack_int8_kernels(mod, tvm.target.Target(target), kernels)
    except Exception as exc:  # noqa: BLE001 - a pass bug must not pass silently
        raise TargetError(f"x86 int8 kernel packing failed: {str(exc).strip()[-500:]}") from exc


def _use_dot_kernels(target: dict[str, Any]) -> bool:
    import tvm

    from lepton_edge.lowering import x86_int8

    return x86_int8.use_dot_kernels(tvm.target.Target(target), untuned=True)


def _has_qdq(subgraph: onnx.ModelProto) -> bool:
    """Only graphs with QuantizeLinear/DequantizeLinear need the integer lowering pass."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in subgraph.graph.node)
