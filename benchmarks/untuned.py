"""Untuned (--tune 0) lepton-edge CPU builds against onnxruntime fp32, same process, alternating.

    .venv/bin/python benchmarks/untuned.py [--models digits,resnet18,mobilenet_v2,bert]
                                           [--runs R] [--warmup W] [--threads T]
                                           [--plain | --no-pack | --no-nchwc] [--block K]
                                           [--pause-ms P]
                                           [--batches B1,B2]

Each model is compiled for "cpu" without tuning (the default schedules of
lepton_edge/lowering/schedules.py; --plain sets LEPTON_DEFAULT_SCHEDULES=0 for TVM's plain
loops, the "before" numbers; --no-pack sets LEPTON_PACK_CONV=0: pointwise convolutions keep
their OIHW filters and vectorize along the output width; --no-nchwc sets LEPTON_NCHWC=0:
float32 convolutions stay NCHW instead of lowering/nchwc.py's channel-blocked layout) and
timed with
lepton_edge.bench.compare against onnxruntime fp32 on the same random input, in per-engine
blocks (K timed calls of one engine back to back after a P ms pause and one untimed call, the
engine order rotating every round; see lepton_edge.bench.Protocol). Printed per model and
batch: MACs, the fp32 floor (2 x MACs / the fp32 peak measured here), lepton and onnxruntime
p50 and p90 over all timed calls, the p50 ratio, the largest relative difference of the
outputs, and the compile time; then the protocol. Models: the digits CNN (batch 1 and 64) and
benchmarks/models.py's ResNet-18-shaped and MobileNetV2-shaped CNNs (224x224) and BERT-base-
shaped encoder (seq 128), batch 1 (--batches 1,8: those batches).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    parser.add_argument("--block", type=int, default=3,
                        help="timed calls of one engine back to back per block")
    parser.add_argument("--pause-ms", "--gap-ms", dest="pause_ms", type=float, default=100.0,
                        help="idle time before each block, so the other engine's spinning "
                             "worker threads have stopped (--gap-ms: older name)")
    parser.add_argument("--batches", default=None,
                        help="batch sizes for the 224x224 models and BERT (default: 1)")
    parser.add_argument("--export", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--plain", action="store_true",
                        help="TVM's plain loops (LEPTON_DEFAULT_SCHEDULES=0): the 'before'")
    parser.add_argument("--no-pack", action="store_true",
                        help="LEPTON_PACK_CONV=0: no packed pointwise filters (for A/B runs)")
    parser.add_argument("--no-nchwc", action="store_true",
                        help="LEPTON_NCHWC=0: float32 convolutions in NCHW, not NCHW8c (A/B runs)")
    args = parser.parse_args()
    if args.export is not None:
        _export(args.models.split(","), args.export)
        return
    if args.plain:
        os.environ["LEPTON_DEFAULT_SCHEDULES"] = "0"
    if args.no_pack:
        os.environ["LEPTON_PACK_CONV"] = "0"
    if args.no_nchwc:
        os.environ["LEPTON_NCHWC"] = "0"
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
    header = ("| model | batch | M MACs | floor ms | lepton p50 / p90 ms | ORT p50 / p90 ms "
              "| lepton/ORT | max rel err | compile s |")
    rows = [header, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    footer = ""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        subprocess.run([sys.executable, __file__, "--models", ",".join(names), "--export",
                        str(tmp)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        for name in names:
            input_name, batches = INPUTS[name]
            if args.batches and name != "digits":
                batches = tuple(int(b) for b in args.batches.split(","))
            onnx_path = tmp / f"{name}.onnx"
            model = lepton_edge.load(onnx_path)
            started = time.perf_counter()
            art = lepton_edge.compile(model, ["cpu"], golden_count=0)
            path = art.save(tmp / f"{name}.lepton")
            took = time.perf_counter() - started
            shape = [d if isinstance(d, int) else 1 for d in model.inputs[0].shape]
            for batch in batches:
                feeds = {input_name: rng.standard_normal((batch, *shape[1:])).astype(np.float32)}
                report = bench.compare(path, feeds, model_path=onnx_path, runs=args.runs,
                                       warmup=args.warmup, peak=peak, block=args.block,
                                       pause_ms=args.pause_ms, threads=args.threads or None)
                lep = report.engines[bench.LEPTON].latency
                ort = report.engines["onnxruntime"]
                macs = report.macs or 0
                floor = 2 * macs / (peak.fp32_gflops * 1e9) * 1e3
                err = f"{ort.max_rel_err:.1e}" if ort.max_rel_err is not None else "-"
                row = (f"| {name} | {batch} | {macs / 1e6:,.1f} | {floor:.3f} | "
                       f"{lep.p50:.3f} / {lep.p90:.3f} | {ort.latency.p50:.3f} / "
                       f"{ort.latency.p90:.3f} | {lep.p50 / ort.latency.p50:.2f}x | {err} | "
                       f"{took:.1f} |")
                rows.append(row)
                footer = f"{report.order}; threads: {report.threads}"
                print(row, flush=True)
    print("\n".join(rows))
    print(footer)


if __name__ == "__main__":
    main()
