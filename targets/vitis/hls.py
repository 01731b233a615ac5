"""The Vitis HLS C++ generator: a Program (compile.py) -> kernel.cpp, kernel.h (and, for the
dataflow form, the hls::stream stand-in header the C simulation compiles against), and the
board build files.

Arithmetic: int8_t x int8_t -> int32_t with the fixed-point requantization of
lepton_edge/lowering/int8.py for Conv/Gemm/MatMul; float32 in the CPU build's order for Add,
AveragePool and requantize (see compile.py). Settings:

- parallelism P: MAC lanes per conv/dense layer (`PIPELINE II=1` over chunks of P products,
  weights `ARRAY_PARTITION cyclic factor=P`).
- dataflow: false -> one batch loop calling the layers in order on local (ping-pong) arrays;
  true -> `#pragma HLS DATAFLOW` over load / layer / store tasks joined by `hls::stream`
  FIFOs (one per producer-consumer edge, depth one sample), so layers overlap across samples.

Interfaces: every input and output is an int8 `m_axi` port (its own bundle) with its address
and `batch` on `s_axilite` (the Vitis kernel convention XRT drives).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np

KERNEL = "lepton_kernel"  # placeholder; each kernel is named lepton_<hash of its source>


def _flit(value: float) -> str:
    """An exact C float literal for a float32 value (hex float, C++17)."""
    return float(np.float32(value)).hex() + "f"


def _array(ctype: str, name: str, values: np.ndarray, per_line: int = 24) -> str:
    if ctype == "float":
        flat = [_flit(v) for v in np.asarray(values, np.float32).ravel()]
        per_line = 8
    else:
        flat = [str(int(v)) for v in np.asarray(values).ravel()]
    if ctype == "int64_t":
        flat = [f"{v}LL" for v in flat]
    rows = [", ".join(flat[i:i + per_line]) for i in range(0, len(flat), per_line)]
    body = ",\n    ".join(rows)
    return f"static const {ctype} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


_REQUANT = """\
// y = clip(rne((acc * m0) >> shift) + zp, lo, hi): round half to even, as QuantizeLinear.
static inline int8_t requantize(int32_t acc, int64_t m0, int shift, int zp, int lo, int hi) {
#pragma HLS INLINE
    int64_t prod = (int64_t)acc * m0;
    int64_t q = prod >> shift;  // arithmetic shift: floor
    int64_t rem = prod & ((((int64_t)1) << shift) - 1);
    int64_t half = ((int64_t)1) << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q += 1;
    q += zp;
    if (q < lo) q = lo;
    if (q > hi) q = hi;
    return (int8_t)q;
}

// QuantizeLinear of a float32 value exactly as the CPU build computes it: rne(v / scale) + zp
// in float32 (a true division, no reciprocal), then clip to [lo, hi] (Relu/Clip folded).
static inline int8_t quantize_f(float v, float scale, int zp, int lo, int hi) {
#pragma HLS INLINE
    float r = nearbyintf(v / scale) + (float)zp;
    if (r < (float)lo) r = (float)lo;
    if (r > (float)hi) r = (float)hi;
    return (int8_t)r;
}
"""


def _add(i: int, layer: Any, p: int) -> str:
    n = int(np.prod(layer.out_shape))
    prm = layer.params
    return f"""\
// layer {i}: add of two int8 tensors ({n} values), DequantizeLinear -> Add -> QuantizeLinear
// in float32 as the CPU build: tables hold float32((v - zp) * scale) for every int8 v.
{_array("float", f"L{i}_ta", prm["table_a"])}{_array("float", f"L{i}_tb", prm["table_b"])}
static void layer{i}(const int8_t in0[{n}], const int8_t in1[{n}], int8_t out[{n}]) {{
L{i}_e: for (int j = 0; j < {n}; ++j) {{
#pragma HLS PIPELINE II=1
        const float s = L{i}_ta[in0[j] + 128] + L{i}_tb[in1[j] + 128];
        out[j] = quantize_f(s, {_flit(prm["scale"])}, {prm["zp"]}, {prm["low"]}, {prm["high"]});
}}
}}
"""


def _requant(i: int, layer: Any, p: int) -> str:
    n = int(np.prod(layer.out_shape))
    prm = layer.params
    return f"""\
// layer {i}: requantize {n} int8 values to a new scale (DequantizeLinear -> QuantizeLinear)
{_array("float", f"L{i}_t", prm["table"])}
static void layer{i}(const int8_t in0[{n}], int8_t out[{n}]) {{
L{i}_e: for (int j = 0; j < {n}; ++j) {{
#pragma HLS PIPELINE II=1
        out[j] = quantize_f(L{i}_t[in0[j] + 128], {_flit(prm["scale"])}, {prm["zp"]}, \
{prm["low"]}, {prm["high"]});
}}
}}
"""


def _avgpool(i: int, layer: Any, p: int) -> str:
    c, h, w = layer.in_shape
    _, oh, ow = layer.out_shape
    prm = layer.params
    kh, kw = prm["kernel"]
    sh, sw = prm["strides"]
    pt, pl = prm["pads"][0], prm["pads"][1]
    divisor = f"{kh * kw}" if prm["count_include_pad"] else "count"
    return f"""\
