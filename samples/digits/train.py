"""Train the bundled sample model: a small CNN on scikit-learn's 8x8 handwritten digits.

The repository ships ``digits.onnx`` so that ``make demo`` and the end-to-end tests have a real,
trained network to compile with lepton-edge, without downloading anything: scikit-learn bundles
the digits data set (1797 grey 8x8 images, pixel values 0..16). This script regenerates that
file and the held-out test set next to it:

* ``digits.onnx`` -- opset 17, input ``image`` float32 ``[N, 1, 8, 8]`` (pixels scaled to [0, 1]),
  output ``logits`` float32 ``[N, 10]``; ``N`` is a symbolic batch dimension; weights embedded.
* ``x_test.npy`` -- float32 ``[n, 1, 8, 8]``, already scaled, the stratified 20 % test split.
* ``y_test.npy`` -- int64 ``[n]`` labels for ``x_test.npy``.

Training is seeded and uses deterministic kernels on one CPU thread, so a rerun with the same
pinned toolchain reproduces the same weights. After export the ONNX file is checked, run with
onnxruntime on the test set, and must agree with PyTorch; the script exits non-zero if the test
accuracy falls below ``MIN_ACCURACY``.

Usage: ``.venv/bin/python samples/digits/train.py [--out-dir DIR] [--epochs N]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
TEST_SIZE = 0.2
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 30
MIN_ACCURACY = 0.95
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
BATCH_DIM = "N"


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, two fully connected layers (~38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def seed_everything(seed: int) -> None:
    """Make training reproducible: fixed seeds, deterministic kernels, one CPU thread."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``x_train, x_test, y_train, y_test``; images float32 [n,1,8,8] in [0,1]."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, np.newaxis, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=0
    )
    return x_train, x_test, y_train, y_test


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    """Plain Adam + cross-entropy over shuffled mini-batches (shuffling uses a seeded generator)."""
    inputs = torch.from_numpy(x)
    targets = torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            optimizer.zero_grad()
            loss = loss_fn(model(inputs[batch]), targets[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        if epoch == 1 or epoch % 5 == 0 or epoch == epochs:
            print(f"epoch {epoch:3d}  train loss {total / len(order):.4f}")
    model.eval()


def torch_predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(dim=1).numpy()


def set_batch_dim(value_info: onnx.ValueInfoProto) -> None:
    """Name the first (batch) dimension ``BATCH_DIM`` whatever the exporter called it."""
    dim = value_info.type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = BATCH_DIM


def export_onnx(model: nn.Module, path: Path, accuracy: float, n_test: int) -> onnx.ModelProto:
    """Export with the torch.export-based (dynamo) exporter and tidy the result.

    The dynamo exporter gives a clean graph here (Conv, Relu, MaxPool, Reshape with a constant
    [-1, 512] shape, Gemm; no Shape/Gather chains). It translates at opset 18 and converts down
    to the requested opset 17, so the opset is asserted afterwards.
    """
    example = torch.zeros(2, 1, 8, 8)
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim(BATCH_DIM)}},
        external_data=False,
        optimize=True,
        verbose=False,
    )
    proto = program.model_proto

    opsets = {entry.domain: entry.version for entry in proto.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != OPSET:
        raise RuntimeError(f"exporter produced opset {opsets}, expected {OPSET}")
    (graph_input,) = proto.graph.input
    (graph_output,) = proto.graph.output
    if (graph_input.name, graph_output.name) != (INPUT_NAME, OUTPUT_NAME):
        raise RuntimeError(f"unexpected I/O names {graph_input.name!r}, {graph_output.name!r}")
    # Keep the exporter's shapes for intermediate activations (ONNX's own inference cannot
    # carry "N" through Reshape(-1, 512)), drop its redundant entries for initializers, and name
    # the batch dimension "N" everywhere; strict shape inference below checks them all.
    initializers = {tensor.name for tensor in proto.graph.initializer}
    activations = [info for info in proto.graph.value_info if info.name not in initializers]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(activations)
    for info in [graph_input, graph_output, *proto.graph.value_info]:
        set_batch_dim(info)
    proto.doc_string = (
        "Small CNN classifying scikit-learn's 8x8 handwritten digits (lepton-edge sample). "
        "Input 'image': float32 [N,1,8,8], pixel values / 16 in [0,1]. "
        "Output 'logits': float32 [N,10], argmax is the digit. "
        "Regenerate with samples/digits/train.py."
    )
    del proto.metadata_props[:]
    metadata = {
        "dataset": "sklearn digits",
        "preprocessing": "float32 pixels / 16, shape [N,1,8,8]",
        "test_split": f"stratified {TEST_SIZE:.0%} held out, random_state=0, n={n_test}",
        "test_accuracy": f"{accuracy:.4f}",
        "labels": "0,1,2,3,4,5,6,7,8,9",
    }
    onnx.helper.set_model_props(proto, metadata)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    batch_dims = {
        info.name: info.type.tensor_type.shape.dim[0].dim_param
        for info in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]
    }
    if set(batch_dims.values()) != {BATCH_DIM}:
        raise RuntimeError(f"batch dimension is not {BATCH_DIM!r} everywhere: {batch_dims}")
    onnx.save_model(proto, path, save_as_external_data=False)
    return proto


def onnxruntime_predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: x})
    return logits.argmax(axis=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="where to write digits.onnx, x_test.npy, y_test.npy (default: this script's folder)",
    )
    parser.add_argument(
        "--epochs", type=int, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(SEED)

    x_train, x_test, y_train, y_test = load_split()
    print(f"train {len(x_train)} images, test {len(x_test)} images")

    model = DigitsCNN()
    started = time.perf_counter()
    train(model, x_train, y_train, args.epochs)
    print(f"training took {time.perf_counter() - started:.1f} s")

    torch_pred = torch_predict(model, x_test)
    torch_acc = float((torch_pred == y_test).mean())
    print(f"torch test accuracy:       {torch_acc:.4f}")

    onnx_path = args.out_dir / "digits.onnx"
    export_onnx(model, onnx_path, torch_acc, len(x_test))
    np.save(args.out_dir / "x_test.npy", np.ascontiguousarray(x_test, dtype=np.float32))
    np.save(args.out_dir / "y_test.npy", y_test.astype(np.int64))

    ort_pred = onnxruntime_predict(onnx_path, x_test)
    ort_acc = float((ort_pred == y_test).mean())
    print(f"onnxruntime test accuracy: {ort_acc:.4f}")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes)")

    mismatches = int((ort_pred != torch_pred).sum())
    if mismatches:
        print(f"error: onnxruntime and torch disagree on {mismatches} test images", file=sys.stderr)
        return 1
    if torch_acc < MIN_ACCURACY:
        print(f"error: test accuracy {torch_acc:.4f} < {MIN_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
