"""Pruning the digits CNN: accuracy, compiled latency and artifact size, in one process.

    .venv/bin/python benchmarks/prune_digits.py [--mac-reduction 0.3] [--runs 60] [--finetune]

Structured: `prune(mode="structured", mac_reduction=...)`, calibrated on the training split
(sklearn digits, the split samples/digits/train.py uses; the test split is only scored). If
test accuracy drops by more than one point, or with --finetune, the torch DigitsCNN of
train.py is rebuilt with the ONNX weights and fine-tuned through `finetune()` (Adam, lr 1e-3,
batch 64, the pruned channels held at zero). The unpruned and the pruned model are compiled
fp32 with lepton_edge.compile(model, ["cpu"]) and timed at batch 64, alternating one run of
each, median of --runs runs each.

Unstructured: 50% of the weights zeroed, once allocated by the sensitivity scan
(`sparsity=0.5`) and once uniformly (50% of every layer). The artifact is a deflate zip; the
size that matters on disk is the compressed size of builds/*/cpu/lib.so (ZipInfo.compress_size).
That file also holds the compiled code, which pruning does not shrink, so the weights' share is
measured too: the same build with every weight and bias zero is the code-only baseline, and
weight storage = compressed lib.so - baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

import lepton_edge
from lepton_edge.compress.prune import finetune, prune
from lepton_edge.compress.sensitivity import replace_initializers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "samples/digits"))
from train import DigitsCNN, load_split  # noqa: E402 - the sample's own model and data split

X_TEST = np.load(REPO / "samples/digits/x_test.npy")
Y_TEST = np.load(REPO / "samples/digits/y_test.npy")


def accuracy(model: lepton_edge.Model) -> float:
    session = onnxruntime.InferenceSession(model.proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return float((session.run(None, {"image": X_TEST})[0].argmax(1) == Y_TEST).mean())


def torch_digits(model: lepton_edge.Model):
    """train.py's DigitsCNN holding the ONNX model's weights (same parameter names)."""
    import torch

    net = DigitsCNN()
    params = dict(net.named_parameters())
    net.load_state_dict({t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
                         for t in model.proto.graph.initializer if t.name in params})
    return net.eval()


def fine_tuned(model: lepton_edge.Model, pruned: lepton_edge.Model, x: np.ndarray,
               y: np.ndarray, epochs: int) -> lepton_edge.Model:
    import torch

    torch.manual_seed(0)
    net = torch_digits(model)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(module, batch) -> float:
        optimizer.zero_grad()
        loss = loss_fn(module(batch[0]), batch[1])
        loss.backward()
        optimizer.step()
        return loss.item()

    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(0)

    class Shuffled:  # a fresh order every epoch
        def __iter__(self):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(order), 64):
                batch = order[start:start + 64]
                yield inputs[batch], targets[batch]

    return finetune(net, pruned, step, Shuffled(), epochs=epochs, evaluate=accuracy)


def build(model: lepton_edge.Model, path: Path):
    lepton_edge.compile(model, ["cpu"], golden_count=0).save(path)
    return lepton_edge.runtime.load(path)


def lib_size(path: Path) -> int:
    with zipfile.ZipFile(path) as z:
        return sum(i.compress_size for i in z.infolist()
                   if i.filename.startswith("builds/") and i.filename.endswith("/cpu/lib.so"))


def compiled_accuracy(session) -> float:
    return float((session.run({"image": X_TEST})["logits"].argmax(1) == Y_TEST).mean())


def structured(model: lepton_edge.Model, x: np.ndarray, y: np.ndarray, args: argparse.Namespace,
               tmp: Path) -> None:
    base = accuracy(model)
    start = time.perf_counter()
    pruned = prune(model, x, mac_reduction=args.mac_reduction, batch_size=256)
    print(f"prune took {time.perf_counter() - start:.1f} s\n")
    print(pruned.report.sensitivity.table(), "\n")
    print(pruned.report.table(), "\n")
    final, note = pruned, "no fine-tuning"
    if base - accuracy(pruned) > 0.01 or args.finetune:
        final = fine_tuned(model, pruned, x, y, args.epochs)
        note = f"fine-tuned {args.epochs} epochs"
    sessions = {"unpruned": build(model, tmp / "dense.lepton"),
                "pruned": build(final, tmp / "pruned.lepton")}
    feeds = {"image": X_TEST[:64]}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for session in sessions.values():
        session.run(feeds)  # warm-up
    for _ in range(args.runs):  # alternate, so machine noise hits both alike
        for label, session in sessions.items():
            t0 = time.perf_counter()
            session.run(feeds)
            times[label].append((time.perf_counter() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"structured, mac_reduction target {args.mac_reduction} ({note}); latency: compiled "
          f"fp32, batch 64, median of {args.runs} alternating runs")
    print("| model | MACs/sample | test acc (onnxruntime) | test acc (compiled) | "
          "compiled ms @64 |")
    print("| --- | --- | --- | --- | --- |")
    macs = pruned.report.macs
    rows = [("unpruned", model, macs[0], "unpruned"),
            ("pruned", pruned, macs[1], "pruned" if final is pruned else None)]
    if final is not pruned:
        rows.append((f"pruned, {note}", final, macs[1], "pruned"))
    for label, m, n, compiled in rows:  # only the shipped models are compiled
        acc = f"{compiled_accuracy(sessions[compiled]):.4f}" if compiled else "-"
        ms = f"{med[compiled]:.3f}" if compiled else "-"
        print(f"| {label} | {n:,} | {accuracy(m):.4f} | {acc} | {ms} |")
    print(f"\nMAC reduction {pruned.report.mac_reduction:.1%}; accuracy change "
          f"{(accuracy(final) - base) * 100:+.2f} points; compiled latency pruned/unpruned "
          f"{med['pruned'] / med['unpruned']:.2f} ({med['unpruned']:.3f} -> "
          f"{med['pruned']:.3f} ms)\n")


def unstructured(model: lepton_edge.Model, x: np.ndarray, tmp: Path) -> None:
    zeros = {t.name: np.zeros_like(onnx.numpy_helper.to_array(t))
             for t in model.proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    code_only = lepton_edge.load(replace_initializers(model.proto, zeros))
    layers = [n.name for n in model.proto.graph.node if n.op_type in ("Conv", "Gemm")]
    variants = {
        "unpruned": model,
        "sparsity=0.5 (scan-allocated)": prune(model, x, mode="unstructured", sparsity=0.5,
                                               batch_size=256),
        "50% of every layer": prune(model, x, mode="unstructured",
                                    ratios=dict.fromkeys(layers, 0.5), batch_size=256),
    }
    build(code_only, tmp / "code_only.lepton")
    code = lib_size(tmp / "code_only.lepton")
    print(f"unstructured; lib.so of a build whose weights are all zero (code only): {code:,} "
          "bytes compressed")
    print("| model | weight sparsity | test acc | lib.so raw | lib.so compressed | saving | "
          "weight storage (compressed - code) | saving |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    dense = weights_dense = None
    for label, m in variants.items():
        path = tmp / f"u{len(label)}.lepton"
        build(m, path)
        with zipfile.ZipFile(path) as z:
            raw = sum(i.file_size for i in z.infolist() if i.filename.endswith("/cpu/lib.so"))
        size = lib_size(path)
        dense = dense or size
        weights_dense = weights_dense or size - code
        sparsity = m.report.sparsity if hasattr(m, "report") else 0.0
        print(f"| {label} | {sparsity:.1%} | {accuracy(m):.4f} | {raw:,} | {size:,} | "
              f"{1 - size / dense:.1%} | {size - code:,} | "
              f"{1 - (size - code) / weights_dense:.1%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mac-reduction", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--finetune", action="store_true",
                        help="fine-tune even if accuracy stays within one point")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    model = lepton_edge.load(REPO / "samples/digits/digits.onnx")
    x_train, _, y_train, _ = load_split()
    tmp = Path(tempfile.mkdtemp(prefix="lepton-prune-bench-"))
    structured(model, x_train, y_train, args, tmp)
    unstructured(model, x_train, tmp)


if __name__ == "__main__":
    main()