// layer {i}: averagepool {c}x{h}x{w} -> {c}x{oh}x{ow}, kernel {kh}x{kw}; float32 sum in the
// CPU build's order (ky, then kx), divided by the {'window size' if prm['count_include_pad']
                                                  else 'count of valid elements'}
{_array("float", f"L{i}_t", prm["table"])}
static void layer{i}(const int8_t in0[{c * h * w}], int8_t out[{c * oh * ow}]) {{
L{i}_c: for (int ch = 0; ch < {c}; ++ch) {{
  L{i}_y: for (int y = 0; y < {oh}; ++y) {{
    L{i}_x: for (int x = 0; x < {ow}; ++x) {{
        float s = 0.0f;
        int count = 0;
        for (int ky = 0; ky < {kh}; ++ky) {{
            for (int kx = 0; kx < {kw}; ++kx) {{
                const int iy = y * {sh} - {pt} + ky, ix = x * {sw} - {pl} + kx;
                if (iy >= 0 && iy < {h} && ix >= 0 && ix < {w}) {{
                    s = s + L{i}_t[in0[(ch * {h} + iy) * {w} + ix] + 128];
                    ++count;
                }}
            }}
        }}
        out[(ch * {oh} + y) * {ow} + x] = quantize_f(s / (float)({divisor}), \
{_flit(prm["scale"])}, {prm["zp"]}, {prm["low"]}, {prm["high"]});
    }}
  }}
}}
}}
"""


def _conv(i: int, layer: Any, p: int) -> str:
    c, h, w = layer.in_shape
    o, oh, ow = layer.out_shape
    prm = layer.params
    wq = prm["w"]
    _, cg, kh, kw = wq.shape
    groups = prm["groups"]
    og = o // groups
    sh, sw = prm["strides"]
    pt, pl = prm["pads"][0], prm["pads"][1]
    k = cg * kh * kw
    chunks = math.ceil(k / p)
    return f"""\
// layer {i}: conv {c}x{h}x{w} -> {o}x{oh}x{ow}, kernel {kh}x{kw}, stride {sh}x{sw}, groups {groups}
{_array("int8_t", f"L{i}_w", wq)}{_array("int32_t", f"L{i}_corr", prm["corr"])}\
{_array("int64_t", f"L{i}_m0", prm["m0"])}{_array("int8_t", f"L{i}_shift", prm["shift"])}
static void layer{i}(const int8_t in0[{c * h * w}], int8_t out[{o * oh * ow}]) {{
#pragma HLS ARRAY_PARTITION variable=L{i}_w cyclic factor={p} dim=1
L{i}_oc: for (int oc = 0; oc < {o}; ++oc) {{
    const int g = oc / {og};
  L{i}_oh: for (int y = 0; y < {oh}; ++y) {{
    L{i}_ow: for (int x = 0; x < {ow}; ++x) {{
        int32_t acc = 0;
      L{i}_k: for (int kk = 0; kk < {chunks}; ++kk) {{
#pragma HLS PIPELINE II=1
        L{i}_u: for (int u = 0; u < {p}; ++u) {{
#pragma HLS UNROLL
            const int k = kk * {p} + u;
            if (k < {k}) {{
                const int ci = k / {kh * kw}, ky = (k / {kw}) % {kh}, kx = k % {kw};
                const int iy = y * {sh} - {pt} + ky, ix = x * {sw} - {pl} + kx;
                const int32_t v = (iy >= 0 && iy < {h} && ix >= 0 && ix < {w})
                    ? (int32_t)in0[((g * {cg} + ci) * {h} + iy) * {w} + ix] : (int32_t)({prm["x_zp"]});
                acc += v * (int32_t)L{i}_w[oc * {k} + k];
            }}
        }}
      }}
        acc += L{i}_corr[oc];
        out[(oc * {oh} + y) * {ow} + x] =
            requantize(acc, L{i}_m0[oc], L{i}_shift[oc], {prm["zp"]}, {prm["low"]}, {prm["high"]});
    }}
  }}
}}
}}
"""


def _dense(i: int, layer: Any, p: int) -> str:
    prm = layer.params
    o, k = prm["w"].shape
    chunks = math.ceil(k / p)
    return f"""\
