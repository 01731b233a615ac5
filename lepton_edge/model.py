"""Model: a validated ONNX model and its signature, from a path, bytes, a proto or torch.

`load()` is the front door: it checks everything about the model that does not depend on a
target (readable, valid, opset known, every op known to ONNX, ai.onnx.ml or onnxruntime's
contrib domain) before any heavy work, and reports all unknown ops in one error. Models below
MIN_OPSET are upgraded; models above MAX_OPSET are brought down where onnx can, else keep
their opset and `partition()` runs the ops revised since MAX_OPSET on onnxruntime. Which
target can run which op is asked later, by `partition()`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, shape_inference

from lepton_edge.errors import ModelError, UnsupportedOpsError
from lepton_edge.signature import (
    NARROW_DTYPES,
    OPTIONAL,
    OPTIONAL_SEQUENCE,
    SEQUENCE,
    TENSOR,
    Dim,
    TensorSpec,
)

# The ai.onnx opsets TVM compiles. Older models are upgraded with onnx.version_converter;
# newer ones (TVM 0.27's importer predates them) are relabelled or converted down when
# possible, else their revised ops run on onnxruntime (see plan.py).
MIN_OPSET = 7
MAX_OPSET = 25
# Non-default op domains whose ops the runtime can execute (onnxruntime's contrib ops).
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
# ONNX's traditional-ML domain (scikit-learn exports): onnxruntime runs it, TVM cannot.
ML_DOMAIN = "ai.onnx.ml"
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class Model:
    """A checked ONNX model (with shapes inferred) and what it takes and returns."""

    proto: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    sha256: str
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    # how load() changed the declared ai.onnx opset (for `explain`), "" when it did not
    opset_note: str = ""

    @property
    def name(self) -> str:
        if not self.source.startswith("<"):
            return Path(self.source).stem
        return self.proto.graph.name or "model"

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.proto.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts


def load(
    source: str | os.PathLike[str] | bytes | onnx.ModelProto | Any,
    example_inputs: Any = None,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Model:
    """Load and validate a model from a path, serialized bytes, a ModelProto or a torch module.

    torch modules need `example_inputs` (a tensor or a tuple of tensors) and are exported
    with `torch.onnx.export` at `opset`; with `dynamic_batch` the first dimension of every
    input and output becomes the symbolic dimension "N". The caller's objects are never
    modified: a ModelProto is copied.
    """
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        return _validated(proto, "<ModelProto>", base_dir=None)
    if isinstance(source, bytes | bytearray | memoryview):
        return _validated(_parse(bytes(source), "<bytes>"), "<bytes>", base_dir=None)
    if isinstance(source, str | os.PathLike):
        return _load_path(Path(source))
    if _is_torch_module(source):
        proto = _export_torch(source, example_inputs, input_names, output_names, dynamic_batch,
                              opset)
        return _validated(proto, f"<torch {type(source).__name__}>", base_dir=None)
    raise ModelError(
        f"cannot load a model from a {type(source).__name__}: pass a path to an .onnx file, "
        "its bytes, an onnx.ModelProto or a torch.nn.Module with example_inputs"
    )


def _load_path(path: Path) -> Model:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory; pass the .onnx file inside it")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
    proto = _parse(data, str(path))
    size = len(data) + _resolve_external_data(proto, path.parent)
    if size > PROTOBUF_LIMIT:
        # Over protobuf's 2 GB limit the checker must read the model from disk.
        _check(lambda: onnx.checker.check_model(str(path)), str(path))
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (ValueError, OSError) as exc:  # a bad offset or length, an unreadable data file
        raise ModelError(f"cannot load the external data of {path}: {exc}; re-save the model "
                         "with onnx.save_model(..., save_as_external_data=True)") from None
    # Loaded data is inline now; clear the explicit DEFAULT marker so the model hashes the same
    # whether its weights came from external files or not.
    for tensor in external_data_helper._get_all_tensors(proto):  # noqa: SLF001
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.DEFAULT:
            tensor.ClearField("data_location")
    return _validated(proto, str(path), base_dir=path.parent, checked=size > PROTOBUF_LIMIT)


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelError(f"{where} is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"{where} is not a valid ONNX model (protobuf parse failed: {exc}); the file may be "
            "truncated or not ONNX at all"
        ) from None
    if not proto.ir_version or not proto.HasField("graph"):
        raise ModelError(
            f"{where} is not an ONNX model (no ir_version or graph after parsing); the file "
            "may be truncated or of another format"
        )
    return proto


def _external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t for t in external_data_helper._get_all_tensors(proto)  # noqa: SLF001 - walks subgraphs
        if external_data_helper.uses_external_data(t)
    ]


def _resolve_external_data(proto: onnx.ModelProto, base_dir: Path) -> int:
    """Refuse external data outside the model's folder (CVE-2022-25882); return its size."""
    base = base_dir.resolve()
    total = 0
    problems: list[str] = []
    for tensor in _external_tensors(proto):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or "\0" in location:
            problems.append(f"tensor '{tensor.name}' uses external data but names no valid "
                            f"file ({location!r})")
            continue
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            problems.append(
                f"tensor '{tensor.name}' points at external data '{location}' outside the "
                f"model folder {base}"
            )
        elif not target.is_file():
            problems.append(f"tensor '{tensor.name}' needs external data file {target}, missing")
        elif not all(info.get(k, "0").isdecimal() for k in ("offset", "length")):
            problems.append(f"tensor '{tensor.name}' has a malformed external data offset or "
                            f"length ({info.get('offset')!r}, {info.get('length')!r})")
        else:
            total += int(info.get("length", 0) or target.stat().st_size)
    if problems:
        raise ModelError(
            "refusing external data: " + "; ".join(problems)
            + ". Keep external data files next to the model, referenced by relative paths"
        )
    return total


