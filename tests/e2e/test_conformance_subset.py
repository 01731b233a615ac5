"""A fixed subset of the ONNX backend node tests, for `make test`.

About 150 cases of the ops most common in real models, each run through lepton-edge
(load -> compile(["cpu"], golden_count=0) -> save -> runtime.load -> run) and compared with
the case's expected outputs under onnx's backend-test tolerances. The full suite, isolated
in worker processes and compared with onnxruntime, is `make conformance`
(conformance/run.py, report in conformance/RESULTS.md); this file shares its case
generation and comparison (conformance/cases.py) and runs in-process, one compile per case.

Every case must pass, compiled or through the onnxruntime fallback, or be listed in
KNOWN_FAILURES with the outcome it has and why. A known failure that starts passing, or
fails in another way, fails the test, so the list stays honest. Wrong results are never
hidden: their reasons start with "WRONG NUMBERS:".

Names ending in `@opsetN` are *restamped* cases (see cases.restamp): onnx generates each case
at the op's newest opset, and for ops revised after opset 23 (Reshape, Transpose, Cast,
QuantizeLinear, Pad, ...) that is outside lepton-edge's opset range; the restamped case is the
same model declared at the newest opset <= 23 that has the op, checked against onnx's
reference implementation.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]

# The onnx test-case modules (onnx/backend/test/case/node/<name>.py) the subset draws from;
# generating only these is much faster than generating all ~1900 cases.
MODULES = [
    "conv", "convtranspose", "matmul", "gemm", "add", "sub", "mul", "div", "relu", "leakyrelu",
    "sigmoid", "tanh", "softmax", "logsoftmax", "batch_normalization", "layernormalization",
    "instance_normalization", "maxpool", "averagepool", "globalaveragepool", "globalmaxpool",
    "reshape", "transpose", "concat", "split", "slice", "gather", "squeeze", "unsqueeze",
    "flatten", "reducemean", "reducesum", "reducemax", "pow", "sqrt", "erf", "exp", "log", "neg",
    "abs", "reciprocal", "clip", "cast", "where", "expand", "resize", "quantizelinear",
    "dequantizelinear", "gelu", "hardswish", "hardsigmoid", "elu", "prelu", "softplus", "pad",
    "shape", "constantofshape", "rangeop", "topk", "einsum", "max", "min", "equal", "argmax",
    "tile", "depthtospace", "nonmaxsuppression", "dropout", "identity", "attention", "mish",
    "swish", "trilu", "reducesumsquare", "sequenceinsert", "splittosequence", "sequence_map",
    "optionalhaselement", "if_", "loop", "meanvariancenormalization", "qlinearconv",
    "qlinearmatmul", "convinteger", "softmax_cross_entropy_loss", "rnn", "hannwindow",
    "affinegrid", "isinf",
]

SUBSET = [
    # convolution and linear algebra
    "test_basic_conv_with_padding", "test_conv_with_strides_padding",
    "test_conv_with_strides_and_asymmetric_padding", "test_conv_with_autopad_same",
    "test_convtranspose", "test_convtranspose_1d", "test_convtranspose_pads",
    "test_convtranspose_dilations", "test_convtranspose_group_2", "test_convtranspose_output_shape",
    "test_matmul_2d", "test_matmul_3d", "test_matmul_4d", "test_matmul_bcast",
    "test_gemm_default_no_bias", "test_gemm_default_vector_bias", "test_gemm_transposeA",
    "test_gemm_transposeB", "test_gemm_all_attributes",
    # empty tensors through the CPU device (its DLPack path copies them)
    "test_tril_zero", "test_reduce_sum_square_empty_set_expanded",
    "test_einsum_batch_matmul@opset12", "test_einsum_transpose@opset12",
    # elementwise arithmetic
    "test_add", "test_add_bcast", "test_sub_bcast", "test_sub_uint8", "test_mul",
    "test_mul_bcast", "test_div", "test_div_int32_trunc", "test_pow", "test_pow_bcast_array",
    "test_pow_types_float32_int64", "test_sqrt", "test_erf", "test_exp", "test_log", "test_neg",
    "test_abs", "test_reciprocal", "test_max_two_inputs", "test_min_example", "test_max_int16",
    "test_equal_bcast", "test_where_example", "test_where_long_example",
    # activations
    "test_relu", "test_leakyrelu", "test_leakyrelu_default", "test_sigmoid", "test_tanh",
    "test_softmax_axis_0", "test_softmax_large_number", "test_softmax_negative_axis",
    "test_logsoftmax_axis_1", "test_logsoftmax_large_number", "test_gelu_default_1",
    "test_gelu_tanh_1", "test_hardswish", "test_hardsigmoid", "test_elu", "test_prelu_broadcast",
    "test_softplus", "test_clip", "test_clip_default_min", "test_clip_default_int8_max",
    "test_mish", "test_mish_expanded", "test_swish",
    # attention (ai.onnx Attention through its function body; a fully masked row)
    "test_attention_4d", "test_attention_4d_expanded",
    "test_attention_23_boolmask_fullymasked_row_nan_robustness",
    # normalization
    "test_batchnorm_example", "test_batchnorm_epsilon", "test_batchnorm_example_training_mode",
    "test_layer_normalization_4d_axis_negative_1", "test_layer_normalization_2d_axis1",
    "test_layer_normalization_2d_axis1_expanded", "test_instancenorm_example",
    # pooling
    "test_maxpool_2d_default", "test_maxpool_2d_pads", "test_maxpool_2d_strides",
    "test_maxpool_2d_ceil", "test_maxpool_2d_same_upper", "test_maxpool_2d_dilations",
    "test_maxpool_with_argmax_2d_precomputed_pads", "test_averagepool_2d_default",
    "test_averagepool_2d_pads", "test_averagepool_2d_pads_count_include_pad",
    "test_averagepool_2d_strides", "test_averagepool_2d_ceil", "test_globalaveragepool",
    "test_globalaveragepool_precomputed", "test_globalmaxpool",
    # reductions
    "test_reduce_mean_keepdims_example", "test_reduce_mean_do_not_keepdims_random",
    "test_reduce_sum_keepdims_random", "test_reduce_sum_empty_axes_input_noop",
    "test_reduce_max_default_axes_keepdim_example", "test_reduce_max_keepdims_random",
    "test_argmax_keepdims_example", "test_argmax_negative_axis_keepdims_random_select_last_index",
    "test_top_k@opset11", "test_top_k_smallest@opset11",
    # shape manipulation
    "test_reshape_reordered_all_dims@opset23", "test_reshape_negative_dim@opset23",
    "test_reshape_zero_dim@opset23", "test_transpose_default@opset23",
    "test_transpose_all_permutations_3@opset23", "test_concat_1d_axis_0", "test_concat_2d_axis_1",
    "test_concat_3d_axis_negative_1", "test_split_equal_parts_2d",
    "test_split_variable_parts_1d_opset18", "test_split_1d_uneven_split_opset18", "test_slice",
    "test_slice_neg_steps", "test_slice_default_axes", "test_slice_end_out_of_bounds",
    "test_gather_0", "test_gather_2d_indices", "test_gather_negative_indices",
    "test_squeeze@opset23", "test_squeeze_negative_axes@opset23", "test_unsqueeze_axis_0@opset23",
    "test_unsqueeze_two_axes@opset23", "test_flatten_axis1@opset23",
    "test_flatten_negative_axis1@opset23", "test_expand_dim_unchanged", "test_expand_dim_changed",
    "test_tile", "test_depthtospace_crd_mode_example@opset13", "test_constant_pad@opset23",
    "test_reflect_pad@opset23", "test_shape@opset23", "test_constantofshape_float_ones@opset23",
    "test_range_float_type_positive_delta@opset11", "test_identity@opset23",
    # resize
    "test_resize_upsample_scales_nearest", "test_resize_downsample_scales_linear",
    "test_resize_upsample_scales_cubic", "test_resize_upsample_sizes_nearest",
    "test_resize_downsample_scales_linear_antialias", "test_resize_tf_crop_and_resize",
    # run-time lengths and sizes (lowering/dynamic_ops.py), bodies of our own (bodies.py)
    "test_hannwindow", "test_affine_grid_2d", "test_simple_rnn_defaults", "test_isinf_negative",
    # casts and quantization
    "test_cast_FLOAT_to_FLOAT16@opset23", "test_cast_FLOAT16_to_FLOAT@opset23",
    "test_cast_DOUBLE_to_FLOAT@opset23", "test_cast_FLOAT_to_BFLOAT16@opset23",
    "test_cast_FLOAT8E4M3FN_to_FLOAT@opset23", "test_quantizelinear@opset23",
    "test_quantizelinear_axis@opset23", "test_quantizelinear_int16@opset23",
    "test_dequantizelinear@opset23", "test_dequantizelinear_axis@opset23",
    "test_dequantizelinear_blocked@opset23", "test_qlinearconv",
    "test_qlinearmatmul_2D_int8_float32", "test_convinteger_with_padding",
    # losses (nested context-dependent function bodies)
    "test_sce_mean_weight_ii",
    # inference-time no-ops, detection
    "test_dropout_default", "test_dropout_default_mask", "test_nonmaxsuppression_suppress_by_IOU",
    "test_mvn",
    # sequence and optional graph inputs/outputs (their nodes run on onnxruntime)
    "test_sequence_insert_at_front", "test_split_to_sequence_1@opset11",
    "test_sequence_map_add_1_sequence_1_tensor",
    "test_optional_has_element_empty_optional_input@opset18", "test_if_seq",
    "test_loop16_seq_none",
]

# case -> (the outcome it has today, why). See conformance/RESULTS.md for the full picture.
# Empty since the CPU target routes the configurations TVM 0.27 gets wrong (ConvTranspose
# output_shape, Expand with a shape computed at run time, NonMaxSuppression) to onnxruntime or
# replaces them (lowering/onnx_fixups.py, bodies.py, dynamic_ops.py, narrow.py for float8 and
# int4 casts), and the runtime handles Shape outputs and golden_count=0 without onnxruntime
# (conformance/RESULTS.md).
KNOWN_FAILURES: dict[str, tuple[str, str]] = {}


def _cases_module() -> Any:
    name = "lepton_conformance_cases"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "conformance" / "cases.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@functools.cache
def _subset_cases() -> dict[str, Any]:
    cases = _cases_module()
    generated = {c.name: c for c in cases.collect(MODULES)}
    found = {}
    for name in SUBSET:
        base = name.split("@")[0]
        case = generated.get(base)
        if case is not None and "@" in name:
            case = cases.restamp(case)
        if case is not None and case.name == name:
            found[name] = case
    return found


def test_subset_is_well_formed() -> None:
    assert len(SUBSET) == len(set(SUBSET)), "duplicate case names in SUBSET"
    assert set(KNOWN_FAILURES) <= set(SUBSET), set(KNOWN_FAILURES) - set(SUBSET)
    kinds = _cases_module().FAIL_KINDS
    for name, (kind, reason) in KNOWN_FAILURES.items():
        assert kind in kinds, f"{name}: unknown outcome {kind!r}"
        if kind == "mismatch":
            assert reason.startswith("WRONG NUMBERS:"), (
                f"{name}: a known mismatch must say 'WRONG NUMBERS:' first")
    missing = sorted(set(SUBSET) - set(_subset_cases()))
    assert not missing, (f"onnx no longer generates {missing}; pick other cases (see "
                         "conformance/RESULTS.json)")


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBSET)
def test_onnx_node_case(name: str, tmp_path: Path) -> None:
    case = _subset_cases().get(name)
    if case is None:
        pytest.fail(f"{name} is not generated by this onnx (see test_subset_is_well_formed)")
    result = _cases_module().run_lepton(case, workdir=tmp_path)
    outcome = result["outcome"]
    detail = f"{outcome} at {result['stage']}: {result['reason']}"
    known = KNOWN_FAILURES.get(name)
    if known is None:
        assert outcome in ("pass_compiled", "pass_fallback"), detail
        return
    kind, reason = known
    if outcome in ("pass_compiled", "pass_fallback"):
        pytest.fail(f"{name} is listed in KNOWN_FAILURES ({kind}: {reason}) but now passes "
                    f"({outcome}); remove it from the list")
    assert outcome == kind, f"known {kind} ({reason}) now fails differently: {detail}"
    pytest.xfail(reason)
