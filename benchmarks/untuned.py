"""Untuned (--tune 0) lepton-edge CPU builds against onnxruntime fp32, same process, alternating.

    .venv/bin/python benchmarks/untuned.py [--models digits,resnet18,mobilenet_v2,bert]
                                           [--runs R] [--warmup W] [--threads T]
                                           [--plain | --no-pack] [--gap-ms G]

Each model is compiled for "cpu" without tuning (the default schedules of
lepton_edge/lowering/schedules.py; --plain sets LEPTON_DEFAULT_SCHEDULES=0 for TVM's plain
loops, the "before" numbers; --no-pack sets LEPTON_PACK_CONV=0: pointwise convolutions keep
their OIHW filters and vectorize along the output width) and timed with
lepton_edge.bench.compare against onnxruntime fp32 on the same random input. Printed per model and batch: MACs, the fp32 floor (2 x MACs / the
fp32 peak measured here), lepton and onnxruntime p50, their ratio, the largest relative
difference of the outputs, and the compile time. Models: the digits CNN (batch 1 and 64) and
benchmarks/models.py's ResNet-18-shaped and MobileNetV2-shaped CNNs (224x224) and BERT-base-
shaped encoder (seq 128), batch 1.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODELS = ("digits", "resnet18", "mobilenet_v2", "bert")


INPUTS = {"digits": ("image", (1, 64)), "resnet18": ("image", (1,)),
          "mobilenet_v2": ("image", (1,)), "bert": ("tokens", (1,))}


def _export(names: list[str], folder: Path) -> None:
    """Write each model as <folder>/<name>.onnx (run in a child process: importing torch in the
    timing process slowed TVM's thread pool 3x here)."""
    import torch

    import lepton_edge
    import models

    builders = {"resnet18": (models.resnet18, (1, 3, 224, 224)),
                "mobilenet_v2": (models.mobilenet_v2, (1, 3, 224, 224)),
                "bert": (models.bert_base, (1, 128, 768))}
    for name in names:
        torch.manual_seed(0)
        if name == "digits":
            proto = lepton_edge.load(REPO / "samples/digits/digits.onnx").proto
        else:
            build, shape = builders[name]
            proto = lepton_edge.load(build().eval(), torch.randn(*shape),
                                     input_names=[INPUTS[name][0]]).proto
        (folder / f"{name}.onnx").write_bytes(proto.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for both engines (TVM_NUM_THREADS, onnxruntime "
                             "intra_op_num_threads); 0 = each engine's default (all cores)")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="with --threads: idle time before each timed call, so the other "
                             "engine's spinning worker threads have stopped (onnxruntime's "
                             "spin after a run and TVM's pool then waits for the busy core)")
    parser.add_argument("--export", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true",
                        help="TVM's plain loops (LEPTON_DEFAULT_SCHEDULES=0): the 'before'")
    parser.add_argument("--no-pack", action="store_true",
                        help="LEPTON_PACK_CONV=0: no packed pointwise filters (for A/B runs)")
    args = parser.parse_args()
    if args.export is not None:
        _export(args.models.split(","), args.export)
        return
    if args.gap_ms and not args.threads:
        parser.error("--gap-ms needs --threads")
    if args.plain:
        os.environ["LEPTON_DEFAULT_SCHEDULES"] = "0"
    if args.no_pack:
        os.environ["LEPTON_PACK_CONV"] = "0"
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its pool
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")

    import lepton_edge
    from lepton_edge import bench

    peak = bench.cpu_peak(int8=False)
    print(f"fp32 peak measured now: {peak.fp32_gflops:.1f} GFLOPS; "
          f"schedules: {'TVM plain loops' if args.plain else 'lepton-edge defaults'}", flush=True)
    header = ("| model | batch | M MACs | floor ms | lepton ms | ORT ms | lepton/ORT | max rel err "
              "| compile s |")
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        subprocess.run([sys.executable, __file__, "--models", ",".join(names), "--export",
                        str(tmp)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        for name in names:
            input_name, batches = INPUTS[name]
            onnx_path = tmp / f"{name}.onnx"
            model = lepton_edge.load(onnx_path)
            started = time.perf_counter()
            art = lepton_edge.compile(model, ["cpu"], golden_count=0)
            path = art.save(tmp / f"{name}.lepton")
            took = time.perf_counter() - started
            shape = [d if isinstance(d, int) else 1 for d in model.inputs[0].shape]
            for batch in batches:
                feeds = {input_name: rng.standard_normal((batch, *shape[1:])).astype(np.float32)}
                if args.threads:
                    lep, ort_ms, err_value, macs = _alternate(path, onnx_path, feeds, args)
                else:
                    report = bench.compare(path, feeds, model_path=onnx_path, runs=args.runs,
                                           warmup=args.warmup, peak=peak)
                    lep = report.engines[bench.LEPTON].latency.p50
                    ort = report.engines["onnxruntime"]
                    ort_ms, err_value, macs = ort.latency.p50, ort.max_rel_err, report.macs or 0
                floor = 2 * macs / (peak.fp32_gflops * 1e9) * 1e3
                err = f"{err_value:.1e}" if err_value is not None else "-"
                row = (f"| {name} | {batch} | {macs / 1e6:,.1f} | {floor:.3f} | {lep:.3f} | "
                       f"{ort_ms:.3f} | {lep / ort_ms:.2f}x | {err} | {took:.1f} |")
                rows.append(row)
                print(row, flush=True)
    print("\n".join(rows))


def _alternate(path: Path, onnx_path: Path, feeds: dict[str, np.ndarray], args: Any
               ) -> tuple[float, float, float, int]:
    """Same protocol as bench.compare (warm-up, then alternating rounds, p50), with both
    engines limited to ``args.threads`` threads. Returns (lepton ms, ORT ms, max rel err, MACs)."""
    import onnxruntime

    import lepton_edge

    session = lepton_edge.runtime.load(path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    ort = onnxruntime.InferenceSession(str(onnx_path), options,
                                       providers=["CPUExecutionProvider"])
    engines = {"lepton": lambda: list(session.run(feeds).values()),
               "ort": lambda: ort.run(None, feeds)}
    got, want = engines["lepton"](), engines["ort"]()
    err = max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
              for g, w in zip(got, want, strict=True))
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.warmup):
        for fn in engines.values():
            fn()
    for i in range(args.runs):
        order = list(engines) if i % 2 == 0 else list(reversed(engines))
        for key in order:
            if args.gap_ms:
                time.sleep(args.gap_ms / 1e3)
            start = time.perf_counter()
            engines[key]()
            times[key].append((time.perf_counter() - start) * 1e3)
    per_sample = sum(int(sg.get("macs", 0) or 0) for sg in session.manifest["subgraphs"])
    macs = per_sample * next(iter(feeds.values())).shape[0]
    return (float(np.median(times["lepton"])), float(np.median(times["ort"])), err, macs)


if __name__ == "__main__":
    main()
