"""The Vitis HLS C++ generator: the lowered TIR of a Program (tir_lower.py) -> kernel.cpp,
kernel.h (and, for the dataflow form, the hls::stream stand-in header the C simulation
compiles against), and the board build files.

Every kernel is printed from its TIR PrimFunc by a small printer (TirPrinter) over the node
types that plain loops contain: For, SeqStmt, BufferStore/TensorLoad, IfThenElse, Bind,
AllocBuffer/DeclBuffer; integer and float arithmetic with TIR's semantics in C++ (FloorDiv/
FloorMod round toward minus infinity, narrow integer results wrap to their type, Min/Max as
TVM's compare-and-select, round as nearbyint: half to even), Select, Cast, comparisons,
logical and bitwise ops, shifts, Let (hoisted to a const), and the tir calls if_then_else,
likely, round, floor, ceil, trunc, fabs, sqrt. Anything else raises Unprintable with the node,
and the subgraph stays on another target with that reason.

Settings:
- parallelism P: the reduction loops of every reduction kernel are fused and split by P
  (tir_lower.schedule); the inner loop is `UNROLL`ed into P lanes, the outer one `PIPELINE
  II=1`, and the constant arrays those lanes read get `ARRAY_PARTITION cyclic factor=P`.
  Other innermost loops are `PIPELINE II=1`.
- dataflow: false -> one batch loop calling the kernels in order on local arrays; true ->
  `#pragma HLS DATAFLOW` over load / kernel / store tasks joined by `hls::stream` FIFOs (one
  per producer-consumer edge, depth one sample), so kernels overlap across samples.

Interfaces: every input and output is an `m_axi` port (its own bundle) with its address and
`batch` on `s_axilite` (the Vitis kernel convention XRT drives).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np

KERNEL = "lepton_kernel"  # placeholder; each kernel is named lepton_<hash of its source>

CTYPES = {"int8": "int8_t", "uint8": "uint8_t", "int16": "int16_t", "uint16": "uint16_t",
          "int32": "int32_t", "uint32": "uint32_t", "int64": "int64_t",
          "uint64": "uint64_t", "float32": "float", "float64": "double", "bool": "bool"}
_MATH = {"round": "nearbyint", "nearbyint": "nearbyint", "floor": "floor", "ceil": "ceil",
         "trunc": "trunc", "fabs": "fabs", "sqrt": "sqrt"}  # exactly rounded in IEEE 754


class Unprintable(Exception):
    """A TIR node the HLS printer has no exact C++ form for (the message names it)."""


def ctype(dtype: Any) -> str:
    name = str(dtype)
    if name not in CTYPES:
        raise Unprintable(f"no HLS C++ type for dtype {name}")
    return CTYPES[name]


def dtype_of(node: Any) -> str:
    """The dtype of a TIR expression or buffer (TVM 0.27 keeps it in `.ty`)."""
    dtype = getattr(node, "dtype", None)
    if dtype is None:
        dtype = getattr(getattr(node, "ty", None), "dtype", None)
    return str(dtype) if dtype is not None else ""


def _flit(value: float, dtype: str = "float32") -> str:
    """An exact C float literal (hex float, C++17)."""
    if dtype == "float64":
        v = float(value)
        return v.hex() if np.isfinite(v) else ("INFINITY" if v > 0 else "-INFINITY")
    v = float(np.float32(value))
    if not np.isfinite(v):
        return "INFINITY" if v > 0 else "-INFINITY"
    return v.hex() + "f"


def c_array(dtype: str, name: str, values: np.ndarray) -> str:
    """A static const ROM array (flat, row-major)."""
    flat = np.asarray(values).ravel()
    if dtype in ("float32", "float64"):
        items, per_line = [_flit(v, dtype) for v in flat], 8
    else:
        items, per_line = [_int_literal(int(v), dtype) for v in flat], 16
    rows = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    body = ",\n    ".join(rows)
    return f"static const {ctype(dtype)} {name}[{max(len(items), 1)}] = {{\n    {body}\n}};\n"


def _int_literal(value: int, dtype: str) -> str:
    if dtype == "bool":
        return "true" if value else "false"
    if dtype in ("int64", "uint64"):
        if value == -(2**63):
            return "(-9223372036854775807LL - 1)"
        return f"{value}{'ULL' if dtype == 'uint64' else 'LL'}"
    if dtype == "int32" and value == -(2**31):
        return "(-2147483647 - 1)"
    if dtype == "uint32":
        return f"{value}u"
    return str(value)


_HELPERS = """\
// TIR's integer floor division and modulo (toward minus infinity; C++ truncates).
template <typename T> static inline T lepton_floordiv(T a, T b) {
#pragma HLS INLINE
    const T q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? (T)(q - 1) : q;
}
template <typename T> static inline T lepton_floormod(T a, T b) {
#pragma HLS INLINE
    const T r = a % b;
    return (r != 0 && ((r < 0) != (b < 0))) ? (T)(r + b) : r;
}
// TIR's Min/Max as TVM compiles them: compare and select (each operand evaluated once).
template <typename T> static inline T lepton_min(T a, T b) {
#pragma HLS INLINE
    return a < b ? a : b;
}
template <typename T> static inline T lepton_max(T a, T b) {
#pragma HLS INLINE
    return a > b ? a : b;
}
"""


_RESERVED = {"auto", "bool", "break", "case", "char", "const", "continue", "default", "do",
             "double", "else", "enum", "float", "for", "goto", "if", "int", "long", "new",
             "register", "return", "short", "signed", "sizeof", "static", "struct", "switch",
             "this", "typedef", "union", "unsigned", "void", "volatile", "while", "in", "out",
             "batch", "n", "i", "j"}  # C++ keywords and the top function's own names


def _name(raw: str) -> str:
    """A C++ identifier for a TIR name."""
    name = re.sub(r"\W", "_", raw) or "v"
    if name[0].isdigit() or name in _RESERVED or name.startswith("lepton_"):
        name = f"v_{name}"
    return name


class TirPrinter:
    """One lowered PrimFunc as a C++ function. `args` are the Program ids of its parameters
    (constants are printed as the global ROM arrays of those names, not as parameters)."""

    def __init__(self, func: Any, cname: str, args: list[str], n_outputs: int,
                 consts: set[str], partitioned: list[str], parallelism: int) -> None:
        self.func, self.cname, self.args = func, cname, args
        self.n_outputs, self.consts = n_outputs, consts
        self.partitioned, self.p = partitioned, parallelism
        self.names: dict[Any, str] = {}
        self.used: set[str] = set()
        self.lines: list[str] = []
        self.loops = 0
        self.guarded = 0  # inside an if_then_else branch (evaluated only when selected)

    def fresh(self, node: Any, raw: str) -> str:
        base = _name(raw)
        name, n = base, 0
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        self.names[node] = name
        return name

    def var(self, node: Any) -> str:
        for key, name in self.names.items():
            if key.same_as(node):
                return name
        raise Unprintable(f"variable '{node}' is used before it is defined")

    def print(self) -> str:
        import tvm

        params = []
        n_in = len(self.args) - self.n_outputs
        for i, (buf, arg) in enumerate(zip(self.func.params, self.args, strict=True)):
            if not isinstance(buf, tvm.ir.expr.Var) or not hasattr(buf, "shape"):
                raise Unprintable(f"parameter {buf} is not a buffer")
            if arg in self.consts:
                self.names[buf] = arg
                self.used.add(arg)
                continue
            name = self.fresh(buf, arg)
            size = int(np.prod([int(d) for d in buf.shape])) if len(buf.shape) else 1
            const = "const " if i < n_in else ""
            params.append(f"{const}{ctype(buf.dtype)} {name}[{size}]")
        self.lines = [f"static void {self.cname}({', '.join(params)}) {{"]
        for cid in self.partitioned:
            self.lines.append(f"#pragma HLS ARRAY_PARTITION variable={cid} cyclic "
                              f"factor={self.p} dim=1")
        self.stmt(self.func.body, 1, False)
        self.lines.append("}")
        return "\n".join(self.lines) + "\n"

    # ------------------------------------------------------------------ statements
    def emit(self, depth: int, text: str) -> None:
        self.lines.append("    " * depth + text)

    def stmt(self, node: Any, depth: int, pipelined: bool) -> None:
        import tvm
        from tvm import tirx

        kind = type(node).__name__
        if isinstance(node, tirx.SeqStmt):
            for s in node.seq:
                self.stmt(s, depth, pipelined)
        elif isinstance(node, tirx.DeclBuffer):
            data = getattr(node, "data", None)
            source = data.args[0] if isinstance(data, tvm.ir.expr.Call) and \
                getattr(data.op, "name", "") == "tirx.buffer_data" else None
            if source is None:
                raise Unprintable("a DeclBuffer that does not alias a parameter or allocation")
            self.names[node.buffer] = self.var(source)
        elif isinstance(node, tirx.AllocBuffer):
            buf = node.buffer
            size = int(np.prod([int(d) for d in buf.shape])) if len(buf.shape) else 1
            name = self.fresh(buf, buf.name)
            self.emit(depth, f"{ctype(buf.dtype)} {name}[{size}];")
        elif isinstance(node, tirx.For):
            self.loop(node, depth, pipelined)
        elif isinstance(node, tirx.BufferStore):
            if len(node.indices) != 1:
                raise Unprintable(f"a {len(node.indices)}-D store (buffers are flat here)")
            pre: list[str] = []
            value = self.expr(node.value, pre)
            index = self.expr(node.indices[0], pre)
            target = f"{self.var(node.buffer)}[{index}] = {value};"
            if pre:
                self.emit(depth, "{")
                for line in pre:
                    self.emit(depth + 1, line)
                self.emit(depth + 1, target)
                self.emit(depth, "}")
            else:
                self.emit(depth, target)
        elif isinstance(node, tirx.IfThenElse):
            pre = []
            cond = self.expr(node.condition, pre)
            for line in pre:
                self.emit(depth, line)
            self.emit(depth, f"if ({cond}) {{")
            self.stmt(node.then_case, depth + 1, pipelined)
            if node.else_case is not None:
                self.emit(depth, "} else {")
                self.stmt(node.else_case, depth + 1, pipelined)
            self.emit(depth, "}")
        elif isinstance(node, tirx.Bind):
            pre = []
            value = self.expr(node.value, pre)
            for line in pre:
                self.emit(depth, line)
            name = self.fresh(node.var, node.var.name)
            self.emit(depth, f"const {ctype(dtype_of(node.var))} {name} = {value};")
        elif isinstance(node, tirx.Evaluate) and isinstance(node.value, tirx.IntImm):
            pass  # a no-op
        else:
            raise Unprintable(f"TIR statement {kind}")

    def loop(self, node: Any, depth: int, pipelined: bool) -> None:
        from tvm import tirx

        from lepton_edge_targets.vitis.tir_lower import HLS_ANNOTATION

        if getattr(node, "step", None) is not None and not (
                isinstance(node.step, tirx.IntImm) and int(node.step) == 1):
            raise Unprintable("a loop with a step")
        if int(node.kind) != 0:
            raise Unprintable(f"a {node.kind} loop (only serial loops are printed)")
        if getattr(node, "thread_binding", None) is not None:
            raise Unprintable("a thread-bound loop")
        pre: list[str] = []
        lo, ext = self.expr(node.min, pre), self.expr(node.extent, pre)
        if pre:
            raise Unprintable("a loop bound with a Let")
        var = self.fresh(node.loop_var, node.loop_var.name)
        hint = str(node.annotations.get(HLS_ANNOTATION, "")) if node.annotations else ""
        self.loops += 1
        label = f"{self.cname}_l{self.loops}"
        t = ctype(dtype_of(node.loop_var))
        bound = ext if lo == "0" else f"{lo} + {ext}"
        self.emit(depth, f"{label}: for ({t} {var} = {lo}; {var} < {bound}; ++{var}) {{")
        inner = pipelined
        if hint == "unroll":
            self.emit(0, "#pragma HLS UNROLL")
        elif not pipelined and (hint == "pipeline" or not _has_loop(node.body)):
            self.emit(0, "#pragma HLS PIPELINE II=1")
            inner = True
        self.stmt(node.body, depth + 1, inner)
        self.emit(depth, "}")

    # ----------------------------------------------------------------- expressions
    def expr(self, node: Any, pre: list[str]) -> str:  # noqa: C901, PLR0911, PLR0912
        import tvm
        from tvm import tirx

        e = lambda n: self.expr(n, pre)  # noqa: E731
        dtype = dtype_of(node)
        if isinstance(node, tirx.IntImm):
            return _int_literal(int(node.value), dtype) if dtype in ("int32", "bool") \
                else f"(({ctype(dtype)}){_int_literal(int(node.value), dtype)})"
        if isinstance(node, tirx.FloatImm):
            return _flit(node.value, dtype)
        if isinstance(node, tvm.ir.expr.TensorLoad):
            if len(node.indices) != 1:
                raise Unprintable(f"a {len(node.indices)}-D load (buffers are flat here)")
            return f"{self.var(node.source)}[{e(node.indices[0])}]"
        if isinstance(node, tirx.Let):
            if self.guarded:  # hoisting it would evaluate it where the guard says not to
                raise Unprintable("a Let inside an if_then_else branch")
            value = e(node.value)
            name = self.fresh(node.var, node.var.name)
            pre.append(f"const {ctype(dtype_of(node.var))} {name} = {value};")
            return e(node.body)
        if isinstance(node, tvm.ir.expr.Var):
            return self.var(node)
        binary = {tirx.Add: "+", tirx.Sub: "-", tirx.Mul: "*", tirx.BitwiseAnd: "&",
                  tirx.BitwiseOr: "|", tirx.BitwiseXor: "^", tirx.LShift: "<<",
                  tirx.RShift: ">>"}
        for cls, op in binary.items():
            if isinstance(node, cls):
                if dtype.startswith("float") and op not in "+-*":
                    raise Unprintable(f"a float {cls.__name__}")
                return _narrow(dtype, f"{e(node.a)} {op} {e(node.b)}")
        compare = {tirx.EQ: "==", tirx.NE: "!=", tirx.LT: "<", tirx.LE: "<=", tirx.GT: ">",
                   tirx.GE: ">=", tirx.And: "&&", tirx.Or: "||"}
        for cls, op in compare.items():
            if isinstance(node, cls):
                return f"({e(node.a)} {op} {e(node.b)})"
        if isinstance(node, tirx.Not):
            return f"(!{e(node.a)})"
        if isinstance(node, tirx.BitwiseNot):
            return _narrow(dtype, f"~{e(node.a)}")
        if isinstance(node, tirx.Div):
            return _narrow(dtype, f"{e(node.a)} / {e(node.b)}")  # C truncates, as TIR Div
        if isinstance(node, tirx.Mod):
            if dtype.startswith("float"):
                raise Unprintable("a float Mod")
            return _narrow(dtype, f"{e(node.a)} % {e(node.b)}")
        if isinstance(node, (tirx.FloorDiv, tirx.FloorMod)):
            if dtype.startswith("float"):
                raise Unprintable(f"a float {type(node).__name__}")
            fn = "lepton_floordiv" if isinstance(node, tirx.FloorDiv) else "lepton_floormod"
            return f"{fn}<{ctype(dtype)}>({e(node.a)}, {e(node.b)})"
        if isinstance(node, (tirx.Min, tirx.Max)):
            fn = "lepton_min" if isinstance(node, tirx.Min) else "lepton_max"
            return f"{fn}<{ctype(dtype)}>({e(node.a)}, {e(node.b)})"
        if isinstance(node, tirx.Select):
            return f"({e(node.condition)} ? {e(node.true_value)} : {e(node.false_value)})"
        if isinstance(node, tirx.Cast):
            return f"(({ctype(dtype)}){e(node.value)})"
        if isinstance(node, tvm.ir.expr.Call):
            return self.call(node, dtype, e)
        raise Unprintable(f"TIR expression {type(node).__name__}")

    def call(self, node: Any, dtype: str, e: Any) -> str:
        op = str(getattr(node.op, "name", node.op)).split(".")[-1]
        args = list(node.args)
        if op == "if_then_else":
            cond = e(args[0])
            self.guarded += 1
            try:
                return f"({cond} ? {e(args[1])} : {e(args[2])})"
            finally:
                self.guarded -= 1
        if op == "likely":
            return e(args[0])
        if op in ("shift_right", "shift_left"):
            sign = ">>" if op == "shift_right" else "<<"
            return _narrow(dtype, f"{e(args[0])} {sign} {e(args[1])}")
        if op in _MATH and dtype in ("float32", "float64"):
            return f"{_MATH[op]}{'f' if dtype == 'float32' else ''}({e(args[0])})"
        raise Unprintable(f"TIR call {op} ({dtype}): no exact HLS C++ form here")


def _narrow(dtype: str, text: str) -> str:
    """`text` computed in `dtype`: C++ promotes 8/16-bit operands to int, so their result is
    cast back (TIR wraps in the narrow type); 32/64-bit and float ops stay in their type."""
    if dtype in ("int8", "uint8", "int16", "uint16", "bool"):
        return f"(({ctype(dtype)})({text}))"
    return f"({text})"


def _has_loop(stmt: Any) -> bool:
    from tvm import tirx

    from lepton_edge_targets.vitis.tir_lower import walk

    found: list[int] = []
    walk(stmt, lambda n: found.append(1) if isinstance(n, tirx.For) else None)
    return bool(found)


def _stream_t(dtype: str) -> str:
    return f"hls::stream<{ctype(dtype)}>"


def _signature(program: Any) -> str:
    args = [f"const {ctype(p.dtype)}* in{j}" for j, p in enumerate(program.inputs)]
    args += [f"{ctype(p.dtype)}* out{j}" for j, p in enumerate(program.outputs)]
    return f'extern "C" void {KERNEL}({", ".join(args + ["int batch"])})'


def _interfaces(program: Any) -> list[str]:
    lines = []
    ports = [(f"in{j}", port) for j, port in enumerate(program.inputs)]
    ports += [(f"out{j}", port) for j, port in enumerate(program.outputs)]
    for bundle, (name, port) in enumerate(ports):
        lines.append(f"#pragma HLS INTERFACE m_axi port={name} offset=slave bundle=gmem{bundle} "
                     f"depth={port.size}")
    for name, _ in ports:
        lines.append(f"#pragma HLS INTERFACE s_axilite port={name} bundle=control")
    lines.append("#pragma HLS INTERFACE s_axilite port=batch bundle=control")
    lines.append("#pragma HLS INTERFACE s_axilite port=return bundle=control")
    return lines


def kernel_cname(index: int, kernel: Any) -> str:
    """The C++ name of a kernel: its position and its PrimFunc's name."""
    return f"k{index}_{_name(kernel.name)}"


