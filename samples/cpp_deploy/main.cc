// lepton_deploy: run a lepton-edge CPU build (a TVM Relax VM shared library) from C++.
//
//   usage: lepton_deploy MODEL.so INPUT.npy OUTPUT.npy
//
// MODEL.so is the CPU build from a .lepton artifact (see README.md). INPUT.npy must be a
// C-contiguous little-endian float32 array; the first output of "main" is written to
// OUTPUT.npy. Only the TVM runtime is needed here (libtvm_runtime.so + libtvm_ffi.so); all
// calls go through the tvm-ffi C++ API (tvm/ffi/...), which is what the wheels ship headers for.

#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <sched.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// Relax VM allocator kinds (tvm::runtime::memory::AllocatorType): 1 = naive, 2 = pooled.
constexpr int kPooledAllocator = 2;

// Every error ends up as "error: <message>" on stderr and exit status 1.
[[noreturn]] void Fail(const std::string& message) { throw std::runtime_error(message); }

// ---------------------------------------------------------------------------------------------
// Thread pool size. TVM 0.27 starts its CPU pool with half the logical CPUs on x86 (it assumes
// two hyper-threads per core), so on a VM whose vCPUs are one thread per core every kernel
// would run on half the cores. As lepton-edge's Python runtime does (lepton_edge/threads.py),
// set TVM_NUM_THREADS to the physical cores this process may run on, unless the user set it.
// The pool reads the variable when the first kernel runs, so this must happen before that.
// ---------------------------------------------------------------------------------------------

// Distinct physical cores among the CPUs in this process's affinity mask (Linux sysfs
// topology: CPUs sharing a core have the same thread_siblings_list).
int PhysicalCores() {
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return 1;
  std::set<std::string> cores;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &mask)) continue;
    std::ifstream f("/sys/devices/system/cpu/cpu" + std::to_string(cpu) +
                    "/topology/thread_siblings_list");
    std::string siblings;
    if (!(f && std::getline(f, siblings))) siblings = "cpu" + std::to_string(cpu);
    cores.insert(siblings);
  }
  return cores.empty() ? 1 : static_cast<int>(cores.size());
}

void DefaultThreads() {
  const char* set = std::getenv("TVM_NUM_THREADS");
  if (set != nullptr && *set != '\0') return;
  // overwrite: an empty TVM_NUM_THREADS counts as unset
  setenv("TVM_NUM_THREADS", std::to_string(PhysicalCores()).c_str(), /*overwrite=*/1);
}

// The size of the pool TVM actually started (after the first kernel ran).
int64_t PoolThreads() {
  ffi::Optional<ffi::Function> f = ffi::Function::GetGlobal("runtime.NumThreads");
  return f.has_value() ? (*f)().cast<int64_t>() : -1;
}

// ---------------------------------------------------------------------------------------------
// Minimal, strict .npy reader/writer (format versions 1.0, 2.0 and 3.0).
// https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
// ---------------------------------------------------------------------------------------------

struct NpyArray {
  std::string descr;           // e.g. "<f4"
  std::vector<int64_t> shape;  // empty for a 0-d array
  std::vector<char> data;      // raw C-order bytes
};

const char kNpyMagic[] = "\x93NUMPY";  // 6 bytes + NUL

// Returns the text that follows `'key':` in the header dict, with leading spaces skipped.
std::string HeaderValue(const std::string& header, const std::string& key,
                        const std::string& path) {
  size_t pos = header.find("'" + key + "'");
  if (pos == std::string::npos) Fail(path + ": .npy header has no '" + key + "' key");
  pos = header.find(':', pos);
  if (pos == std::string::npos) Fail(path + ": malformed .npy header");
  pos = header.find_first_not_of(' ', pos + 1);
  return pos == std::string::npos ? std::string() : header.substr(pos);
}

