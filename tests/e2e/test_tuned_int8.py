"""Tuned builds of int8 (QDQ) models: the batch buckets, the x86 int8 kernels, the numbers.

A quantized model's int8 lowering writes TIR kernels (requantizations) for the symbolic batch
before tuning specialises ``main`` to the buckets; each bucket must get kernels of its own
shapes (``tuning.specialize``). Tuned builds crashed on every int8 model before (FuseTIR: "no
definition of requantize"). On AVX2 without VNNI the tuned build packs the same hand-scheduled
int8 kernels as the untuned one and keeps them out of MetaSchedule's tasks.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest

import lepton_edge
from lepton_edge.compress.quantize import quantize
from tests.e2e.test_quantize import DIGITS, spec_run

tvm = pytest.importorskip("tvm")


@pytest.fixture(scope="module")
def qdq_digits() -> tuple[onnx.ModelProto, np.ndarray]:
    x = np.load(DIGITS / "x_test.npy")
    q = quantize(lepton_edge.load(DIGITS / "digits.onnx"), x[:64], weight_bits=7)
    return q.proto, x


@pytest.fixture(scope="module")
def tuned(qdq_digits, tmp_path_factory: pytest.TempPathFactory):
    proto, _ = qdq_digits
    logs: list[str] = []
    db = tmp_path_factory.mktemp("tuning-db")
    art = lepton_edge.compile(proto, ["cpu"], fallback=False, tune=1, tuning_db=db,
                              log=logs.append)
    path = art.save(tmp_path_factory.mktemp("art") / "q.lepton")
    return art, lepton_edge.runtime.load(path, self_test=True), logs


@pytest.mark.parametrize("batch", [1, 64, 3])  # 1 and 64 are the tuned buckets, 3 is generic
def test_tuned_int8_build_matches_the_qdq_semantics(tuned, qdq_digits, batch: int) -> None:
    art, session, _ = tuned
    proto, x = qdq_digits
    step = art.manifest["output_quant_step"]["logits"]
    got = session.run({"image": x[:batch]})["logits"]
    assert np.abs(got - spec_run(proto, x[:batch])).max() <= step * (1 + 1e-5)


def test_tuned_int8_build_specialises_and_keeps_the_x86_kernels(tuned) -> None:
    from lepton_edge.lowering import x86_int8
    from tests.targets.test_vnni import HOST

    art, session, logs = tuned
    text = "\n".join(logs)
    assert "specialising N to [1, 64]" in text, text
    meta = art.manifest["subgraphs"][0]["builds"][0]["meta"]
    assert meta["tuned"]["trials"] == 1
    assert [k.split(" ")[0] for k in meta["int8_kernels"]] == ["conv2d", "conv2d", "matmul",
                                                               "matmul"]
    assert [p.target for p in session.placement.values()] == ["cpu"]
    if x86_int8.dot_intrinsic(HOST) == x86_int8.INTRIN_AVX2:
        # the AVX2 kernels of both buckets are packed and not handed to MetaSchedule
        assert "AVX2 int8 kernel(s) packed; they keep their default schedules" in text, text
        hand = [line for line in logs if "AVX2 int8 kernel(s) keep their default" in line]
        assert hand and "_N1" in hand[0] and "_N64" in hand[0], text
    if x86_int8.dot_intrinsic(HOST) == x86_int8.INTRIN_VNNI:
        # the untuned build's pixel kernels (both convolutions: 8-wide rows) stay out of
        # MetaSchedule's tasks; the matmuls are tuned around the VNNI intrinsic
        hand = [line for line in logs if "VNNI int8 kernel(s) keep their default" in line]
        assert hand and "conv2d_px" in hand[0] and "_N1" in hand[0] and "_N64" in hand[0], \
            text


def test_a_database_with_int8_records_serves_a_fresh_process(tmp_path, monkeypatch) -> None:
    """Reading a database replays its records, and records of packed int8 kernels tensorize
    with lepton-edge's intrinsics: a fresh process must register them before it opens the
    database, whatever it compiles (it failed with "TensorIntrin ... is not registered" and
    the build fell back to onnxruntime)."""
    import subprocess
    import sys

    from lepton_edge.lowering import x86_int8
    from tests.targets.test_int8_lowering import qdq_model
    from tests.targets.test_vnni import HOST

    if x86_int8.dot_intrinsic(HOST) is None:
        pytest.skip("host CPU has neither AVX2 nor AVX-512 VNNI")
    monkeypatch.setenv(x86_int8.DOT_ENV, "on")  # AVX2 hosts: the tuned [.., 16, 4] kernels
    model, _ = qdq_model(kind="matmul")
    onnx.save(model, tmp_path / "q.onnx")
    db = tmp_path / "db"
    lepton_edge.compile(model, ["cpu"], fallback=False, tune=1, tuning_db=db)
    records = "".join(p.read_text() for p in db.rglob("*tuning_record*.json"))
    assert "lepton_dot_16x4" in records  # a record that replays our tensorize
    code = ("import lepton_edge, sys; art = lepton_edge.compile(sys.argv[1], ['cpu'], "
            "fallback=False, tune=1, tuning_db=sys.argv[2]); print(art.builds)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q.onnx"), str(db)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'cpu'" in out.stdout and "onnxruntime" not in out.stdout, out.stdout


def test_tuned_int8_encoder_kernels_with_a_batch_scalar(tmp_path) -> None:
    """An int8 encoder's requantizations take the batch as a scalar argument (their buffers
    are N * 16 rows): each bucket gets copies with the scalar bound (FuseTIR failed on them:
    "Inconsistent buffers ... mapped to the same relax var"). tune=0 with a database applies
    it only: the same specialise / pack / build path as tuning, without measurements."""
    from lepton_edge.compress.quantize import cosine
    from tests.conftest import spec_output
    from tests.e2e.test_quantize import bert_shaped

    model = bert_shaped(32, 2, 64, 1)
    rng = np.random.default_rng(0)
    q = quantize(model, rng.standard_normal((16, 16, 32)).astype(np.float32), weight_bits=7)
    logs: list[str] = []
    art = lepton_edge.compile(q, ["cpu"], fallback=False, tune=0, tuning_db=tmp_path / "db",
                              log=logs.append)
    assert "specialising N to [1, 64]" in "\n".join(logs)
    bucketed = lepton_edge.runtime.load(art.save(tmp_path / "t.lepton"))
    plain = lepton_edge.runtime.load(
        lepton_edge.compile(q, ["cpu"], fallback=False).save(tmp_path / "u.lepton"))
    test = rng.standard_normal((3, 16, 32)).astype(np.float32)
    fp32 = spec_output(model.proto, {"tokens": test})
    for batch in (1, 3):  # a bucket, and the generic function
        got = bucketed.run({"tokens": test[:batch]})["hidden"]
        np.testing.assert_allclose(got, plain.run({"tokens": test[:batch]})["hidden"],
                                   rtol=1e-5, atol=1e-5)
        assert cosine(got, fp32[:batch]) >= 0.99