def _buffer_args(program: Any, kernel: Any) -> list[str]:
    return [a for a in kernel.args if a not in program.consts]


def _sequential_top(program: Any) -> str:
    body = []
    for bid, (dtype, size) in program.buffers.items():
        body.append(f"        {ctype(dtype)} {bid}[{size}];")
    for j, port in enumerate(program.inputs):
        body += [f"    L_in{j}: for (int i = 0; i < {port.size}; ++i) {{",
                 "#pragma HLS PIPELINE II=1",
                 f"            {port.buffer}[i] = in{j}[n * {port.size} + i];", "        }"]
    for i, kernel in enumerate(program.kernels):
        body.append(f"        {kernel_cname(i, kernel)}"
                    f"({', '.join(_buffer_args(program, kernel))});")
    for j, port in enumerate(program.outputs):
        body += [f"    L_out{j}: for (int i = 0; i < {port.size}; ++i) {{",
                 "#pragma HLS PIPELINE II=1",
                 f"            out{j}[n * {port.size} + i] = {port.buffer}[i];", "        }"]
    return "\n".join([
        _signature(program) + " {", *_interfaces(program),
        "L_batch: for (int n = 0; n < batch; ++n) {", *body, "}", "}", ""])


def _dataflow_top(program: Any) -> str:
    """Tasks joined by one hls::stream per (buffer, consumer) edge."""
    consumers: dict[str, list[str]] = {bid: [] for bid in program.buffers}
    reads: list[list[str]] = []
    for i, kernel in enumerate(program.kernels):
        names = []
        for a, bid in enumerate(kernel.inputs):
            if bid in program.consts:
                continue
            name = f"s_{bid}_k{i}_{a}"
            consumers[bid].append(name)
            names.append(name)
        reads.append(names)
    out_streams = []
    for j, port in enumerate(program.outputs):
        name = f"s_{port.buffer}_out{j}"
        consumers[port.buffer].append(name)
        out_streams.append(name)
    tasks, calls = [], []
    for j, port in enumerate(program.inputs):
        outs = consumers[port.buffer]
        st, t = _stream_t(port.dtype), ctype(port.dtype)
        params = ", ".join(f"{st}& o{k}" for k in range(len(outs)))
        writes = " ".join(f"o{k}.write(v);" for k in range(len(outs)))
        tasks.append(f"""\
static void load_in{j}(const {t}* in, {params}, int batch) {{
L_load{j}: for (int i = 0; i < batch * {port.size}; ++i) {{
#pragma HLS PIPELINE II=1
        const {t} v = in[i];
        {writes}
}}
}}
""")
        calls.append(f"    load_in{j}(in{j}, {', '.join(outs)}, batch);")
    for i, kernel in enumerate(program.kernels):
        ins = [b for b in kernel.inputs if b not in program.consts]
        params = [f"{_stream_t(program.buffers[b][0])}& i{a}" for a, b in enumerate(ins)]
        out_params: list[str] = []
        for o, bid in enumerate(kernel.outputs):
            out_params += [f"{_stream_t(program.buffers[bid][0])}& o{o}_{k}"
                           for k in range(len(consumers[bid]))]
        lines = [f"static void task{i}({', '.join(params + out_params)}, int batch) {{",
                 f"T{i}_n: for (int n = 0; n < batch; ++n) {{"]
        for a, bid in enumerate(ins):
            dtype, size = program.buffers[bid]
            lines += [f"        {ctype(dtype)} x{a}[{size}];",
                      f"    T{i}_r{a}: for (int j = 0; j < {size}; ++j) {{",
                      "#pragma HLS PIPELINE II=1", f"            x{a}[j] = i{a}.read();",
                      "        }"]
        for o, bid in enumerate(kernel.outputs):
            dtype, size = program.buffers[bid]
            lines.append(f"        {ctype(dtype)} y{o}[{size}];")
        names = iter([f"x{a}" for a in range(len(ins))] +
                     [f"y{o}" for o in range(len(kernel.outputs))])
        lines.append(f"        {kernel_cname(i, kernel)}"
                     f"({', '.join(next(names) for _ in _buffer_args(program, kernel))});")
        for o, bid in enumerate(kernel.outputs):
            size = program.buffers[bid][1]
            lines += [f"    T{i}_w{o}: for (int j = 0; j < {size}; ++j) {{",
                      "#pragma HLS PIPELINE II=1",
                      "            " + " ".join(f"o{o}_{k}.write(y{o}[j]);"
                                               for k in range(len(consumers[bid]))),
                      "        }"]
        lines += ["}", "}", ""]
        tasks.append("\n".join(lines))
        outs = [name for bid in kernel.outputs for name in consumers[bid]]
        calls.append(f"    task{i}({', '.join(reads[i] + outs)}, batch);")
    for j, port in enumerate(program.outputs):
        tasks.append(f"""\
static void store_out{j}({_stream_t(port.dtype)}& s, {ctype(port.dtype)}* out, int batch) {{
L_store{j}: for (int i = 0; i < batch * {port.size}; ++i) {{
#pragma HLS PIPELINE II=1
        out[i] = s.read();
}}
}}
""")
        calls.append(f"    store_out{j}({out_streams[j]}, out{j}, batch);")
    decls = []
    for bid, names in consumers.items():
        dtype, size = program.buffers[bid]
        for name in names:
            decls += [f'    {_stream_t(dtype)} {name}("{name}");',
                      f"#pragma HLS STREAM variable={name} depth={size}"]
    return "\n".join([*tasks, _signature(program) + " {", *_interfaces(program),
                      "#pragma HLS DATAFLOW", *decls, *calls, "}", ""])


