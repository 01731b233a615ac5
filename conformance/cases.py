"""ONNX backend node test cases, run through lepton-edge and through onnxruntime.

Shared by `conformance/run.py` (the full suite, isolated in worker processes) and
`tests/e2e/test_conformance_subset.py` (a fixed subset, in-process). This folder is not a
package: load this file by path (see `load_module` in run.py and in the test).

The onnx wheel does not ship the node test data on disk; the cases are generated in memory
by onnx's own generators (`onnx.backend.test.case.node`), exactly as onnx's
`backend-test-tools generate-data` would write them: each case is a model, one set of inputs
and the expected outputs, compared with onnx's tolerances (rtol=1e-3, atol=1e-7).

Outcomes of `run_lepton` (the first two are passes):
  pass_compiled  every subgraph ran on the cpu target (TVM)
  pass_fallback  some subgraph ran on onnxruntime (planned, after a failed TVM build, or
                 after a run-time failure)
  mismatch       it ran, but an output differs (values, NaN positions, shape or dtype)
  load_error     lepton_edge.load refused the model (ModelError / UnsupportedOpsError)
  compile_error  lepton_edge.compile (or Artifact.save) raised
  run_error      lepton_edge.runtime.load or Session.run raised
(`timeout` and `crash` are assigned by run.py's worker pool.) An exception that is not a
LeptonError is a bug in lepton-edge by its own contract; it is flagged `internal`.
"""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PASS = ("pass_compiled", "pass_fallback")
FAIL_KINDS = ("mismatch", "load_error", "compile_error", "run_error", "timeout", "crash")
KINDS = PASS + FAIL_KINDS
EXPANDED = re.compile(r"_expanded(_ver\d+)?$")
NODE_PACKAGE = "onnx.backend.test.case.node"


@dataclass
class Case:
    """One node test case, in plain picklable form (model bytes and numpy values)."""

    name: str
    op: str  # the op type under test (for expanded cases: the op whose function it is)
    expanded: bool
    opset: int | None  # default-domain opset of the model
    model: bytes
    inputs: list[Any]  # np.ndarray, a list of them (sequence) or None (absent optional)
    outputs: list[Any]
    rtol: float = 1e-3
    atol: float = 1e-7
    domains: tuple[str, ...] = field(default_factory=tuple)
    restamped_from: int | None = None  # see restamp(): the original opset, else None


def _normalize(value: Any) -> Any:
    """onnx's runner does the same: TensorProto -> numpy; sequences element-wise."""
    import onnx
    from onnx import numpy_helper

    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list | tuple):
        return [_normalize(v) for v in value]
    if value is None:
        return None
    return np.asarray(value) if not isinstance(value, np.ndarray) else value


def _from_testcase(tc: Any, ops_by_name: dict[str, str]) -> Case:
    model = tc.model
    base = EXPANDED.sub("", tc.name)
    expanded = base != tc.name
    if expanded:
        op = ops_by_name.get(base) or (model.graph.node[0].op_type if model.graph.node else "?")
    else:
        op = model.graph.node[0].op_type if len(model.graph.node) == 1 else (
            ops_by_name.get(tc.name) or "?")
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    domains = tuple(sorted({n.domain for n in model.graph.node if n.domain}))
    inputs, outputs = tc.data_sets[0]
    return Case(name=tc.name, op=op, expanded=expanded, opset=max(versions) if versions else None,
                model=model.SerializeToString(), inputs=[_normalize(v) for v in inputs],
                outputs=[_normalize(v) for v in outputs], rtol=tc.rtol, atol=tc.atol,
                domains=domains)


def collect(modules: list[str] | None = None) -> list[Case]:
    """Generate the node test cases (all of them, or those of some case modules).

    `modules` are file names under onnx/backend/test/case/node (e.g. "conv"), much faster
    than generating all ~1900 cases (~20 s). onnx's generator keeps global state (one
    generation per process), so the result is cached for the process.
    """
    import onnx.backend.test.case.node as node_cases

    key = tuple(modules) if modules is not None else None
    if key in _CACHE:
        return _CACHE[key]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        if modules is None:
            testcases = list(node_cases.collect_testcases())
        else:
            for name in modules:
                importlib.import_module(f"{NODE_PACKAGE}.{name}")
            testcases = list(node_cases._NodeTestCases)  # noqa: SLF001 - filled by the imports
    ops_by_name = {tc.name: tc.model.graph.node[0].op_type for tc in testcases
                   if len(tc.model.graph.node) == 1}
    cases = [_from_testcase(tc, ops_by_name) for tc in testcases]
    _CACHE[key] = cases
    return cases