// layer {i}: dense {k} -> {o}
{_array("int8_t", f"L{i}_w", prm["w"])}{_array("int32_t", f"L{i}_corr", prm["corr"])}\
{_array("int64_t", f"L{i}_m0", prm["m0"])}{_array("int8_t", f"L{i}_shift", prm["shift"])}
static void layer{i}(const int8_t in0[{k}], int8_t out[{o}]) {{
#pragma HLS ARRAY_PARTITION variable=L{i}_w cyclic factor={p} dim=1
#pragma HLS ARRAY_PARTITION variable=in0 cyclic factor={p} dim=1
L{i}_o: for (int oc = 0; oc < {o}; ++oc) {{
    int32_t acc = 0;
  L{i}_k: for (int kk = 0; kk < {chunks}; ++kk) {{
#pragma HLS PIPELINE II=1
    L{i}_u: for (int u = 0; u < {p}; ++u) {{
#pragma HLS UNROLL
        const int k = kk * {p} + u;
        if (k < {k}) acc += (int32_t)in0[k] * (int32_t)L{i}_w[oc * {k} + k];
    }}
  }}
    acc += L{i}_corr[oc];
    out[oc] = requantize(acc, L{i}_m0[oc], L{i}_shift[oc], {prm["zp"]}, {prm["low"]}, {prm["high"]});
}}
}}
"""


def _maxpool(i: int, layer: Any, p: int) -> str:
    c, h, w = layer.in_shape
    _, oh, ow = layer.out_shape
    kh, kw = layer.params["kernel"]
    sh, sw = layer.params["strides"]
    pt, pl = layer.params["pads"][0], layer.params["pads"][1]
    return f"""\
// layer {i}: maxpool {c}x{h}x{w} -> {c}x{oh}x{ow}, kernel {kh}x{kw} (exact on int8 values)
static void layer{i}(const int8_t in0[{c * h * w}], int8_t out[{c * oh * ow}]) {{
L{i}_c: for (int ch = 0; ch < {c}; ++ch) {{
  L{i}_y: for (int y = 0; y < {oh}; ++y) {{
    L{i}_x: for (int x = 0; x < {ow}; ++x) {{
#pragma HLS PIPELINE II=1
        int8_t m = -128;
        for (int ky = 0; ky < {kh}; ++ky) {{
            for (int kx = 0; kx < {kw}; ++kx) {{
                const int iy = y * {sh} - {pt} + ky, ix = x * {sw} - {pl} + kx;
                if (iy >= 0 && iy < {h} && ix >= 0 && ix < {w}) {{
                    const int8_t v = in0[(ch * {h} + iy) * {w} + ix];
                    if (v > m) m = v;
                }}
            }}
        }}
        out[(ch * {oh} + y) * {ow} + x] = m;
    }}
  }}
}}
}}
"""


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

_GENERATORS = {"conv": "_conv", "dense": "_dense", "maxpool": "_maxpool", "add": "_add",
               "requant": "_requant", "avgpool": "_avgpool"}


def _signature(program: Any) -> str:
    args = [f"const int8_t* in{j}" for j in range(len(program.inputs))]
    args += [f"int8_t* out{j}" for j in range(len(program.outputs))]
    return f'extern "C" void {KERNEL}({", ".join(args + ["int batch"])})'


def _interfaces(program: Any) -> list[str]:
    lines = []
    ports = [(f"in{j}", port) for j, port in enumerate(program.inputs)]
    ports += [(f"out{j}", port) for j, port in enumerate(program.outputs)]
    for bundle, (name, port) in enumerate(ports):
        lines.append(f"#pragma HLS INTERFACE m_axi port={name} offset=slave bundle=gmem{bundle} "
                     f"depth={port.q.size}")
    for name, _ in ports:
        lines.append(f"#pragma HLS INTERFACE s_axilite port={name} bundle=control")
    lines.append("#pragma HLS INTERFACE s_axilite port=batch bundle=control")
    lines.append("#pragma HLS INTERFACE s_axilite port=return bundle=control")
    return lines


def _sequential_top(program: Any) -> str:
    body = []
    for bid, size in program.buffers.items():
        body.append(f"        int8_t {bid}[{size}];")
    for j, port in enumerate(program.inputs):
        body += [f"    L_in{j}: for (int i = 0; i < {port.q.size}; ++i) {{",
                 "#pragma HLS PIPELINE II=1",
                 f"            {port.buffer}[i] = in{j}[n * {port.q.size} + i];", "        }"]
    for i, layer in enumerate(program.layers):
        body.append(f"        layer{i}({', '.join(layer.inputs)}, {layer.output});")
    for j, port in enumerate(program.outputs):
        body += [f"    L_out{j}: for (int i = 0; i < {port.q.size}; ++i) {{",
                 "#pragma HLS PIPELINE II=1",
                 f"            out{j}[n * {port.q.size} + i] = {port.buffer}[i];", "        }"]
    return "\n".join([
        _signature(program) + " {", *_interfaces(program),
        "L_batch: for (int n = 0; n < batch; ++n) {", *body, "}", "}", ""])


def _dataflow_top(program: Any) -> str:
    """Tasks joined by one hls::stream per (buffer, consumer) edge."""
    consumers: dict[str, list[str]] = {bid: [] for bid in program.buffers}
    reads: list[list[str]] = []
    for i, layer in enumerate(program.layers):
        names = []
        for a, bid in enumerate(layer.inputs):
            name = f"s_{bid}_L{i}_{a}"
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
        params = ", ".join(f"hls::stream<int8_t>& o{k}" for k in range(len(outs)))
        writes = " ".join(f"o{k}.write(v);" for k in range(len(outs)))
        tasks.append(f"""\
