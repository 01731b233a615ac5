"""Session: a loaded artifact with every subgraph placed on a device, ready to run.

Placement takes, for each subgraph, the highest-priority build whose device is present and
compatible (ISA features, architecture, runtime version). With `fallback=True` a device that
fails to load a build, or fails while running, hands that subgraph to its next build once;
the event is recorded in `session.events` and warned about, and the request is re-run there,
so no request is lost. With `fallback=False` anything but the first-choice build raises.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lepton_edge import artifact as artifact_format
from lepton_edge.errors import ArtifactError, DeviceError, LeptonError, TargetError
from lepton_edge.signature import (
    NARROW_DTYPES,
    TENSOR,
    FeedChecker,
    TensorSpec,
    numpy_dtype,
)
from lepton_edge.target import DeviceInfo, Executable, get_plugin, plugins


class SelfTestError(LeptonError):
    """The artifact's golden outputs were not reproduced on this device."""


@dataclass
class Placement:
    subgraph: str
    target: str
    device: str
    reason: str
    rejected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.subgraph} -> {self.device} ({self.target}): {self.reason}"


@dataclass(frozen=True)
class SelfTestReport:
    """Golden replay: per output, the worst absolute and relative error over all cases."""

    cases: int
    max_abs: dict[str, float]
    max_rel: dict[str, float]
    tolerance: float
    # outputs of int8 models: one quantization step of difference is allowed there
    quant_step: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.max_rel[name] <= self.tolerance
                   or self.max_abs[name] <= self.quant_step.get(name, 0.0) * (1 + 1e-5)
                   for name in self.max_rel)

    def __str__(self) -> str:
        parts = [f"{name}: max abs {self.max_abs[name]:.3g}, max rel {self.max_rel[name]:.3g}"
                 + (f" (int8 step {self.quant_step[name]:.3g})" if name in self.quant_step
                    else "") for name in self.max_rel]
        verdict = "PASS" if self.passed else "FAIL"
        return (f"self-test {verdict} on {self.cases} golden case(s) (tolerance "
                f"{self.tolerance:g}): " + "; ".join(parts))


@dataclass
class _Choice:
    build: dict[str, Any]
    info: DeviceInfo
    reason: str


class _PlacedSubgraph:
    def __init__(self, spec: dict[str, Any], choices: list[_Choice], rejected: list[str]
                 ) -> None:
        self.rejected = rejected  # builds whose device is absent or incompatible, and why
        self.id: str = spec["id"]
        self.inputs: list[str] = spec["inputs"]
        self.outputs: list[str] = spec["outputs"]
        self.choices = choices  # best first; the first one is loaded
        self.executable: Executable | None = None


def load(
    path: str | Path,
    devices: list[str] | None = None,
    *,
    fallback: bool = True,
    self_test: bool = False,
    tolerance: float | None = None,
) -> Session:
    """Verify the artifact at `path`, place its subgraphs and return a ready Session.

    `devices` limits placement to these device kinds (e.g. ["cpu"]); kinds that run only when
    named (the FPGA C simulation) must be listed here. With `self_test` the golden inputs are
    replayed and a SelfTestError raised if any output differs by more than `tolerance`
    (relative to the largest reference value; by default 1e-4, or 1e-2 for int8 models, whose
    integer kernels may round an intermediate one step away from ONNX's float QDQ semantics).
    """
    session = Session(artifact_format.read(path), devices=devices, fallback=fallback)
    if self_test:
        report = session.self_test(tolerance)
        if not report.passed:
            raise SelfTestError(f"{Path(path).name}: {report}")
    return session


