// The Python module of the extension (pybind11): importing it registers the operators of ops.cpp
// (torch.ops.sgrpo_native.*) and reports what the build targeted.
#include <torch/extension.h>

namespace {

const char* instruction_set() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#elif defined(__aarch64__)
  return "neon";
#else
  return "scalar";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sgrpo_kernels native backend: C++ passes over CPU logits (torch.ops.sgrpo_native)";
  m.def("instruction_set", &instruction_set, "the vector instruction set the extension was built for");
  m.def("threads", &at::get_num_threads, "threads at::parallel_for uses");
}
