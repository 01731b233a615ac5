"""x86 int8 dot-product kernels (lowering/x86_int8.py): bit-exact, and `vpdpbusd` in VNNI builds.

The packed uint8 x int8 -> int32 kernels are scheduled with one tensorized schedule and
either intrinsic: on this host (AVX2, or VNNI where present) the kernels run and are
compared bit-exactly with numpy int64 math; the x86-64-avx512-vnni (cascadelake) build is
checked for `vpdpbusd` in its disassembly everywhere, and run only on a VNNI host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

import lepton_edge
from lepton_edge.lowering import x86_int8
from lepton_edge.target import host_arch
from tests.targets.test_int8_lowering import CASES, conv_int64, qdq_model, reference

tvm = pytest.importorskip("tvm")
relax = tvm.relax

pytestmark = pytest.mark.skipif(host_arch() != "x86_64", reason="x86 kernels need an x86 host")

rng = np.random.default_rng(11)
HOST = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})


def dilated_conv_int64(x: np.ndarray, weight: np.ndarray, attrs: dict) -> np.ndarray:
    """Exact int64 reference of an unpadded conv2d with the kernel's strides/dilation."""
    dil = attrs.get("dilation", [1, 1])[0]
    w = np.zeros((*weight.shape[:2], (weight.shape[2] - 1) * dil + 1,
                  (weight.shape[3] - 1) * dil + 1), np.int64)
    w[:, :, ::dil, ::dil] = weight
    return conv_int64(x.astype(np.int64), w, [0, 0, 0, 0], attrs.get("strides", [1, 1]), 1)


def host_has_vnni() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "avx512_vnni" in flags.split()


def single_op_module(kind: str, x_shape: list, weight: np.ndarray, **attrs) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if kind == "matmul":
                y = relax.op.matmul(x, relax.const(weight, "int8"), out_dtype="int32")
            else:
                y = relax.op.nn.conv2d(x, relax.const(weight, "int8"), out_dtype="int32",
                                       **attrs)
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return bb.get()