def _check(fn: Any, where: str) -> Any:
    # onnx's C++ side also raises ValueError (e.g. an invalid data type) and
    # UnicodeDecodeError (a damaged string field) for a malformed model.
    try:
        return fn()
    except (onnx.checker.ValidationError, shape_inference.InferenceError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{where} is not a valid ONNX model: {first}") from None


def _validated(
    proto: onnx.ModelProto, where: str, base_dir: Path | None, checked: bool = False
) -> Model:
    if base_dir is None and _external_tensors(proto):
        names = [t.name for t in _external_tensors(proto)][:5]
        raise ModelError(
            f"{where} refers to external data files (tensors {names}); load it from its path "
            "so the data files can be found next to it"
        )
    proto, opset_note = _into_opset_range(proto, where)
    opset = _default_opset(proto, where)
    _check_ops(proto, opset, where)
    _name_free_dims(proto)
    # Serialized once for the checker and inference (each would serialize it again: about a
    # second per 300 MB of weights).
    try:
        data: bytes | None = proto.SerializeToString()
    except Exception:  # noqa: BLE001 - over protobuf's 2 GB: the checks take the proto as before
        data = None
    if not checked:
        _check(lambda: onnx.checker.check_model(proto if data is None else data), where)
    try:  # with constant shape arithmetic propagated (static Expand/Reshape outputs)
        inferred = shape_inference.infer_shapes(proto if data is None else data,
                                                check_type=True, strict_mode=True,
                                                data_prop=True)
    except Exception:  # noqa: BLE001 - any failure: retry plainly, which names it clearly
        # without data propagation; a model that fails this too gets its clear error here,
        # unless onnxruntime accepts it (see _tolerated_inference)
        try:
            inferred = _check(
                lambda: shape_inference.infer_shapes(proto, check_type=True, strict_mode=True),
                where)
        except ModelError as exc:
            inferred = _tolerated_inference(proto, exc)
    inputs, outputs = _signature(inferred, where)
    sha = hashlib.sha256(inferred.SerializeToString(deterministic=True)).hexdigest()
    meta = {p.key: p.value for p in inferred.metadata_props}
    return Model(proto=inferred, inputs=inputs, outputs=outputs, opset=opset, sha256=sha,
                 source=where, metadata=meta, opset_note=opset_note)


def _tolerated_inference(proto: onnx.ModelProto, error: ModelError) -> onnx.ModelProto:
    """Non-strict shape inference for a valid model strict inference trips over, or `error`.

    onnx's strict inference also checks the bodies of ONNX functions as onnx expands them,
    and some of those expansions are broken in onnx itself (MeanVarianceNormalization's
    opset-13 body builds a Constant from an attribute reference that is empty when `axes` is
    left at its default). Such a model is valid: the checker passed and onnxruntime, which
    runs these ops with its own kernels, accepts it. So when onnxruntime builds a session for
    the model, the non-strict inference is used; otherwise the strict error stands.
    """
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise error
    try:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        onnxruntime.InferenceSession(proto.SerializeToString(), options,
                                     providers=["CPUExecutionProvider"])
        return shape_inference.infer_shapes(proto, check_type=True, strict_mode=False,
                                            data_prop=True)
    except Exception:  # noqa: BLE001 - onnxruntime refuses it too: the strict error stands
        raise error from None


def revised_op(op_type: str, domain: str, opset: int) -> int | None:
    """The opset at which a default-domain op took the form it has at `opset`, when that is
    newer than MAX_OPSET (TVM's importer predates it); None for any other op."""
    if (domain or "") not in ("", "ai.onnx") or opset <= MAX_OPSET:
        return None
    try:
        since = onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None  # not an ONNX op at that opset: _check_ops names it
    return since if since > MAX_OPSET else None


def same_at_max_opset(node: onnx.NodeProto, elem_types: dict[str, int], opset: int) -> bool:
    """Whether a revised op's node, with these element types, is unchanged at MAX_OPSET.

    Most revisions only add types or attributes: onnx.version_converter then brings the node
    down as it is (a type-restriction adapter). A node it returns unchanged means the same at
    MAX_OPSET, so TVM can compile it even when the converter fails on the model as a whole.
    Nodes with bodies or an unknown element type are never assumed unchanged.
    """
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for a in node.attribute):
        return False
    names = [n for n in list(node.input) + list(node.output) if n]
    if any(not elem_types.get(n) for n in names):
        return False
    bare = onnx.NodeProto()
    bare.CopyFrom(node)
    bare.name = ""
    key = (bare.SerializeToString(deterministic=True), opset,
           tuple(elem_types[n] for n in names))
    return _unchanged_by_converter(key)


