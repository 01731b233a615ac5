"""lepton_edge.bench: consistent statistics and a compare() that runs both engines.

Nothing here asserts speed: only that the numbers are consistent with each other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lepton_edge
from lepton_edge import bench
from lepton_edge.errors import InputError, LeptonError

FAKE_PEAK = bench.Peak(fp32_gflops=100.0, int8_gops=200.0, threads=1,
                       fp32_method="test", int8_method="test")


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32)).astype(np.float32)
    w2 = rng.standard_normal((32, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.fixture(scope="module")
def mlp_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bench")
    model = _mlp()
    onnx_path = folder / "mlp.onnx"
    onnx.save(model, onnx_path)
    art = lepton_edge.compile(lepton_edge.load(model), ["cpu"], golden_count=0)
    return art.save(folder / "mlp.lepton"), onnx_path


def test_single_stream_and_offline_are_consistent() -> None:
    calls = []
    stats = bench.single_stream(lambda: calls.append(sum(range(1000))), warmup=3, runs=25)
    assert len(calls) == 28 and stats.runs == 25
    assert 0 < stats.min <= stats.p50 <= stats.p90 <= stats.max
    assert stats.min <= stats.mean <= stats.max
    assert stats.spread == pytest.approx((stats.p90 - stats.p50) / stats.p50)
    thr = bench.offline(lambda: sum(range(1000)), 8, warmup=1, runs=10)
    assert thr.batch == 8 and thr.latency.runs == 10
    assert thr.samples_per_s == pytest.approx(8 / (thr.latency.p50 / 1e3))
    with pytest.raises(InputError):
        bench.single_stream(lambda: None, warmup=0, runs=0)
    with pytest.raises(InputError):
        bench.offline(lambda: None, 0, runs=1)


def test_percentiles_and_roofline_helpers() -> None:
    stats = bench.LatencyStats.from_samples([float(v) for v in range(1, 11)])
    assert stats.p50 == pytest.approx(5.5) and stats.p90 == pytest.approx(9.1)
    assert (stats.min, stats.max, stats.runs) == (1.0, 10.0, 10)
    # 1e9 MACs in 1 s = 2 GFLOP/s = 2% of a 100 GFLOPS peak
    assert bench.roofline_fraction(1e9, 1.0, 100.0) == pytest.approx(0.02)
    with pytest.raises(InputError):
        bench.roofline_fraction(1e9, 0.0, 100.0)


def test_compare_runs_both_engines(mlp_files: tuple[Path, Path]) -> None:
    art, onnx_path = mlp_files
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    report = bench.compare(art, {"x": x}, model_path=onnx_path, runs=5, warmup=1,
                           peak=FAKE_PEAK)
    assert list(report.engines) == ["lepton", "onnxruntime"]
    assert report.batch == 4 and report.macs == 4 * (16 * 32 + 32 * 4)
    for result in report.engines.values():
        # a call of this MLP takes microseconds: its blocks fill min_block_ms (20 ms), so
        # each engine gets more than 5 timed calls, in 2 rounds of equal blocks
        runs = result.latency.runs
        assert runs > 5 and runs % 2 == 0 and result.latency.p50 > 0
        assert runs // 2 * result.latency.p50 >= 0.5 * 20.0, (runs, result.latency)
        assert result.samples_per_s > 0 and result.roofline is not None
    lep, ort = report.engines["lepton"], report.engines["onnxruntime"]
    assert lep.ratio == 1.0
    assert ort.ratio == pytest.approx(ort.latency.p50 / lep.latency.p50)
    assert ort.max_rel_err is not None and ort.max_rel_err < 1e-4
    table = report.table()
    assert "lepton" in table and "onnxruntime" in table and "roofline" in table
    assert report.protocol == bench.Protocol(runs=5, warmup=1, block=3, pause_ms=100.0,
                                             min_block_ms=20.0)
    assert table.splitlines()[-2] == report.protocol.describe()  # footer states the protocol
    data = report.to_dict()
    assert data["engines"]["onnxruntime"]["latency"]["runs"] == ort.latency.runs
    assert data["protocol"]["block"] == 3 and "TVM_NUM_THREADS" in data["threads"]
    # the report says where the artifact ran: compiled code here, no onnxruntime fallback
    assert report.placement and all(" -> cpu" in p for p in report.placement)
    assert report.fallback == [] and data["placement"] == list(report.placement)
    assert f"lepton ran: {report.placement[0]}" in table and "fallback" not in table


def test_report_names_an_onnxruntime_fallback_inside_the_artifact() -> None:
    report = bench.BenchReport(artifact="a.lepton", batch=1, macs=None,
                               placement=("sg0 -> cpu:0 (cpu)", "sg1 -> cpu:0 (onnxruntime)"))
    assert report.fallback == ["sg1 -> cpu:0 (onnxruntime)"]
    assert ("lepton ran: sg0 -> cpu:0 (cpu), sg1 -> cpu:0 (onnxruntime) - 1 subgraph(s) on "
            "the onnxruntime fallback, not compiled code") in report.table()


def test_interleave_runs_engines_in_rotating_blocks() -> None:
    """Each engine: warm-up calls in one block, then per round a pause, one untimed call and
    up to `block` timed calls back to back; the engine order rotates every round."""
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    protocol = bench.Protocol(runs=7, warmup=2, block=3, pause_ms=0.0)
    times = bench.interleave(runners, protocol)
    assert {n: len(t) for n, t in times.items()} == {"a": 7, "b": 7, "c": 7}
    assert all(ms >= 0 for t in times.values() for ms in t)
    assert protocol.rounds == 3
    warm, rest = calls[:6], calls[6:]
    assert warm == ["a", "a", "b", "b", "c", "c"]
    blocks = []  # (engine, calls) runs of the same engine
    for name in rest:
        if blocks and blocks[-1][0] == name:
            blocks[-1][1] += 1
        else:
            blocks.append([name, 1])
    # 1 untimed settle call + 3, 3, then the remaining 1 timed call per engine
    assert blocks == [["a", 4], ["b", 4], ["c", 4], ["b", 4], ["c", 4], ["a", 4],
                      ["c", 2], ["a", 2], ["b", 2]]
    assert "3 round(s)" in protocol.describe() and "up to 3 timed" in protocol.describe()


def test_short_calls_get_blocks_of_min_block_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine whose calls are shorter than min_block_ms / block gets blocks of
    ceil(min_block_ms / call) timed calls (call: the median over min_block_ms of calls after
    the warm-up), in the same rounds; a slow engine keeps `block` and `runs`."""
    clock = {"t": 0.0}

    def engine(ms: float) -> Callable[[], None]:
        def call() -> None:
            clock["t"] += ms / 1e3
        return call

    protocol = bench.Protocol(runs=7, warmup=2, block=3, pause_ms=0.0, min_block_ms=10.0)
    assert protocol.block_for(0.5) == 20 and protocol.block_for(4.0) == 3
    assert protocol.block_for(None) == 3
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])  # a fake clock
    times = bench.interleave({"fast": engine(0.5), "slow": engine(4.0)}, protocol)
    monkeypatch.undo()
    assert len(times["slow"]) == 7 and len(times["fast"]) == 3 * 20
    assert all(ms == pytest.approx(0.5) for ms in times["fast"])
    assert "or more to fill 10 ms" in protocol.describe()
    with pytest.raises(InputError):
        bench.compare("x.lepton", {"x": np.zeros(1)}, vs=(), min_block_ms=-1.0)


