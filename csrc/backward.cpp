// Autograd from several roots with given gradients: torch::autograd::backward(roots, grads).
// tch 0.24 exposes only `backward()` of a scalar, which makes the tape (src/autograd) back-
// propagate `dot(input, grad)` instead: one extra elementwise pass per record. This shim is the
// whole of the C++ in the crate. Errors come back as a malloc'ed string, never as an exception.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

extern "C" {

// roots[i] and grads[i] point to at::Tensor objects owned by the caller (tch's C_tensor, a torch::Tensor*).
// Returns nullptr on success, else an error message to release with ulysses_free_error.
char* ulysses_backward(const at::Tensor* const* roots, const at::Tensor* const* grads, int n) {
  try {
    std::vector<at::Tensor> r, g;
    r.reserve(n);
    g.reserve(n);
    for (int i = 0; i < n; ++i) {
      r.push_back(*roots[i]);
      g.push_back(*grads[i]);
    }
    torch::autograd::backward(r, g, /*retain_graph=*/false, /*create_graph=*/false);
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in torch::autograd::backward");
  }
}

void ulysses_free_error(char* message) { free(message); }

}  // extern "C"