def print_kernels(program: Any) -> list[str]:
    """Every kernel of the program printed from its TIR (Unprintable if one cannot be)."""
    consts = set(program.consts)
    return [TirPrinter(k.func, kernel_cname(i, k), k.args, len(k.outputs), consts,
                       k.partitioned, program.parallelism).print()
            for i, k in enumerate(program.kernels)]


def generate(program: Any, *, dataflow: bool = False) -> tuple[str, dict[str, str]]:
    """(kernel name, files): kernel.cpp, kernel.h, CMakeLists.txt (+ the stream stand-in)."""
    p = program.parallelism
    parts = [f"// Generated by lepton-edge (vitis target): Vitis HLS C++ printed from TVM TIR,\n"
             f"// parallelism {p}, {'dataflow (hls::stream)' if dataflow else 'sequential'}.\n"
             "// Not synthesized here: checked by C simulation of exactly this source.\n"
             '#include <math.h>\n#include "kernel.h"\n'
             + ('#include "hls_stream.h"\n' if dataflow else "") + "\n", _HELPERS, "\n"]
    parts.append("// Constants of the TIR kernels (weights, corrections, requantize tables) as "
                 "on-chip ROM.\n")
    for cid, value in program.consts.items():
        parts.append(c_array(str(value.dtype), cid, value))
    parts.append("\n")
    for i, (kernel, text) in enumerate(zip(program.kernels, print_kernels(program),
                                           strict=True)):
        ins = ", ".join(kernel.inputs)
        parts.append(f"// kernel {i}: TIR PrimFunc {kernel.name} ({ins} -> "
                     f"{', '.join(kernel.outputs)})\n{text}\n")
    parts.append(_dataflow_top(program) if dataflow else _sequential_top(program))
    defines = [f"#define LEPTON_IN{j}_SIZE {port.size}  // {port.name}"
               for j, port in enumerate(program.inputs)]
    defines += [f"#define LEPTON_OUT{j}_SIZE {port.size}  // {port.name}"
                for j, port in enumerate(program.outputs)]
    header = "\n".join([
        "// Generated by lepton-edge (vitis target). int8 subgraph as Vitis HLS C++.",
        "#pragma once", "#include <stdint.h>", "", *defines,
        f"#define LEPTON_PARALLELISM {p}", "", _signature(program) + ";", ""])
    # A name unique to this kernel (a hash of its source): several FPGA subgraphs can be
    # linked into one xclbin, and an xclbin built from another subgraph is refused by name
    # instead of running with the wrong ports and weights.
    digest = hashlib.sha256(("".join(parts) + header).encode()).hexdigest()[:12]
    name = f"lepton_{digest}"
    files = {"kernel.cpp": "".join(parts).replace(f"void {KERNEL}(", f"void {name}("),
             "kernel.h": header.replace(f"void {KERNEL}(", f"void {name}("),
             "CMakeLists.txt": _CMAKE}
    if dataflow:
        files["csim_include/hls_stream.h"] = _STREAM_STANDIN

    return name, files