def test_compare_errors(mlp_files: tuple[Path, Path], tmp_path: Path) -> None:
    art, onnx_path = mlp_files
    x = np.zeros((2, 16), np.float32)
    with pytest.raises(LeptonError, match="not found"):
        bench.compare(art, {"x": x}, model_path=tmp_path / "missing.onnx", runs=1, warmup=0,
                      peak=False)
    with pytest.raises(InputError, match="model_path"):
        bench.compare(art, {"x": x}, runs=1, warmup=0, peak=False)
    with pytest.raises(InputError, match="inputs"):
        bench.compare(art, {"wrong": x}, model_path=onnx_path, runs=1, warmup=0, peak=False)
    with pytest.raises(InputError):
        bench.compare(art, {"x": np.zeros((2, 5), np.float32)}, model_path=onnx_path,
                      runs=1, warmup=0, peak=False)
    with pytest.raises(InputError, match="artifact not found"):
        bench.compare(tmp_path / "none.lepton", {"x": x}, model_path=onnx_path, peak=False)
    for bad, match in (({"block": 0}, "block"), ({"pause_ms": -1.0}, "pause_ms"),
                       ({"threads": 0}, "threads")):
        with pytest.raises(InputError, match=match):
            bench.compare(art, {"x": x}, model_path=onnx_path, runs=1, warmup=0, peak=False,
                          **bad)


def test_cpu_peak_is_cached() -> None:
    first = bench.cpu_peak(n=256, repeats=1)
    assert first.fp32_gflops > 0 and first.threads >= 1
    assert bench.cpu_peak(n=256, repeats=1) is first