static void load_in{j}(const int8_t* in, {params}, int batch) {{
L_load{j}: for (int i = 0; i < batch * {port.q.size}; ++i) {{
#pragma HLS PIPELINE II=1
        const int8_t v = in[i];
        {writes}
}}
}}
""")
        calls.append(f"    load_in{j}(in{j}, {', '.join(outs)}, batch);")
    for i, layer in enumerate(program.layers):
        outs = consumers[layer.output]
        ins = [f"hls::stream<int8_t>& i{a}" for a in range(len(layer.inputs))]
        params = ", ".join(ins + [f"hls::stream<int8_t>& o{k}" for k in range(len(outs))])
        size_out = program.buffers[layer.output]
        lines = [f"static void task{i}({params}, int batch) {{",
                 f"T{i}_n: for (int n = 0; n < batch; ++n) {{"]
        for a, bid in enumerate(layer.inputs):
            lines += [f"        int8_t x{a}[{program.buffers[bid]}];",
                      f"    T{i}_r{a}: for (int j = 0; j < {program.buffers[bid]}; ++j) {{",
                      "#pragma HLS PIPELINE II=1", f"            x{a}[j] = i{a}.read();",
                      "        }"]
        args = ", ".join(f"x{a}" for a in range(len(layer.inputs)))
        lines += [f"        int8_t y[{size_out}];", f"        layer{i}({args}, y);",
                  f"    T{i}_w: for (int j = 0; j < {size_out}; ++j) {{",
                  "#pragma HLS PIPELINE II=1",
                  "            " + " ".join(f"o{k}.write(y[j]);" for k in range(len(outs))),
                  "        }", "}", "}", ""]
        tasks.append("\n".join(lines))
        calls.append(f"    task{i}({', '.join(reads[i] + outs)}, batch);")
    for j, port in enumerate(program.outputs):
        tasks.append(f"""\
static void store_out{j}(hls::stream<int8_t>& s, int8_t* out, int batch) {{
L_store{j}: for (int i = 0; i < batch * {port.q.size}; ++i) {{
#pragma HLS PIPELINE II=1
        out[i] = s.read();
}}
}}
""")
        calls.append(f"    store_out{j}({out_streams[j]}, out{j}, batch);")
    decls = []
    for bid, names in consumers.items():
        for name in names:
            decls += [f'    hls::stream<int8_t> {name}("{name}");',
                      f"#pragma HLS STREAM variable={name} depth={program.buffers[bid]}"]
    return "\n".join([*tasks, _signature(program) + " {", *_interfaces(program),
                      "#pragma HLS DATAFLOW", *decls, *calls, "}", ""])


def generate(program: Any, parallelism: int, *, dataflow: bool = False
             ) -> tuple[str, dict[str, str]]:
    """(kernel name, files): kernel.cpp, kernel.h, CMakeLists.txt (+ the stream stand-in)."""
    p = parallelism
    parts = [f"// Generated by lepton-edge (vitis target): Vitis HLS C++ kernel, "
             f"parallelism {p}, {'dataflow (hls::stream)' if dataflow else 'sequential'}.\n"
             "// Not synthesized here: checked by C simulation of exactly this source.\n"
             '#include <math.h>\n#include "kernel.h"\n'
             + ('#include "hls_stream.h"\n' if dataflow else "") + "\n", _REQUANT, "\n"]
    gens = globals()
    for i, layer in enumerate(program.layers):
        parts.append(gens[_GENERATORS[layer.kind]](i, layer, p) + "\n")
    parts.append(_dataflow_top(program) if dataflow else _sequential_top(program))
    defines = [f"#define LEPTON_IN{j}_SIZE {port.q.size}  // {port.name}"
               for j, port in enumerate(program.inputs)]
    defines += [f"#define LEPTON_OUT{j}_SIZE {port.q.size}  // {port.name}"
                for j, port in enumerate(program.outputs)]
    header = "\n".join([
        "// Generated by lepton-edge (vitis target). int8 QDQ subgraph as Vitis HLS C++.",
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
kernel source (../kernel.cpp) was verified by C simulation only (../csim.so).

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