NpyArray ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) Fail("cannot open input file " + path);

  char magic[6];
  unsigned char version[2];
  if (!in.read(magic, 6) || std::memcmp(magic, kNpyMagic, 6) != 0)
    Fail(path + ": not a .npy file (bad magic)");
  if (!in.read(reinterpret_cast<char*>(version), 2))
    Fail(path + ": truncated .npy header");
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) Fail(path + ": truncated header");
    header_len = b[0] | (b[1] << 8);
  } else if (version[0] == 2 || version[0] == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) Fail(path + ": truncated header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
  } else {
    Fail(path + ": unsupported .npy format version " + std::to_string(version[0]));
  }
  if (header_len > (1u << 20)) Fail(path + ": .npy header is implausibly large");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) Fail(path + ": truncated .npy header");

  NpyArray arr;
  // 'descr': a quoted string such as '<f4'.
  std::string v = HeaderValue(header, "descr", path);
  size_t end = v.empty() ? std::string::npos : v.find(v[0], 1);
  if (v.empty() || (v[0] != '\'' && v[0] != '"') || end == std::string::npos)
    Fail(path + ": malformed 'descr' in .npy header");
  arr.descr = v.substr(1, end - 1);
  // 'fortran_order': True or False.
  v = HeaderValue(header, "fortran_order", path);
  if (v.rfind("True", 0) == 0) {
    Fail(path + ": Fortran-ordered arrays are not supported; save a C-contiguous array "
                "(numpy.ascontiguousarray)");
  } else if (v.rfind("False", 0) != 0) {
    Fail(path + ": malformed 'fortran_order' in .npy header");
  }
  // 'shape': a tuple of non-negative integers, e.g. (), (3,), (3, 4).
  v = HeaderValue(header, "shape", path);
  end = v.find(')');
  if (v.empty() || v[0] != '(' || end == std::string::npos)
    Fail(path + ": malformed 'shape' in .npy header");
  std::stringstream dims(v.substr(1, end - 1));
  std::string item;
  while (std::getline(dims, item, ',')) {
    size_t b = item.find_first_not_of(' '), e = item.find_last_not_of(' ');
    if (b == std::string::npos) continue;  // the empty item after a trailing comma
    item = item.substr(b, e - b + 1);
    if (item.find_first_not_of("0123456789") != std::string::npos)
      Fail(path + ": malformed 'shape' in .npy header");
    arr.shape.push_back(std::stoll(item));
  }

  // Only float32 is accepted as model input.
  if (arr.descr != "<f4") {
    Fail(path + ": expected dtype float32 ('<f4'), got '" + arr.descr +
         "'; convert it with x.astype(numpy.float32)");
  }
  size_t numel = 1;
  for (int64_t d : arr.shape) numel *= static_cast<size_t>(d);
  arr.data.resize(numel * sizeof(float));
  if (!in.read(arr.data.data(), static_cast<std::streamsize>(arr.data.size())))
    Fail(path + ": file is shorter than its shape says");
  if (in.peek() != std::char_traits<char>::eof())
    Fail(path + ": file is longer than its shape says");
  return arr;
}

// .npy dtype string for a DLPack dtype, for the types a model output is likely to have.
std::string NpyDescr(DLDataType t) {
  if (t.lanes != 1) Fail("vector dtypes are not supported in .npy output");
  std::string bytes = std::to_string(t.bits / 8);
  switch (t.code) {
    case kDLFloat:
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "<f" + bytes;
      break;
    case kDLInt:
      if (t.bits == 8) return "|i1";
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "<i" + bytes;
      break;
    case kDLUInt:
      if (t.bits == 8) return "|u1";
      if (t.bits == 16 || t.bits == 32 || t.bits == 64) return "<u" + bytes;
      break;
    case kDLBool:
      return "|b1";
  }
  Fail("output dtype (code " + std::to_string(t.code) + ", " + std::to_string(t.bits) +
       " bits) cannot be written as .npy");
}

void WriteNpy(const std::string& path, const DLTensor& t) {
  std::string shape = "(";  // Python tuple syntax: (), (3,), (3, 4)
  for (int i = 0; i < t.ndim; ++i) shape += (i ? ", " : "") + std::to_string(t.shape[i]);
  shape += t.ndim == 1 ? ",)" : ")";
  std::string header = "{'descr': '" + NpyDescr(t.dtype) +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Pad with spaces so that magic(6) + version(2) + length(2) + header ends on 64 bytes, '\n' last.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';

  std::ofstream out(path, std::ios::binary);
  if (!out) Fail("cannot open output file " + path);
  const char prefix[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  out.write(prefix, 8);
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(t.data) + t.byte_offset,
            static_cast<std::streamsize>(ffi::GetDataSize(t)));
  if (!out) Fail("failed writing output file " + path);
}