def test_fp32_peak_is_the_fma_throughput_not_a_library_gemm() -> None:
    """The roofline's fp32 peak is the FMA throughput of a register-only kernel built for this
    CPU; numpy's sgemm is kept as the library figure. A GEMM never beats the FMA pipes: the
    library figure must stay below the peak (allowing for noise between the two runs)."""
    peak = bench.cpu_peak(n=512, repeats=3, int8=False)
    assert peak.fp32_method.startswith("FMA throughput"), peak.fp32_method
    assert peak.fp32_library_gflops is not None and peak.fp32_library_gflops > 0
    assert peak.fp32_library_gflops < 1.3 * peak.fp32_gflops, peak
    rate, threads, method = bench.fma_peak(repeats=3, iterations=1 << 16)
    assert rate > 0 and threads >= 1 and "independent" in method
    assert "sgemm library" in str(peak)
    dot = bench.int8_dot_peak(repeats=3, iterations=1 << 16)
    if dot is not None:  # x86: AVX-512 VNNI or AVX2
        kernel = "vpdpbusd" if "vpdpbusd" in dot[2] else "vpmaddubsw"
        assert dot[0] > 0 and kernel in dot[2]
        with_int8 = bench.cpu_peak(n=256, repeats=2)
        assert with_int8.int8_method.startswith(kernel)
        assert with_int8.int8_library_gops is None or with_int8.int8_library_gops > 0


def test_int8_peak_kernel_follows_the_cpu() -> None:
    """The int8 roofline kernel uses the CPU's widest int8 dot product: vpdpbusd where LLVM's
    host CPU has AVX-512 VNNI, vpmaddubsw on AVX2 without it, none elsewhere (the library
    figure then stands in)."""
    import tvm
    from tvm.target import codegen

    from lepton_edge.lowering.relax import system_cpu

    target = tvm.target.Target({"kind": "llvm", "mcpu": system_cpu()})
    with target:
        has = {f: codegen.target_has_features(f, target)
               for f in ("avx2", "avx512f", "avx512vnni", "avxvnni")}
    dot = bench.int8_dot_peak(repeats=1, iterations=1 << 12)
    if has["avx512vnni"]:
        assert dot is not None and "vpdpbusd" in dot[2], dot
    elif has["avx2"] and not has["avx512f"] and not has["avxvnni"]:
        assert dot is not None and "vpmaddubsw" in dot[2], dot
    else:
        assert dot is None, dot


def test_chain_peak_says_which_figure_it_took(monkeypatch: pytest.MonkeyPatch) -> None:
    """All threads at once, unless one thread's rate times the threads is higher (a core held
    by another process): then the method says so, gives the all-threads figure and the
    single-core turbo caveat. A fake clock: each call's "milliseconds" is what the kernel
    returns."""
    monkeypatch.setattr(bench, "_time_ms", lambda fn: fn())
    # one thread 4 ms, both 8 ms (the second core busy elsewhere): one x 2 = 0.5 GOPS
    rate, how = bench._chain_peak(lambda used: 4.0 * used, 1e6, 2, 3)  # noqa: SLF001
    assert how == ("best of 3 on one thread x 2 threads (all 2 together: 0.2; the per-thread "
                   "rate may overstate an all-core peak under single-core turbo)")
    assert rate == pytest.approx(2 * 1e6 / 0.004 / 1e9)
    # both threads 4 ms together, one alone 8 ms: the all-threads figure
    rate, how = bench._chain_peak(lambda used: 8.0 if used == 1 else 4.0, 1e6, 2, 3)  # noqa: SLF001
    assert how == "best of 3 on 2 thread(s)"
    assert rate == pytest.approx(2 * 1e6 / 0.004 / 1e9)


def test_cli_bench_json(mlp_files: tuple[Path, Path]) -> None:
    import json
    import subprocess
    import sys

    art, model = mlp_files
    out = subprocess.run([sys.executable, "-m", "lepton_edge.cli", "bench", str(art), "--model",
                          str(model), "--batch", "4", "--runs", "3", "--warmup", "1",
                          "--block", "2", "--pause-ms", "5", "--threads", "1",
                          "--no-peak", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["engines"]) == {"lepton", "onnxruntime"}
    assert report["batch"] == 4
    assert report["protocol"] == {"runs": 3, "warmup": 1, "block": 2, "pause_ms": 5.0,
                                  "settle": 1, "min_block_ms": 20.0}
    assert "onnxruntime 1" in report["threads"] and "TVM_NUM_THREADS=1" in report["threads"]
