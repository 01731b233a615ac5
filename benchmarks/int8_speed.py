"""Compiled int8 vs compiled fp32, next to onnxruntime fp32 and int8, in one process.

    .venv/bin/python benchmarks/int8_speed.py [--runs 30]
    .venv/bin/python benchmarks/int8_speed.py --cnn resnet18,mobilenet_v2,digits --threads 1

Models: the digits CNN at batch 64, and a BERT-shaped encoder (2 layers, d=128, 4 heads,
FFN 256) at sequence 128, batch 1. Both are quantized with lepton_edge.compress.quantize
(MinMax, per-channel) twice: with its default op_types="lepton" (QDQ only where lepton-edge's
integer lowering pays off) and with op_types="all" (onnxruntime's default: every op type it
registers, "all ops" columns); onnxruntime int8 runs both QDQ models. Engines are measured
in alternating rounds so machine noise hits all of them alike; the medians and the ratios are
printed. Builds are untuned (default schedules). "lepton int8" is the default build (packed
kernels of lowering/x86_int8.py: VNNI dot products, or on AVX2 int16 `vpmaddwd` matmuls
and uint8 dot-product convs); "lepton int8 generic" turns them off
(LEPTON_X86_INT8_DOT=off: lowering/schedules.py's generic integer kernels).

`--cnn resnet18,mobilenet_v2,digits [--threads 1]` instead times untuned int8 builds of the
CNNs of benchmarks/models.py (224x224, batch 1; quantized with lepton_edge.quantize, MinMax, 16
random calibration samples, as benchmarks/run.sh does) with lepton_edge.bench.compare against
onnxruntime fp32 and int8 (QDQ) in the same process (per-engine blocks), `--threads` for both
engines (TVM_NUM_THREADS, intra-op threads), and prints lepton / the faster onnxruntime and the
fraction of the exact int16 roofline (MACs / (the int8 `vpmaddubsw` peak / 2): a `vpmaddwd`
does half the multiply-adds).

`--weight-bits 7` quantizes every model with `quantize(..., weight_bits=7)` (weights in
[-64, 64]: on AVX2 without VNNI the exact `vpmaddubsw` kernels, lowering/x86_int8.py
maddubs_exact); default 8.

`--whole resnet18,mobilenet_v2,bert_base[:LAYERS] [--batch B] [--weight-bits 7] [--threads 1]` times
whole untuned builds of benchmarks/models.py's models (the CNNs at 224x224; the BERT-base
encoder, 12 layers unless `:LAYERS`, at sequence 128), quantized as above: lepton's default
build, the same model built with LEPTON_X86_INT8_MADDUBS=off (int16 kernels only; skipped
with --weight-bits 8, whose weights almost never pass the check), onnxruntime int8 (the same QDQ model) and fp32,
in alternating rounds, each round one warm-up call and the fastest of the rest; prints the
minima and the ratios to the faster onnxruntime, and whether the two lepton builds agree bit
for bit.

Then one kernel alone: uint8 [128, 384] x int8 [384, 1536] -> int32, lepton's packed kernel
(the layout the host's default build uses; weights in [-64, 64] with --weight-bits 7)
against onnxruntime MatMulInteger and fp32 MatMul, with its bit-exactness against numpy
(onnxruntime's AVX2 u8 x s8 kernel uses the saturating vpmaddubsw and is not exact).
onnxruntime runs with spin-waiting off (see ort_options). The floor printed is MACs / measured int8 peak (lepton_edge.bench.cpu_peak: onnxruntime
MatMulInteger 2048^3, on AVX2 the saturating kernel, so the exact kernels' real ceiling is
lower).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime

import lepton_edge
from lepton_edge.compress.quantize import quantize
from lepton_edge.lowering.x86_int8 import DOT_ENV

REPO = Path(__file__).resolve().parents[1]


def median_ms(fn: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


ORT_SPINNING = True  # --ort-no-spin turns it off (a diagnostic, not a fair comparison)


def ort_options() -> onnxruntime.SessionOptions:
    """onnxruntime in its default configuration. Turning its spin-waiting threads off stops
    them taking the cores from the engine timed next in the alternation, but it also slows
    onnxruntime itself (digits CNN at batch 64: 0.37 -> 0.68 ms in samples/digits/demo.py), so
    the fair comparison keeps onnxruntime's default; `--ort-no-spin` is for diagnosis only."""
    options = onnxruntime.SessionOptions()
    if not ORT_SPINNING:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def models() -> dict[str, tuple[lepton_edge.Model, np.ndarray, dict[str, np.ndarray]]]:
    import torch

    x = np.load(REPO / "samples/digits/x_test.npy")
    digits = lepton_edge.load(REPO / "samples/digits/digits.onnx")
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=256,
                                             dropout=0.0, activation="gelu", batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    bert = lepton_edge.load(encoder, torch.randn(1, 128, 128), input_names=["tokens"])
    rng = np.random.default_rng(0)
    return {
        "digits CNN, batch 64": (digits, x[:128], {"image": x[:64]}),
        "encoder 2x128, seq 128": (bert, rng.standard_normal((16, 128, 128)).astype(np.float32),
                                   {"tokens": rng.standard_normal((1, 128, 128)).astype(
                                       np.float32)}),
    }


