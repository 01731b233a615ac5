"""The benchmark suite's models and the suite driver (see benchmarks/run.sh).

    .venv/bin/python benchmarks/models.py [--quick] [--tune N] [--runs R] [--warmup W]
                                          [--weight-bits 8,7] [--out benchmarks/RESULTS_suite.md]

Models: the digits CNN (samples/digits/digits.onnx); a ResNet-18-shaped CNN and a
MobileNetV2-shaped CNN at 224x224 (random weights, built here with torch, exported through
lepton_edge.load(module, example)); a BERT-base-shaped encoder (12 layers, d=768, 12 heads,
FFN 3072) at sequence 128. Each model runs fp32 and int8 (lepton_edge.quantize, MinMax,
on random calibration data; weights 8-bit and, with the default --weight-bits 8,7, also
7-bit), at batch 1 and a larger batch, with lepton_edge.bench.compare
(artifact vs onnxruntime fp32 and, for int8, onnxruntime int8 of the same QDQ model; per-engine
blocks in rotating order, bench.Protocol).
--quick runs only the digits CNN with few runs (about a minute). Without --tune the CPU
kernels are lepton-edge's default schedules (lowering/schedules.py, x86_int8.py) and the full
run takes about 12 minutes here; with --tune N each model is also tuned first (minutes to
hours). Weights are random: only speed is meaningful, not accuracy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lepton_edge  # noqa: E402
from lepton_edge import bench  # noqa: E402


def resnet18() -> Any:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            y = torch.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def mobilenet_v2() -> Any:
    from torch import nn

    def cbr(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU6()]

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            body = [] if expand == 1 else cbr(cin, hidden, 1, 1)
            body += cbr(hidden, hidden, 3, stride, groups=hidden)
            body += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.body = nn.Sequential(*body)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            return x + self.body(x) if self.residual else self.body(x)

    layers = cbr(3, 32, 3, 2)
    cin = 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            layers.append(Inverted(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += cbr(cin, 1280, 1, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000)]
    return nn.Sequential(*layers)


def bert_base(layers: int = 12) -> Any:
    from torch import nn

    layer = nn.TransformerEncoderLayer(d_model=768, nhead=12, dim_feedforward=3072,
                                       dropout=0.0, activation="gelu", batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def suite(quick: bool) -> list[tuple[str, Any, str, tuple[int, int]]]:
    """(name, model source, input name, (batch 1, larger batch)) in the order they run."""
    import torch

    torch.manual_seed(0)
    digits = (REPO / "samples/digits/digits.onnx", "image", (1, 64))
    if quick:
        return [("digits CNN", *digits)]

    def export(module: Any, shape: tuple[int, ...], name: str) -> Any:
        module.eval()
        return lepton_edge.load(module, torch.randn(*shape), input_names=[name]).proto

    return [
        ("digits CNN", *digits),
        ("ResNet-18-shaped 224x224", export(resnet18(), (1, 3, 224, 224), "image"), "image",
         (1, 8)),
        ("MobileNetV2-shaped 224x224", export(mobilenet_v2(), (1, 3, 224, 224), "image"),
         "image", (1, 8)),
        ("BERT-base-shaped encoder, seq 128", export(bert_base(), (1, 128, 768), "tokens"),
         "tokens", (1, 8)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits CNN only, few runs")
    parser.add_argument("--tune", type=int, default=0, help="MetaSchedule trials per model")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--calib", type=int, default=16, help="random calibration samples")
    parser.add_argument("--weight-bits", default="8,7", metavar="BITS[,BITS]",
                        help="int8 variants to run: weights quantized to 8 bits ([-127, 127]) "
                             "and/or 7 bits ([-64, 64], quantize(weight_bits=7): the exact "
                             "vpmaddubsw kernels on AVX2 without VNNI)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/RESULTS_suite.md")
    parser.add_argument("--invoked-as", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = args.runs or (5 if args.quick else 30)
    try:
        weight_bits = [int(b) for b in args.weight_bits.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--weight-bits {args.weight_bits!r}: a comma list of 8 and 7")
    if not weight_bits or any(b not in (7, 8) for b in weight_bits):
        parser.error(f"--weight-bits {args.weight_bits!r}: a comma list of 8 and 7")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)

    argv = sys.argv[1:]
    if "--invoked-as" in argv:  # run.sh passes its own command line; not shown twice
        at = argv.index("--invoked-as")
        argv = argv[:at] + argv[at + 2:]
    command = f".venv/bin/python benchmarks/models.py {shlex.join(argv)}".strip()
    lines = ["# lepton-edge benchmark suite", "", "Command lines used:", "", "```"]
    if args.invoked_as:
        lines.append(args.invoked_as)
    lines += [command, "```", ""]
    peak = bench.cpu_peak()
    lines += [f"CPU peak (measured: fp32 = FMA throughput, the roofline): {peak}", "",
              f"runs {runs}, warmup {warmup}, tune {args.tune}; engines timed in per-engine "
              "blocks in one process (each table's last line states the protocol); "
              "`vs lepton` = engine p50 / lepton p50.", ""]
    print("\n".join(lines), flush=True)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for index, (name, source, input_name, batches) in enumerate(suite(args.quick)):
            model = lepton_edge.load(source)
            shape = [d if isinstance(d, int) else 1 for d in model.inputs[0].shape]
            calib = rng.standard_normal((args.calib, *shape[1:])).astype(np.float32)
            fp32_onnx = tmp / f"m{index}.onnx"
            fp32_onnx.write_bytes(model.proto.SerializeToString())
            variants: list[tuple[str, Any, Path | None]] = [("fp32", model, None)]
            for bits in weight_bits:
                q = lepton_edge.quantize(model, calib, weight_bits=bits)
                int8_onnx = tmp / f"m{index}.int8w{bits}.onnx"
                int8_onnx.write_bytes(q.proto.SerializeToString())
                variants.append(("int8" if bits == 8 else f"int8 ({bits}-bit weights)", q,
                                 int8_onnx))
            for vi, (precision, variant, int8_onnx) in enumerate(variants):
                start = time.perf_counter()
                art = lepton_edge.compile(variant, ["cpu"], golden_count=0, tune=args.tune)
                path = art.save(tmp / f"m{index}.v{vi}.lepton")
                took = time.perf_counter() - start
                for batch in batches:
                    feeds = {input_name: rng.standard_normal(
                        (batch, *shape[1:])).astype(np.float32)}
                    report = bench.compare(
                        path, feeds, model_path=fp32_onnx,
                        int8_model=int8_onnx,
                        runs=runs, warmup=warmup, peak=peak)
                    report.artifact = f"{name}, {precision}"
                    fell_back = (" - NOT COMPILED CODE: onnxruntime fallback inside the "
                                 "artifact" if report.fallback else "")
                    block = [f"## {name}, {precision}, batch {batch}{fell_back}", "",
                             f"compiled in {took:.1f} s (tune {args.tune})", "", "```",
                             report.table(), "```", ""]
                    print("\n".join(block), flush=True)
                    lines += block
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