@functools.lru_cache(maxsize=1024)
def _unchanged_by_converter(key: tuple[bytes, int, tuple[int, ...]]) -> bool:
    from onnx import version_converter

    data, opset, types = key
    node = onnx.NodeProto()
    node.ParseFromString(data)
    typed = dict(zip([n for n in list(node.input) + list(node.output) if n], types,
                     strict=True))
    inputs = list(dict.fromkeys(n for n in node.input if n))
    graph = onnx.helper.make_graph(
        [node], "node", [onnx.helper.make_tensor_value_info(n, typed[n], None) for n in inputs],
        [onnx.helper.make_tensor_value_info(n, typed[n], None) for n in node.output if n])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    try:
        converted = version_converter.convert_version(model, MAX_OPSET)
    except Exception:  # noqa: BLE001 - no adapter, or the types are not allowed at MAX_OPSET
        return False
    if len(converted.graph.node) != 1:
        return False
    return converted.graph.node[0].SerializeToString(deterministic=True) == data


def _revised_ops(proto: onnx.ModelProto, opset: int) -> set[str]:
    return {n.op_type for n in _all_nodes(proto.graph) + [
        n for f in proto.functions for n in _all_nodes_of(f.node)]
        if revised_op(n.op_type, n.domain, opset) is not None}


