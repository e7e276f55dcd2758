// Which CPU kernels libtorch chose in this process: ATen's vectorised kernels are compiled for
// several instruction sets and one is picked at start-up (the CPU's best, or the one
// ATEN_CPU_CAPABILITY names), so results that depend on rounding depend on it. Errors come back
// as a malloc'ed string, never as an exception.
#include <ATen/Version.h>

#include <cstdlib>
#include <cstring>
#include <exception>

extern "C" {

// ATen's CPU capability ("DEFAULT", "AVX2", "AVX512"), malloc'ed; null on failure.
char* ulysses_cpu_capability() {
  try {
    return strdup(at::get_cpu_capability().c_str());
  } catch (...) {
    return nullptr;
  }
}

// The build configuration libtorch reports (compiler, BLAS, oneDNN, OpenMP, CPU capability
// usage), malloc'ed; null on failure.
char* ulysses_cpu_config() {
  try {
    return strdup(at::show_config().c_str());
  } catch (...) {
    return nullptr;
  }
}

void ulysses_cpu_free(char* text) { std::free(text); }

}  // extern "C"
