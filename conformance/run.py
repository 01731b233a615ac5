#!/usr/bin/env python
"""Run the ONNX backend node tests through lepton-edge (and onnxruntime) and write a report.

    .venv/bin/python conformance/run.py [--filter REGEX] [--limit N] [--jobs 2]
                                        [--timeout 60] [--out conformance/RESULTS.md]

Every case is generated in memory from the installed onnx package (see cases.py), then run
by a pool of worker processes: each imports TVM once and takes cases one at a time from the
parent. A case that crashes its worker (segfault, abort, out of memory) or runs past the
timeout is recorded as `crash` / `timeout` and the worker is replaced, so one bad case never
takes others down. Each case is first run on onnxruntime directly (the reference point),
then through lepton-edge: load -> compile(["cpu"], golden_count=0) -> save -> runtime.load
-> run, compared with the expected outputs under onnx's tolerances.

Writes the Markdown report to --out and the per-case results to the same path with .json.
"""

from __future__ import annotations


import argparse
import collections
import datetime as dt
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from lepton_edge.model import MAX_OPSET, MIN_OPSET

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def load_cases_module() -> Any:
    """conformance/ is a folder of scripts, not a package: load cases.py by path."""
    name = "lepton_conformance_cases"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "cases.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- worker
def _worker(conn: Connection, log_path: str, threads: int, workdir: str) -> None:
    """Run cases sent over `conn`; stdout/stderr (TVM, LLVM, faulthandler) go to log_path."""
    import faulthandler

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log)
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    cases = load_cases_module()
    import lepton_edge.compiler  # noqa: F401 - import TVM & co. before the clock runs
    import lepton_edge.runtime  # noqa: F401
    from lepton_edge.lowering import relax

    relax.supported_onnx_ops()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        case, skip_ort = message
        print(f"=== case {case.name}", flush=True)
        if not skip_ort:
            conn.send(("ort", case.name, cases.run_ort(case, threads=threads)))
        ours = cases.run_lepton(case, workdir=workdir)
        variant = cases.constant_variant(case)
        if variant is not None:  # labelled exporter-style column, never the headline
            conn.send(("const", case.name, cases.run_lepton(variant, workdir=workdir)))
        conn.send(("ours", case.name, ours))