def build_packed(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[object, list[str]]:
    mod, packed = x86_int8.pack_int8_kernels(mod)
    assert len(packed) == 1, packed
    mod, scheduled = x86_int8.schedule_int8_kernels(mod, target)
    return tvm.compile(mod, target=target), scheduled


def run(executable: object, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def extreme_uint8(shape: tuple[int, ...]) -> np.ndarray:
    """Random uint8 with many 0/255 values: products at the int16 edges would saturate
    vpmaddubsw; the exact kernels must not."""
    x = rng.integers(0, 256, shape).astype(np.uint8)
    x[rng.random(shape) < 0.4] = 255
    return x


def extreme_int8(shape: tuple[int, ...]) -> np.ndarray:
    w = rng.integers(-128, 128, shape).astype(np.int8)
    mask = rng.random(shape)
    w[mask < 0.3] = -128
    w[mask > 0.7] = 127
    return w


needs_dot = pytest.mark.skipif(x86_int8.dot_intrinsic(HOST) is None,
                               reason="host CPU has neither AVX2 nor AVX-512 VNNI")


def test_dot_intrinsic_choice() -> None:
    assert x86_int8.dot_intrinsic(CASCADELAKE) == x86_int8.INTRIN_VNNI
    assert x86_int8.dot_intrinsic({"kind": "llvm", "mcpu": "haswell"}) == x86_int8.INTRIN_AVX2
    assert x86_int8.dot_intrinsic({"kind": "llvm", "mcpu": "x86-64"}) is None
    assert x86_int8.dot_intrinsic({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}) is None
    assert x86_int8.int8_rules({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}) == []


MATMULS = {
    "aligned": ([tvm.tirx.Var("N", "int64"), 128], (128, 64), 5),
    "unaligned_k_n": ([tvm.tirx.Var("N", "int64"), 13], (13, 33), 3),
    "batched_3d": ([2, 24, 64], (64, 48), None),
    "single_row": ([1, 96], (96, 16), None),
}


@needs_dot
@pytest.mark.parametrize("case", list(MATMULS))
def test_packed_matmul_is_bit_exact(case: str) -> None:
    x_shape, w_shape, batch = MATMULS[case]
    weight = extreme_int8(w_shape)
    executable, scheduled = build_packed(single_op_module("matmul", x_shape, weight), HOST)
    assert scheduled[0].startswith("int8_matmul_packed: x86_int8_matmul_"), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    got = run(executable, x)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ weight.astype(np.int64))


CONVS = {
    "3x3_stride2_c3": ([tvm.tirx.Var("N", "int64"), 3, 9, 9], (6, 3, 3, 3),
                       dict(strides=[2, 2]), 2),
    "3x3_c16_oc32": ([1, 16, 8, 8], (32, 16, 3, 3), {}, None),
    "3x3_dilated_oc20": ([2, 8, 7, 7], (20, 8, 3, 3), dict(dilation=[2, 2]), None),
}


@needs_dot
@pytest.mark.parametrize("case", list(CONVS))
def test_packed_conv2d_is_bit_exact(case: str) -> None:
    x_shape, w_shape, attrs, batch = CONVS[case]
    weight = extreme_int8(w_shape)
    executable, scheduled = build_packed(single_op_module("conv", x_shape, weight, **attrs),
                                         HOST)
    assert scheduled[0].startswith("int8_conv2d_packed: x86_int8_conv2d_"), scheduled
    shape = tuple(batch if isinstance(d, tvm.tirx.Var) else d for d in x_shape)
    x = extreme_uint8(shape)
    got = run(executable, x)
    want = dilated_conv_int64(x, weight, attrs)
    np.testing.assert_array_equal(got, want)


@needs_dot
@pytest.mark.parametrize("case", ["conv", "gemm_relu", "matmul_per_tensor"])
def test_fused_epilogue_kernel_is_bit_exact(case: str) -> None:
    """TVM's fusion puts the requantization into the packed kernel; the rule computes it per
    output tile. Without lowering/schedules.py: legalize + fuse, then our rules only."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.frontend.onnx import from_onnx

    from lepton_edge.lowering.int8 import lower_qdq_to_integer

    model, p = qdq_model(**CASES[case])
    mod, _ = lower_qdq_to_integer(from_onnx(model, keep_params_in_input=False))
    mod, packed = x86_int8.pack_int8_kernels(mod)
    assert len(packed) == 1
    with HOST:
        mod = tvm.transform.Sequential([*cpu.library_dispatch_passes(HOST),
                                        *cpu.legalize_passes(HOST)])(mod)
    mod, scheduled = x86_int8.schedule_int8_kernels(mod, HOST)
    assert len(scheduled) == 1 and scheduled[0].startswith("fused_int8_"), scheduled
    executable = tvm.compile(mod, target=HOST)
    shape = (3, 3, 7, 7) if case == "conv" else (3, 24)
    x_q = rng.integers(-128, 128, shape).astype(np.int8)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x_q)).numpy()
    np.testing.assert_array_equal(got, reference(x_q, p))


def test_rules_leave_other_kernels_untouched() -> None:
    """A legalized float matmul and an unpacked int8 matmul are not ours: False, unchanged."""
    for dtype_x, dtype_w, out in (("float32", "float32", "float32"), ("int8", "int8", "int32")):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType([4, 8], dtype_x))
        w = relax.Var("w", relax.TensorType([8, 16], dtype_w))
        with bb.function("main", [x, w]):
            y = bb.emit(relax.op.matmul(x, w, out_dtype=out))
            bb.emit_func_output(y)
        mod = relax.transform.LegalizeOps()(bb.get())
        func = next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        for target in (HOST, CASCADELAKE):
            for rule in x86_int8.int8_rules(target):
                sch = tvm.s_tir.Schedule(func)
                assert rule(sch, target) is False
                tvm.ir.assert_structural_equal(sch.mod["main"], func)


def test_non_lowerable_conv_is_reported_and_left() -> None:
    weight = extreme_int8((8, 2, 3, 3))
    mod = single_op_module("conv", [1, 4, 6, 6], weight, groups=2)
    new, notes = x86_int8.pack_int8_kernels(mod)
    assert notes == ["conv2d: grouped; generic code"]
    assert not any(isinstance(f, tvm.tirx.PrimFunc) for _, f in new.functions_items())


# --- end to end: QDQ model -> lepton_edge.compile ----------------------------------------------

#: an instruction only the intrinsic's code has (generic integer code does not use it); an
#: AVX2 build uses the int16 layout (`vpmaddwd`, tests/targets/test_int8_avx2.py)
SIGNATURE = {x86_int8.INTRIN_VNNI: "vpdpbusd", x86_int8.INTRIN_AVX2: "vphaddd",
             x86_int8.INTRIN_I16: "vpmaddwd"}


@needs_dot
@pytest.mark.parametrize("case", ["conv", "matmul", "gemm_relu"])
def test_compiled_qdq_uses_dot_kernels_and_is_bit_exact(case: str, build,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Through lepton_edge.compile: packed, fused with the requantization epilogue,
    tensorized by the default-schedule pass, and bit-exact."""
    monkeypatch.setenv(x86_int8.DOT_ENV, "on")  # also on AVX2-only hosts
    model, p = qdq_model(**CASES[case])
    path, session = build(lepton_edge.load(model))
    text, meta = disassembly(path)
    kind = "conv2d" if case == "conv" else "matmul"
    assert [line.split(" ")[0] for line in meta["int8_dot_kernels"]] == [kind], meta
    intrin = x86_int8.dot_intrinsic(HOST)
    if intrin == x86_int8.INTRIN_AVX2:
        intrin = x86_int8.INTRIN_I16
    assert SIGNATURE[intrin] in text
    shape = [2 if isinstance(d, str) else d for d in session.inputs[0].shape]
    x_q = rng.integers(-128, 128, shape).astype(np.int8)
    x_q[rng.random(shape) < 0.3] = 127
    np.testing.assert_array_equal(session.run({"x_q": x_q})["y_q"], reference(x_q, p))


def test_dot_kernel_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    monkeypatch.delenv(x86_int8.DOT_ENV, raising=False)
    assert x86_int8.use_dot_kernels(CASCADELAKE) and not x86_int8.use_dot_kernels(haswell)
    monkeypatch.setenv(x86_int8.DOT_ENV, "on")
    assert x86_int8.use_dot_kernels(haswell)
    monkeypatch.setenv(x86_int8.DOT_ENV, "off")
    assert not x86_int8.use_dot_kernels(CASCADELAKE)
    monkeypatch.setenv(x86_int8.DOT_ENV, "fast")
    with pytest.raises(lepton_edge.TargetError, match="auto, on or off"):
        x86_int8.use_dot_kernels(CASCADELAKE)


@pytest.fixture(scope="module")
def vnni_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    model, p = qdq_model(kind="conv")
    matmul, pm = qdq_model(kind="matmul")
    art = lepton_edge.compile(model, ["x86-64-avx512-vnni"], fallback=False, golden_count=0)
    art2 = lepton_edge.compile(matmul, ["x86-64-avx512-vnni"], fallback=False, golden_count=0)
    folder = tmp_path_factory.mktemp("vnni")
    return (art.save(folder / "conv.lepton"), art2.save(folder / "matmul.lepton"),
            {"conv": (model, p), "matmul": (matmul, pm)})


def disassembly(artifact: Path) -> tuple[str, dict]:
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not on PATH (Debian: apt install binutils)")
    with zipfile.ZipFile(artifact) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        build = manifest["subgraphs"][0]["builds"][0]
        lib = zf.read(build["files"]["lib.so"])
    path = artifact.with_suffix(".so")
    path.write_bytes(lib)
    text = subprocess.run([objdump, "-d", str(path)], check=True, capture_output=True,
                          text=True).stdout
    return text, build["meta"]


@pytest.mark.parametrize("which", [0, 1])
def test_cascadelake_build_uses_vpdpbusd(vnni_artifact, which: int) -> None:
    text, meta = disassembly(vnni_artifact[which])
    assert meta["mcpu"] == "cascadelake"
    assert len(meta["int8_dot_kernels"]) == 1, meta
    assert "vpdpbusd" in text


@pytest.mark.skipif(not host_has_vnni(), reason="host CPU has no avx512_vnni: the cascadelake "
                    "build cannot run here (its disassembly is checked above)")
@pytest.mark.parametrize("which", [0, 1])
def test_cascadelake_build_runs_bit_exact_on_vnni_host(vnni_artifact, which: int) -> None:
    kind = ["conv", "matmul"][which]
    model, p = vnni_artifact[2][kind]
    session = lepton_edge.runtime.load(vnni_artifact[which])
    shape = [2 if isinstance(d, str) else d for d in session.inputs[0].shape]
    x_q = rng.integers(-128, 128, shape).astype(np.int8)
    np.testing.assert_array_equal(session.run({"x_q": x_q})["y_q"], reference(x_q, p))


@needs_dot
def test_metaschedule_tunes_packed_kernel_with_the_intrinsic(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tune_and_build packs after specialising the batch, tunes the packed kernel in the
    dot-product space (records name our intrinsic) and stays bit-exact for the tuned bucket
    and for other batch sizes (default tensorized schedule)."""
    from lepton_edge.lowering.tuning import tune_and_build

    monkeypatch.setenv(x86_int8.DOT_ENV, "on")
    weight = extreme_int8((64, 48))
    mod = single_op_module("matmul", [tvm.tirx.Var("N", "int64"), 64], weight)
    target = tvm.target.Target({**HOST.export(), "num-cores": 2})
    lines: list[str] = []
    executable = tune_and_build(mod, target, trials=8, database_dir=tmp_path, log=lines.append,
                                buckets={"N": [4]})
    assert any("packed uint8 x int8 kernel" in line for line in lines), lines
    records = (tmp_path / "database_tuning_record.json").read_text()
    assert x86_int8.dot_intrinsic(HOST) in records  # tensorize with our intrinsic was tuned
    for n in (4, 3):
        x = extreme_uint8((n, 64))
        np.testing.assert_array_equal(run(executable, x),
                                      x.astype(np.int64) @ weight.astype(np.int64))
