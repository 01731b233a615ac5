"""x86 int8 kernels: uint8 x int8 -> int32 dot-product tensor intrinsics and their schedules.

The int8 pass (lowering/int8.py) leaves matmul and non-grouped conv2d kernels as
uint8 activations x constant int8 weights -> int32. On x86 this module

1. `pack_int8_kernels(mod, target=None)` (Relax): replaces each such `relax.matmul` /
   `relax.nn.conv2d` by a `call_tir` to a kernel of its own whose weight is packed at
   compile time into [N/16, K/4, 16, 4] (conv2d: [OC/16, C/4, KH, KW, 16, 4]; K, N, C, OC
   zero-padded to multiples of 4 and 16, so any size works) and whose reduction (block
   "dot") is written so that its innermost 16 x 4 block is exactly the dot-product
   intrinsic's description. conv2d packs its input to NCHW[c4] inside the kernel and writes
   NCHW. For an AVX2 target without VNNI, a kernel whose constant weight passes
   `maddubs_exact` (no weight pair can saturate `vpmaddubsw`'s int16 for any uint8 input:
   every weight in [-64, 64], i.e. 7-bit weights such as onnxruntime's reduce_range ones, and
   more) keeps that uint8 layout, its "dot" block annotated MADDUBS_ATTR (the check done; a
   block annotation, which survives FuseOps/FuseTIR), and is tensorized with INTRIN_U8S7
   (conv2d: stems and 1x1 convs of fewer than 128 channels instead get the pixel-vectorized
   kernel's uint8 variant, INTRIN_PX_U8S7: `u8s7_conv_kernel`, a measured rule). Other
   weights there are instead widened to int16 at compile time, matmul [N/8, K/2, 8, 2],
   and the kernel widens its uint8 activations once (block "widen"). conv2d there gets one
   of two int16 kernels (`use_pixel_kernel`): 1x1 convs (but those of >= 64 channels with
   20-32 wide rows, I16_C2_1X1), rows of at most 6 pixels and inputs of at most 4 channels
   get the pixel-vectorized kernel (below: "AVX2 convolutions"; the zero-point pad in front
   of it, and lowering/int8.py's int8 -> uint8 shift, folded into its input packing:
   `folded_shift`); the other convs (KxK with > 4 input channels:
   ResNet-18's 3x3 layers) keep the NCHW[c2] kernel (weights
   [OC/8, C/2, KH, KW, 8, 2]: output channels along the vector, each input pair broadcast;
   the pad stays a kernel of its own); one-channel convs stay generic. int8 depthwise conv2d
   gets a kernel that stages each channel (zero-point pad folded in, strides split into
   phases: column stride 2 by INTRIN_SPLIT2, one load and two shuffles per 32 columns) as a
   flattened plane and runs the taps as a 1-D convolution over it in whole
   vectors ("depthwise int8 convolutions"; int8 NCHW max pooling runs the same way). For a
   VNNI target the depthwise and max-pooling kernels are the same (AVX2 vector code, which
   AVX-512 CPUs run; before, those ops ran lowering/schedules.py's generic int8 code;
   depthwise rows of column stride 1 at least DWP_MIN_WIDTH wide take its tap-pair variant,
   `_te_depthwise_pairs`: the planes restaged as int16 pairs of neighbouring columns, one
   `vpmaddwd` per two taps x 8 outputs, `use_depthwise_pairs`), and stems, 1x1 convs and
   KxK convs with 8-wide output rows (the digits CNN) get the pixel-vectorized kernel's
   uint8 layout for any weight (`vnni_conv_kernel`; one
   256-bit `vpdpbusd` per 8 pixels x 4 channels, INTRIN_PX_VNNI; tiles of up to 16
   accumulators, `px_tile_vnni`); the other convs (KxK over more than 4 channels) keep the
   NCHW[c4] kernel. MobileNetV2 int8 on Zen 4 (1 thread, the same QDQ model,
   benchmarks/int8_speed.py --whole): 1.65x -> 0.84x onnxruntime int8's time at batch 1,
   1.74x -> 0.84x at batch 8, outputs bit-equal to onnxruntime's. FuseOps
   may fuse the elementwise consumers (bias, requantization) into the kernel; the rules
   recognise the kernel by its "dot" block, not by name. The requantization there is
   lowering/int8.py's requantize_te: on x86 builds its float64 form where the per-channel
   accumulator bounds prove it equal to the integer reference (checked at compile time):
   q = lrint(acc * m0 * 2^-shift) (llvm.lrint, vcvtpd2dq) where the product is exact, or
   where no accumulator in the bounds lands on a tie (float_requantize_ok(tie_free=True):
   the long 1x1 reductions), and, where float_zero_point_ok also holds, the zero point
   added in float64 before rounding, lrint(acc * m0 * 2^-shift + z), so that LLVM narrows
   with saturating packs instead of an int32 add and clip. lrint rounds half to even only
   in the default floating-point rounding mode (round-to-nearest-even; code that changes
   MXCSR's rounding mode around a call would change results). Elsewhere the 32-bit
   integer form when every shift >= 33, else the 64-bit one.
2. registers three implementations of ONE description, C[i] += sum_k A[k] * B[i, k]
   (A 4 x uint8, B 16 x 4 int8, C 16 x int32):
   * INTRIN_VNNI: one `vpdpbusd` (llvm.x86.avx512.vpdpbusd.512 with <64 x i8> operands, as
     this wheel's LLVM 22 declares it; TVM's bundled `dot_16x4_vnni` still passes <16 x i32>
     and fails LLVM verification);
   * INTRIN_AVX2: exact AVX2 code: sign/zero-extend to int16, `vpmaddwd` (exact int16 x
     int16 -> int32 pair sums), `vphaddd` and a lane fix-up, exact for any weight;
   * INTRIN_U8S7: per 8 outputs one `vpmaddubsw` (uint8 x int8 pairs summed into int16,
     saturating) of the broadcast activation quad and the packed weights, one `vpmaddwd`
     with int16 ones (the two pairs into int32) and one `vpaddd`. Exact only when no pair
     sum a0 * w0 + a1 * w1 (a in [0, 255]) can leave int16, i.e. 255 * (w0+ + w1+) <= 32767
     and 255 * (w0- + w1-) >= -32768 for every pair (maddubs_exact, checked on the constant
     weight at compile time; only kernels so marked get it: tuned AVX2 builds pack
     unchecked weights in the same layout). With weights that can saturate, it (and
     onnxruntime's AVX2 u8s8 kernel, the same instruction) gets most outputs wrong, so the
     other kernels stay the default. Half the weight bytes and one load + 3 uops per 32
     MACs where the int16 kernel needs two loads + 4: 1.4-1.5x its speed on BERT's matmuls
     (about onnxruntime's MatMulInteger), 1.1-1.9x on most convs;
   INTRIN_PX_VNNI, the pixel kernel's description (below) as one 256-bit `vpdpbusd`
   (AVX512-VNNI + VL, exact for any weight; Zen 4 splits 512-bit ones into two halves, so
   the narrower vector costs no throughput there);
   and INTRIN_I16 for the int16 layout, C[i] += A[0] * B[i, 0] + A[1] * B[i, 1] (8 x int32):
   one `vpmaddwd` with the activation pair broadcast, one `vpaddd`, no fix-up (the
   pixel-vectorized convs use it with the roles swapped: A a weight pair, B 8 pixels x 2
   channels); and INTRIN_PX_U8S7, C[i] += sum_k A[k] * B[i, k] (A 4 int8 weights, B 8
   pixels x 4 uint8 channels, C 8 x int32) for the pixel-vectorized kernel's uint8 variant:
   `vpmaddubsw` + `vpmaddwd` (ones) + `vpaddd`, under the same maddubs_exact condition.
3. `int8_rules(target)`: default-schedule rules (no tuning) that tile the kernels, keep the
   accumulators in registers (the conv kernels in parallel over whole blocks of output
   channels, the matmuls over whole column panels when there are enough, since TVM allocates a tile's buffers once per parallel iteration, with a
   workspace call; per tile that cost more than the tile's work on small layers), run the
   fused epilogue per tile from the accumulators, and tensorize with the target's intrinsic (VNNI when the target
   has avx512vnni, with INTRIN_PX_VNNI for the pixel kernel and the depthwise rule, else
   AVX2 / U8S7 / I16 when it has avx2, else none: the kernels then run TVM's
   plain loops, still exact). `schedule_int8_kernels(mod, target)` applies them to a module;
   `scheduled_notes` checks pack_int8_kernels' notes against the build's ScheduleReport
   (a packed kernel no int8 rule scheduled says so).

The uint8 schedule is the same with either intrinsic, so an AVX2 build (packed without a
target) exercises exactly the tiling and tensorization that the VNNI build uses. Builds pack
by default for VNNI targets, and for AVX2 targets when untuned (`use_dot_kernels`,
LEPTON_X86_INT8_DOT=auto|on|off; measurements in benchmarks/RESULTS.md). On a Zen 3 core
`vpmaddwd` issues about as many MACs per cycle as fp32 FMA, so exact int8 matmuls there
match fp32 kernels at best; VNNI's `vpdpbusd` does 4x the MACs. 7-bit weights (quantized
with at most 64 in magnitude) take the `vpmaddubsw` kernels instead, exactly: whole models
1.2-1.4x faster than with the int16 kernels here (1 thread, the same 7-bit QDQ model, bit-
equal outputs: ResNet-18 b1 30.7 -> 24.2 ms, MobileNetV2 b1 11.1 -> 9.3 ms, BERT-base b8
1498 -> 1103 ms; benchmarks/int8_speed.py --whole ... --weight-bits 7 --threads 1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from lepton_edge.lowering.int8 import expr_dtype

Rule = Callable[[Any, Any], bool]

LANES = 16  # int32 outputs per dot-product step (one zmm register)
GROUP = 4  # uint8 x int8 products summed into each output per step
KERNEL_ATTR = "lepton.x86_int8"
INTRIN_VNNI = "lepton_dot_16x4_u8i8i32_vnni"
INTRIN_AVX2 = "lepton_dot_16x4_u8i8i32_avx2"
#: AVX2, weights whose pairs cannot saturate int16 (maddubs_exact): `vpmaddubsw` + `vpmaddwd`
INTRIN_U8S7 = "lepton_dot_16x4_u8i8i32_maddubs"
#: the pixel-vectorized variant: C[i] += sum_k A[k] * B[i, k], A 4 int8 weights (one
#: broadcast), B 8 pixels x 4 uint8 channels, C 8 int32 pixels
INTRIN_PX_U8S7 = "lepton_dot_8x4_i8u8i32_maddubs"
#: the same description on VNNI: one 256-bit `vpdpbusd` (AVX512-VNNI + VL; exact for any
#: weight; Zen 4 runs 512-bit vpdpbusd as two 256-bit halves, so the narrower vector of the
#: pixel kernel's layout costs no throughput there)
INTRIN_PX_VNNI = "lepton_dot_8x4_i8u8i32_vnni"
#: the "dot" block annotation of a uint8-layout kernel whose constant weight passed
#: maddubs_exact (set only by pack_int8_kernels, after the check; a block annotation, since
#: it must survive FuseOps/FuseTIR): only such kernels get INTRIN_U8S7
MADDUBS_ATTR = "lepton.maddubs_exact"
LOCAL_ACC = "_local_acc"  # suffix of the variants whose accumulator buffer is "local"
_OUT_EWISE_FUSABLE = 4  # relax OpPatternKind: FuseOps fuses the elementwise consumers in

#: AVX2 without VNNI: int16 x int16 -> int32 pairs, one `vpmaddwd` per 8 outputs x 2
INTRIN_I16 = "lepton_dot_8x2_i16i16i32_avx2"
#: a stride-2 depthwise kernel's column phase split: 32 contiguous int8 -> 16 even, 16 odd
#: (one vector load and two shuffles)
INTRIN_SPLIT2 = "lepton_split2_16_i8"
I16_LANES, I16_GROUP = 8, 2

_registered = False
#: matmul register tile (rows, column groups), at most; AVX2 has 16 ymm, AVX-512 32 zmm
MATMUL_TILE = {INTRIN_AVX2: (1, 4), INTRIN_VNNI: (4, 4), INTRIN_I16: (4, 2),
               INTRIN_U8S7: (2, 2)}


def register_intrinsics() -> None:
    """Register INTRIN_VNNI, INTRIN_AVX2, INTRIN_U8S7, INTRIN_PX_U8S7 and INTRIN_I16
    (accumulator in memory of any scope, for MetaSchedule's global caches) and their
    LOCAL_ACC variants (accumulator in a "local" buffer: a stack array that LLVM keeps in
    registers), idempotently."""
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(INTRIN_SPLIT2, allow_missing=True) is None:
        TensorIntrin.register(INTRIN_SPLIT2, *_intrinsic_funcs_split2(DW_SPLIT_LANES))
    for acc_scope, suffix in (("global", ""), ("local", LOCAL_ACC)):
        desc, vnni, avx2, maddubs = _intrinsic_funcs(acc_scope)
        desc16, impl16 = _intrinsic_funcs_i16(acc_scope)
        desc_px, impl_px, impl_px_vnni = _intrinsic_funcs_px_u8(acc_scope)
        for name, d, impl in ((INTRIN_VNNI + suffix, desc, vnni),
                              (INTRIN_PX_U8S7 + suffix, desc_px, impl_px),
                              (INTRIN_PX_VNNI + suffix, desc_px, impl_px_vnni),
                              (INTRIN_AVX2 + suffix, desc, avx2),
                              (INTRIN_U8S7 + suffix, desc, maddubs),
                              (INTRIN_I16 + suffix, desc16, impl16)):
            if TensorIntrin.get(name, allow_missing=True) is None:
                TensorIntrin.register(name, d, impl)
    _registered = True


def _intrinsic_funcs(acc_scope: str) -> tuple[Any, Any, Any, Any]:
    """The description and the VNNI / AVX2 / AVX2 `vpmaddubsw` implementations, accumulator
    in `acc_scope`."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "uint8", offset_factor=1),
             b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni(a: T.Buffer((4,), "uint8", offset_factor=1),
             b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            a_i32 = T.reinterpret(a.vload([0], "uint8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                c.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
                b.vload([0, 0], dtype="int8x64"),
                dtype="int32x16")

    @T.prim_func(s_tir=True)
    def avx2(a: T.Buffer((4,), "uint8", offset_factor=1),
             b: T.Buffer((16, 4), "int8", offset_factor=1),
             c: T.Buffer((16,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            # a0 a1 a2 a3 zero-extended to int16 and repeated 4x: one 64-bit lane, broadcast
            a16 = T.reinterpret(T.broadcast(T.reinterpret(
                T.cast(a.vload([0], "uint8x4"), "int16x4"), dtype="int64"), 4), dtype="int16x16")
            for h in T.unroll(2):
                # rows 8h..8h+3 and 8h+4..8h+7: each int32 = a0*b0 + a1*b1 or a2*b2 + a3*b3
                p0 = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    T.cast(b.vload([h * 8, 0], dtype="int8x16"), "int16x16"), a16,
                    dtype="int32x8")
                p1 = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    T.cast(b.vload([h * 8 + 4, 0], dtype="int8x16"), "int16x16"), a16,
                    dtype="int32x8")
                # per 128-bit lane: rows (0 1 4 5 | 2 3 6 7); the shuffle restores the order
                s = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.phadd.d"), p0, p1,
                    dtype="int32x8")
                c[T.ramp(h * 8, 1, 8)] = c[T.ramp(h * 8, 1, 8)] + T.Shuffle(
                    [s], [0, 1, 4, 5, 2, 3, 6, 7])

    @T.prim_func(s_tir=True)
    def maddubs(a: T.Buffer((4,), "uint8", offset_factor=1),
                b: T.Buffer((16, 4), "int8", offset_factor=1),
                c: T.Buffer((16,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:16], a[0:4], b[0:16, 0:4])
            T.writes(c[0:16])
            # a0 a1 a2 a3 as one int32, broadcast: 8 copies of the quad (32 bytes)
            a32 = T.reinterpret(T.broadcast(
                T.reinterpret(a.vload([0], "uint8x4"), dtype="int32"), 8), dtype="uint8x32")
            for h in T.unroll(2):
                # rows 8h..8h+7: int16 pairs a0*b0 + a1*b1, a2*b2 + a3*b3 (saturating, so
                # exact only for weights that pass maddubs_exact), then summed into int32
                pairs = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                    a32, b.vload([h * 8, 0], dtype="int8x32"), dtype="int16x16")
                c[T.ramp(h * 8, 1, 8)] = c[T.ramp(h * 8, 1, 8)] + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")

    return desc, vnni, avx2, maddubs


def _intrinsic_funcs_px_u8(acc_scope: str) -> tuple[Any, Any, Any]:
    """C[i] += sum_k A[k] * B[i, k] (A 4 x int8 weights, B 8 x 4 uint8 pixels, C 8 x int32)
    and its AVX2 implementation: one `vpmaddubsw` of the 8 pixels' channel quads (unsigned
    operand) and the broadcast weight quad (signed), one `vpmaddwd` with int16 ones, one
    `vpaddd`. Exact for weights that pass maddubs_exact only, like INTRIN_U8S7. Third, the
    VNNI implementation (INTRIN_PX_VNNI): one 256-bit `vpdpbusd`, exact for any weight."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((4,), "int8", offset_factor=1),
             b: T.Buffer((8, 4), "uint8", offset_factor=1),
             c: T.Buffer((8,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:4], b[0:8, 0:4])
            T.writes(c[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((4,), "int8", offset_factor=1),
             b: T.Buffer((8, 4), "uint8", offset_factor=1),
             c: T.Buffer((8,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:4], b[0:8, 0:4])
            T.writes(c[0:8])
            quad = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                b.vload([0, 0], dtype="uint8x32"),
                T.reinterpret(T.broadcast(quad, 8), dtype="int8x32"), dtype="int16x16")
            c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def vnni(a: T.Buffer((4,), "int8", offset_factor=1),
             b: T.Buffer((8, 4), "uint8", offset_factor=1),
             c: T.Buffer((8,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:4], b[0:8, 0:4])
            T.writes(c[0:8])
            quad = T.reinterpret(a.vload([0], "int8x4"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.256"),
                c.vload([0], dtype="int32x8"),
                b.vload([0, 0], dtype="uint8x32"),
                T.reinterpret(T.broadcast(quad, 8), dtype="int8x32"), dtype="int32x8")

    return desc, impl, vnni


def _intrinsic_funcs_split2(lanes: int) -> tuple[Any, Any]:
    """D[p, j] = S[2 j + p] (S 2 * `lanes` int8, D 2 x `lanes` int8, rows any stride) and its
    implementation: one vector load and two shuffles (even, odd lanes), which LLVM lowers to
    `vpshufb` + `vpermq` (x86), instead of 2 * `lanes` scalar loads."""
    from tvm import tirx
    from tvm.script import tirx as T

    n = 2 * lanes
    even = [tirx.IntImm("int32", 2 * k) for k in range(lanes)]
    odd = [tirx.IntImm("int32", 2 * k + 1) for k in range(lanes)]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, d: T.handle) -> None:
        stride = T.int64()
        src = T.match_buffer(a, (n,), "int8", offset_factor=1)
        dst = T.match_buffer(d, (2, lanes), "int8", strides=(stride, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(src[0:n])
            T.writes(dst[0:2, 0:lanes])
            for j, p in T.grid(lanes, 2):
                with T.sblock("split"):
                    vp, vj = T.axis.remap("SS", [p, j])  # the staged block's order
                    dst[vp, vj] = src[vj * 2 + vp]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, d: T.handle) -> None:
        stride = T.int64()
        src = T.match_buffer(a, (n,), "int8", offset_factor=1)
        dst = T.match_buffer(d, (2, lanes), "int8", strides=(stride, 1), offset_factor=1)
        with T.sblock("root"):
            T.reads(src[0:n])
            T.writes(dst[0:2, 0:lanes])
            both = src.vload([0], f"int8x{n}")
            dst[0, T.ramp(T.int32(0), 1, lanes)] = T.Shuffle([both], even)
            dst[1, T.ramp(T.int32(0), 1, lanes)] = T.Shuffle([both], odd)

    return desc, impl


def _intrinsic_funcs_i16(acc_scope: str) -> tuple[Any, Any]:
    """C[i] += A[0] * B[i, 0] + A[1] * B[i, 1] (A 2 x int16, B 8 x 2 int16, C 8 x int32) and
    its AVX2 implementation: one `vpmaddwd` (exact: int16 x int16 products summed in pairs
    into int32; only -32768 * -32768 twice could overflow, and the operands here are widened
    int8/uint8) with the activation pair broadcast as one int32, and one `vpaddd`."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((2,), "int16", offset_factor=1),
             b: T.Buffer((8, 2), "int16", offset_factor=1),
             c: T.Buffer((8,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((2,), "int16", offset_factor=1),
             b: T.Buffer((8, 2), "int16", offset_factor=1),
             c: T.Buffer((8,), "int32", offset_factor=1, scope=acc_scope)) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] = c.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                b.vload([0, 0], dtype="int16x16"),
                T.reinterpret(T.broadcast(pair, 8), dtype="int16x16"), dtype="int32x8")

    return desc, impl


def dot_intrinsic(target: Any) -> str | None:
    """The dot-product intrinsic for an LLVM x86 `target`: VNNI, AVX2 or None."""
    import tvm
    from tvm.target import codegen

    try:
        target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
        if target.kind.name != "llvm":
            return None
        triple = str(target.attrs.get("mtriple", "") or "")
        if triple and not triple.startswith(("x86_64", "i686", "i386")):
            return None
        if codegen.target_has_features("avx512vnni", target):
            return INTRIN_VNNI
        if codegen.target_has_features("avx2", target):
            return INTRIN_AVX2
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe has no intrinsic
        return None
    return None


#: LEPTON_X86_INT8_DOT: "auto" (default) packs for VNNI targets (tuned builds: the uint8
#: layout, tuned around the intrinsic), and for AVX2 targets with the target
#: (pack_int8_kernels(mod, target): the int16 `vpmaddwd` layout, or the uint8 `vpmaddubsw`
#: one for weights that pass maddubs_exact; faster than lowering/schedules.py's generic int8
#: kernels, benchmarks/RESULTS.md; tuned builds keep them out of MetaSchedule's tasks, see
#: tuning.tune_and_build); "on" packs tuned AVX2 builds in the unmarked uint8 layout instead
#: (MetaSchedule tunes it with INTRIN_AVX2); "off" never.
DOT_ENV = "LEPTON_X86_INT8_DOT"


def use_dot_kernels(target: Any, *, untuned: bool = False) -> bool:
    """Whether builds for `target` should pack int8 kernels for the dot-product rules
    (`untuned`: a build with the default schedules only, no MetaSchedule tuning)."""
    import os

    mode = os.environ.get(DOT_ENV, "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        from lepton_edge.errors import TargetError

        raise TargetError(f"{DOT_ENV}={mode!r}: use auto, on or off")
    intrin = dot_intrinsic(target)
    if mode == "off" or intrin is None:
        return False
    return mode == "on" or intrin == INTRIN_VNNI or untuned


#: LEPTON_X86_INT8_MADDUBS: "auto" (default) gives AVX2 kernels whose weights pass
#: maddubs_exact the `vpmaddubsw` kernels; "off" keeps the int16 ones for every weight (for
#: comparisons: benchmarks/int8_speed.py --whole).
MADDUBS_ENV = "LEPTON_X86_INT8_MADDUBS"


def use_maddubs() -> bool:
    """Whether AVX2 builds may use the exact `vpmaddubsw` kernels (MADDUBS_ENV)."""
    import os

    mode = os.environ.get(MADDUBS_ENV, "auto").strip().lower()
    if mode not in ("auto", "off"):
        from lepton_edge.errors import TargetError

        raise TargetError(f"{MADDUBS_ENV}={mode!r}: use auto or off")
    return mode == "auto"


# --- Relax: packed kernels -----------------------------------------------------------------

def _ceil(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack_matmul_weight(w: np.ndarray) -> np.ndarray:
    """int8 [K, N] -> [ceil(N/16), ceil(K/4), 16, 4], zero-padded."""
    k, n = w.shape
    kp, np_ = _ceil(k, GROUP), _ceil(n, LANES)
    padded = np.zeros((kp, np_), np.int8)
    padded[:k, :n] = w
    return np.ascontiguousarray(
        padded.reshape(kp // GROUP, GROUP, np_ // LANES, LANES).transpose(2, 0, 3, 1))


#: int16 bounds of one `vpmaddubsw` lane: a0 * w0 + a1 * w1 with a0, a1 uint8 in [0, 255]
_U8_MAX, _I16_MIN, _I16_MAX = 255, -32768, 32767


def maddubs_exact(w: np.ndarray) -> bool:
    """Whether `vpmaddubsw` is exact for constant int8 weight `w` (matmul [K, N], or conv2d
    OIHW) and every uint8 input: each lane sums a0 * w0 + a1 * w1 over a weight pair as the
    uint8 layout pairs them (adjacent K, (k0, k1) and (k2, k3) of each group of 4; for
    conv2d adjacent input channels at the same tap; the zero padding counts as 0) and
    saturates at int16. Over a in [0, 255] that sum reaches 255 * (w0+ + w1+) at most and
    255 * (w0- + w1-) at least (w+, w- the positive and negative parts), so the lane is
    exact for all inputs iff both fit int16: only two weights of one sign can break it
    (w0 + w1 > 128, or < -128). Weights in [-64, 64] (7-bit, onnxruntime's reduce_range)
    always pass; so does (127, -128)."""
    w = np.asarray(w)
    if w.ndim not in (2, 4) or w.dtype != np.int8:
        return False
    k = np.moveaxis(w, 0 if w.ndim == 2 else 1, 0).astype(np.int32)
    if k.shape[0] % 2:
        k = np.concatenate([k, np.zeros_like(k[:1])])
    pairs = k.reshape(k.shape[0] // 2, 2, -1)
    pos = np.clip(pairs, 0, None).sum(axis=1)
    neg = np.clip(pairs, None, 0).sum(axis=1)
    return bool((_U8_MAX * pos <= _I16_MAX).all() and (_U8_MAX * neg >= _I16_MIN).all())


def pack_matmul_weight_i16(w: np.ndarray) -> np.ndarray:
    """int8 [K, N] -> int16 [ceil(N/8), ceil(K/2), 8, 2], widened at compile time, zero-padded."""
    k, n = w.shape
    kp, np_ = _ceil(k, I16_GROUP), _ceil(n, I16_LANES)
    padded = np.zeros((kp, np_), np.int16)
    padded[:k, :n] = w
    return np.ascontiguousarray(padded.reshape(
        kp // I16_GROUP, I16_GROUP, np_ // I16_LANES, I16_LANES).transpose(2, 0, 3, 1))


def pack_conv2d_weight_i16(w: np.ndarray) -> np.ndarray:
    """int8 OIHW -> int16 [ceil(O/8), ceil(I/2), KH, KW, 8, 2], widened, zero-padded."""
    o, i, kh, kw = w.shape
    op, ip = _ceil(o, I16_LANES), _ceil(i, I16_GROUP)
    padded = np.zeros((op, ip, kh, kw), np.int16)
    padded[:o, :i] = w
    return np.ascontiguousarray(padded.reshape(
        op // I16_LANES, I16_LANES, ip // I16_GROUP, I16_GROUP, kh, kw).transpose(
            0, 2, 4, 5, 1, 3))


def pack_conv2d_weight(w: np.ndarray) -> np.ndarray:
    """int8 OIHW -> [ceil(O/16), ceil(I/4), KH, KW, 16, 4], zero-padded."""
    o, i, kh, kw = w.shape
    op, ip = _ceil(o, LANES), _ceil(i, GROUP)
    padded = np.zeros((op, ip, kh, kw), np.int8)
    padded[:o, :i] = w
    return np.ascontiguousarray(padded.reshape(
        op // LANES, LANES, ip // GROUP, GROUP, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def _dot_attrs(exact: bool) -> dict[str, Any] | None:
    """The "dot" block's annotations: MADDUBS_ATTR when its weight passed maddubs_exact."""
    return {MADDUBS_ATTR: 1} if exact else None


def _te_matmul(a: Any, wp: Any, n: int, exact: bool = False) -> Any:
    """(..., M, K) uint8 x packed weight -> (..., M, n) int32 (`exact`: the weight passed
    maddubs_exact, annotated for INTRIN_U8S7)."""
    from tvm import te, tirx

    *lead, k = a.shape
    nb, kb = int(wp.shape[0]), int(wp.shape[1])
    k = int(k)
    src = a
    if k % GROUP:
        src = te.compute((*lead, kb * GROUP), lambda *i: tirx.if_then_else(
            i[-1] < k, a[(*i[:-1], i[-1])], tirx.const(0, "uint8")), name="a_pad")
    ko = te.reduce_axis((0, kb), "ko")
    ki = te.reduce_axis((0, GROUP), "ki")
    dot = te.compute(
        (*lead, nb * LANES),
        lambda *i: te.sum(
            src[(*i[:-1], ko * GROUP + ki)].astype("int32")
            * wp[i[-1] // LANES, ko, i[-1] % LANES, ki].astype("int32"), axis=[ko, ki]),
        name="dot", attrs=_dot_attrs(exact))
    if nb * LANES == n:
        return dot
    return te.compute((*lead, n), lambda *i: dot[i], name="unpack")


def _te_matmul_i16(a: Any, wp: Any, n: int) -> Any:
    """(..., M, K) uint8 x packed int16 weight -> (..., M, n) int32. The activations are
    widened to int16 once ("widen", K zero-padded to even), not per use."""
    from tvm import te, tirx

    *lead, k = a.shape
    nb, kb = int(wp.shape[0]), int(wp.shape[1])
    k = int(k)
    if k % I16_GROUP:
        wide = te.compute((*lead, kb * I16_GROUP), lambda *i: tirx.if_then_else(
            i[-1] < k, a[(*i[:-1], tirx.min(i[-1], k - 1))].astype("int16"),
            tirx.const(0, "int16")), name="widen")
    else:
        wide = te.compute((*lead, k), lambda *i: a[i].astype("int16"), name="widen")
    ko = te.reduce_axis((0, kb), "ko")
    ki = te.reduce_axis((0, I16_GROUP), "ki")
    dot = te.compute(
        (*lead, nb * I16_LANES),
        lambda *i: te.sum(
            wide[(*i[:-1], ko * I16_GROUP + ki)].astype("int32")
            * wp[i[-1] // I16_LANES, ko, i[-1] % I16_LANES, ki].astype("int32"),
            axis=[ko, ki]),
        name="dot")
    if nb * I16_LANES == n:
        return dot
    return te.compute((*lead, n), lambda *i: dot[i], name="unpack")



def _conv_axes(blocks: int, kh: int, kw: int, group: int) -> tuple[Any, Any, Any, Any]:
    """A blocked int conv's reduction: input-channel blocks, filter rows and columns, and the
    channels inside a block (the pairs one vpmaddwd/vpdpbusd lane sums)."""
    from tvm import te

    return (te.reduce_axis((0, blocks), "rc"), te.reduce_axis((0, kh), "ry"),
            te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, group), "ri"))

def _te_conv2d(x: Any, wp: Any, oc: int, strides: tuple[int, int],
               dilation: tuple[int, int], exact: bool = False) -> Any:
    """NCHW uint8 (already padded) x packed OIHW weight -> NCHW int32. The weight's last two
    axes give the layout: [.., 16, 4] int8 (input packed NCHW[c4] uint8) or [.., 8, 2] int16
    (input widened and packed NCHW[c2] int16). `exact`: an int8 weight that passed
    maddubs_exact (annotated for INTRIN_U8S7)."""
    from tvm import te, tirx

    n, c, h, w = x.shape
    c = int(c)
    ocb, icb, kh, kw, lanes, group = (int(v) for v in wp.shape)
    dtype = "int16" if str(wp.dtype) == "int16" else "uint8"
    (sh, sw), (dh, dw) = strides, dilation
    oh = (h - (kh - 1) * dh - 1) // sh + 1
    ow = (w - (kw - 1) * dw - 1) // sw + 1
    packed = te.compute(
        (n, icb, h, w, group),
        lambda b, cb, y, z, ci: tirx.if_then_else(
            cb * group + ci < c, x[b, tirx.min(cb * group + ci, c - 1), y, z].astype(dtype),
            tirx.const(0, dtype)),
        name="pack")
    rc, ry, rx, ri = _conv_axes(icb, kh, kw, group)
    dot = te.compute(
        (n, ocb, oh, ow, lanes),
        lambda b, ob, y, z, oi: te.sum(
            packed[b, rc, y * sh + ry * dh, z * sw + rx * dw, ri].astype("int32")
            * wp[ob, rc, ry, rx, oi, ri].astype("int32"), axis=[rc, ry, rx, ri]),
        name="dot", attrs=_dot_attrs(exact))
    return te.compute((n, oc, oh, ow), lambda b, o, y, z: dot[b, o // lanes, y, z, o % lanes],
                      name="unpack")


#: compile notes: why an AVX2 kernel is (or is not) the `vpmaddubsw` one
_BOUNDED = "weight pairs bounded: exact"
_SATURATES = "a weight pair could saturate vpmaddubsw"


def pack_int8_kernels(mod: Any, target: Any = None, kernels: list[str] | None = None
                      ) -> tuple[Any, list[str]]:
    """Replace uint8 x constant-int8 -> int32 matmul/conv2d calls by packed-weight kernels.

    For an AVX2 `target` without VNNI, kernels whose weight passes maddubs_exact get the
    uint8 layout marked for INTRIN_U8S7 (MADDUBS_ATTR; conv2d: or, by u8s7_conv_kernel, the
    pixel-vectorized uint8 kernel marked for INTRIN_PX_U8S7), the others the int16 layout
    (weights widened at compile time, `vpmaddwd` per 8 x 2, INTRIN_I16). For a VNNI target,
    depthwise convs and int8 max pooling get the flattened-plane kernel (as on AVX2), stems,
    1x1 convs and KxK convs with 8-wide output rows the pixel kernel's uint8 layout,
    unmarked (vnni_conv_kernel,
    INTRIN_PX_VNNI), and the other convs and matmuls the uint8 x int8 [.., 16, 4] layout;
    without a target every kernel gets that [.., 16, 4] layout of the VNNI / AVX2 dot
    intrinsics, unmarked (tuned builds: MetaSchedule tunes it).
    Returns the new module and one line per call: what was packed, or why a candidate was
    left as it was (it then runs TVM's generic, still exact, code). A list `kernels` gets,
    line for line, the packed kernel's PrimFunc name ("" for a call left as it was): what
    scheduled_notes needs to check, after the build, that the kernel was scheduled."""
    from tvm import relax, tirx
    from tvm.ir.expr import Constant
    from tvm.relax.expr_functor import PyExprMutator, mutator

    notes: list[str] = []
    names: list[str] = kernels if kernels is not None else []

    def note(text: str, out: Any = None) -> None:
        notes.append(text)
        names.append("" if out is None else str(out.args[0].name_hint))

    intrin = None if target is None else dot_intrinsic(target)
    avx2_only = intrin == INTRIN_AVX2
    vnni = intrin == INTRIN_VNNI
    # the depthwise / max-pool kernels are AVX2 vector code (8 x int32), and AVX-512 CPUs
    # have AVX2: VNNI targets take them too
    planes = avx2_only or vnni
    maddubs = avx2_only and use_maddubs()

    def bounded(weight: np.ndarray) -> bool:
        return maddubs and maddubs_exact(weight)

    def saturates() -> str:
        return f" ({_SATURATES})" if maddubs else f" ({MADDUBS_ENV}=off)"

    def shape(expr: Any) -> list[Any] | None:
        dims = getattr(getattr(expr, "ty", None), "shape", None)
        values = getattr(dims, "values", None)
        return None if values is None else list(values)

    @mutator
    class Packer(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            name = str(getattr(call.op, "name", ""))
            if name == "relax.nn.max_pool2d" and planes:
                return self.max_pool(call)
            if name not in ("relax.matmul", "relax.nn.conv2d") or len(call.args) != 2:
                return call
            x, w = call.args
            if planes and name == "relax.nn.conv2d" and self.is_depthwise(call):
                return self.depthwise(call, x, w.value.numpy())
            if str(call.attrs.out_dtype) != "int32" or expr_dtype(x) != "uint8" \
                    or not isinstance(w, Constant) or expr_dtype(w) != "int8":
                return call
            weight = w.value.numpy()
            if name == "relax.matmul":
                return self.matmul(call, x, weight)
            return self.conv2d(call, x, weight)

        def matmul(self, call: Any, x: Any, weight: np.ndarray) -> Any:
            dims = shape(x)
            if weight.ndim != 2 or dims is None or len(dims) < 2 \
                    or not isinstance(dims[-1], tirx.IntImm):
                note("matmul: weight not 2-D or reduction length not static; "
                      "generic code")
                return call
            k, n = weight.shape
            exact = bounded(weight)
            why = ""
            if avx2_only and not exact:
                packed_np, te_func, what = pack_matmul_weight_i16(weight), _te_matmul_i16, "int16"
                aligned = k % I16_GROUP == 0 and n % I16_LANES == 0
                why = saturates()
            else:
                packed_np, te_func, what = pack_matmul_weight(weight), _te_matmul, "int8"
                aligned = k % GROUP == 0 and n % LANES == 0
            packed = relax.const(packed_np, "int16" if what == "int16" else "int8")
            out = self.builder_.call_te(
                te_func, x, packed, n, *((True,) if exact else ()),
                primfunc_name_hint="int8_matmul_packed",
                primfunc_attrs={KERNEL_ATTR: "matmul", "op_pattern": _OUT_EWISE_FUSABLE})
            label = f"uint8 vpmaddubsw {list(packed_np.shape)} ({_BOUNDED})" if exact \
                else f"{what} {list(packed_np.shape)}{why}"
            note(f"matmul K={k} N={n}: packed {label}"
                  + ("" if aligned else " (zero-padded)"), out)
            return out

        def conv2d(self, call: Any, x: Any, weight: np.ndarray) -> Any:
            attrs = call.attrs
            why = None
            if int(attrs.groups) != 1:
                why = "grouped"
            elif (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) \
                    != ("NCHW", "OIHW", "NCHW"):
                why = "layout is not NCHW/OIHW"
            elif any(int(p) for p in attrs.padding):
                why = "implicit padding"
            elif shape(x) is None or not all(isinstance(d, tirx.IntImm)
                                             for d in shape(x)[1:]):
                why = "channels or spatial size not static"
            elif avx2_only and weight.shape[1] == 1:
                # AVX2: one channel padded to 4 wastes 3/4 of the dot product; the generic
                # kernel was 2-3x faster on digits' first conv
                why = "one input channel"
            if why:
                note(f"conv2d: {why}; generic code")
                return call
            exact = bounded(weight)
            if exact and u8s7_conv_kernel(weight.shape) == "px":
                return self.conv2d_px(call, x, weight, f" ({_BOUNDED})", u8=True)
            if vnni and vnni_conv_kernel(weight.shape, self.out_width(call)) == "px":
                return self.conv2d_px(call, x, weight, " (vpdpbusd)", u8=True, vnni=True)
            why = f" ({_BOUNDED})" if exact else ""
            if avx2_only and not exact:
                why = saturates()
                if use_pixel_kernel(weight.shape, self.out_width(call)):
                    return self.conv2d_px(call, x, weight, why)
                packed_np, what, group = pack_conv2d_weight_i16(weight), "int16", I16_GROUP
            else:
                packed_np, what, group = pack_conv2d_weight(weight), "int8", GROUP
                what = "uint8 vpmaddubsw" if exact else what
            packed = relax.const(packed_np, "int16" if what == "int16" else "int8")
            out = self.builder_.call_te(
                _te_conv2d, x, packed, int(weight.shape[0]),
                tuple(int(s) for s in attrs.strides), tuple(int(d) for d in attrs.dilation),
                *((True,) if exact else ()),
                primfunc_name_hint="int8_conv2d_packed",
                primfunc_attrs={KERNEL_ATTR: "conv2d", "op_pattern": _OUT_EWISE_FUSABLE})
            note(f"conv2d {list(weight.shape)}: NCHW[c{group}] input, packed {what} "
                  f"weight {list(packed_np.shape)}{why}", out)
            return out

        def out_width(self, call: Any) -> int:
            """The output width of conv2d `call` (its input padded by its own producer)."""
            attrs, (x, w) = call.attrs, call.args
            width, kw = int(shape(x)[3]), int(w.value.shape[3])
            return (width - (kw - 1) * int(attrs.dilation[1]) - 1) // int(attrs.strides[1]) + 1

        def is_depthwise(self, call: Any) -> bool:
            x, w = call.args
            attrs = call.attrs
            dims = shape(x)
            return (str(attrs.out_dtype) == "int32" and expr_dtype(x) == "int8"
                    and isinstance(w, Constant) and expr_dtype(w) == "int8"
                    and (str(attrs.data_layout), str(attrs.kernel_layout),
                         str(attrs.out_layout)) == ("NCHW", "OIHW", "NCHW")
                    and not any(int(p) for p in attrs.padding)
                    and dims is not None and len(dims) == 4
                    and all(isinstance(d, tirx.IntImm) for d in dims[1:])
                    and int(attrs.groups) == int(dims[1]) > 1
                    and tuple(int(v) for v in w.value.shape[:2]) == (int(dims[1]), 1))

        def depthwise(self, call: Any, x: Any, weight: np.ndarray) -> Any:
            """AVX2: the depthwise kernel; a zero-point pad in front (lowering/int8.py) is
            folded into its per-channel staging."""
            attrs = call.attrs
            (sh, sw), (dh, dw) = (tuple(int(v) for v in attrs.strides),
                                  tuple(int(v) for v in attrs.dilation))
            _, _, kh, kw = weight.shape
            x, padding, pad_value = self.folded_pad(x, "int8", -128, 127)
            h, wd = (int(d) for d in shape(x)[2:])
            oh = (h + padding[0] + padding[2] - (kh - 1) * dh - 1) // sh + 1
            ow = (wd + padding[1] + padding[3] - (kw - 1) * dw - 1) // sw + 1
            rows, pitch, _ = dw_tile(oh, ow, kw, sw, dw)
            paired = dw_tile_pairs(oh, ow, kw, sw) if use_depthwise_pairs(ow, sw, dw) \
                else None
            if vnni and paired is not None:
                rows, pitch, _ = paired
                out = self.builder_.call_te(
                    _te_depthwise_pairs, x, relax.const(pack_depthwise_pairs(weight, sw),
                                                        "int16"), int(kw),
                    (sh, sw), (dh, dw), padding, pad_value, primfunc_name_hint="int8_depthwise",
                    primfunc_attrs={KERNEL_ATTR: "depthwise",
                                    "op_pattern": _OUT_EWISE_FUSABLE})
                how = ", tap pairs (vpmaddwd)"
            else:
                out = self.builder_.call_te(
                    _te_depthwise, x, relax.const(weight, "int8"), (sh, sw), (dh, dw),
                    padding, pad_value, primfunc_name_hint="int8_depthwise",
                    primfunc_attrs={KERNEL_ATTR: "depthwise", "op_pattern": _OUT_EWISE_FUSABLE})
                how = ""
            note(f"depthwise conv2d {list(weight.shape)}: flattened planes of pitch "
                  f"{pitch}, tile {rows} rows ({rows * pitch} outputs)"
                  + (f", pad {list(padding)} folded" if any(padding) else "") + how, out)
            return out

        def max_pool(self, call: Any) -> Any:
            """AVX2: int8 NCHW max pooling (lowering/int8.py pools requantized int8 values
            directly) on the depthwise kernel's staged planes, its padding folded in."""
            attrs, x = call.attrs, call.args[0]
            dims = shape(x)
            if expr_dtype(x) != "int8" or str(attrs.layout) != "NCHW" \
                    or str(attrs.out_layout) != "NCHW" or bool(attrs.ceil_mode) \
                    or dims is None or len(dims) != 4 \
                    or not all(isinstance(d, tirx.IntImm) for d in dims[1:]):
                return call
            kernel = tuple(int(v) for v in attrs.pool_size)
            strides = tuple(int(v) for v in attrs.strides)
            dilation = tuple(int(v) for v in attrs.dilation)
            pad = [int(v) for v in attrs.padding]
            if len(pad) == 2:
                pad = pad * 2
            padding = (pad[0], pad[1], pad[2], pad[3])
            h, wd = int(dims[2]), int(dims[3])
            oh = (h + pad[0] + pad[2] - (kernel[0] - 1) * dilation[0] - 1) // strides[0] + 1
            ow = (wd + pad[1] + pad[3] - (kernel[1] - 1) * dilation[1] - 1) // strides[1] + 1
            want = shape(call)
            if want is None or len(want) != 4 or [oh, ow] != [
                    int(d) if isinstance(d, tirx.IntImm) else -1 for d in want[2:]]:
                return call  # a pooling shape rule this kernel does not follow
            out = self.builder_.call_te(
                _te_max_pool, x, kernel, strides, dilation, padding,
                primfunc_name_hint="int8_max_pool",
                primfunc_attrs={KERNEL_ATTR: "depthwise", "op_pattern": _OUT_EWISE_FUSABLE})
            note(f"max_pool2d {list(kernel)}: int8, flattened planes"
                  + (f", pad {list(padding)} folded" if any(padding) else ""), out)
            return out

        def folded_pad(self, x: Any, want: str, low: int, high: int
                       ) -> tuple[Any, tuple[int, int, int, int], int]:
            """(input, (top, left, bottom, right), value) of a constant spatial pad of
            dtype `want` producing `x` (the kernel then pads itself), else (x, 0s, 0)."""
            source = self.lookup_binding(x) if isinstance(x, relax.Var) else None
            if source is not None and str(getattr(source.op, "name", "")) == "relax.nn.pad" \
                    and str(source.attrs.pad_mode) == "constant" \
                    and expr_dtype(source.args[0]) == want:
                widths = [int(v) for v in source.attrs.pad_width]
                value = float(source.attrs.pad_value)
                if len(widths) == 8 and not any(widths[:4]) and value == int(value) \
                        and low <= value <= high:
                    return (source.args[0], (widths[4], widths[6], widths[5], widths[7]),
                            int(value))
            return x, (0, 0, 0, 0), 0

        def folded_shift(self, x: Any) -> tuple[Any, bool]:
            """(int8 x_q, True) when uint8 `x` is lowering/int8.py's exact shift of x_q,
            astype(add(astype(x_q, int16), 128), uint8): the pixel kernel's packing pass
            then shifts while it packs (no kernel of its own, nor a step in the producer's
            epilogue); else (x, False)."""
            def source(expr: Any, op: str, dtype: str) -> Any:
                call = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
                if call is None or str(getattr(call.op, "name", "")) != op \
                        or expr_dtype(expr) != dtype:
                    return None
                return call

            cast = source(x, "relax.astype", "uint8")
            add = None if cast is None else source(cast.args[0], "relax.add", "int16")
            if add is None or not isinstance(add.args[1], Constant) \
                    or add.args[1].value.numpy().shape != () \
                    or int(add.args[1].value.numpy()) != 128:
                return x, False
            widen = source(add.args[0], "relax.astype", "int16")
            if widen is None or expr_dtype(widen.args[0]) != "int8":
                return x, False
            return widen.args[0], True

        def conv2d_px(self, call: Any, x: Any, weight: np.ndarray, why: str = "",
                      u8: bool = False, vnni: bool = False) -> Any:
            """AVX2: the pixel-vectorized int16 kernel (`u8`: its uint8 `vpmaddubsw`
            variant, for a weight that passed maddubs_exact); `vnni`: the uint8 variant
            for any weight, unmarked (INTRIN_PX_VNNI); a zero-point pad in front of
            the conv (lowering/int8.py) is folded into its packing pass."""
            attrs = call.attrs
            x, padding, pad_value = self.folded_pad(x, "uint8", 0, 255)
            x, shift = self.folded_shift(x)
            o, _, kh, kw = weight.shape
            dims = [int(d) for d in shape(x)[1:]]
            (sh, sw), (dh, dw) = (tuple(int(v) for v in attrs.strides),
                                  tuple(int(v) for v in attrs.dilation))
            oh = (dims[1] + padding[0] + padding[2] - (kh - 1) * dh - 1) // sh + 1
            ow = (dims[2] + padding[1] + padding[3] - (kw - 1) * dw - 1) // sw + 1
            deep = kh * kw > 1 and int(shape(x)[1]) > PX_MAX_NARROW_C
            tile = px_tile_vnni(o, oh, ow, deep) if vnni else px_tile(o, oh, ow)
            packed_np = pack_conv2d_weight_px(weight, tile[0], GROUP if u8 else I16_GROUP)
            out = self.builder_.call_te(
                _te_conv2d_px, x, relax.const(packed_np, "int8" if u8 else "int16"), int(o),
                (sh, sw), (dh, dw), padding, pad_value, tile, u8 and not vnni, shift, vnni,
                primfunc_name_hint="int8_conv2d_px",
                primfunc_attrs={KERNEL_ATTR: "conv2d", "op_pattern": _OUT_EWISE_FUSABLE})
            kind = "uint8 vpdpbusd" if vnni else "uint8 vpmaddubsw" if u8 else "int16"
            note(f"conv2d {list(weight.shape)}: pixel-vectorized {kind}, packed weight "
                  f"{list(packed_np.shape)}, tile {tile[0]} channels x {tile[1]} rows "
                  f"x {tile[2] * PX_LANES} pixels"
                  + (f", pad {list(padding)} folded" if any(padding) else "")
                 + (", uint8 shift folded" if shift else "") + why, out)
            return out

    packer = Packer(mod)
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            packer.builder_.update_func(gvar, packer.visit_expr(func))
    return relax.transform.DeadCodeElimination()(packer.builder_.get()), notes


def scheduled_notes(notes: list[str], kernels: list[str], rules: dict[str, str]
                    ) -> list[str]:
    """pack_int8_kernels' `notes`, each packed kernel's checked against `rules` (the build's
    ScheduleReport.rules: scheduled function -> rule; lowering/schedules.py). A packed
    kernel (`kernels`, line for line) every one of whose fused functions an int8 rule
    scheduled keeps its note; any other says what ran instead: the packed layout in the
    rule's (or TVM's plain) loops, not the dot-product kernel it names."""
    import re

    out = []
    for text, kernel in zip(notes, kernels, strict=True):
        if not kernel:
            out.append(text)
            continue
        token = re.compile(rf"(^|_){re.escape(kernel)}(_|$)")
        ran = sorted({rule for func, rule in rules.items() if token.search(func)})
        if ran and all(rule.startswith("int8:") for rule in ran):
            out.append(text)
            continue
        other = ", ".join(r for r in ran if not r.startswith("int8:")) or "no default schedule"
        out.append(f"{text.split(':')[0]}: packed, but no int8 dot-product schedule "
                   f"applied ({other}): plain loops, not the kernel packed for")
    return out


# --- AVX2 (no VNNI) convolutions: output pixels along the vector lanes --------------------
#
# NCHW convolutions vectorized along the output width: every `vpmaddwd` multiplies 8 output
# pixels x 2 input channels (the input widened to int16 once, packed NCHW[c2] with the two
# channels interleaved) by one broadcast pair of int16 weights (packed at compile time in the
# order the kernel reads them). An output tile of R output channels x Vy rows x Vx vectors of
# 8 pixels accumulates in registers over the whole reduction (C/2 x KH x KW steps, each R
# broadcasts + Vy*Vx vector loads for R*Vy*Vx `vpmaddwd`), and the fused epilogue
# (bias, requantization, residual) runs per tile on whole vectors of one output row, which
# is already NCHW. Channels, rows and the row width are zero-padded up to the tile (any
# size works; the padded outputs are computed and dropped). The input's zero-point padding
# and a strided conv's column phases (w % s, w // s: contiguous vector loads) are folded
# into the packing pass, so no separate pad kernel runs; a 1x1 conv packs only the pixels
# it reads (the stride applied in the packing, so the kernel runs at stride 1), row by row,
# each row zero-padded like the others to a whole number of tiles (Vx vectors of 8).
# Its uint8 variant (weights that pass maddubs_exact; u8s7_conv_kernel picks it) keeps the
# pixels uint8, packed in channel quads (8 pixels x 4 channels = 32 bytes), and runs one
# `vpmaddubsw` + `vpmaddwd` (ones) per 8 pixels x 4 channels (INTRIN_PX_U8S7).

PX_LANES = 8  # output pixels (int32) per vpmaddwd
PX_MAX_NARROW_C = 4  # input channels: a stem conv (RGB) packs to c2 with little reuse
#: candidate tiles (R, Vy, Vx), in order of preference
PX_TILES = ((4, 2, 1), (8, 1, 1), (6, 1, 1), (4, 1, 2))
#: VNNI (AVX-512: 32 vector registers, the 256-bit INTRIN_PX_VNNI leaves them ymm): tiles of
#: 16 accumulators first, in order of preference, then PX_TILES' 8 for less padded work
#: (MobileNetV2 int8, 1 thread, min per kernel: (8, 2, 1) first 4.58 ms the model, (4, 2, 2)
#: first 4.82 (its 112-wide 16 -> 96 conv 240 -> 383 us), PX_TILES alone 4.90)
PX_TILES_VNNI = ((8, 2, 1), (4, 4, 1), (16, 1, 1), (8, 1, 2), (4, 2, 2), (4, 1, 4),
                 (4, 2, 1), (8, 1, 1), (4, 1, 2))
PX_BLOCK = "dot_px"
PX_MIN_PARALLEL = 8  # output-channel blocks that are enough parallel work alone
PX_TILE_ATTR = "lepton.px_tile"  # the dot block's (Vy, Vx), for the schedule


#: (input channels, narrowest, widest output row) of the int16 1x1 convs that take the
#: NCHW[c2] kernel rather than the pixel kernel (use_pixel_kernel)
I16_C2_1X1 = (64, 20, 32)


def use_pixel_kernel(weight_shape: tuple[int, ...], out_width: int) -> bool:
    """AVX2: the pixel-vectorized kernel for 1x1 convs, inputs of at most PX_MAX_NARROW_C
    channels, rows of at most 6 pixels (C2_MIN_WIDTH), and 7-wide rows whose output channels
    leave the NCHW[c2] kernel fewer than C2_MIN_ACCUMULATORS accumulators; the NCHW[c2] kernel
    (output channels along the vector, each input pair broadcast) for the other KxK convs,
    where it measured faster here (ResNet-18's 28- and 14-wide 3x3 layers: 64 and 58 GMAC/s
    against 40 and 46; its 7-wide 512-channel layers with a 1 x 7 tile: 63-73 against
    40-52). 1x1 convs of at least I16_C2_1X1[0] input channels with rows I16_C2_1X1[1:]
    wide take the NCHW[c2] kernel too (measured at 28 wide, 1 thread, requantization fused:
    0.68-0.87x the pixel kernel's time on 9 shapes with 64-256 input channels, MobileNetV2's
    144 -> 32 and 192 -> 32 0.69 and 0.68; 32 -> 192 1.20; 14 and 56 wide 0.92-1.16)."""
    o, c, kh, kw = weight_shape
    if c <= PX_MAX_NARROW_C:
        return True
    if kh == 1 and kw == 1:
        least, low, high = I16_C2_1X1
        return not (c >= least and low <= out_width <= high)
    if out_width >= PX_LANES:
        return False
    if out_width < C2_MIN_WIDTH:  # 2-6 wide: not measured on the NCHW[c2] kernel
        return True
    blocks, columns = c2_tile(-(-o // I16_LANES), out_width)
    return blocks * columns < C2_MIN_ACCUMULATORS


def u8s7_conv_kernel(weight_shape: tuple[int, ...]) -> str:
    """AVX2, a weight that passed maddubs_exact: which `vpmaddubsw` conv kernel, "px" (the
    pixel-vectorized kernel's uint8 variant, INTRIN_PX_U8S7: 8 output pixels x 4 input
    channels per step) or "c4" (the NCHW[c4] kernel, INTRIN_U8S7: 16 output channels x 4
    input channels); the one chosen measured 1.0-2.0x the int16 kernels' speed on every
    shape tried, within the noise of a shared machine. A measured rule (1 thread, 7-bit
    weights, requantization fused, speed relative to the int16 kernel, min over
    interleaved rounds, noisy within about 15%): narrow inputs (at most
    PX_MAX_NARROW_C channels: stems) and 1x1 convs of fewer than U8S7_PX_MAX_1X1_C input
    channels take "px" (MobileNetV2's 1x1 convs with 16-96 channels 1.1-1.8x where "c4"
    gets 0.5-1.2x: 4-24 reduction steps per output tile leave the c4 kernel's input
    packing and per-tile work exposed; stems: MobileNetV2's 3x3 1.1x, "c4" 0.6-0.9x, which
    decided the rule; ResNet-18's 7x7 stem measured 1.1-1.3x, "c4" 1.2-1.4x, within the
    noise, and keeps "px" with the other stems); the other convs "c4" (ResNet-18's 3x3 layers
    1.25-2.2x, "px" 1.05-1.7x; 1x1 convs with 144-960 channels 1.0-2.0x, "px" 1.0-1.6x;
    ResNet-18's strided 1x1 downsamples 1.25x either way)."""
    _, c, kh, kw = weight_shape
    if c <= PX_MAX_NARROW_C or (kh == 1 and kw == 1 and c < U8S7_PX_MAX_1X1_C):
        return "px"
    return "c4"


U8S7_PX_MAX_1X1_C = 128


def vnni_conv_kernel(weight_shape: tuple[int, ...], out_width: int | None = None) -> str:
    """VNNI: "px" (the pixel-vectorized kernel's uint8 layout, INTRIN_PX_VNNI: 8 output
    pixels x 4 input channels per 256-bit `vpdpbusd`, tiles px_tile_vnni) for 1x1 convs and
    narrow inputs (at most PX_MAX_NARROW_C channels: stems), else "c4" (the NCHW[c4] kernel,
    INTRIN_VNNI: 16 output channels x 4 input channels per 512-bit one). Measured on
    MobileNetV2 int8 (Zen 4, 1 thread, batch 1): the pixel kernel writes NCHW rows, so the
    fused epilogue (requantization, residual add) runs on contiguous vectors, where the c4
    kernel's reads its accumulators across channel vectors: 1x1 convs of 144-960 channels
    0.65-0.9x the c4 kernel's time with a residual add (14 and 28 wide), 0.6-1.0x without,
    except 960 -> 160 and 960 -> 320 at 7 wide, 1.0-1.1x (the model: 5.21 ms with px for
    1x1 convs of fewer than 128 channels, 4.89 with px for all). KxK convs whose output rows
    are exactly one vector (`out_width` PX_LANES) take "px" too, with a 4 x 4-row tile
    (px_tile_vnni `deep`): the digits CNN's 16 -> 32 3x3 conv at 8x8, batch 64, 1 thread:
    the model 0.284 -> 0.242 ms (c4: 16-channel vectors of 8x8 rows, 180 us a call)."""
    _, c, kh, kw = weight_shape
    if c <= PX_MAX_NARROW_C or (kh == 1 and kw == 1) or out_width == PX_LANES:
        return "px"
    return "c4"
#: the c4 `vpmaddubsw` conv tile for rows whose width leaves CONV_TILE's (4, 2) fewer than
#: 4 accumulators (7 wide: 2 x 1): up to 7 x 1 (14 ymm; ResNet-18's 512@7 3x3: 1.14 ->
#: 1.32x the int16 kernel)
U8S7_NARROW_TILE = (7, 1)


#: narrow rows: the NCHW[c2] kernel when its tile has this many accumulators (measured on
#: 7-wide rows, 1 x 7) and the rows are at least C2_MIN_WIDTH wide (narrower rows keep the
#: pixel kernel: a 4-wide row's 2 x 4 tile would qualify, but was not measured)
C2_MIN_ACCUMULATORS = 7
C2_MIN_WIDTH = 7


def c2_tile(blocks: int, width: int, intrin: str = INTRIN_I16) -> tuple[int, int]:
    """(output-channel blocks, output pixels) of a blocked conv's register tile over
    `blocks` output-channel blocks and rows `width` wide: the most accumulators within
    CONV_TILE's budget (exact divisors: no predicates), more channel blocks on a tie (each
    input broadcast then feeds more of them): a 7-wide row gets 1 x 7 rather than 2 x 1.
    INTRIN_U8S7 falls back to U8S7_NARROW_TILE's budget when its own leaves it short."""
    def best(budget: int, ob_max: int) -> tuple[int, int]:
        return max(((o, _divisor(width, max(1, budget // o)))
                    for o in range(1, ob_max + 1) if blocks % o == 0),
                   key=lambda t: (t[0] * t[1], t[0]))

    budget, ob_max = CONV_TILE[intrin]
    tile = best(budget, ob_max)
    if intrin == INTRIN_U8S7 and tile[0] * tile[1] < budget:
        tile = max(tile, best(*U8S7_NARROW_TILE), key=lambda t: t[0] * t[1])
    return tile


def px_tile(oc: int, oh: int, ow: int, tiles: tuple[tuple[int, int, int], ...] = PX_TILES
            ) -> tuple[int, int, int]:
    """(R output channels, Vy rows, Vx vectors of 8 pixels) for an oc x oh x ow output: of
    the tiles of 8 accumulators that measured fastest here (16 ymm registers: with more,
    LLVM spills them), the one with the least zero-padded work (first listed on a tie)."""
    def work(tile: tuple[int, int, int]) -> int:
        r, vy, vx = tile
        return _ceil(oc, r) * _ceil(oh, vy) * _ceil(ow, PX_LANES * vx)

    return min(tiles, key=work)


def px_tile_vnni(oc: int, oh: int, ow: int, deep: bool = False) -> tuple[int, int, int]:
    """VNNI: (R, Vy, Vx) of PX_TILES_VNNI for an oc x oh x ow output: a tile whose columns
    (Vx vectors of 8 pixels) divide the row or cover it whole, then the least zero-padded
    work, then the first listed; `deep` (a KxK conv of more than PX_MAX_NARROW_C input
    channels) lists (4, 4, 1) first (the digits CNN's 16 -> 32 3x3 conv at 8x8, 1 thread:
    the model 0.85x the time of (8, 2, 1); (4, 2, 1) 0.87x, (16, 1, 1) 0.89x). A tile that
    splits a row raggedly (14 wide in tiles of 8) leaves the fused epilogue a predicated
    vector loop, which TVM emits lane by lane; one that covers the row gets an epilogue loop
    of the row's own width (MobileNetV2's 14-wide residual projections, 1 thread: about 1.2x
    faster whole)."""
    def key(tile: tuple[int, int, int]) -> tuple[int, int, int]:
        r, vy, vx = tile
        cols = PX_LANES * vx
        ragged = ow % cols != 0 and cols < ow
        work = _ceil(oc, r) * _ceil(oh, vy) * _ceil(ow, cols)
        return (int(ragged), work)

    tiles = PX_TILES_VNNI
    if deep:
        tiles = [(4, 4, 1), *(t for t in PX_TILES_VNNI if t != (4, 4, 1))]
    return min(tiles, key=key)


def pack_conv2d_weight_px(w: np.ndarray, r: int, group: int = I16_GROUP) -> np.ndarray:
    """int8 OIHW -> int16 [ceil(O/r), ceil(I/2), KH, KW, r, 2], widened, zero-padded: the
    tile's r output channels x 2 input channels of one filter tap are 2r consecutive int16
    (each pair one broadcast). `group` GROUP: int8 [.., r, 4] for the uint8 variant (each
    quad one broadcast)."""
    o, i, kh, kw = w.shape
    op, ip = _ceil(o, r), _ceil(i, group)
    padded = np.zeros((op, ip, kh, kw), np.int16 if group == I16_GROUP else np.int8)
    padded[:o, :i] = w
    return np.ascontiguousarray(padded.reshape(
        op // r, r, ip // group, group, kh, kw).transpose(0, 2, 4, 5, 1, 3))


def _te_conv2d_px(x: Any, wp: Any, oc: int, strides: tuple[int, int],
                  dilation: tuple[int, int], padding: tuple[int, int, int, int],
                  pad_value: int, tile: tuple[int, int, int], exact: bool = False,
                  shift: bool = False, vnni: bool = False) -> Any:
    """NCHW uint8 (unpadded: `padding` top, left, bottom, right with `pad_value`) x packed
    int16 weight [OC/R, C/2, KH, KW, R, 2] -> NCHW int32, vectorized along output pixels.
    An int8 weight [OC/R, C/4, KH, KW, R, 4] keeps the pixels uint8, packed in channel
    quads; it exists only for a weight that passed maddubs_exact (`exact`: the block is then
    annotated for INTRIN_PX_U8S7). `shift`: x is int8 and the kernel's input is x + 128 as
    uint8 (lowering/int8.py's exact shift, folded into the packing pass; `pad_value` is in
    the shifted, uint8 domain). `vnni`: the uint8 layout for any weight, unmarked (only
    VNNI's exact INTRIN_PX_VNNI schedules it)."""
    from tvm import te, tirx

    n, c, h, w = x.shape
    c, h, w = int(c), int(h), int(w)
    ocb, c2, kh, kw, r, group = (int(v) for v in wp.shape)
    u8 = str(wp.dtype) == "int8"
    if u8 and not (exact or vnni):
        raise ValueError("the uint8 pixel kernel is only for weights that passed "
                         "maddubs_exact (pass exact=True after the check)")
    dtype = "uint8" if u8 else "int16"
    _, vy, vx = tile
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    pad = tirx.const(pad_value, dtype)

    def value(b: Any, ch: Any, row: Any, col: Any) -> Any:
        """x at padded coordinates (row, col), widened; pad_value outside (the zero-point
        padding, and beyond it columns/rows only padded outputs read); channels past C read
        a clamped channel (their weights are 0)."""
        inside = tirx.all(row >= pt, row < pt + h, col >= pl, col < pl + w)
        pixel = x[b, tirx.min(ch, c - 1), tirx.max(tirx.min(row - pt, h - 1), 0),
                  tirx.max(tirx.min(col - pl, w - 1), 0)]
        if shift:
            pixel = (pixel.astype("int16") + tirx.const(128, "int16")).astype("uint8")
        return tirx.if_then_else(inside, pixel.astype(dtype), pad)

    ohp, owp = _ceil(oh, vy), _ceil(ow, PX_LANES * vx)
    if kh == 1 and kw == 1:  # a 1x1 conv packs only the pixels it reads: stride 1 after
        packed = te.compute(
            (n, c2, ohp, 1, owp, group),
            lambda b, cb, row, _ph, j, ci: value(b, cb * group + ci, row * sh, j * sw),
            name="pack_px")
        sh = sw = 1
    else:
        packed = te.compute(
            (n, c2, (ohp - 1) * sh + (kh - 1) * dh + 1, sw, owp + ((kw - 1) * dw) // sw,
             group),
            lambda b, cb, row, ph, j, ci: value(b, cb * group + ci, row, j * sw + ph),
            name="pack_px")
    rc, ry, rx, ri = _conv_axes(c2, kh, kw, group)
    dot = te.compute(
        (n, ocb, ohp, r, owp),
        lambda b, ob, y, o, z: te.sum(
            wp[ob, rc, ry, rx, o, ri].astype("int32")
            * packed[b, rc, y * sh + ry * dh, (rx * dw) % sw, z + (rx * dw) // sw,
                     ri].astype("int32"),
            axis=[rc, ry, rx, ri]),
        name=PX_BLOCK, attrs={PX_TILE_ATTR: [vy, vx], **(_dot_attrs(exact) or {})})
    return te.compute((n, oc, oh, ow), lambda b, o, y, z: dot[b, o // r, y, o % r, z],
                      name="unpack")


def _schedule_conv2d_px(sch: Any, intrin: str) -> None:
    # INTRIN_I16 (or INTRIN_PX_U8S7), with the roles swapped: A = weights, B = 8 pixels
    dot = sch.get_sblock(PX_BLOCK)
    b, ob, y, o, z, rc, ry, rx, ri = sch.get_loops(dot)
    vy, vx = (int(v) for v in sch.get(dot).annotations[PX_TILE_ATTR])
    y_o, y_i = sch.split(y, factors=[None, vy])
    xb_o, xb_i, xi = sch.split(z, factors=[None, vx, PX_LANES])
    sch.reorder(b, ob, y_o, xb_o, rc, ry, rx, y_i, xb_i, o, xi, ri)
    # Parallel over whole output-channel blocks (rows too when they are few): TVM allocates
    # the accumulators once per parallel iteration (a workspace call), not per tile.
    ocb = _extent(ob, sch) or 1
    parallel = _worth_parallel(sch, dot, int8_work_scale(intrin))
    outer = sch.fuse(b, ob) if ocb >= PX_MIN_PARALLEL else sch.fuse(b, ob, y_o)
    if parallel:
        sch.parallel(outer)
    tile = xb_o
    sch.unroll(y_i)
    sch.unroll(xb_i)
    sch.unroll(o)
    cache = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(cache, tile)
    init = sch.decompose_reduction(dot, rc)
    sch.tensorize(xi, intrin + LOCAL_ACC)
    _vectorize_inner(sch, init, PX_LANES)
    # the epilogue reads the accumulators themselves (no whole-output int32 buffer), one
    # output row vector at a time, unrolled so that they stay registers
    sch.compute_inline(cache)
    _epilogue_per_tile(sch, PX_BLOCK, tile)


# --- depthwise int8 convolutions, vectorized along the flattened output plane ------------
#
# int8 x int8 -> int32 depthwise conv2d (NCHW, one filter per channel). Each channel is first
# staged ("pack_dw", in the kernel's channel loop while it is in cache): padded with the
# zero point (the pad kernel in front, from lowering/int8.py, is folded in; the constant
# border is filled first, then the in-bound pixels copied: decompose_padding) and split into
# the strides' phases, planes [sh * sw, Hq, Wq] with a row pitch Wq >= ow + ((KW - 1) * DW)
# // SW (strided: from a padded plane staged first, "pack_dw_pad", rather than in one scalar
# pass testing every pixel's bounds). In such a plane every filter tap reads the output
# plane's pixels at one constant offset (output (y, x) at flat index y * Wq + x), so the
# taps run as one 1-D convolution over the flattened plane: whole vectors of 8 int32
# accumulators, however narrow the rows (the Wq - ow columns past each row, and rows past
# the last tile's end, are computed and dropped). A tile of R whole output rows (dw_tile:
# R * Wq a whole number of vectors) accumulates over the KH x KW taps, DW_VECTORS vectors
# at a time in registers, and the fused requantization then runs on the tile's R rows,
# vectorized along the row. int8 max pooling (`_te_max_pool`, padding -128) uses the same
# planes and schedule with max for sum.

DW_BLOCK = "dot_dw"
DW_FLAT_OUTPUTS = 128  # flat outputs (int32) per tile, at most, when whole rows fit
DW_VECTORS = 8  # accumulator vectors of 8 int32 held in registers across the taps
DW_CHANNELS = 16  # channels per parallel iteration, at most
DW_PADDED = "pack_dw_pad"  # a strided kernel's padded plane, before its phase split
DW_SPLIT_VECTOR = 32  # a strided kernel's phase split rows this short (pitch) vectorized
DW_SPLIT_LANES = 16  # column stride 2: a pitch this multiple split by INTRIN_SPLIT2
DW_SPLIT_MAX = 64  # ... up to this pitch (past DW_SPLIT_VECTOR: tiles of 2x DW_FLAT_OUTPUTS)


def dw_tile(oh: int, ow: int, kw: int, sw: int = 1, dw: int = 1) -> tuple[int, int, int]:
    """(R rows, pitch, tiles) of a depthwise kernel: staged planes of row pitch >= ow +
    ((kw - 1) * dw) // sw, tiles of R rows whose R * pitch flat outputs are whole vectors of
    PX_LANES (at most DW_FLAT_OUTPUTS when rows are that short), the least flat work
    (tiles * R * pitch; the rows past oh are computed and dropped: 7 x 7 is one tile of
    8 rows of pitch 9), fewer tiles on a tie."""
    least = ow + ((kw - 1) * dw) // sw
    best = None
    split = -(-least // DW_SPLIT_LANES) * DW_SPLIT_LANES
    # INTRIN_SPLIT2 for rows up to DW_SPLIT_MAX, at most 1/8 more columns; past
    # DW_SPLIT_VECTOR with tiles of up to 2 * DW_FLAT_OUTPUTS (96 x 112 x 112 stride 2, 1
    # thread: pitch 60 x 2 rows 249 us (the plain split), pitch 64 split x 2 rows 329, x 4
    # rows 213)
    split = sw == 2 and split <= DW_SPLIT_MAX and split * 8 <= least * 9
    most = DW_FLAT_OUTPUTS * (2 if split and least > DW_SPLIT_VECTOR else 1)
    for pitch in range(least, least + (DW_SPLIT_LANES if split else PX_LANES)):
        if split and pitch % DW_SPLIT_LANES:
            continue
        for rows in range(1, oh + PX_LANES):  # rows past oh: one tile of whole vectors
            flat = rows * pitch
            if flat % PX_LANES or (rows > 1 and flat > most):
                continue
            tiles = -(-oh // rows)
            key = (tiles * flat, tiles)
            if best is None or key < best[0]:
                best = (key, (rows, pitch, tiles))
    assert best is not None  # rows = 1 with pitch a multiple of PX_LANES always fits
    return best[1]


#: VNNI targets: the paired depthwise kernel for column stride 1 and rows this wide at least
DWP_MIN_WIDTH = 24


def use_depthwise_pairs(out_width: int, sw: int, dw: int) -> bool:
    """VNNI targets: whether a depthwise conv takes the paired kernel (_te_depthwise_pairs,
    also subject to dw_tile_pairs): column stride 1 and dilation 1, output rows at least
    DWP_MIN_WIDTH wide. Measured on MobileNetV2 (Zen 4, 1 thread, min per kernel, against the
    plain kernel): stride 1 at 112, 56 and 28 wide 0.70, 0.70, 0.75x the time; at 14 wide
    1.05-1.08x; column stride 2 (the paired kernel supports it) 0.95-1.17x."""
    return sw == 1 and dw == 1 and out_width >= DWP_MIN_WIDTH


def dw_tile_pairs(oh: int, ow: int, kw: int, sw: int = 1) -> tuple[int, int, int] | None:
    """dw_tile for the paired depthwise kernel, whose vectors of 8 outputs may not span two
    rows: (R rows, pitch a multiple of PX_LANES, tiles), or None when that pitch would add
    more than 1/8 to the row's columns (7-wide rows: pitch 16 for 9)."""
    least = ow + (kw - 1) // sw
    split = -(-least // DW_SPLIT_LANES) * DW_SPLIT_LANES
    split = sw == 2 and split <= DW_SPLIT_MAX and split * 8 <= least * 9
    pitch = -(-least // (DW_SPLIT_LANES if split else PX_LANES)) \
        * (DW_SPLIT_LANES if split else PX_LANES)
    if pitch * 8 > least * 9:
        return None
    most = DW_FLAT_OUTPUTS * (2 if split and least > DW_SPLIT_VECTOR else 1)
    best = None
    for rows in range(1, max(1, most // pitch) + 1):
        tiles = -(-oh // rows)
        key = (tiles * rows * pitch, tiles)
        if best is None or key < best[0]:
            best = (key, (rows, pitch, tiles))
    return None if best is None else best[1]


def _dw_planes(x: Any, kernel: tuple[int, int], strides: tuple[int, int],
               dilation: tuple[int, int], padding: tuple[int, int, int, int],
               pad_value: int, tile: tuple[int, int, int] | None = None
               ) -> tuple[Any, Any, int, int, int, int]:
    """A per-channel kernel's staged planes ("pack_dw": NCHW int8 x padded with `pad_value`,
    split into the strides' phases, [N, C, SH * SW, Hq, pitch]) and a function giving the
    value a tap (ry, rx) reads for flat output (y, j); with oh, ow, rows, pitch."""
    from tvm import te, tirx

    n, c, h, wd = x.shape
    h, wd = int(h), int(wd)
    kh, kw = kernel
    (sh, sw), (dh, dw) = strides, dilation
    pt, pl, pb, pr = padding
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (wd + pl + pr - (kw - 1) * dw - 1) // sw + 1
    rows, pitch, tiles = tile if tile is not None else dw_tile(oh, ow, kw, sw, dw)
    # staged rows: every tap of the computed rows (rows * tiles) reads inside, the last
    # column's reach wrapping into one more row
    hq = rows * tiles + ((kh - 1) * dh) // sh + (1 if ((kw - 1) * dw) // sw else 0)
    pad = tirx.const(pad_value, str(x.dtype))

    def padded(b: Any, ch: Any, row: Any, col: Any) -> Any:
        inside = tirx.all(row >= pt, row < pt + h, col >= pl, col < pl + wd)
        return tirx.if_then_else(inside, x[b, ch, row - pt, col - pl], pad)

    if sh * sw > 1:
        # strided: the padded plane first (a pad fill and contiguous row copies, both in
        # vectors), then its phases split from it in plain loops free of bounds tests
        # (96 x 112 x 112 stride 2, 1 thread: 670 -> 270-340 us)
        plane = te.compute((n, c, hq * sh, pitch * sw), padded, name=DW_PADDED)

        def value(b: Any, ch: Any, phase: Any, i: Any, j: Any) -> Any:
            return plane[b, ch, i * sh + phase // sw, j * sw + phase % sw]
    else:
        def value(b: Any, ch: Any, phase: Any, i: Any, j: Any) -> Any:
            return padded(b, ch, i * sh + phase // sw, j * sw + phase % sw)

    staged = te.compute((n, c, sh * sw, hq, pitch), value, name="pack_dw")

    def tap(b: Any, ch: Any, y: Any, j: Any, ry: Any, rx: Any) -> Any:
        phase = ((ry * dh) % sh) * sw + (rx * dw) % sw
        col = j + (rx * dw) // sw  # may run into the next staged row: flat, contiguous
        return staged[b, ch, phase, y + (ry * dh) // sh + col // pitch, col % pitch]

    return staged, tap, oh, ow, rows, pitch


def _te_depthwise(x: Any, w: Any, strides: tuple[int, int], dilation: tuple[int, int],
                  padding: tuple[int, int, int, int] = (0, 0, 0, 0), pad_value: int = 0
                  ) -> Any:
    """NCHW int8 (`padding` top, left, bottom, right with `pad_value`) x [C, 1, KH, KW] int8
    -> NCHW int32, one filter per channel, over the staged flattened planes (see above)."""
    from tvm import te

    n, c = x.shape[:2]
    _, _, kh, kw = (int(v) for v in w.shape)
    _, tap, oh, ow, rows, pitch = _dw_planes(x, (kh, kw), strides, dilation, padding,
                                             pad_value)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    dot = te.compute(
        (n, c, oh + (-oh) % rows, pitch),
        lambda b, ch, y, j: te.sum(tap(b, ch, y, j, ry, rx).astype("int32")
                                   * w[ch, 0, ry, rx].astype("int32"), axis=[ry, rx]),
        name=DW_BLOCK, attrs={PX_TILE_ATTR: [rows, pitch, strides[1]]})
    return te.compute((n, c, oh, ow), lambda b, ch, y, z: dot[b, ch, y, z], name="unpack")


DWP_BLOCK = "dot_dwp"  # the paired depthwise kernel's block (a DW_BLOCK name prefix)
DWP_PAIRS = "pack_dwp"  # its staged planes as int16 pairs of neighbouring columns


def pack_depthwise_pairs(w: np.ndarray, sw: int) -> np.ndarray:
    """int8 [C, 1, KH, KW] -> int16 [C, KH, SW, H, 2] (H = ceil(ceil(KW / SW) / 2)): per
    filter row ry and column phase pc, the taps rx = pc + SW * m (m = 0, 1, ..: the phase
    plane's columns m) in pairs (m = 2h, 2h + 1), zero past KW."""
    c, _, kh, kw = w.shape
    h = -(-(-(-kw // sw)) // 2)
    out = np.zeros((c, kh, sw, h, 2), np.int16)
    for pc in range(sw):
        for m in range(h * 2):
            rx = pc + sw * m
            if rx < kw:
                out[:, :, pc, m // 2, m % 2] = w[:, 0, :, rx]
    return out


def _te_depthwise_pairs(x: Any, wp: Any, kw: int, strides: tuple[int, int],
                        dilation: tuple[int, int],
                        padding: tuple[int, int, int, int] = (0, 0, 0, 0), pad_value: int = 0
                        ) -> Any:
    """VNNI targets: _te_depthwise with the taps of a filter row in pairs of neighbouring
    staged columns, `vpmaddwd` (INTRIN_I16) per pair and 8 outputs instead of a widen,
    `vpmulld` and `vpaddd` per tap: the staged planes are restaged as int16 pairs
    (DWP_PAIRS: column q holds columns q and q + 1), the weights packed by
    pack_depthwise_pairs (a missing second tap weighs 0; `kw` the filter's own width).
    Column dilation 1, column stride 1 or 2."""
    from tvm import te, tirx

    n, c = x.shape[:2]
    _, kh, sw, hp, _ = (int(v) for v in wp.shape)
    (sh, sw_), (dh, dw) = strides, dilation
    assert sw_ == sw and dw == 1
    h_in, w_in = int(x.shape[2]), int(x.shape[3])
    pt, pl, pb, pr = padding
    oh0 = (h_in + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow0 = (w_in + pl + pr - (kw - 1) * dw - 1) // sw + 1
    tile = dw_tile_pairs(oh0, ow0, kw, sw)
    assert tile is not None
    staged, _, oh, ow, rows, pitch = _dw_planes(x, (kh, kw), strides, dilation, padding,
                                                pad_value, tile)
    phases, hq = int(staged.shape[2]), int(staged.shape[3])

    def pair(b: Any, ch: Any, ph: Any, i: Any, q: Any, k: Any) -> Any:
        flat = i * pitch + q + k  # may run into the next staged row: flat, contiguous
        return tirx.if_then_else(
            flat < hq * pitch,
            staged[b, ch, ph, tirx.min(flat // pitch, hq - 1), flat % pitch].astype("int16"),
            tirx.const(0, "int16"))

    pairs = te.compute((n, c, phases, hq, pitch, 2), pair, name=DWP_PAIRS)
    ry = te.reduce_axis((0, kh), "ry")
    pc = te.reduce_axis((0, sw), "pc")
    h = te.reduce_axis((0, hp), "h")
    k = te.reduce_axis((0, 2), "k")

    def tap(b: Any, ch: Any, y: Any, j: Any) -> Any:
        phase = ((ry * dh) % sh) * sw + pc
        col = j + 2 * h
        return pairs[b, ch, phase, y + (ry * dh) // sh + col // pitch, col % pitch, k]

    dot = te.compute(
        (n, c, oh + (-oh) % rows, pitch),
        lambda b, ch, y, j: te.sum(wp[ch, ry, pc, h, k].astype("int32")
                                   * tap(b, ch, y, j).astype("int32"),
                                   axis=[ry, pc, h, k]),
        name=DWP_BLOCK, attrs={PX_TILE_ATTR: [rows, pitch, sw]})
    return te.compute((n, c, oh, ow), lambda b, ch, y, z: dot[b, ch, y, z], name="unpack")


def _te_max_pool(x: Any, kernel: tuple[int, int], strides: tuple[int, int],
                 dilation: tuple[int, int], padding: tuple[int, int, int, int]) -> Any:
    """NCHW int8 max pooling (`padding` with -128, which never wins over a value) over the
    staged flattened planes of the depthwise kernel, scheduled by the same rule."""
    from tvm import te

    n, c = x.shape[:2]
    kh, kw = kernel
    _, tap, oh, ow, rows, pitch = _dw_planes(x, kernel, strides, dilation, padding, -128)
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    pooled = te.compute(
        (n, c, oh + (-oh) % rows, pitch),
        lambda b, ch, y, j: te.max(tap(b, ch, y, j, ry, rx), axis=[ry, rx]),
        name=DW_BLOCK, attrs={PX_TILE_ATTR: [rows, pitch, strides[1]]})
    return te.compute((n, c, oh, ow), lambda b, ch, y, z: pooled[b, ch, y, z], name="unpack")


def _schedule_depthwise(sch: Any, intrin: str) -> None:
    from tvm.s_tir.schedule import ScheduleError

    del intrin  # plain vector code: widen, multiply, add
    dot = sch.get_sblock(DW_BLOCK)
    b, ch, y, j, ry, rx = sch.get_loops(dot)
    rows, pitch, stride_w = (int(v) for v in sch.get(dot).annotations[PX_TILE_ATTR])
    y_o, y_i = sch.split(y, factors=[None, rows])
    # the tile's rows flattened: R * pitch outputs, whole vectors
    vectors = rows * pitch // PX_LANES
    f_o, f_v, f_i = sch.split(sch.fuse(y_i, j),
                              factors=[None, _divisor(vectors, DW_VECTORS), PX_LANES])
    # channels in parallel, DW_CHANNELS at a time: TVM allocates the tile buffers once per
    # parallel iteration (a workspace call each), not once per small channel
    ch_o, ch_i = sch.split(ch, factors=[None, _divisor(_extent(ch, sch), DW_CHANNELS)])
    sch.reorder(b, ch_o, ch_i, y_o, f_o, ry, rx, f_v, f_i)
    if _worth_parallel(sch, dot):
        sch.parallel(sch.fuse(b, ch_o))
    pack = sch.get_sblock("pack_dw")
    sch.compute_at(pack, ch_i)
    # the staged planes flat: a tap's reads become contiguous (q // pitch * pitch + q % pitch)
    sch.transform_layout(pack, ("write", 0),
                         lambda b_, c_, p_, i_, j_: (b_, c_, p_, i_ * pitch + j_))
    sch.unroll(ry)
    sch.unroll(rx)
    sch.unroll(f_v)
    sch.vectorize(f_i)
    cache = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(cache, y_o)
    init = sch.decompose_reduction(dot, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    try:  # the epilogue (or the output copy) reads the accumulators
        sch.compute_inline(cache)
    except ScheduleError:
        sch.vectorize(sch.get_loops(cache)[-1])
    _epilogue_per_tile(sch, DW_BLOCK, y_o)
    _stage_planes(sch, pack, ch_i, stride_w, pitch)


def _stage_planes(sch: Any, pack: Any, channel: Any, stride_w: int, pitch: int) -> None:
    """The depthwise kernels' staging of each channel's flattened plane (block `pack`) under
    the `channel` loop; last in their schedules: it rebuilds the loops."""
    if not _has_block(sch, DW_PADDED):
        _stage_depthwise(sch, pack, channel, stride_w == 1)
        return
    # strided: the padded plane staged first (pad fill, row copies, both in vectors), then
    # its phases split from it in plain loops free of bounds tests (phase, row, column:
    # the column phases unrolled innermost measured slower at 56 wide, 200 -> 440 us)
    padded = sch.get_sblock(DW_PADDED)
    sch.compute_at(padded, channel)
    _stage_depthwise(sch, padded, channel, True)
    # the phase split: at column stride 2 with a pitch of 16, 32, 48 or 64, INTRIN_SPLIT2;
    # else its rows (`pitch` columns each, read at the column stride) vectorized
    # when short: LLVM's loop vectorizer leaves rows under its vector width scalar (144 x
    # 56 x 56 stride 2, pitch 30, 1 thread: 280 -> 165 us), and vectorizes longer ones
    # better than TVM's vector of strided loads (96 x 112 x 112, pitch 60: 250 -> 400 us)
    if stride_w == 2 and pitch % DW_SPLIT_LANES == 0 and pitch <= DW_SPLIT_MAX \
            and _split_columns(sch, pack, channel, pitch):
        return
    inner = sch.get_loops(pack)[-1]
    if 1 < (_extent(inner, sch) or 0) <= DW_SPLIT_VECTOR:
        sch.vectorize(inner)


def _schedule_depthwise_pairs(sch: Any, intrin: str) -> None:
    """_schedule_depthwise for _te_depthwise_pairs: the same tiles, staging and epilogue,
    the pair planes staged per channel after the planes, and each pair of taps x 8
    outputs one INTRIN_I16 (`vpmaddwd`, the weight pair broadcast)."""
    del intrin
    dot = sch.get_sblock(DWP_BLOCK)
    b, ch, y, j, ry, pc, h, k = sch.get_loops(dot)
    rows, pitch, stride_w = (int(v) for v in sch.get(dot).annotations[PX_TILE_ATTR])
    y_o, y_i = sch.split(y, factors=[None, rows])
    j_o, f_i = sch.split(j, factors=[None, PX_LANES])  # a vector stays in its row
    # up to DW_VECTORS accumulator vectors: rows x row vectors, each an exact divisor (a
    # fused split across rows would leave tensorize bindings it cannot blockize)
    per_row = _divisor(pitch // PX_LANES, DW_VECTORS)
    j_oo, j_ov = sch.split(j_o, factors=[None, per_row])
    y_io, y_iv = sch.split(y_i, factors=[None, _divisor(rows, DW_VECTORS // per_row)])
    ch_o, ch_i = sch.split(ch, factors=[None, _divisor(_extent(ch, sch), DW_CHANNELS)])
    sch.reorder(b, ch_o, ch_i, y_o, y_io, j_oo, ry, pc, h, y_iv, j_ov, f_i, k)
    if _worth_parallel(sch, dot):
        sch.parallel(sch.fuse(b, ch_o))
    pairs = sch.get_sblock(DWP_PAIRS)
    sch.compute_at(pairs, ch_i)
    pack = sch.get_sblock("pack_dw")
    sch.compute_at(pack, ch_i)
    sch.transform_layout(pack, ("write", 0),
                         lambda b_, c_, p_, i_, j_: (b_, c_, p_, i_ * pitch + j_))
    sch.transform_layout(pairs, ("write", 0),
                         lambda b_, c_, p_, i_, j_, k_: (b_, c_, p_, i_ * pitch + j_, k_))
    _pack_pairs(sch, pairs)
    sch.unroll(ry)
    sch.unroll(pc)
    sch.unroll(h)
    sch.unroll(y_iv)
    sch.unroll(j_ov)
    cache = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(cache, y_o)
    init = sch.decompose_reduction(dot, ry)
    sch.tensorize(f_i, INTRIN_I16 + LOCAL_ACC)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.compute_inline(cache)
    _epilogue_per_tile(sch, DWP_BLOCK, y_o)
    _stage_planes(sch, pack, ch_i, stride_w, pitch)


def _split_columns(sch: Any, pack: Any, channel: Any, pitch: int) -> bool:
    """A column-stride-2 kernel's phase split (loops phase, row, column under the channel)
    as INTRIN_SPLIT2: each staged row's 2 * L padded columns loaded once and split into the
    even and odd phase (`pitch` a multiple of L = DW_SPLIT_LANES, dw_tile), rather than a
    vector of L strided loads per phase (1 thread, shift epilogue: 144 x 56 x 56 stride 2
    167 -> 86 us, 192 x 28 x 28 65 -> 35 us). False (nothing done) unless both column
    phases are staged (a dilated kernel may read only the even ones)."""
    loops = sch.get_loops(pack)
    depth = [sch.get(lp).same_as(sch.get(channel)) for lp in loops].index(True)
    extents = [_extent(lp, sch) for lp in loops[depth + 1:]]
    if len(extents) != 3 or (extents[0] or 1) % 2 or extents[2] != pitch:
        return False
    phase, row, col = loops[depth + 1:]
    p_row, p_col = sch.split(phase, factors=[None, 2])
    c_o, c_i = sch.split(col, factors=[None, DW_SPLIT_LANES])
    sch.reorder(p_row, row, c_o, c_i, p_col)
    sch.tensorize(c_i, INTRIN_SPLIT2)
    return True


def _stage_depthwise(sch: Any, pack: Any, channel: Any, contiguous: bool) -> None:
    """The per-channel staging (its loops under loop `channel`): the pad value filled
    (vectorized), then the in-bound pixels copied (vectorized along the row at column
    stride 1); when TVM cannot split it so, one pass that tests every pixel."""
    from tvm.s_tir.schedule import ScheduleError

    loops = sch.get_loops(pack)
    depth = [sch.get(lp).same_as(sch.get(channel)) for lp in loops].index(True)
    if depth + 1 >= len(loops):
        return
    try:
        fill = sch.decompose_padding(pack, loops[depth + 1])
    except ScheduleError:
        return
    for block in (fill, pack) if contiguous else (fill,):
        inner = sch.get_loops(block)[-1]
        if (_extent(inner, sch) or 0) > 1:
            try:
                sch.vectorize(inner)
            except ScheduleError:
                pass


def _pack_pairs(sch: Any, block: Any) -> None:
    """An int16 kernel's input packing: the channel pair (innermost, 2) unrolled, so that
    LLVM's loop vectorizer sees two contiguous rows stored interleaved (widen + unpack)
    rather than a strided scalar loop."""
    loops = sch.get_loops(block)
    if len(loops) >= 2 and _extent(loops[-1], sch) in (I16_GROUP, GROUP):
        sch.unroll(loops[-1])


def _epilogue_per_tile(sch: Any, ours: str, tile: Any, whole_rows: bool = False) -> None:
    """The blocks around kernel `ours` (its name prefix): producers other than the input
    packing inlined into their consumers (a residual's dequantize; `_inline_inputs` for the
    ones after the kernel's blocks) or given parallel loops, the elementwise epilogue
    (steps before the requantization each a tile-sized local buffer; the requantization and
    the steps after it inlined into the last block) run per output tile (loop `tile`),
    reading the accumulators, vectorized along the row, the other loops unrolled."""
    from tvm.s_tir.schedule import ScheduleError

    root = sch.get_sblock("root")
    names = [sch.get(blk).name_hint for blk in sch.get_child_blocks(root)]
    mine = [i for i, name in enumerate(names) if name.startswith(ours)]
    for name in names[:mine[0]]:
        block = sch.get_sblock(name)
        if name in ("pack_dw", DW_PADDED, DWP_PAIRS):  # computed per channel in the kernel
            continue
        if not name.startswith("pack"):
            try:  # an elementwise input of the epilogue (a residual's dequantize)
                sch.compute_inline(block)
                continue
            except ScheduleError:  # not inlinable: a pass of its own
                pass
        _parallel_outer(sch, block)
        if name == "pack_px":
            _pack_pairs(sch, block)
    epilogue = _inline_inputs(sch, names, mine)
    # the requantization and the steps after it (the int8 -> uint8 shift for the next conv:
    # cast, add, cast) inlined into the last block: one pass from the accumulators plus
    # bias (MobileNetV2's depthwise kernels at 14x14 and 7x7, 1 thread: 4-5% faster)
    first = next((i for i, n in enumerate(epilogue) if n.startswith("requantize")), None)
    if first is not None:
        for name in epilogue[first:-1]:
            try:
                sch.compute_inline(sch.get_sblock(name))
            except ScheduleError:
                continue
            epilogue = [n for n in epilogue if n != name]
    for name in epilogue:
        block = sch.get_sblock(name)
        if name.startswith("unpack"):
            try:  # a copy: read the accumulators directly
                sch.compute_inline(block)
                continue
            except ScheduleError:  # the output block itself: it stays
                pass
        # Each step per tile, in order, its result a tile-sized local buffer. Not inlined:
        # TVM's simplifier would widen an int32 bias add into the requantization's int64
        # product (cast(a + b) -> cast(a) + cast(b)), and LLVM then emulates a 64 x 64-bit
        # multiply instead of one vpmuldq per 4 lanes.
        sch.reverse_compute_at(block, tile)
        if name != epilogue[-1]:
            sch.set_scope(block, 0, "local")
        loops = sch.get_loops(block)
        depth = [sch.get(lp).same_as(sch.get(tile)) for lp in loops].index(True)
        inner = loops[depth + 1:]
        if whole_rows and len(inner) >= 2:  # tile rows are whole rows: one contiguous run
            inner = [*inner[:-2], sch.fuse(*inner[-2:])]
        *rest, last = inner
        for loop in rest if not _reads_residual(sch, block) else ():
            sch.unroll(loop)
        if (_extent(last, sch) or 0) > 1:
            sch.vectorize(last)


def _reads_residual(sch: Any, block: Any) -> bool:
    """Whether `block` reads a function input of its own output's shape (a residual): TVM
    then vectorizes only the first of the unrolled copies of its tile loops and emits the
    others lane by lane, so those loops stay loops (MobileNetV2's 144 -> 24 and 96 -> 24
    pixel-kernel projections with their residual add, 1 thread: 411 -> 221, 361 -> 170 us;
    without one, unrolled and not measured within 5%)."""
    inputs = list(sch.mod["main"].params)  # the buffers themselves in TVM 0.27
    stmt = sch.get(block)
    shape = [str(d) for d in stmt.writes[0].source.shape]
    return any(any(r.source.same_as(b) for b in inputs)
               and [str(d) for d in r.source.shape] == shape for r in stmt.reads)


def _inline_inputs(sch: Any, names: list[str], mine: list[int]) -> list[str]:
    """The epilogue's block names (after the kernel's blocks, indices `mine`) less the ones
    that read nothing the kernel computes (an elementwise input of the epilogue placed after
    the kernel: a residual's cast): those are inlined into their consumers, or else get
    parallel loops of their own. Moved under the tile, such a block would be computed whole
    in every parallel iteration, and a consumer after it would read other iterations'
    outputs before they are written."""
    from tvm.s_tir.schedule import ScheduleError

    def buffers(name: str, which: str) -> list[Any]:
        return [region.source for region in getattr(sch.get(sch.get_sblock(name)), which)]

    ours = [buf for i in mine for buf in buffers(names[i], "writes")]
    kept = []
    for name in names[mine[-1] + 1:]:
        reads = buffers(name, "reads")
        if name == names[-1] or any(r.same_as(o) for r in reads for o in ours):
            ours += buffers(name, "writes")
            kept.append(name)
            continue
        block = sch.get_sblock(name)
        try:
            sch.compute_inline(block)
        except ScheduleError:
            _parallel_outer(sch, block)
    return kept


# --- TIR: default schedules ------------------------------------------------------------------

def _extent(loop_sref: Any, sch: Any) -> int | None:
    from tvm import tirx

    ext = sch.get(loop_sref).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _divisor(value: int | None, limit: int) -> int:
    if value is None:
        return 1
    return max(d for d in range(1, limit + 1) if value % d == 0)


def _schedule_matmul(sch: Any, intrin: str) -> None:
    lanes = I16_LANES if intrin == INTRIN_I16 else LANES
    dot = sch.get_sblock("dot")
    loops = sch.get_loops(dot)
    *spatial, ko, ki = loops
    *lead, row, col = spatial
    nb, ni = sch.split(col, factors=[None, lanes])
    # register tile: row_i x nb_i accumulators of `lanes` int32 (AVX2: 16 ymm; AVX-512:
    # 32 zmm). Only exact divisors: tensorize needs no predicates.
    rows_max, cols_max = MATMUL_TILE[intrin]
    nb_i_f = _divisor(_extent(nb, sch), cols_max)
    if _extent(row, sch) is None and lead and _extent(lead[-1], sch) is not None:
        # (seq, N, d) layouts: the rows are the symbolic batch; tile the static axis
        # before it instead, so that a tile still has several rows that share the weights
        lead, row = [*lead[:-1], row], lead[-1]
    row_i_f = _divisor(_extent(row, sch), rows_max)
    row_o, row_i = sch.split(row, factors=[None, row_i_f])
    nb_o, nb_i = sch.split(nb, factors=[None, nb_i_f])
    # weight-stationary: a [K, 16 * nb_i] weight panel stays in cache while all rows pass
    sch.reorder(nb_o, *lead, row_o, ko, row_i, nb_i, ni, ki)
    # Parallel over whole column panels (all their rows) when there are enough of them: TVM
    # allocates the tile buffers once per parallel iteration (a workspace call), which per
    # tile cost a noticeable share of small tiles' work
    panels = 1
    for loop in (nb_o, *lead):
        panels *= _extent(loop, sch) or 1
    if panels >= PX_MIN_PARALLEL:
        outer = sch.fuse(nb_o, *lead) if lead else nb_o
        tile = row_o
    else:
        outer = tile = sch.fuse(nb_o, *lead, row_o)
    if _worth_parallel(sch, dot, int8_work_scale(intrin)):
        sch.parallel(outer)  # before tensorize: parallel needs the reduction block intact
    sch.unroll(row_i)
    sch.unroll(nb_i)
    cache = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(cache, tile)
    init = sch.decompose_reduction(dot, ko)
    sch.tensorize(ni, intrin + LOCAL_ACC)
    _vectorize_inner(sch, init, lanes)
    _vectorize_inner(sch, cache, lanes)
    _schedule_around(sch, tile)


#: conv register tile: (accumulator vectors, output-channel blocks at most)
CONV_TILE = {INTRIN_AVX2: (6, 1), INTRIN_VNNI: (16, 2), INTRIN_I16: (8, 2),
             INTRIN_U8S7: (4, 2)}


def _schedule_conv2d(sch: Any, intrin: str) -> None:
    lanes = I16_LANES if intrin == INTRIN_I16 else LANES
    dot = sch.get_sblock("dot")
    b, ob, y, z, oi, rc, ry, rx, ri = sch.get_loops(dot)
    ob_i_f, z_i_f = c2_tile(_extent(ob, sch) or 1, _extent(z, sch) or 1, intrin)
    ob_o, ob_i = sch.split(ob, factors=[None, ob_i_f])
    z_o, z_i = sch.split(z, factors=[None, z_i_f])
    sch.reorder(b, ob_o, y, z_o, rc, ry, rx, ob_i, z_i, oi, ri)
    outer = sch.fuse(b, ob_o, y)
    if _worth_parallel(sch, dot, int8_work_scale(intrin)):
        sch.parallel(outer)
    sch.unroll(ob_i)
    sch.unroll(z_i)
    cache = sch.cache_write(dot, 0, "local")
    sch.reverse_compute_at(cache, z_o)
    init = sch.decompose_reduction(dot, rc)
    sch.tensorize(oi, intrin + LOCAL_ACC)
    _vectorize_inner(sch, init, lanes)
    _vectorize_inner(sch, cache, lanes)
    _schedule_around(sch, outer)  # a whole output row: the epilogue vectorizes along W


def _schedule_around(sch: Any, tile: Any) -> None:
    """The other blocks of the function: the ones before the dot product (input packing,
    anything fused in front) run as parallel loops; the ones after it (unpacking and the
    fused elementwise epilogue: bias, requantization) are computed per output tile, in
    order, right after the tile's accumulators are written, while they are in cache (an
    "unpack" copy is inlined). An elementwise input of the epilogue that does not read the
    kernel's result (a residual's dequantize, before or after the kernel's blocks) is
    inlined into its consumer, so that the epilogue after it still runs per tile
    (`_inline_inputs`). The requantization and the steps after it are inlined into the
    last block for most row widths (`_inline_after_requantize`; MobileNetV2's last 1x1
    conv, 320 -> 1280 at 7x7 with its dequantize and ReLU6 clip, 1 thread: 390-430 -> 330
    us; its residual 144 -> 24 projection at 56x56 290 -> 255 us). A block that refuses
    (ScheduleError) gets parallel loops of its own."""
    from tvm.s_tir.schedule import ScheduleError

    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)]
    ours = [i for i, n in enumerate(names) if n.startswith("dot")]  # init, update, write-back
    before = [sch.get_sblock(n) for n in names[:ours[0]]]
    epilogue = [sch.get_sblock(n) for n in _inline_inputs(sch, names, ours)]
    for block in before:
        if not sch.get(block).name_hint.startswith("pack"):
            try:  # an elementwise input of the epilogue (a residual's dequantize): inlined,
                sch.compute_inline(block)  # so the epilogue after it can run per tile too
                continue
            except ScheduleError:  # not inlinable: a pass of its own
                pass
        _parallel_outer(sch, block)
        if sch.get(block).name_hint == "pack":
            _pack_pairs(sch, block)
    epilogue = _inline_after_requantize(sch, epilogue)
    for block in epilogue:
        if sch.get(block).name_hint.startswith("unpack"):
            try:  # a pure copy: read the accumulators directly
                sch.compute_inline(block)
                continue
            except ScheduleError:  # an output block: it stays
                pass
        try:  # each block per tile, in order: nothing is computed twice (no inlining)
            sch.reverse_compute_at(block, tile)
            loops = sch.get_loops(block)
            extent = _extent(loops[-1], sch)
            if extent is not None and extent <= 4 * LANES and extent % 8 == 0:
                sch.vectorize(loops[-1])
        except ScheduleError:  # falls back to parallel loops of its own
            _parallel_outer(sch, block)


def _inline_after_requantize(sch: Any, epilogue: list[Any]) -> list[Any]:
    """`epilogue` (blocks) less the requantization and the elementwise steps after it, which
    are inlined into the last block (int8 -> uint8 shift, dequantize, clip): one pass from
    the accumulators plus bias rather than a pass (and a buffer) per step. Only for output
    rows that _schedule_around vectorizes (a multiple of 8, at most 64 wide) or that LLVM's
    loop vectorizer leaves scalar anyway (under 8): 14-wide rows measured 1.15x slower
    inlined (MobileNetV2's residual projections, 1 thread: LLVM vectorizes each short
    step's loop, not the inlined one)."""
    from tvm.s_tir.schedule import ScheduleError

    width = _extent(sch.get_loops(epilogue[-1])[-1], sch) if epilogue else None
    if width is None or not (width < PX_LANES or (width % PX_LANES == 0
                                                  and width <= 4 * LANES)):
        return epilogue
    names = [sch.get(block).name_hint for block in epilogue]
    first = next((i for i, n in enumerate(names) if n.startswith("requantize")), None)
    if first is None:
        return epilogue
    kept = epilogue[:first]
    for block in epilogue[first:-1]:
        try:
            sch.compute_inline(block)
        except ScheduleError:
            kept.append(block)
    return [*kept, epilogue[-1]]


def _has_block(sch: Any, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # noqa: BLE001 - TVM raises a generic error for a missing block
        return False
    return True


def _vectorize_inner(sch: Any, block: Any, lanes: int = LANES) -> None:
    loops = sch.get_loops(block)
    extent = _extent(loops[-1], sch) if loops else None
    if extent is not None and extent % lanes == 0 and extent <= 4 * LANES:
        sch.vectorize(loops[-1])


#: Multiply-adds of the int8 kernels per fp32 FMA of the same time, roughly: the threshold
#: of a kernel's parallel loop is schedules.PARALLEL_MIN_WORK times this many multiply-adds
#: (a `vpdpbusd` lane does 4 per instruction, an int16 `vpmaddwd` lane 2). Measured
#: 2026-11-30, Zen 4, 2 threads: the digits CNN's int8 kernels (0.02-0.2 M multiply-adds a
#: sample) each ran 1.1-1.8x slower parallel than serial at batch 1 (16.6 -> 12.2 us a call
#: with TVM_NUM_THREADS=1: thread-pool launches).
INT8_WORK_SCALE = {INTRIN_VNNI: 4, INTRIN_PX_VNNI: 4}
INT8_WORK_SCALE_DEFAULT = 2


def int8_work_scale(intrin: str) -> int:
    """Multiply-adds of a kernel tensorized with `intrin` per iteration of a float32 kernel's
    loop nest (INT8_WORK_SCALE)."""
    return INT8_WORK_SCALE.get(intrin, INT8_WORK_SCALE_DEFAULT)


def _worth_parallel(sch: Any, block: Any, scale: int = 1) -> bool:
    """Whether `block`'s loop nest (all its iterations: multiply-adds for a kernel, elements
    for a copy) divided by `scale` reaches schedules.PARALLEL_MIN_WORK: less does not pay
    for a thread-pool launch. A symbolic batch counts as schedules' current symbolic
    factor (1 for the serial schedule; schedules._with_parallel_variant schedules such a
    kernel again for large batches and picks one of the two at run time, from the work
    times the rule's `work_scale`)."""
    from lepton_edge.lowering import schedules

    work = 1.0
    for loop in sch.get_loops(block):
        extent = sch.get(loop).extent
        constant = schedules._const(extent)
        # a fused symbolic loop (N * 16): its constant factor times the symbolic factor
        work *= constant if constant is not None else \
            schedules._const_factor(extent) * schedules._symbolic_factor()
    return work / scale >= schedules.PARALLEL_MIN_WORK


def _parallel_outer(sch: Any, block: Any) -> None:
    if not _worth_parallel(sch, block):
        return
    loops = sch.get_loops(block)
    if len(loops) >= 2:
        sch.parallel(sch.fuse(loops[0], loops[1]))
    elif loops:
        sch.parallel(loops[0])


_SCHEDULES = {"matmul": _schedule_matmul, "conv2d": _schedule_conv2d,
              "matmul_u8s7": _schedule_matmul, "conv2d_u8s7": _schedule_conv2d,
              "matmul_i16": _schedule_matmul, "conv2d_i16": _schedule_conv2d,
              "conv2d_px": _schedule_conv2d_px, "conv2d_px_u8s7": _schedule_conv2d_px,
              "conv2d_px_u8": _schedule_conv2d_px,
              "depthwise": _schedule_depthwise,
              "depthwise_pairs": _schedule_depthwise_pairs}


def packed_kind(sch: Any) -> str | None:
    """"matmul" / "conv2d" when the scheduled function holds one of our packed kernels (a
    not yet scheduled "dot" block: uint8 x int8 packed [..., 16, 4] -> int32), with
    "_u8s7" when that block carries MADDUBS_ATTR (its weight passed maddubs_exact),
    "matmul_i16" / "conv2d_i16" for the int16 ones (int16 x int16 packed [.., 8, 2] ->
    int32), "conv2d_px" / "depthwise" for those kernels, else None."""
    func = sch.mod["main"]
    if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
        return None
    if _has_block(sch, PX_BLOCK):
        px = sch.get(sch.get_sblock(PX_BLOCK))
        if MADDUBS_ATTR in px.annotations:
            return "conv2d_px_u8s7"
        # the uint8 layout unmarked (VNNI builds): int8 weights, no int16 operand
        u8 = not any(str(r.source.dtype) == "int16" for r in px.reads)
        return "conv2d_px_u8" if u8 else "conv2d_px"
    if _has_block(sch, DWP_BLOCK):
        return "depthwise_pairs"
    if _has_block(sch, DW_BLOCK):
        return "depthwise"
    if not _has_block(sch, "dot"):
        return None
    block = sch.get(sch.get_sblock("dot"))
    if len(block.writes) != 1 or str(block.writes[0].source.dtype) != "int32" \
            or block.init is None:
        return None
    dtypes = sorted(str(r.source.dtype) for r in block.reads)

    def static(buf: Any) -> list[int | None]:
        return [int(d) if hasattr(d, "value") else None for d in buf.shape]

    if dtypes == ["int16", "int16"]:
        for sh in (static(r.source) for r in block.reads):
            if sh[-2:] == [I16_LANES, I16_GROUP] and len(sh) in (4, 6):
                return {4: "matmul_i16", 6: "conv2d_i16"}[len(sh)]
        return None
    weights = [r.source for r in block.reads if str(r.source.dtype) == "int8"]
    if dtypes != ["int8", "uint8"] or len(weights) != 1:
        return None
    shape = static(weights[0])
    if shape[-2:] != [LANES, GROUP] or len(shape) not in (4, 6):
        return None
    kind = {4: "matmul", 6: "conv2d"}[len(shape)]
    # the annotation, never the layout alone: tuned AVX2 builds (LEPTON_X86_INT8_DOT=on)
    # pack unchecked weights in the same uint8 layout
    return kind + "_u8s7" if MADDUBS_ATTR in block.annotations else kind


def _make_rule(kind: str, intrin: str) -> Rule:
    def rule(sch: Any, target: Any) -> bool:
        if packed_kind(sch) != kind:
            return False
        register_intrinsics()
        schedule = _SCHEDULES[kind]
        # Dry run on a copy: a failure leaves `sch` untouched (the kernel keeps plain loops).
        try:
            schedule(sch.copy(), intrin)
        except Exception:  # noqa: BLE001 - TVM schedule errors have no common type
            return False
        schedule(sch, intrin)
        return True

    vnni = intrin in (INTRIN_VNNI, INTRIN_PX_VNNI)
    # for schedules._with_parallel_variant's run-time choice (depthwise and pooling: plain
    # vector code, as float32 kernels)
    scale = 1 if kind.startswith("depthwise") else int8_work_scale(intrin)
    rule.work_scale = scale  # type: ignore[attr-defined]
    rule.__name__ = f"x86_int8_{kind}_{'vnni' if vnni else 'avx2'}"
    return rule


def int8_rules(target: Any) -> list[Rule]:
    """The int8 default-schedule rules for `target`: tensorize the packed int8 kernels with
    VNNI (avx512vnni) or the exact AVX2 dot products (INTRIN_U8S7 only for kernels marked
    MADDUBS_ATTR); none on other targets."""
    intrin = dot_intrinsic(target)
    if intrin is None:
        return []
    rules = [_make_rule(kind, intrin) for kind in ("matmul", "conv2d")]
    if intrin == INTRIN_AVX2:
        rules += [_make_rule(kind, INTRIN_U8S7) for kind in ("matmul_u8s7", "conv2d_u8s7")]
        rules.append(_make_rule("conv2d_px_u8s7", INTRIN_PX_U8S7))
        rules += [_make_rule(kind, INTRIN_I16)
                  for kind in ("matmul_i16", "conv2d_i16", "conv2d_px", "depthwise")]
    else:  # VNNI is exact for any weight: a checked kernel is a plain uint8 one there
        rules += [_make_rule(kind, intrin) for kind in ("matmul_u8s7", "conv2d_u8s7")]
        rules += [_make_rule(kind, INTRIN_PX_VNNI) for kind in ("conv2d_px_u8",
                                                                "conv2d_px_u8s7")]
        rules.append(_make_rule("depthwise", INTRIN_I16))  # plain AVX2 vector code
        rules.append(_make_rule("depthwise_pairs", INTRIN_I16))
    return rules


def schedule_int8_kernels(mod: Any, target: Any) -> tuple[Any, list[str]]:
    """Apply int8_rules(target) to every not yet scheduled packed int8 kernel of `mod` (fused
    or not) and mark it scheduled. For pipelines that do not call the rules themselves
    (lowering/schedules.py does). Returns the module and one line per kernel found."""
    import tvm

    rules = int8_rules(target)
    notes = []
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        sch = tvm.s_tir.Schedule(func)
        if packed_kind(sch) is None:
            continue
        used = next((r.__name__ for r in rules if r(sch, target)), None)
        if used is None:
            notes.append(f"{gvar.name_hint}: no dot-product schedule for this target; "
                         "plain loops")
            continue
        mod[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        notes.append(f"{gvar.name_hint}: {used}")
    return mod, notes