def _into_opset_range(proto: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, str]:
    """A model declared at an opset outside MIN_OPSET..MAX_OPSET, brought into it if it can be.

    Older models are upgraded to MIN_OPSET with onnx.version_converter (semantics-preserving).
    Newer ones (up to onnx's newest): when every op is unchanged since MAX_OPSET or earlier
    (its schema's since_version), only the declared opset changes; otherwise
    onnx.version_converter converts it down. A model it cannot convert keeps its opset: the
    ops revised after MAX_OPSET then run on onnxruntime (plan.py says so per node) and
    everything else still compiles, relabelled to MAX_OPSET. Returns the model and a note
    saying what was done ("" for nothing).
    """
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if versions and max(versions) < MIN_OPSET:
        return (_upgraded(proto, max(versions), where),
                f"declared {max(versions)}, upgraded with onnx.version_converter")
    if not versions or not MAX_OPSET < max(versions) <= onnx.defs.onnx_opset_version():
        return proto, ""
    opset = max(versions)
    if not _revised_ops(proto, opset) and not proto.functions:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        for entry in copy.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = MAX_OPSET
        return copy, f"declared {opset}; every op it uses is unchanged since {MAX_OPSET}"
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(proto, MAX_OPSET)
        onnx.checker.check_model(converted)
        return converted, f"declared {opset}, converted down with onnx.version_converter"
    except Exception:  # noqa: BLE001 - the converter raises RuntimeError and others
        # planned per node: see plan.py's fallback reasons
        return proto, (f"onnx.version_converter cannot convert the whole model down to "
                       f"{MAX_OPSET}: revised ops it cannot bring down node by node run on "
                       "onnxruntime")


def _upgraded(proto: onnx.ModelProto, opset: int, where: str) -> onnx.ModelProto:
    """An opset < MIN_OPSET model upgraded with onnx.version_converter, or a clear error."""
    _check(lambda: onnx.checker.check_model(proto), where)  # an invalid model: say so first
    try:
        from onnx import version_converter

        converted = version_converter.convert_version(proto, MIN_OPSET)
        onnx.checker.check_model(converted)
        return converted
    except Exception as exc:  # noqa: BLE001 - the converter raises RuntimeError and others
        text = str(exc).strip()
        first = text.splitlines()[-1][:200] if text else type(exc).__name__
        raise ModelError(
            f"{where} uses opset {opset}, too old (lepton-edge supports opsets "
            f"{MIN_OPSET}-{MAX_OPSET} and upgrades older models with onnx.version_converter, "
            f"which failed: {first}); re-export the model at opset 17"
        ) from None


def _default_opset(proto: onnx.ModelProto, where: str) -> int:
    """The model's ai.onnx opset; 0 for a model with only ai.onnx.ml (or other) ops."""
    versions = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        found = sorted({o.domain for o in proto.opset_import})
        if found and not any((n.domain or "") in ("", "ai.onnx") for n in _all_nodes(
                proto.graph)):
            return 0  # e.g. a scikit-learn model of ai.onnx.ml ops only
        raise ModelError(
            f"{where} declares no default-domain (ai.onnx) opset"
            + (f"; it uses only {found}" if found else " (opset_import is empty)")
            + " but has ai.onnx nodes; declare the ai.onnx opset it was written for")
    opset = max(versions)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelError(
            f"{where} uses opset {opset}, too new (onnx {onnx.__version__} knows opsets up to "
            f"{newest}; lepton-edge compiles opsets {MIN_OPSET}-{MAX_OPSET} with TVM and runs "
            f"ops revised in {MAX_OPSET + 1}-{newest} on onnxruntime); re-export with "
            "opset_version=17 (torch.onnx.export) or convert it down with "
            "onnx.version_converter"
        )
    return opset