_STREAM_STANDIN = """\
// hls_stream.h: lepton-edge's own stand-in for the Vitis HLS hls::stream class, used ONLY to
// compile the C simulation with plain g++ (no Xilinx headers here). The board build uses the
// hls_stream.h that ships with Vitis HLS. A FIFO without a depth limit, as in Vitis C
// simulation; a read from an empty stream (a deadlock in hardware) is counted, and the
// runtime reports it after the call (lepton_csim_stream_errors).
#pragma once
#include <cstddef>
#include <cstdio>
#include <deque>
#include <string>

namespace lepton_csim {
static int stream_errors = 0;
}

extern "C" int lepton_csim_stream_errors(void) { return lepton_csim::stream_errors; }

namespace hls {
template <typename T>
class stream {
  public:
    stream() : name_("stream") {}
    explicit stream(const char* name) : name_(name) {}
    stream(const stream&) = delete;
    stream& operator=(const stream&) = delete;
    void write(const T& value) { fifo_.push_back(value); }
    T read() {
        if (fifo_.empty()) {
            ++lepton_csim::stream_errors;
            std::fprintf(stderr, "hls::stream %s: read while empty (deadlock in hardware)\\n",
                         name_.c_str());
            return T();
        }
        T value = fifo_.front();
        fifo_.pop_front();
        return value;
    }
    bool read_nb(T& value) {
        if (fifo_.empty()) return false;
        value = read();
        return true;
    }
    bool write_nb(const T& value) { write(value); return true; }
    bool empty() const { return fifo_.empty(); }
    bool full() const { return false; }
    std::size_t size() const { return fifo_.size(); }
    void operator<<(const T& value) { write(value); }
    void operator>>(T& value) { value = read(); }

  private:
    std::deque<T> fifo_;
    std::string name_;
};
}  // namespace hls
"""