class Session:
    """Runs a placed artifact. `inputs`, `outputs` and `placement` describe it."""

    def __init__(self, verified: artifact_format.VerifiedArtifact,
                 devices: list[str] | None = None, fallback: bool = True) -> None:
        self._artifact = verified
        self._fallback = fallback
        manifest = verified.manifest
        self.manifest = manifest
        self.inputs = tuple(TensorSpec.from_json(s) for s in manifest["inputs"])
        self.outputs = tuple(TensorSpec.from_json(s) for s in manifest["outputs"])
        self._check_feeds = FeedChecker(self.inputs)
        # Outputs that are all plain (not narrow) tensors: a call whose bound symbols and
        # output dtypes/shapes equal those of an already checked call needs no new check.
        self._plain_outputs = all(s.kind == TENSOR and s.dtype not in NARROW_DTYPES
                                  for s in self.outputs)
        self._checked: set[tuple[Any, ...]] = set()
        self.events: list[str] = []
        self._lock = threading.Lock()
        self._dir = Path(tempfile.mkdtemp(prefix="lepton-session-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
        self._probed: dict[str, list[DeviceInfo]] = {}
        self._allowed = set(devices) if devices is not None else None
        if devices is not None:
            unknown = sorted(set(devices) - set(plugins()))
            if unknown:
                raise DeviceError(f"unknown device kind(s) {unknown}; known: "
                                  f"{', '.join(sorted(plugins()))}")
        self._subgraphs = self._place(manifest["subgraphs"])
        for sg in self._subgraphs:
            self._load_first(sg)
        # One subgraph computing exactly the model's outputs, in order (most compiled
        # models): run() takes its results as the outputs, without the name table
        self._output_names = [spec.name for spec in self.outputs]
        self._direct = (self._plain_outputs and len(self._subgraphs) == 1
                        and list(self._subgraphs[0].outputs) == self._output_names)

    # ------------------------------------------------------------------ placement
    def _devices(self, kind: str) -> list[DeviceInfo]:
        if kind not in self._probed:
            device = get_plugin(kind).make_device()
            explicit = self._allowed is not None and kind in self._allowed
            if device.explicit_only and not explicit:
                self._probed[kind] = [DeviceInfo(kind=kind, name=kind, present=False,
                                                 reason="used only when named in devices=")]
            else:
                self._probed[kind] = device.probe()
        return self._probed[kind]

    def _candidates(self, build: dict[str, Any]) -> tuple[DeviceInfo | None, str]:
        kind = build["target"]
        if self._allowed is not None and kind not in self._allowed:
            return None, f"{kind} not in the allowed devices {sorted(self._allowed)}"
        try:
            device = get_plugin(kind).make_device()
            infos = self._devices(kind)
        except TargetError as exc:
            return None, f"target '{kind}' is not available in this runtime: {exc}"
        present = [i for i in infos if i.present]
        if not present:
            why = "; ".join(i.reason for i in infos if i.reason) or "none found"
            return None, f"no {kind} device present ({why})"
        problems = []
        for info in present:
            problem = device.incompatibility(info, build.get("meta", {}))
            if problem is None:
                return info, "highest-priority build whose device is present"
            problems.append(f"{info.name}: {problem}")
        return None, "; ".join(problems)

    def _place(self, specs: list[dict[str, Any]]) -> list[_PlacedSubgraph]:
        placed: list[_PlacedSubgraph] = []
        unplaceable: list[str] = []
        for spec in sorted(specs, key=lambda s: s["level"]):
            builds = sorted(spec["builds"], key=lambda b: -b["priority"])
            choices: list[_Choice] = []
            rejected: list[str] = []
            for build in builds:
                info, reason = self._candidates(build)
                if info is None:
                    rejected.append(f"{build['target']}: {reason}")
                else:
                    choices.append(_Choice(build, info, reason))
            if not choices or (not self._fallback and choices[0].build is not builds[0]):
                unplaceable.append(f"{spec['id']} ({'; '.join(rejected) or 'no builds'})")
                continue
            if rejected:
                choices[0].reason = "fell back: " + "; ".join(rejected)
            placed.append(_PlacedSubgraph(spec, choices, rejected))
        if unplaceable:
            hint = "" if not self._fallback else " and no fallback build could run either"
            raise DeviceError(
                f"cannot place {len(unplaceable)} subgraph(s) on this machine's devices{hint}: "
                + "; ".join(unplaceable)
                + (". Use fallback=True to allow other builds" if not self._fallback else "")
            )
        return placed

    def _load_first(self, sg: _PlacedSubgraph) -> None:
        while sg.choices:
            choice = sg.choices[0]
            try:
                files = self._artifact.extract(list(choice.build["files"].values()), self._dir)
                local = {name: files[path] for name, path in choice.build["files"].items()}
                device = get_plugin(choice.build["target"]).make_device()
                sg.executable = device.load(choice.info, local, choice.build.get("meta", {}))
                return
            except Exception as exc:  # noqa: BLE001 - a device failing to load is reported
                message = f"{sg.id}: loading on {choice.info.name} failed: {exc}"
                if not self._fallback or len(sg.choices) == 1:
                    raise DeviceError(message) from exc
                self._note(message + f"; falling back to {sg.choices[1].info.name}")
                sg.choices.pop(0)
                sg.choices[0].reason = f"fell back after load failure on {choice.info.name}"

    @property
    def placement(self) -> dict[str, Placement]:
        """subgraph id -> where it runs and why."""
        return {sg.id: Placement(sg.id, sg.choices[0].build["target"], sg.choices[0].info.name,
                                 sg.choices[0].reason, list(sg.rejected))
                for sg in self._subgraphs}

    def _note(self, message: str) -> None:
        self.events.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ running
    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run the model; returns every output by name, in the signature's order.

        Tensors are numpy arrays; a sequence input or output is a list of arrays, and an
        absent optional is None (an optional input may also be left out of `feeds`).
        """
        # narrow (ml_dtypes) tensors travel between subgraphs as their uint8 bytes
        # (check_feeds returns them so); `env` is a new dict on every call
        env, symbols = self._check_feeds(feeds)
        if self._direct:
            (sg,) = self._subgraphs
            with self._lock:
                values = [_plain_output(v) for v in
                          self._run_subgraph(sg, [env[name] for name in sg.inputs])]
            return self._checked_result(values, symbols)
        with self._lock:
            for sg in self._subgraphs:
                outputs = self._run_subgraph(sg, [env[name] for name in sg.inputs])
                env.update(zip(sg.outputs, outputs, strict=True))
        if self._plain_outputs:
            return self._checked_result([_plain_output(env[name]) for name in
                                         self._output_names], symbols)
        result = {spec.name: _output_value(spec, env[spec.name]) for spec in self.outputs}
        self._check_outputs(result, symbols)
        return result

    def _checked_result(self, values: list[Any], symbols: dict[str, int]) -> dict[str, Any]:
        """The outputs by name (plain tensors, in the signature's order), checked unless a
        call with the same bound symbols gave the same output types, dtypes and shapes."""
        result = dict(zip(self._output_names, values, strict=True))
        key = (tuple(symbols.items()), *[(type(v), v.dtype, v.shape)
                                         if type(v) is np.ndarray else None for v in values])
        if key not in self._checked:
            self._check_outputs(result, symbols)
            if len(self._checked) >= 64:
                self._checked.clear()
            self._checked.add(key)
        return result

    def _check_outputs(self, result: dict[str, Any], symbols: dict[str, int]) -> None:
        """A build that returns the wrong type, dtype or shape is a bug: say so, never return
        it. Sequence outputs must be lists of arrays, absent optionals None."""
        problems = []
        for spec in self.outputs:
            value = result[spec.name]
            if value is None:
                if not spec.is_optional:
                    problems.append(f"output '{spec.name}' is None, expected {spec.type_str()}")
                continue
            if spec.is_sequence != isinstance(value, list):
                problems.append(f"output '{spec.name}' is a {type(value).__name__}, expected "
                                f"{spec.type_str()}")
                continue
            if spec.is_sequence:
                # Only the element dtype: ONNX records one merged shape for all elements, which
                # inference may take from a declared input that the graph then outgrows (a
                # Loop appending [i]-shaped tensors to a sequence declared of scalars); the
                # elements come from onnxruntime, never from compiled code.
                problems += [f"output '{spec.name}'[{i}] is {_kind_of(v)}, expected "
                             f"{spec.dtype}" for i, v in enumerate(value)
                             if not isinstance(v, np.ndarray) or v.dtype != numpy_dtype(spec.dtype)]
            else:
                problems += _tensor_problem(f"output '{spec.name}'", spec, value, symbols)
        if problems:
            where = ", ".join(str(p) for p in self.placement.values())
            raise DeviceError("the compiled model returned wrong outputs (" + "; ".join(problems)
                              + f"); placement: {where}. This is a compiler bug: please report it "
                              "and run with devices=['onnxruntime'] meanwhile")

    def _run_subgraph(self, sg: _PlacedSubgraph, values: list[Any]) -> list[Any]:
        while True:
            assert sg.executable is not None
            try:
                outputs = sg.executable.run(values)
                if len(outputs) != len(sg.outputs):
                    raise RuntimeError(f"returned {len(outputs)} outputs, expected "
                                       f"{len(sg.outputs)}")
                return outputs
            except LeptonError:
                raise
            except Exception as exc:  # noqa: BLE001 - a device failing mid-run falls back once
                failed = sg.choices[0].info.name
                if not self._fallback or len(sg.choices) == 1:
                    raise DeviceError(f"{sg.id} failed on {failed}: {exc}") from exc
                self._note(f"{sg.id}: {failed} failed while running ({exc}); re-running this "
                           f"request on {sg.choices[1].info.name} and staying there")
                sg.choices.pop(0)
                sg.choices[0].reason = f"fell back after a run failure on {failed}"
                sg.executable = None
                self._load_first(sg)

    def self_test(self, tolerance: float | None = None) -> SelfTestReport:
        """Replay the golden inputs stored at compile time and compare with their outputs.

        The default tolerance is 1e-4 relative, 1e-2 for int8 (QDQ) models; outputs made by a
        DequantizeLinear also pass within one quantization step.
        """
        if tolerance is None:
            tolerance = 1e-2 if self.manifest.get("quantized") else 1e-4
        golden = self.manifest.get("golden", [])
        if not golden:
            raise ArtifactError("this artifact carries no golden inputs to check against")
        max_abs: dict[str, float] = {}
        max_rel: dict[str, float] = {}
        specs = {s.name: s for s in self.inputs + self.outputs}
        for case in golden:
            feeds = {name: _golden_value(specs.get(name), self._artifact.value(ref))
                     for name, ref in case["inputs"].items()}
            got = self.run(feeds)
            for name, ref in case["outputs"].items():
                want = _golden_value(specs.get(name), self._artifact.value(ref))
                abs_err, rel_err = compare(got[name], want)
                max_abs[name] = max(max_abs.get(name, 0.0), abs_err)
                max_rel[name] = max(max_rel.get(name, 0.0), rel_err)
        steps = {k: float(v) for k, v in self.manifest.get("output_quant_step", {}).items()}
        return SelfTestReport(cases=len(golden), max_abs=max_abs, max_rel=max_rel,
                              tolerance=tolerance, quant_step=steps)

    def close(self) -> None:
        """Free the extracted build files (also done when the session is collected)."""
        self._finalizer()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = ", ".join(f"{p.subgraph}->{p.device}" for p in self.placement.values())
        return (f"Session({self._artifact.path.name}: "
                f"{', '.join(str(s) for s in self.inputs)} -> "
                f"{', '.join(str(s) for s in self.outputs)}; {where})")


def _output_value(spec: TensorSpec, value: Any) -> Any:
    """An output as returned: an array, a list of arrays (sequence) or None (absent); what
    does not fit its spec is left for _check_outputs to report."""
    if value is None:
        return None
    if spec.is_sequence and isinstance(value, list | tuple):
        return [np.asarray(v) for v in value]
    if spec.is_sequence:
        return value
    value = np.asarray(value)
    if spec.dtype in NARROW_DTYPES and value.dtype == np.uint8:
        return value.view(numpy_dtype(spec.dtype))  # the bytes compiled code returned
    return value


def _plain_output(value: Any) -> Any:
    """_output_value for a plain tensor output (not narrow, not a sequence)."""
    if value is None or type(value) is np.ndarray:
        return value
    return np.asarray(value)


def _golden_value(spec: TensorSpec | None, value: Any) -> Any:
    """A stored golden array with its ml_dtypes type back: narrow values are stored as their
    uint8 bytes, and .npy keeps a bfloat16 array as raw bytes (void dtype)."""
    if spec is None or not isinstance(value, np.ndarray):
        return value
    raw = value.dtype.kind == "V" or (value.dtype == np.uint8 and spec.dtype in NARROW_DTYPES)
    if (raw and (spec.dtype in NARROW_DTYPES or spec.dtype == "bfloat16")
            and value.dtype.itemsize == numpy_dtype(spec.dtype).itemsize):
        return value.view(numpy_dtype(spec.dtype))
    return value


def _kind_of(value: Any) -> str:
    return str(value.dtype) if isinstance(value, np.ndarray) else type(value).__name__


def _tensor_problem(label: str, spec: TensorSpec, value: np.ndarray, symbols: dict[str, int]
                    ) -> list[str]:
    """[] when `value` has spec's dtype and shape (symbols resolved), else what is wrong."""
    if not isinstance(value, np.ndarray):
        return [f"{label} is a {type(value).__name__}, expected an array"]
    if spec.shape is None:  # any rank
        ok = value.dtype == numpy_dtype(spec.dtype)
        return [] if ok else [f"{label} is {value.dtype}, expected {spec.dtype}"]
    expected = [symbols.get(d, d) if isinstance(d, str) else d for d in spec.shape]
    if value.dtype != numpy_dtype(spec.dtype) or value.ndim != len(expected) or any(
            isinstance(want, int) and want != got
            for want, got in zip(expected, value.shape, strict=True)):
        return [f"{label} is {value.dtype}{list(value.shape)}, expected {spec.dtype}{expected}"]
    return []


def compare(got: Any, want: Any) -> tuple[float, float]:
    """(max absolute error, max error relative to the largest reference magnitude).

    Sequences compare element-wise (the worst element counts); None matches only None.
    """
    if want is None or got is None:
        return (0.0, 0.0) if want is None and got is None else (float("inf"), float("inf"))
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(want):
            return float("inf"), float("inf")
        errors = [compare(g, w) for g, w in zip(got, want, strict=True)]
        return (max((e[0] for e in errors), default=0.0),
                max((e[1] for e in errors), default=0.0))
    if isinstance(got, list | tuple):
        return float("inf"), float("inf")
    if got.shape != want.shape:
        return float("inf"), float("inf")
    if want.size == 0:
        return 0.0, 0.0
    g64, w64 = got.astype(np.float64), want.astype(np.float64)  # float8/bfloat16 too
    with np.errstate(invalid="ignore"):  # inf - inf: compared below
        diff = np.abs(g64 - w64)
    if np.isnan(diff).any():
        # NaN where both are NaN, or both the same infinity: equal; anything else differs
        same = (np.isnan(g64) & np.isnan(w64)) | (np.isinf(g64) & (g64 == w64))
        if not np.all(same[np.isnan(diff)]):
            return float("inf"), float("inf")
        diff = np.where(np.isnan(diff), 0.0, diff)
    finite = np.abs(w64[np.isfinite(w64)])
    scale = float(finite.max()) if finite.size else 0.0
    scale = scale or 1.0  # relative to the largest finite reference magnitude
    worst = float(diff.max())
    return worst, worst / scale