class Worker:
    def __init__(self, ctx: Any, index: int, logdir: Path, threads: int, workdir: str) -> None:
        self.index = index
        self.log_path = logdir / f"worker{index}.log"
        parent, child = ctx.Pipe()
        self.conn = parent
        self.proc = ctx.Process(target=_worker, args=(child, str(self.log_path), threads,
                                                     workdir), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.started_at = time.monotonic()
        self.case: Any = None
        self.skip_ort = False
        self.case_started = 0.0
        self.ort: dict[str, Any] | None = None

    def send(self, case: Any, skip_ort: bool) -> None:
        self.case, self.skip_ort, self.ort = case, skip_ort, None
        self.case_started = time.monotonic()
        self.conn.send((case, skip_ort))

    def stop(self, hard: bool) -> None:
        if hard and self.proc.is_alive():
            self.proc.kill()
        elif self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()

    def log_tail(self) -> str:
        """The worker's output since the current case started, last useful line first."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        marker = f"=== case {self.case.name}" if self.case is not None else "=== case"
        text = text[text.rfind(marker) + len(marker):] if marker in text else text[-4000:]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        useful = [ln for ln in lines if not ln.startswith((
            "File ", "Current thread", "Thread 0x", "Extension modules", "Stack (most recent",
            "=== case", "<no Python frame>"))]
        fatal = [ln for ln in useful if ln.startswith("Fatal Python error")]
        picked = list(dict.fromkeys(fatal[:1] + useful[-2:]))
        return "; ".join(picked)[:400]


def _rss_bytes(pid: int) -> int:
    try:
        import psutil

        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except Exception:  # noqa: BLE001 - the process may be gone
        return 0


def run_pool(cases: list[Any], jobs: int, timeout: float, max_rss: float,
             progress: bool = True) -> dict[str, dict[str, Any]]:
    """name -> {"ours": ..., "ort": ...} for every case, isolated in worker processes."""
    ctx = mp.get_context("spawn")
    logdir = Path(tempfile.mkdtemp(prefix="lepton-conformance-logs-"))
    workdir = tempfile.mkdtemp(prefix="lepton-conformance-work-")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    queue: collections.deque[tuple[Any, bool]] = collections.deque((c, False) for c in cases)
    results: dict[str, dict[str, Any]] = {c.name: {} for c in cases}
    workers = [Worker(ctx, i, logdir, threads, workdir) for i in range(min(jobs, len(cases)))]
    spawned = len(workers)
    done = 0
    t0 = time.monotonic()

    def replace(w: Worker) -> Worker:
        nonlocal spawned
        w.stop(hard=True)
        spawned += 1
        return Worker(ctx, spawned, logdir, threads, workdir)

    def record_failure(w: Worker, kind: str, why: str) -> None:
        nonlocal done
        entry = results[w.case.name]
        if w.ort is None and not w.skip_ort:
            # it died or hung inside onnxruntime: note that, and run ours in a fresh worker
            entry["ort"] = {"pass": False, "stage": kind, "reason": f"{kind}: {why}"}
            queue.appendleft((w.case, True))
        else:
            entry["ours"] = {"outcome": kind, "stage": "worker", "reason": why,
                             "internal": False, "placement": {}, "planned": {},
                             "build_errors": {}, "events": []}
            done += 1
        w.case = None

    try:
        while done < len(cases):
            for w in workers:
                if w.ready and w.case is None and queue:
                    case, skip_ort = queue.popleft()
                    w.send(case, skip_ort)
            waitables = [w.conn for w in workers] + [w.proc.sentinel for w in workers]
            wait(waitables, timeout=0.5)
            now = time.monotonic()
            for i, w in enumerate(workers):
                dead = False
                try:
                    while w.conn.poll():
                        message = w.conn.recv()
                        if message[0] == "ready":
                            w.ready = True
                        elif message[0] == "ort":
                            w.ort = message[2]
                            results[message[1]]["ort"] = message[2]
                        elif message[0] == "const":
                            results[message[1]]["const"] = message[2]
                        elif message[0] == "ours":
                            results[message[1]]["ours"] = message[2]
                            w.case = None
                            done += 1
                            if progress and (done % 50 == 0 or done == len(cases)):
                                print(f"  {done}/{len(cases)} cases, "
                                      f"{time.monotonic() - t0:.0f} s", flush=True)
                except (EOFError, OSError):
                    dead = True
                if not w.ready:
                    if not w.proc.is_alive() or now - w.started_at > 300:
                        raise SystemExit(f"worker {w.index} failed to start; see {w.log_path}")
                    continue
                if w.case is None:
                    if dead or not w.proc.is_alive():
                        workers[i] = replace(w)
                    continue
                if dead or not w.proc.is_alive():
                    w.proc.join(1)
                    code = w.proc.exitcode
                    how = (f"killed by {signal.Signals(-code).name}" if code is not None
                           and code < 0 else f"exited with code {code}")
                    tail = w.log_tail()
                    record_failure(w, "crash", how + (f"; {tail}" if tail else ""))
                    workers[i] = replace(w)
                elif now - w.case_started > timeout:
                    record_failure(w, "timeout", f"no result after {timeout:g} s")
                    workers[i] = replace(w)
                elif max_rss and _rss_bytes(w.proc.pid) > max_rss:
                    record_failure(w, "crash", f"memory limit: worker RSS over "
                                               f"{max_rss / 2**30:.1f} GiB")
                    workers[i] = replace(w)
    finally:
        for w in workers:
            w.stop(hard=False)
        shutil.rmtree(logdir, ignore_errors=True)  # crash reasons were read from it already
        shutil.rmtree(workdir, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------- report
def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "-"


def _norm_reason(reason: str) -> str:
    """Group similar reasons: quoted names and numbers replaced."""
    text = re.sub(r"'[^']*'", "'…'", reason)
    text = re.sub(r"\[[^\]]*\]", "[…]", text)
    text = re.sub(r"\b\d+(\.\d+)?\b", "N", text)
    return text[:160]


def _cell(text: str, width: int = 220) -> str:
    text = " ".join(str(text).split())
    if len(text) > width:
        text = text[: width - 1] + "…"
    return text.replace("|", "\\|")


def _why_fallback(ours: dict[str, Any]) -> str:
    if ours.get("build_errors"):
        return "TVM build failed"
    if ours.get("events"):
        return "TVM failed at run time"
    if ours.get("sequence_values"):
        return "sequence/optional values, which compiled code has none of (planned)"
    if ours.get("newer_opset"):
        return f"ops revised after opset {MAX_OPSET}, which TVM's importer predates (planned)"
    if ours.get("ml_domain"):
        return "ai.onnx.ml ops, which TVM has no importer for (planned)"
    return "op not in TVM's importer (planned)"


def write_report(out: Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    kinds_order = load_cases_module().KINDS
    suite = [r for r in records if not r.get("restamped_from")]
    restamped = [r for r in records if r.get("restamped_from")]
    n = len(suite)
    lines: list[str] = []
    add = lines.append

    def passed(r: dict[str, Any]) -> bool:
        return r["ours"]["outcome"] in ("pass_compiled", "pass_fallback")

    add("# lepton-edge on the ONNX backend node tests")
    add("")
    add(f"Generated {meta['date']} by `{meta['command']}` in {meta['seconds']:.0f} s "
        f"({meta['jobs']} workers, {meta['timeout']:g} s per-case timeout) on "
        f"{meta['host']}.")
    add("")
    add("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + "; "
        f"lepton-edge source at git {meta.get('source', 'unknown')}.")
    add("")
    if meta.get("filter") or meta.get("limit"):
        add(f"**Partial run**: filter `{meta.get('filter') or '-'}`, limit "
            f"{meta.get('limit') or '-'}; {n} of the suite's {meta['available']} cases "
            f"(+ {len(restamped)} restamped variants).")
    else:
        add(f"Full run: all {n} node test cases that onnx {meta['versions'].get('onnx')} "
            "generates in memory (`onnx.backend.test.case.node.collect_testcases()`; the "
            "wheel ships no node test data on disk), including the `_expanded` "
            f"function-body variants; plus {len(restamped)} *restamped* variants (below).")
    add("")
    add("Each case: lepton-edge `load -> compile([\"cpu\"], golden_count=0) -> save -> "
        "runtime.load -> run`, compared with the case's expected outputs under onnx's "
        "backend-test policy (rtol=1e-3, atol=1e-7 for floats, NaN positions must match, "
        "exact for ints/bools/strings, shape and dtype must match); and the same case run "
        "directly on onnxruntime (CPU provider) with the same comparison. Each case runs in "
        "a worker process that is replaced if it crashes or times out. Regenerate with "
        "`make conformance` (or `.venv/bin/python conformance/run.py --help`); per-case "
        f"results are in `{out.with_suffix('.json').name}`.")
    add("")
    add("*Restamped* variants: onnx generates each case at the op's newest opset (up to "
        f"28), outside the opsets TVM compiles ({MIN_OPSET}-{MAX_OPSET}) for ops revised "
        "lately. For single-node cases of ops revised after opset 23, `name@opsetN` is the same "
        "case declared at the newest opset <= 23 that has the op, kept only if onnx's full "
        "checker accepts it and onnx's reference implementation reproduces the expected "
        "outputs at that opset. They are counted separately and never in the suite's totals.")
    add("")

    def totals_row(rs: list[dict[str, Any]], label: str) -> None:
        k = collections.Counter(r["ours"]["outcome"] for r in rs)
        p = k["pass_compiled"] + k["pass_fallback"]
        o = sum(1 for r in rs if r["ort"].get("pass"))
        m = len(rs)
        add(f"| {label} | {m} | {k['pass_compiled']} ({_pct(k['pass_compiled'], m)}) | "
            f"{k['pass_fallback']} ({_pct(k['pass_fallback'], m)}) | **{p} ({_pct(p, m)})** | "
            f"{o} ({_pct(o, m)}) | {k['mismatch']} |")

    add("## Totals")
    add("")
    add("| cases | n | lepton-edge compiled pass (all on TVM) | lepton-edge fallback pass "
        "(some onnxruntime) | lepton-edge total pass | onnxruntime pass | mismatches |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    totals_row(suite, "**the suite, all cases**")
    totals_row([r for r in suite if r["opset"] is not None
                and MIN_OPSET <= r["opset"] <= MAX_OPSET],
               f"suite cases at opset {MIN_OPSET}-{MAX_OPSET} (lepton-edge's range)")
    totals_row([r for r in suite if not r["expanded"]], "suite node cases (not `_expanded`)")
    totals_row([r for r in suite if r["expanded"]], "suite `_expanded` function-body cases")
    totals_row(restamped, "restamped variants (opset >23 cases at opset <=23)")
    add("")
    both = sum(1 for r in suite if r["ort"].get("pass") and passed(r))
    ort_only = sum(1 for r in suite if r["ort"].get("pass") and not passed(r))
    ours_only = sum(1 for r in suite if not r["ort"].get("pass") and passed(r))
    add(f"In the suite: both pass {both}; only onnxruntime passes {ort_only}; only lepton-edge "
        f"passes {ours_only}.")
    add("")
    in_range = [r for r in suite if r["opset"] is not None
                and MIN_OPSET <= r["opset"] <= MAX_OPSET]
    with_const = [r for r in in_range if r.get("const")]
    if with_const:
        def compiled(r: dict[str, Any], key: str) -> bool:
            return (r.get(key) or r["ours"])["outcome"] == "pass_compiled"

        def total(r: dict[str, Any], key: str) -> bool:
            return (r.get(key) or r["ours"])["outcome"] in ("pass_compiled", "pass_fallback")

        m = len(in_range)
        head_c = sum(compiled(r, "ours") for r in in_range)
        const_c = sum(compiled(r, "const") for r in in_range)
        const_t = sum(total(r, "const") for r in in_range)
        const_m = sum(1 for r in in_range if (r.get("const") or r["ours"])["outcome"]
                      == "mismatch")
        add("**Separate column, not the headline: exporter-style constants.** Node tests feed "
            "shapes, axes, scales, pads, sizes and counts as graph inputs; real exporters emit "
            "them as constants. For the "
            f"{len(with_const)} suite cases at opset {MIN_OPSET}-{MAX_OPSET} that have such an "
            "input (`cases.SHAPE_LIKE`), a second run turns those inputs into initializers "
            "holding the test's values (`cases.constant_variant`); the other cases count as in "
            "the headline.")
        add("")
        add("| suite cases at opset {}-{} | n | compiled pass (all on TVM) | total pass | "
            "mismatches |".format(MIN_OPSET, MAX_OPSET))
        add("| --- | ---: | ---: | ---: | ---: |")
        add(f"| headline (test inputs stay runtime inputs) | {m} | {head_c} "
            f"({_pct(head_c, m)}) | {sum(total(r, 'ours') for r in in_range)} | "
            f"{sum(1 for r in in_range if r['ours']['outcome'] == 'mismatch')} |")
        add(f"| exporter-style (shape-like inputs as constants) | {m} | {const_c} "
            f"({_pct(const_c, m)}) | {const_t} ({_pct(const_t, m)}) | {const_m} |")
        add("")

    add("## lepton-edge outcomes by kind")
    add("")
    add("| outcome | suite cases | share | restamped | most common reasons, suite and restamped "
        "(count) |")
    add("| --- | ---: | ---: | ---: | --- |")
    for kind in kinds_order:
        rs = [r for r in records if r["ours"]["outcome"] == kind]
        in_suite = sum(1 for r in rs if not r.get("restamped_from"))
        if kind == "pass_compiled":
            top = ""
        elif kind == "pass_fallback":
            top = "; ".join(f"{k} ({v})" for k, v in collections.Counter(
                _why_fallback(r["ours"]) for r in rs).most_common())
        else:
            top = "; ".join(f"`{_cell(k, 120)}` ({v})" for k, v in collections.Counter(
                _norm_reason(r["ours"]["reason"]) for r in rs).most_common(4))
        add(f"| {kind} | {in_suite} | {_pct(in_suite, n)} | {len(rs) - in_suite} | {top} |")
    add("")
    internal = [r for r in records if r["ours"].get("internal")]
    add("Exceptions that are not a `LeptonError` (bugs by lepton-edge's own contract): "
        + (str(len(internal)) if internal else "none") + ".")
    add("")
    if internal:
        add("| case | stage | exception |")
        add("| --- | --- | --- |")
        for r in internal:
            add(f"| {r['name']} | {r['ours']['stage']} | {_cell(r['ours']['reason'])} |")
        add("")

    add("## Mismatches (wrong results)")
    add("")
    mism = [r for r in records if r["ours"]["outcome"] == "mismatch"]
    ort_right = [r for r in mism if r["ort"].get("pass")]
    ort_cannot = [r for r in mism if not r["ort"].get("pass")
                  and r["ort"].get("stage") != "compare"]
    ort_wrong = [r for r in mism if not r["ort"].get("pass")
                 and r["ort"].get("stage") == "compare"]
    add(f"{len(mism)} cases (suite and restamped) ran to the end and returned an output that "
        f"differs from the case's expected output: **{len(ort_right)}** where onnxruntime run "
        f"directly gets it right, **{len(ort_cannot)}** where onnxruntime cannot run the case "
        f"at all (so only the ONNX reference says what is right), and {len(ort_wrong)} where "
        "onnxruntime returns a wrong output too. The first two groups are wrong results "
        "lepton-edge returns without any error; \"ran on\" says which executor produced them.")
    add("")

    def mismatch_table(rs: list[dict[str, Any]]) -> None:
        if not rs:
            add("None.")
            return
        add("| case | op | ran on | onnxruntime direct | what differs |")
        add("| --- | --- | --- | --- | --- |")
        for r in rs:
            where = ", ".join(sorted(set(r["ours"].get("placement", {}).values()))) or "?"
            ort = ("pass" if r["ort"].get("pass")
                   else f"{r['ort'].get('stage')}: {_cell(r['ort'].get('reason'), 80)}")
            add(f"| {r['name']} | {r['op']} | {where} | {ort} | {_cell(r['ours']['reason'])} |")

    add("### Wrong results where onnxruntime is right")
    add("")
    mismatch_table(ort_right)
    add("")
    add("### Wrong results where onnxruntime cannot run the case")
    add("")
    mismatch_table(ort_cannot)
    add("")
    add("### Wrong results shared with onnxruntime")
    add("")
    mismatch_table(ort_wrong)
    add("")

    add("## Crashes and timeouts")
    add("")
    bad = [r for r in records if r["ours"]["outcome"] in ("crash", "timeout")]
    ort_bad = [r for r in records if r["ort"].get("stage") in ("crash", "timeout")]
    if not bad and not ort_bad:
        add("None.")
    else:
        add("| case | op | who | outcome | reason |")
        add("| --- | --- | --- | --- | --- |")
        for r in bad:
            add(f"| {r['name']} | {r['op']} | lepton-edge | {r['ours']['outcome']} | "
                f"{_cell(r['ours']['reason'])} |")
        for r in ort_bad:
            add(f"| {r['name']} | {r['op']} | onnxruntime direct | {r['ort']['stage']} | "
                f"{_cell(r['ort']['reason'])} |")
    add("")

    add("## Compile, load and run errors")
    add("")
    errs = [r for r in records if r["ours"]["outcome"] in ("compile_error", "run_error")]
    if not errs:
        add("None.")
    else:
        add("| case | op | outcome | onnxruntime direct | reason |")
        add("| --- | --- | --- | --- | --- |")
        for r in errs:
            ort = "pass" if r["ort"].get("pass") else "fails too"
            add(f"| {r['name']} | {r['op']} | {r['ours']['outcome']} | {ort} | "
                f"{_cell(r['ours']['reason'], 200)} |")
    add("")
    load_errs = collections.Counter(_norm_reason(r["ours"]["reason"]) for r in records
                                    if r["ours"]["outcome"] == "load_error")
    if load_errs:
        add("`load_error` reasons (suite and restamped):")
        add("")
        add("| cases | reason |")
        add("| ---: | --- |")
        for key, count in load_errs.most_common():
            add(f"| {count} | `{_cell(key, 200)}` |")
        add("")

    add("## TVM builds that failed (subgraph fell back to onnxruntime at compile time)")
    add("")
    failed_builds = [r for r in records if r["ours"].get("build_errors")]
    if not failed_builds:
        add("None.")
    else:
        counter: collections.Counter[str] = collections.Counter()
        example: dict[str, str] = {}
        ops: dict[str, set[str]] = collections.defaultdict(set)
        for r in failed_builds:
            for errs_by_target in r["ours"]["build_errors"].values():
                for reason in errs_by_target.values():
                    key = _norm_reason(reason)
                    counter[key] += 1
                    example.setdefault(key, r["name"])
                    ops[key].add(r["op"])
        add(f"{len(failed_builds)} cases; the op is in TVM's importer, but importing or "
            "building the subgraph failed, so it ran on onnxruntime. Grouped by reason:")
        add("")
        add("| cases | ops | reason (example case) |")
        add("| ---: | --- | --- |")
        for key, count in counter.most_common():
            add(f"| {count} | {', '.join(sorted(ops[key]))} | `{_cell(key, 200)}` "
                f"({example[key]}) |")
    add("")

    add("## By op")
    add("")
    add("Cases grouped by the op under test; `_expanded` cases (the op's ONNX function body) "
        "are counted as `Op [expanded]`, restamped variants as `Op [restamped]`.")
    add("")
    add("| op | cases | compiled pass | fallback pass | lepton-edge pass | onnxruntime pass | "
        "lepton-edge failures |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    by_op: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in records:
        suffix = (" [expanded]" if r["expanded"] else
                  " [restamped]" if r.get("restamped_from") else "")
        by_op[r["op"] + suffix].append(r)
    for op in sorted(by_op, key=str.lower):
        rs = by_op[op]
        k = collections.Counter(r["ours"]["outcome"] for r in rs)
        fails = ", ".join(f"{kind} {k[kind]}" for kind in kinds_order[2:] if k[kind])
        add(f"| {op} | {len(rs)} | {k['pass_compiled']} | {k['pass_fallback']} | "
            f"{k['pass_compiled'] + k['pass_fallback']} | "
            f"{sum(1 for r in rs if r['ort'].get('pass'))} | {fails} |")
    add("")
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", help="regular expression on case names (re.search)")
    parser.add_argument("--limit", type=int, help="run at most N cases (after --filter)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per case before the worker is killed (default 60)")
    parser.add_argument("--max-rss-gb", type=float, default=8.0,
                        help="kill a worker whose memory exceeds this (default 8 GiB; 0: off)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"),
                        help="Markdown report (default conformance/RESULTS.md); per-case "
                             "JSON is written next to it")
    parser.add_argument("--no-restamp", action="store_true",
                        help="do not add the restamped (opset <= 23) variants of opset > 23 "
                             "cases (see cases.restamp)")
    parser.add_argument("--from-json", metavar="JSON",
                        help="do not run: rewrite --out from the per-case JSON of a past run")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        write_report(Path(args.out), data["cases"], data["meta"])
        print(f"report: {args.out} (from {args.from_json})")
        return 0

    cases_mod = load_cases_module()
    t0 = time.monotonic()
    print("generating the ONNX node test cases ...", flush=True)
    all_cases = cases_mod.collect()
    candidates = list(all_cases)
    if not args.no_restamp:
        candidates += [v for v in map(cases_mod.restamp, all_cases) if v is not None]
    selected = [c for c in candidates if not args.filter or re.search(args.filter, c.name)]
    if args.limit is not None:
        selected = selected[: args.limit]
    print(f"{len(selected)} of {len(candidates)} cases ({len(all_cases)} in the suite, "
          f"{len(candidates) - len(all_cases)} restamped) selected; running with {args.jobs} "
          f"workers, {args.timeout:g} s timeout", flush=True)
    results = run_pool(selected, args.jobs, args.timeout, args.max_rss_gb * 2**30)
    seconds = time.monotonic() - t0

    records = []
    for c in selected:
        entry = results[c.name]
        records.append({"name": c.name, "op": c.op, "expanded": c.expanded, "opset": c.opset,
                        "domains": list(c.domains), "restamped_from": c.restamped_from,
                        "ours": entry["ours"], "const": entry.get("const"),
                        "ort": entry.get("ort", {"pass": False, "stage": "?",
                                                 "reason": "not run"})})
    command = "python conformance/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "seconds": seconds, "jobs": args.jobs, "timeout": args.timeout,
        "filter": args.filter, "limit": args.limit, "available": len(all_cases),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, {_cpu_model()}",
        "versions": cases_mod.lepton_versions(),
        "source": _git_state(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(out, records, meta)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "cases": records}, indent=1,
                                                   default=str) + "\n")
    kinds = collections.Counter(r["ours"]["outcome"] for r in records)
    ort_pass = sum(1 for r in records if r["ort"].get("pass"))
    print(f"done in {seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common())
          + f"; onnxruntime pass {ort_pass}/{len(records)}")
    print(f"report: {out}  per-case: {out.with_suffix('.json')}")
    return 0


def _git_state() -> str:
    """The commit the library was measured at, and whether its files had local changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=30).stdout.rstrip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "lepton_edge",
                                      "targets").splitlines()]
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not commit:
        return "unknown"
    return commit + (f" with uncommitted changes in {', '.join(dirty)}" if dirty else "")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