_CACHE: dict[Any, list[Case]] = {}


def restamp(case: Case, max_opset: int = 23) -> Case | None:
    """The same single-node case declared at the newest opset <= max_opset that has the op.

    onnx generates each case at the op's latest version, so every case of an op updated
    after opset 23 (Reshape, Transpose, Cast, QuantizeLinear, ... gained new element types in
    opsets 24-25) is refused by lepton-edge's opset range, which says nothing about the op
    itself. A restamped variant is kept only if onnx's full checker accepts it and onnx's
    reference implementation, run at the older opset, reproduces the expected outputs; so
    the test's meaning is unchanged. Returns None when that does not hold.
    """
    import onnx
    from onnx import defs, reference

    if case.opset is None or case.opset <= max_opset or case.expanded:
        return None
    model = onnx.ModelProto()
    model.ParseFromString(case.model)
    if len(model.graph.node) != 1 or model.graph.node[0].domain not in ("", "ai.onnx"):
        return None
    try:
        version = defs.get_schema(model.graph.node[0].op_type, max_opset, "").since_version
    except defs.SchemaError:
        return None  # the op is newer than max_opset
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = version
    input_names, _ = _graph_io(case.model)
    try:
        onnx.checker.check_model(model, full_check=True)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            got = reference.ReferenceEvaluator(model).run(
                None, dict(zip(input_names, case.inputs, strict=False)))
    except Exception:  # noqa: BLE001 - not valid or not reproducible at the older opset
        return None
    if len(got) != len(case.outputs) or any(
            compare(w, g, case.rtol, case.atol) for w, g in zip(case.outputs, got, strict=True)):
        return None
    return Case(name=f"{case.name}@opset{version}", op=case.op, expanded=False, opset=version,
                model=model.SerializeToString(), inputs=case.inputs, outputs=case.outputs,
                rtol=case.rtol, atol=case.atol, domains=case.domains,
                restamped_from=case.opset)


# Input positions that exporters (torch.onnx, tf2onnx) emit as constants: shapes, axes,
# sizes, scales, pads, counts. See constant_variant.
SHAPE_LIKE: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
    "Squeeze": (1,), "Unsqueeze": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3),
    "Resize": (1, 2, 3), "Upsample": (1,), "TopK": (1,), "Split": (1,), "OneHot": (1,),
    "CumSum": (1,), "Trilu": (1,), "CenterCropPad": (1, 2), "AffineGrid": (1,),
    "BlackmanWindow": (0,), "HammingWindow": (0,), "HannWindow": (0,), "Col2Im": (1, 2),
    "MaxUnpool": (2,), "NonMaxSuppression": (2, 3, 4), "DFT": (1, 2), "STFT": (1, 3),
    "MelWeightMatrix": (0, 1, 2, 3, 4), "Clip": (1, 2), "Dropout": (1, 2),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
    "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
}