def _check_ops(proto: onnx.ModelProto, opset: int, where: str) -> None:
    """Every node must be an op ONNX (or onnxruntime's contrib domain) defines; list all."""
    domain_versions = {o.domain or "": o.version for o in proto.opset_import}
    local_functions = {(f.domain, f.name) for f in proto.functions}
    problems: dict[str, list[str]] = {}
    for node in _all_nodes(proto.graph):
        if not (isinstance(node.op_type, str) and isinstance(node.domain, str)):
            # protobuf hands back bytes for string fields that are not valid UTF-8
            raise ModelError(
                f"{where} is not a valid ONNX model: a node's op type or domain is not UTF-8 "
                "text; the file is damaged, re-export the model"
            )
        domain = node.domain or ""
        if (domain, node.op_type) in local_functions:
            continue
        reason = None
        if domain not in KNOWN_DOMAINS:
            reason = f"custom domain '{domain}' (no runtime provides it)"
        elif domain in ("", "ai.onnx"):
            if not onnx.defs.has(node.op_type, ""):
                reason = "not an ONNX operator"
            else:
                try:
                    onnx.defs.get_schema(node.op_type, opset, "")
                except onnx.defs.SchemaError:
                    reason = f"does not exist in opset {opset}"
        elif domain_versions.get(domain) is None:
            reason = f"domain '{domain}' is used but not declared in opset_import"
        elif domain == ML_DOMAIN:
            if not onnx.defs.has(node.op_type, ML_DOMAIN):
                reason = f"not an {ML_DOMAIN} operator"
            else:
                try:
                    onnx.defs.get_schema(node.op_type, domain_versions[domain], ML_DOMAIN)
                except onnx.defs.SchemaError:
                    reason = f"does not exist in {ML_DOMAIN} opset {domain_versions[domain]}"
        if reason:
            key = f"{node.op_type or '<empty op_type>'}" + (f" ({domain})" if domain else "")
            problems.setdefault(f"{key}: {reason}", []).append(str(node.name or "<unnamed>"))
    if problems:
        raise UnsupportedOpsError(
            [f"{k} at node(s) {', '.join(v[:5])}" + (" ..." if len(v) > 5 else "")
             for k, v in problems.items()],
            hint="Replace them with standard ONNX ops or re-export the model",
        )


def _all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return _all_nodes_of(graph.node)