CNN_SHAPES = {"resnet18": (1, 3, 224, 224), "mobilenet_v2": (1, 3, 224, 224)}


def _quantize(model: lepton_edge.Model, calib: np.ndarray, weight_bits: int,
              **kw: object) -> lepton_edge.Model:
    """quantize(), with weight_bits=7 only when asked (weights in [-64, 64])."""
    if weight_bits == 8:
        return quantize(model, calib, **kw)
    return quantize(model, calib, weight_bits=weight_bits, **kw)


def _export_cnns(names: list[str], folder: Path, weight_bits: int = 8) -> None:
    """<folder>/<name>.onnx and <name>.int8.onnx (run in a child process: torch imported in
    the timing process slows TVM's thread pool, benchmarks/untuned.py). Names: resnet18,
    mobilenet_v2, digits, bert_base[:LAYERS] (sequence 128; 4 calibration samples)."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import models as suite

    rng = np.random.default_rng(0)
    for name in names:
        torch.manual_seed(0)
        samples = 16
        if name == "digits":
            model = lepton_edge.load(REPO / "samples/digits/digits.onnx")
        elif name.startswith("bert_base"):
            layers = int(name.split(":")[1]) if ":" in name else 12
            model = lepton_edge.load(suite.bert_base(layers).eval(), torch.randn(1, 128, 768),
                                     input_names=["tokens"])
            samples = 4
        else:
            build = getattr(suite, name)
            model = lepton_edge.load(build().eval(), torch.randn(*CNN_SHAPES[name]),
                                     input_names=["image"])
        shape = [d if isinstance(d, int) else 1 for d in model.inputs[0].shape]
        calib = rng.standard_normal((samples, *shape[1:])).astype(np.float32)
        (folder / f"{name}.onnx").write_bytes(model.proto.SerializeToString())
        q = _quantize(model, calib, weight_bits)
        (folder / f"{name}.int8.onnx").write_bytes(q.proto.SerializeToString())


def _export_in_child(names: list[str], folder: Path, weight_bits: int) -> None:
    """_export_cnns in a child process (this script with --export-cnns)."""
    import subprocess
    import sys

    subprocess.run([sys.executable, __file__, "--export-cnns", ",".join(names),
                    "--export-dir", str(folder), "--weight-bits", str(weight_bits)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def whole_benchmark(names: list[str], runs: int, batch: int, weight_bits: int) -> None:
    """Whole untuned builds: lepton default vs lepton int16-only (MADDUBS_ENV=off) vs
    onnxruntime int8 and fp32, alternating rounds, minima (module docstring: --whole)."""
    from lepton_edge.lowering.x86_int8 import MADDUBS_ENV

    rng = np.random.default_rng(0)
    rounds = max(2, runs // 5)
    with tempfile.TemporaryDirectory(prefix="lepton-whole-") as tmp_name:
        tmp = Path(tmp_name)
        _export_in_child(names, tmp, weight_bits)
        for name in names:
            fp32 = lepton_edge.load(tmp / f"{name}.onnx")
            q = lepton_edge.load(tmp / f"{name}.int8.onnx")
            builds = {"lepton": "auto"}
            if weight_bits == 7:
                builds["lepton int16 only"] = "off"
            engines: dict[str, Callable[[], object]] = {}
            shape = [batch if not isinstance(d, int) else d for d in q.inputs[0].shape]
            feeds = {q.inputs[0].name: rng.standard_normal(shape).astype(np.float32)}
            outs = {}
            for label, mode in builds.items():
                os.environ[MADDUBS_ENV] = mode
                start = time.perf_counter()
                # no fallback: a failed CPU build must not time onnxruntime as "lepton"
                art = lepton_edge.compile(q, ["cpu"], golden_count=0, fallback=False)
                took = time.perf_counter() - start
                os.environ.pop(MADDUBS_ENV)
                kernels = [k for sg in art.manifest["subgraphs"] for b in sg["builds"]
                           for k in b["meta"].get("int8_dot_kernels", [])]
                u8 = sum("uint8 vpmaddubsw" in k for k in kernels)
                print(f"<!-- {name} {label}: compile {took:.0f} s, {u8}/{len(kernels)} packed "
                      "kernels vpmaddubsw -->", flush=True)
                session = lepton_edge.runtime.load(art.save(tmp / f"{name}-{mode}.lepton"))
                outs[label] = list(session.run(feeds).values())[0]
                engines[label] = lambda s=session: s.run(feeds)
            threads = os.environ.get("TVM_NUM_THREADS")
            options = ort_options()
            if threads:
                options.intra_op_num_threads = int(threads)
            for label, m in (("ORT int8", q), ("ORT fp32", fp32)):
                ort = onnxruntime.InferenceSession(m.proto.SerializeToString(), options,
                                                   providers=["CPUExecutionProvider"])
                engines[label] = lambda s=ort: s.run(None, feeds)
            best: dict[str, float] = {k: float("inf") for k in engines}
            per_round = max(2, runs // rounds)
            for _ in range(rounds):  # rounds: neighbours' bursts hit every engine alike
                for label, fn in engines.items():
                    fn()  # warm-up
                    best[label] = min(best[label], *median_ms(fn, per_round))
            faster = min(best["ORT int8"], best["ORT fp32"])
            agree = ("; lepton builds bit-equal: "
                     f"{np.array_equal(outs['lepton'], outs['lepton int16 only'])}"
                     if len(outs) == 2 else "")
            print(f"{name} batch {batch}, {weight_bits}-bit weights, min of "
                  f"{rounds * per_round} calls{agree}")
            for label, ms in best.items():
                print(f"  {label:18s} {ms:9.2f} ms  {ms / faster:.2f}x the faster onnxruntime",
                      flush=True)


def cnn_benchmark(names: list[str], runs: int, threads: int | None,
                  weight_bits: int = 8) -> None:
    from lepton_edge import bench

    peak = bench.cpu_peak()
    int16_gmacs = peak.int8_gops / 4 if peak.int8_gops else None  # vpmaddwd: half, MACs
    print(f"peak: {peak}; exact int16 roofline {int16_gmacs or 0:.0f} GMAC/s; "
          f"threads {threads or 'default'}", flush=True)
    print("| model | batch | lepton int8 ms | ORT fp32 ms | ORT int8 ms | lepton / faster ORT "
          "| int16 roofline | compile s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="lepton-cnn-") as tmp_name:
        tmp = Path(tmp_name)
        _export_in_child(names, tmp, weight_bits)
        for name in names:
            q = lepton_edge.load(tmp / f"{name}.int8.onnx")
            start = time.perf_counter()
            path = lepton_edge.compile(q, ["cpu"], golden_count=0).save(tmp / f"{name}.lepton")
            took = time.perf_counter() - start
            shape = [d if isinstance(d, int) else 1 for d in q.inputs[0].shape]
            for batch in ((1, 64) if name == "digits" else (1,)):
                feeds = {q.inputs[0].name: rng.standard_normal(
                    (batch, *shape[1:])).astype(np.float32)}
                report = bench.compare(path, feeds, model_path=tmp / f"{name}.onnx",
                                       int8_model=tmp / f"{name}.int8.onnx", runs=runs,
                                       warmup=2, peak=False, threads=threads)
                lep = report.engines[bench.LEPTON].latency.p50
                o32 = report.engines["onnxruntime"].latency.p50
                o8 = report.engines["onnxruntime-int8"].latency.p50
                macs = report.macs or 0
                roof = (f"{100 * macs / (lep / 1e3) / 1e9 / int16_gmacs:.1f}%"
                        if int16_gmacs and macs else "-")
                print(f"| {name} | {batch} | {lep:.3f} | {o32:.3f} | {o8:.3f} | "
                      f"{lep / min(o32, o8):.2f}x | {roof} | {took:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--cnn", default=None,
                        help="comma-separated resnet18, mobilenet_v2, digits: time their untuned "
                             "int8 builds against onnxruntime fp32/int8 (nothing else)")
    parser.add_argument("--threads", type=int, default=None,
                        help="--cnn: threads for both engines (default: each engine's own)")
    parser.add_argument("--weight-bits", type=int, choices=(7, 8), default=8,
                        help="quantize weights to 8 bits ([-127, 127]) or 7 ([-64, 64]: the "
                             "exact vpmaddubsw kernels on AVX2 without VNNI)")
    parser.add_argument("--whole", default=None,
                        help="comma-separated resnet18, mobilenet_v2, bert_base[:LAYERS]: whole "
                             "untuned builds, lepton (and its int16-only build with "
                             "--weight-bits 7) vs onnxruntime int8 and fp32, minima")
    parser.add_argument("--batch", type=int, default=1, help="--whole: batch size")
    parser.add_argument("--export-cnns", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--export-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kernel-only", action="store_true", help="only the matmul kernel")
    parser.add_argument("--ort-no-spin", action="store_true",
                        help="onnxruntime without spin-waiting threads (diagnosis: slows it)")
    args = parser.parse_args()
    if args.export_cnns:
        _export_cnns(args.export_cnns.split(","), args.export_dir, args.weight_bits)
        return
    if args.whole:
        names = args.whole.split(",")
        unknown = sorted(n for n in names if n.split(":")[0] not in (
            "resnet18", "mobilenet_v2", "bert_base"))
        if unknown:
            parser.error(f"unknown model(s) {unknown}: choose from resnet18, mobilenet_v2, "
                         "bert_base[:LAYERS]")
        if args.threads:
            os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
        whole_benchmark(names, args.runs, args.batch, args.weight_bits)
        return
    if args.cnn:
        unknown = sorted(set(args.cnn.split(",")) - {"resnet18", "mobilenet_v2", "digits"})
        if unknown:
            parser.error(f"unknown CNN(s) {unknown}: choose from resnet18, mobilenet_v2, digits")
        if args.threads:
            os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
        cnn_benchmark(args.cnn.split(","), args.runs, args.threads, args.weight_bits)
        return
    global ORT_SPINNING
    ORT_SPINNING = not args.ort_no_spin
    from lepton_edge.bench import cpu_peak

    peak = cpu_peak()
    print(f"peak: {peak}")
    kernel_benchmark(args.runs, peak.int8_gops, args.weight_bits)
    if args.kernel_only:
        return
    tmp = Path(tempfile.mkdtemp(prefix="lepton-bench-"))
    columns = ("lepton fp32", "lepton int8", "lepton int8 all ops", "lepton int8 generic",
               "ORT fp32", "ORT int8", "ORT int8 all ops")
    print("| model | " + " | ".join(f"{c} ms" for c in columns)
          + " | int8/fp32 (lepton) | all-ops int8/fp32 | lepton int8 / best ORT | "
          "int8 floor ms (% of peak) |")
    print("|" + " --- |" * (len(columns) + 5))
    for name, (model, calib, feeds) in models().items():
        q = _quantize(model, calib, args.weight_bits)
        q_all = _quantize(model, calib, args.weight_bits, op_types="all")
        print(f"<!-- {name}: QDQ nodes {q.op_counts().get('QuantizeLinear', 0)} Q + "
              f"{q.op_counts().get('DequantizeLinear', 0)} DQ (lepton), "
              f"{q_all.op_counts().get('QuantizeLinear', 0)} Q + "
              f"{q_all.op_counts().get('DequantizeLinear', 0)} DQ (all ops) -->", flush=True)
        engines: dict[str, Callable[[], object]] = {}
        for label, m, dot in (("lepton fp32", model, "auto"), ("lepton int8", q, "auto"),
                              ("lepton int8 all ops", q_all, "auto"),
                              ("lepton int8 generic", q, "off")):
            os.environ[DOT_ENV] = dot  # "off": no packed kernels
            path = lepton_edge.compile(m, ["cpu"], golden_count=0).save(tmp / f"{label}.lepton")
            os.environ.pop(DOT_ENV)
            session = lepton_edge.runtime.load(path)
            engines[label] = lambda s=session: s.run(feeds)
        for label, m in (("ORT fp32", model), ("ORT int8", q), ("ORT int8 all ops", q_all)):
            ort = onnxruntime.InferenceSession(m.proto.SerializeToString(), ort_options(),
                                               providers=["CPUExecutionProvider"])
            engines[label] = lambda s=ort: s.run(None, feeds)
        times: dict[str, list[float]] = {k: [] for k in engines}
        for fn in engines.values():
            fn()  # warm-up
        for _ in range(3):
            for label, fn in engines.items():
                times[label] += median_ms(fn, max(1, args.runs // 3))
        med = {k: statistics.median(v) for k, v in times.items()}
        best_ort = min(med["ORT fp32"], med["ORT int8"], med["ORT int8 all ops"])
        batch = next(iter(feeds.values())).shape[0]
        macs = sum(sg.macs for sg in lepton_edge.partition(model, ["cpu"]).subgraphs) * batch
        floor = f"{2 * macs / (peak.int8_gops * 1e9) * 1e3:.3f} (" + (
            f"{100 * 2 * macs / (med['lepton int8'] / 1e3) / 1e9 / peak.int8_gops:.1f}%)"
        ) if peak.int8_gops else "-"
        print(f"| {name} | " + " | ".join(f"{med[c]:.3f}" for c in columns)
              + f" | {med['lepton int8'] / med['lepton fp32']:.2f} | "
              f"{med['lepton int8 all ops'] / med['lepton fp32']:.2f} | "
              f"{med['lepton int8'] / best_ort:.1f} | {floor} |", flush=True)
        # on a shared machine the medians carry the neighbours' load; the minima show what
        # each engine does with the cores to itself
        low = {c: min(times[c]) for c in columns}
        print("|   (min) | " + " | ".join(f"{low[c]:.3f}" for c in columns)
              + f" | {low['lepton int8'] / low['lepton fp32']:.2f} | "
              f"{low['lepton int8 all ops'] / low['lepton fp32']:.2f} | | |", flush=True)


def kernel_benchmark(runs: int, int8_gops: float | None, weight_bits: int = 8) -> None:
    """The packed uint8 x int8 matmul kernel alone vs onnxruntime, alternating rounds
    (`weight_bits` 7: weights in [-64, 64], the `vpmaddubsw` kernel on AVX2)."""
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax

    from lepton_edge.lowering import x86_int8

    m, k, n = 128, 384, 1536
    rng = np.random.default_rng(0)
    qmax = 64 if weight_bits == 7 else 127
    w = rng.integers(-qmax - (weight_bits == 8), qmax + 1, (k, n)).astype(np.int8)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([m, k], "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(xv, relax.const(w, "int8"),
                                                         out_dtype="int32")))
        bb.emit_func_output(out)
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(
        tvm.target.codegen.llvm_get_system_cpu())})
    mod, _ = x86_int8.pack_int8_kernels(bb.get(), target)
    mod, notes = x86_int8.schedule_int8_kernels(mod, target)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    xt = tvm.runtime.tensor(x)

    def ort(op: str, dtype: int, w_: np.ndarray, out_type: int) -> onnxruntime.InferenceSession:
        graph = helper.make_graph(
            [helper.make_node(op, ["x", "w"], ["y"])], "k",
            [helper.make_tensor_value_info("x", dtype, [m, k])],
            [helper.make_tensor_value_info("y", out_type, [m, n])],
            [numpy_helper.from_array(w_, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return onnxruntime.InferenceSession(model.SerializeToString(), ort_options(),
                                            providers=["CPUExecutionProvider"])

    ort_i8 = ort("MatMulInteger", TensorProto.UINT8, w, TensorProto.INT32)
    ort_f32 = ort("MatMul", TensorProto.FLOAT, w.astype(np.float32), TensorProto.FLOAT)
    xf = x.astype(np.float32)
    want = x.astype(np.int64) @ w.astype(np.int64)
    exact = np.array_equal(vm["main"](xt).numpy(), want)
    ort_exact = np.array_equal(ort_i8.run(None, {"x": x})[0], want)
    engines = {"lepton packed": lambda: vm["main"](xt),
               "ORT MatMulInteger": lambda: ort_i8.run(None, {"x": x}),
               "ORT fp32 MatMul": lambda: ort_f32.run(None, {"x": xf})}
    times: dict[str, list[float]] = {key: [] for key in engines}
    for fn in engines.values():
        fn()
    for _ in range(3):
        for label, fn in engines.items():
            times[label] += median_ms(fn, max(1, runs // 3))
    med = {key: statistics.median(v) for key, v in times.items()}
    ops = 2.0 * m * k * n
    print(f"kernel u8[{m},{k}] x s8[{k},{n}] -> s32 ({notes[0]}; exact: {exact}, "
          f"onnxruntime exact: {ort_exact})")
    for label, ms in med.items():
        share = f", {100 * ops / (ms / 1e3) / 1e9 / int8_gops:.0f}% of int8 peak" \
            if int8_gops else ""
        print(f"  {label}: {ms:.3f} ms, {ops / (ms / 1e3) / 1e9:.0f} GOPS{share}, "
              f"x{ms / med['lepton packed']:.2f} of lepton")


if __name__ == "__main__":
    main()