CSIM_FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off"]
_CMAKE = f"""\
# Rebuilds the C simulation of kernel.cpp (csim.so) as lepton-edge built it:
#   cmake -S . -B csim-build && cmake --build csim-build
# (no fused multiply-add: the float steps must round like the CPU int8 build's).
# Not for the board: build/Makefile runs v++ with Vitis's own headers.
cmake_minimum_required(VERSION 3.16)
project(lepton_vitis_csim CXX)
add_library(csim SHARED kernel.cpp)
set_target_properties(csim PROPERTIES PREFIX "" OUTPUT_NAME csim)
target_compile_options(csim PRIVATE {" ".join(CSIM_FLAGS)})
target_include_directories(csim PRIVATE ${{CMAKE_CURRENT_SOURCE_DIR}}
                           ${{CMAKE_CURRENT_SOURCE_DIR}}/csim_include)
"""


def board_files(kernel: str, profile: str, platform: str, clock_mhz: Any,
                estimate: dict[str, Any], opts: dict[str, Any], n_in: int = 1, n_out: int = 1
                ) -> dict[str, str]:
    from lepton_edge_targets.vitis.estimate import summary

    KERNEL = kernel  # noqa: N806 - the templates below name the kernel

    makefile = f"""\
# Board build for profile '{profile}' (generated by lepton-edge; needs AMD Vitis 2023.2+ and XRT).
# Not run here: lepton-edge has no Vitis tools; the kernel was checked by C simulation only.
# Compile against Vitis's own hls_stream.h (never ../csim_include, the C-simulation stand-in).
# The float steps (dequantize, float Add/AveragePool, quantize) must round like the CPU
# build's: the C simulation (../CMakeLists.txt) is compiled with -ffp-contract=off (no fused
# multiply-add), and Vitis HLS keeps separate fmul/fadd unless unsafe math is enabled
# (config_compile -unsafe_math_optimizations, off by default): leave it off.
PLATFORM ?= {platform}
FREQ_MHZ ?= {clock_mhz}
TARGET ?= hw

all: {KERNEL}.xclbin

{KERNEL}.xo: ../kernel.cpp ../kernel.h
\tv++ -c -t $(TARGET) -k {KERNEL} --platform $(PLATFORM) --hls.clock $(FREQ_MHZ)000000:{KERNEL} \\
\t    -I.. -o $@ ../kernel.cpp

{KERNEL}.xclbin: {KERNEL}.xo connectivity.cfg
\tv++ -l -t $(TARGET) --platform $(PLATFORM) --config connectivity.cfg -o $@ {KERNEL}.xo

clean:
\trm -rf *.xo *.xclbin _x .Xil *.log *.ltx *.info .ipcache

.PHONY: all clean
"""
    conn = ["[connectivity]", f"nk={KERNEL}:1:{KERNEL}_1"]
    conn += [f"sp={KERNEL}_1.in{j}:DDR" for j in range(n_in)]
    conn += [f"sp={KERNEL}_1.out{j}:DDR" for j in range(n_out)]
    readme = f"""\
# {KERNEL} for {profile}

Generated by lepton-edge. NOT synthesized here: this machine has no AMD Vitis tools; the
kernel source (../kernel.cpp, printed from the subgraph's TVM TIR: the CPU int8 build's
integer lowering, one C++ function per TIR PrimFunc) was verified by C simulation only
(../csim.so, g++ -ffp-contract=off, bit-exact with the CPU int8 build).

Settings: parallelism {opts['parallelism']}, dataflow {opts['dataflow']}.

To build on a machine with Vitis and the platform `{platform}` (Vitis and XRT settings
sourced, e.g. `source /tools/Xilinx/Vitis/2023.2/settings64.sh`,
`source /opt/xilinx/xrt/setup.sh`): `make` (v++ -c, then v++ -l with connectivity.cfg)
-> {KERNEL}.xclbin. `make TARGET=hw_emu` builds for hardware emulation instead. On an
embedded platform (ZCU104, KV260) also package the SD-card image with `v++ -p` as the
platform's documentation describes. Then run the artifact on the board with
LEPTON_VITIS_XCLBIN=/path/to/{KERNEL}.xclbin and devices=["vitis", "cpu"]: the runtime
drives the kernel through pyxrt (../host_xrt.py).

Pre-synthesis estimate (rough model, targets/vitis/estimate.py): {summary(estimate)}.
"""
    return {"Makefile": makefile, "connectivity.cfg": "\n".join(conn) + "\n",
            "README.md": readme}