// Host memory for the input tensor; 64-byte aligned as TVM kernels expect.
struct AlignedCPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = (ffi::GetDataSize(*t) + 63) / 64 * 64;
    t->data = std::aligned_alloc(64, n == 0 ? 64 : n);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int Run(const std::string& model_path, const std::string& input_path,
        const std::string& output_path) {
  NpyArray input = ReadNpy(input_path);  // validate the input before loading the model

  // 1. Load the shared library. The Relax bytecode is embedded in it; the compiled kernels are
  //    its symbols. Loading needs libtvm_runtime.so in the process (linked in by CMake).
  //    The path is made absolute: dlopen("model.so") would search the library path, not ".".
  DefaultThreads();  // before any kernel runs
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_path, ec))
    Fail("cannot open model file " + model_path);
  if (std::filesystem::path(model_path).extension() != ".so")  // TVM picks the loader by suffix
    Fail(model_path + ": expected the model's shared library (a .so file)");
  ffi::Module lib = ffi::Module::LoadFromFile(std::filesystem::absolute(model_path).string());

  // 2. Create the VM: "vm_load_executable" returns a fresh relax.VirtualMachine module, and
  //    "vm_initialization" takes (device_type, device_id, allocator_type) triples. The CPU is
  //    the only device here (the VM also needs it for shape functions).
  ffi::Optional<ffi::Function> load_exec = lib->GetFunction("vm_load_executable");
  if (!load_exec.has_value())
    Fail(model_path + " is not a Relax VM library (no vm_load_executable)");
  ffi::Module vm = (*load_exec)().cast<ffi::Module>();
  const DLDevice cpu{kDLCPU, 0};
  vm->GetFunction("vm_initialization")
      .value()(static_cast<int>(cpu.device_type), cpu.device_id, kPooledAllocator);

  // 3. Look up "main" and check it takes exactly one input.
  int arity = vm->GetFunction("get_function_arity").value()("main").cast<int>();
  if (arity != 1) {
    Fail("this sample feeds one input, but the model's main takes " +
                     std::to_string(arity));
  }
  ffi::Function main_fn = vm->GetFunction("main").value();

  // 4. Wrap the input in a tensor and run.
  ffi::ShapeView shape(input.shape.data(), input.shape.size());
  const DLDataType f32{kDLFloat, 32, 1};
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(AlignedCPUAlloc(), shape, f32, cpu);
  std::memcpy(x.data_ptr(), input.data.data(), input.data.size());
  ffi::Any result = main_fn(x);

  // 5. A single output comes back as a Tensor; several come back as an Array (a Relax tuple).
  ffi::Tensor y;
  if (auto t = result.as<ffi::Tensor>()) {
    y = *t;
  } else if (auto tuple = result.as<ffi::Array<ffi::Any>>()) {
    if (tuple->empty()) Fail("model returned an empty tuple");
    y = (*tuple)[0].cast<ffi::Tensor>();
  } else {
    Fail("model returned " + result.GetTypeKey() + ", expected a tensor");
  }
  const DLTensor& out = *y.GetDLTensorPtr();
  if (out.device.device_type != kDLCPU || !y.IsContiguous())
    Fail("expected a contiguous CPU output tensor");
  WriteNpy(output_path, out);

  std::cout << "wrote " << output_path << " shape (";
  for (int i = 0; i < out.ndim; ++i) std::cout << (i ? ", " : "") << out.shape[i];
  std::cout << ") threads " << PoolThreads() << std::endl;
  // Tensors returned by the VM are freed by code in the loaded modules, so `y` must be released
  // before `vm` and `lib`: locals are destroyed in reverse order, which does that here.
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.so INPUT.npy OUTPUT.npy" << std::endl;
    return 2;
  }
  try {
    return Run(argv[1], argv[2], argv[3]);
  } catch (const ffi::Error& e) {
    std::cerr << "error: TVM " << e.kind() << ": " << e.message() << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
  }
  return 1;
}