def constant_variant(case: Case) -> Case | None:
    """The case with its shape-like graph inputs turned into initializers, or None.

    Node tests feed shapes, axes, scales and pads as graph inputs; a real exporter emits
    them as constants. This variant measures that situation and is reported in its own,
    labelled column: never in the headline numbers, where test inputs stay runtime inputs.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.ParseFromString(case.model)
    input_names, _ = _graph_io(case.model)
    if len(input_names) != len(case.inputs):
        return None
    wanted = set()
    for node in model.graph.node:
        for index in SHAPE_LIKE.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            if index < len(node.input) and node.input[index] in input_names:
                wanted.add(node.input[index])
    values = dict(zip(input_names, case.inputs, strict=True))
    wanted = {n for n in wanted if isinstance(values[n], np.ndarray)}
    if not wanted:
        return None
    kept = [v for v in model.graph.input if v.name not in wanted]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.graph.initializer.extend(numpy_helper.from_array(values[n], n) for n in sorted(wanted))
    return Case(name=case.name, op=case.op, expanded=case.expanded, opset=case.opset,
                model=model.SerializeToString(),
                inputs=[values[n] for n in input_names if n not in wanted],
                outputs=case.outputs, rtol=case.rtol, atol=case.atol, domains=case.domains,
                restamped_from=case.restamped_from)


# ---------------------------------------------------------------------------------- compare
def _low_precision(dtype: np.dtype) -> str | None:
    """ml_dtypes types numpy cannot compare directly: 'float' or 'int', else None."""
    if dtype.kind != "V":
        return None
    name = dtype.name
    if name.startswith(("bfloat", "float")):
        return "float"
    if name.startswith(("int", "uint")):
        return "int"
    return None


def _v(x: Any) -> str:
    """A short readable value (not numpy's np.float32(...) repr)."""
    x = x.item() if hasattr(x, "item") else x
    return f"{x:.8g}" if isinstance(x, float) else repr(x)


def compare(want: Any, got: Any, rtol: float, atol: float, where: str = "output") -> str | None:
    """None when `got` matches `want` under onnx's backend-test policy, else why not.

    Floats: |got - want| <= atol + rtol * |want| (numpy's assert_allclose), NaN where NaN is
    expected and only there, infinities equal; bfloat16 gets rtol >= 2**-6 as in onnx's
    runner. Integers, bools and strings: exact. Shapes and dtypes must match.
    """
    if isinstance(want, list | tuple):
        if not isinstance(got, list | tuple):
            return f"{where}: expected a sequence, got {type(got).__name__}"
        if len(got) != len(want):
            return f"{where}: sequence of {len(got)} tensors, expected {len(want)}"
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            problem = compare(w, g, rtol, atol, f"{where}[{i}]")
            if problem:
                return problem
        return None
    if want is None:
        return None if got is None else f"{where}: expected None (absent optional)"
    if got is None:
        return f"{where}: got None, expected a tensor"
    want = np.asarray(want)
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"{where}: shape {list(got.shape)}, expected {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"{where}: dtype {got.dtype}, expected {want.dtype}"
    if want.size == 0:
        return None
    low = _low_precision(want.dtype)
    if want.dtype == object or want.dtype.kind in "biuUSM" or low == "int":
        w = want.astype(np.int64) if low == "int" else want
        g = got.astype(np.int64) if low == "int" else got
        bad = ~(np.asarray(w == g))
        if not bad.any():
            return None
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return (f"{where}: {int(bad.sum())}/{want.size} elements differ (exact compare); first "
                f"at {list(idx)}: got {_v(g[idx])}, expected {_v(w[idx])}")
    if low == "float" or want.dtype.kind == "V":
        if want.dtype.name == "bfloat16":
            rtol = max(rtol, 2**-6)
        want = want.astype(np.float32)
        got = got.astype(np.float32)
    with np.errstate(all="ignore"):
        ok = np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        if ok.all():
            return None
        nan_w, nan_g = np.isnan(want), np.isnan(got)
        if (nan_w != nan_g).any():
            missing = int((nan_w & ~nan_g).sum())
            extra = int((nan_g & ~nan_w).sum())
            idx = tuple(int(i) for i in np.argwhere(nan_w != nan_g)[0])
            return (f"{where}: NaN positions differ ({extra} unexpected NaN, {missing} missing);"
                    f" first at {list(idx)}: got {_v(got[idx])}, expected {_v(want[idx])}")
        err = np.abs(got.astype(np.float64) - want.astype(np.float64))
        err = np.where(ok, 0.0, np.nan_to_num(err, nan=np.inf, posinf=np.inf))
        idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), err.shape))
        return (f"{where}: {int((~ok).sum())}/{want.size} elements outside rtol={rtol:g} "
                f"atol={atol:g}; worst at {list(idx)}: got {_v(got[idx])}, expected {_v(want[idx])}"
                f" (abs err {err[idx]:.3g})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {(lines[0] if lines else '')[:400]}"


def _graph_io(model_bytes: bytes) -> tuple[list[str], list[str]]:
    import onnx

    model = onnx.ModelProto()
    model.ParseFromString(model_bytes)
    inits = {t.name for t in model.graph.initializer}
    return ([v.name for v in model.graph.input if v.name not in inits],
            [v.name for v in model.graph.output])


# ---------------------------------------------------------------------------------- ours
def run_lepton(case: Case, workdir: str | Path | None = None) -> dict[str, Any]:
    """load -> compile(["cpu"], golden_count=0) -> save -> runtime.load -> run -> compare."""
    import onnx

    import lepton_edge
    import lepton_edge.runtime

    started = time.perf_counter()
    result: dict[str, Any] = {"outcome": None, "stage": None, "reason": "", "internal": False,
                              "placement": {}, "planned": {}, "build_errors": {},
                              "events": [], "warnings": []}

    def fail(kind: str, stage: str, exc: BaseException) -> dict[str, Any]:
        result.update(outcome=kind, stage=stage, reason=_first_line(exc),
                      internal=not isinstance(exc, lepton_edge.LeptonError),
                      exc_type=type(exc).__name__)
        if result["internal"]:
            result["traceback"] = traceback.format_exc()[-3000:]
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result

    proto = onnx.ModelProto()
    proto.ParseFromString(case.model)
    input_names, output_names = _graph_io(case.model)
    tmp = Path(tempfile.mkdtemp(prefix="lepton-conf-", dir=workdir))
    session = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model = lepton_edge.load(proto)
            except Exception as exc:  # noqa: BLE001 - classified, internal ones flagged
                return fail("load_error", "load", exc)
            try:
                art = lepton_edge.compile(model, ["cpu"], golden_count=0)
            except Exception as exc:  # noqa: BLE001
                return fail("compile_error", "compile", exc)
            result["planned"] = {sg["id"]: sg["target"] for sg in art.manifest["subgraphs"]}
            # planned on onnxruntime because compiled code has no sequence/optional values
            result["sequence_values"] = any(
                "no sequence or optional values" in why
                for by_target in art.manifest["reasons"].values() for why in by_target.values())
            whys = [why for by_target in art.manifest["reasons"].values()
                    for why in by_target.values()]
            # planned on onnxruntime: ops revised after opset 25, or ai.onnx.ml ops
            result["newer_opset"] = any("TVM's importer covers opsets up to" in w for w in whys)
            result["ml_domain"] = any("TVM has no ai.onnx.ml importer" in w for w in whys)
            result["build_errors"] = {sg["id"]: sg["build_errors"]
                                      for sg in art.manifest["subgraphs"] if sg["build_errors"]}
            try:
                path = art.save(tmp / "case.lepton")
            except Exception as exc:  # noqa: BLE001
                return fail("compile_error", "save", exc)
            try:
                session = lepton_edge.runtime.load(path)
            except Exception as exc:  # noqa: BLE001
                return fail("run_error", "runtime.load", exc)
            feeds = dict(zip(input_names, case.inputs, strict=False))
            try:
                got = session.run(feeds)
            except Exception as exc:  # noqa: BLE001
                return fail("run_error", "run", exc)
            finally:
                result["placement"] = {k: p.target for k, p in session.placement.items()}
                result["events"] = list(session.events)
        result["warnings"] = sorted({str(w.message)[:300] for w in caught
                                     if not issubclass(w.category, DeprecationWarning)})[:5]
        problems = []
        for name, want in zip(output_names, case.outputs, strict=False):
            if name not in got:
                problems.append(f"output '{name}' missing")
                continue
            problem = compare(want, got[name], case.rtol, case.atol, f"output '{name}'")
            if problem:
                problems.append(problem)
        if problems:
            result.update(outcome="mismatch", stage="compare", reason="; ".join(problems)[:600])
        else:
            on_cpu = all(t == "cpu" for t in result["placement"].values())
            result["outcome"] = "pass_compiled" if on_cpu else "pass_fallback"
        result["seconds"] = round(time.perf_counter() - started, 3)
        return result
    finally:
        if session is not None:
            session.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------- ORT
def run_ort(case: Case, threads: int = 0) -> dict[str, Any]:
    """The same case straight on onnxruntime's CPU provider: pass or why not."""
    import onnxruntime

    started = time.perf_counter()
    input_names, output_names = _graph_io(case.model)

    def done(ok: bool, reason: str = "", stage: str = "") -> dict[str, Any]:
        return {"pass": ok, "stage": stage, "reason": reason,
                "seconds": round(time.perf_counter() - started, 3)}

    try:
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = onnxruntime.InferenceSession(case.model, options,
                                               providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return done(False, _first_line(exc), "load")
    feeds = {n: v for n, v in zip(input_names, case.inputs, strict=False) if v is not None}
    try:
        # float8 only crosses onnxruntime's Python API as OrtValues of its bytes
        from lepton_edge.reference import FLOAT8, run_float8

        got = run_float8(session, output_names, feeds)
        types = {o.name: o.type for o in session.get_outputs()}
        got = [g.view(w.dtype) if types.get(n) in FLOAT8 and isinstance(w, np.ndarray)
               and g.dtype == np.uint8 and w.dtype.itemsize == 1 else g
               for n, g, w in zip(output_names, got, case.outputs, strict=False)]
    except Exception as exc:  # noqa: BLE001
        return done(False, _first_line(exc), "run")
    problems = [p for p in (compare(w, g, case.rtol, case.atol, f"output '{n}'")
                            for n, w, g in zip(output_names, case.outputs, got, strict=False)) if p]
    if problems:
        return done(False, "; ".join(problems)[:600], "compare")
    return done(True)


def lepton_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import tvm

    import lepton_edge

    return {"lepton_edge": lepton_edge.__version__, "tvm": str(tvm.__version__),
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}