def _all_nodes_of(graph_nodes: Any) -> list[onnx.NodeProto]:
    """`graph_nodes` and every node of their If/Loop/Scan bodies, recursively."""
    nodes = []
    for node in graph_nodes:
        nodes.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                nodes.extend(_all_nodes(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    nodes.extend(_all_nodes(g))
    return nodes


def _name_free_dims(proto: onnx.ModelProto) -> None:
    """Give every unnamed dynamic dimension of a graph input a name, so it stays symbolic."""
    initializers = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        for axis, dim in enumerate(tensor_type.shape.dim):
            if not dim.HasField("dim_value") and not dim.dim_param:
                dim.dim_param = f"{value.name}_dim{axis}"


def _spec(value: onnx.ValueInfoProto, where: str) -> TensorSpec:
    """A graph input/output: a tensor, a sequence of tensors, or an optional of either."""
    which = value.type.WhichOneof("value")
    kind, inner = TENSOR, value.type
    if which == "optional_type":
        inner = value.type.optional_type.elem_type
        kind = OPTIONAL
    if inner.WhichOneof("value") == "sequence_type":
        inner = inner.sequence_type.elem_type
        kind = OPTIONAL_SEQUENCE if kind == OPTIONAL else SEQUENCE
    if not inner.HasField("tensor_type"):
        described = _describe(value.type)
        raise ModelError(
            f"{where}: graph input/output '{value.name}' is {described}; lepton-edge "
            "takes tensors, sequences of tensors and optionals of those at the graph boundary"
            + ("; a scikit-learn classifier's ZipMap output is one: convert it with skl2onnx "
               "options={'zipmap': False} to get a probability tensor" if "map<" in described
               else ""))
    tensor_type = inner.tensor_type
    elem_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type in (
        onnx.TensorProto.DataType.values()) else str(tensor_type.elem_type)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    except (KeyError, TypeError, ValueError):
        raise ModelError(
            f"{where}: '{value.name}' has element type {tensor_type.elem_type}, which has no "
            "numpy equivalent"
        ) from None
    if np.dtype(dtype).kind == "V" and dtype not in NARROW_DTYPES | {"bfloat16"}:
        raise ModelError(
            f"{where}: graph input/output '{value.name}' is {elem_name.lower()}; lepton-edge "
            f"takes bfloat16, {', '.join(sorted(NARROW_DTYPES))} (ml_dtypes arrays) at the "
            "graph boundary, not this type (convert it inside the model with Cast)")
    if not tensor_type.HasField("shape"):
        if kind == TENSOR:
            raise ModelError(f"{where}: '{value.name}' has no shape; export the model with "
                             "shapes")
        # ONNX leaves the rank of sequence elements / optional tensors open: any rank
        return TensorSpec(name=value.name, dtype=dtype, shape=None, kind=kind)
    shape: list[Dim] = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
        else:
            shape.append(dim.dim_param or f"{value.name}_dim{axis}")
    return TensorSpec(name=value.name, dtype=dtype, shape=tuple(shape), kind=kind)


def _describe(type_proto: onnx.TypeProto) -> str:
    """A TypeProto as short text: sequence<map<int64, tensor>>, sparse_tensor, ..."""
    which = type_proto.WhichOneof("value")
    if which == "sequence_type":
        return f"sequence<{_describe(type_proto.sequence_type.elem_type)}>"
    if which == "optional_type":
        return f"optional<{_describe(type_proto.optional_type.elem_type)}>"
    if which == "map_type":
        key = onnx.helper.tensor_dtype_to_string(type_proto.map_type.key_type)
        return f"map<{key.removeprefix('TensorProto.').lower()}, " \
               f"{_describe(type_proto.map_type.value_type)}>"
    return which.removesuffix("_type") if which else "untyped"


def _signature(
    proto: onnx.ModelProto, where: str
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    initializers = {t.name for t in proto.graph.initializer}
    inputs = tuple(_spec(v, where) for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, where) for v in proto.graph.output)
    if not outputs:
        raise ModelError(f"{where}: the graph has no outputs")
    return inputs, outputs


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to ask
    return torch is not None and isinstance(obj, torch.nn.Module)


def _export_torch(
    module: Any,
    example_inputs: Any,
    input_names: list[str] | None,
    output_names: list[str] | None,
    dynamic_batch: bool,
    opset: int,
) -> onnx.ModelProto:
    import torch

    if example_inputs is None:
        raise ModelError(
            "a torch module needs example_inputs (a tensor or a tuple of tensors of the "
            "shapes it takes) to be exported to ONNX"
        )
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ModelError("example_inputs must be torch tensors (or a tuple of them)")
    names = list(input_names or [f"input{i}" if len(args) > 1 else "input"
                                 for i in range(len(args))])
    if len(names) != len(args):
        raise ModelError(f"{len(names)} input_names given for {len(args)} example inputs")
    dynamic_shapes = None
    if dynamic_batch:
        # torch.export specialises dimensions of size 0 and 1; export with a batch of 2 (the
        # example repeated) so the batch stays symbolic.
        args = tuple(torch.cat([a, a]) if a.dim() > 0 and a.shape[0] == 1 else a for a in args)
        batch = torch.export.Dim("N", min=1, max=2**20)
        dynamic_shapes = tuple({0: batch} if a.dim() > 0 else None for a in args)
    was_training = module.training
    module.eval()
    buffer = io.BytesIO()
    try:
        program = torch.onnx.export(
            module, args, dynamo=True, input_names=names, output_names=output_names,
            opset_version=opset, dynamic_shapes=dynamic_shapes, external_data=False,
            verbose=False,
        )
        program.save(buffer) if hasattr(program, "save") else None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds; all mean "cannot export"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(f"torch.onnx.export failed: {first}") from exc
    finally:
        module.train(was_training)
    proto = _parse(buffer.getvalue(), "<torch export>")
    if dynamic_batch:
        _rename_batch_dims(proto)
        fixed = [v.name for v in proto.graph.input
                 if v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].dim_param]
        if fixed:
            raise ModelError(
                f"torch.onnx.export fixed the batch dimension of input(s) {fixed}; the module's "
                "forward depends on the batch size. Pass dynamic_batch=False to compile for the "
                "example's batch size")
    return proto


def _rename_batch_dims(proto: onnx.ModelProto) -> None:
    """torch names the batch dimension after its Dim; make every leading symbol "N"."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].dim_param:
            old = dims[0].dim_param
            if old != "N":
                for v in list(proto.graph.input) + list(proto.graph.output) + list(
                        proto.graph.value_info):
                    for d in v.type.tensor_type.shape.dim:
                        if d.dim_param == old:
                            d.dim_param = "N"
