// What the tape needs from libtorch's autograd that tch 0.24 does not expose
// (src/autograd/ffi.rs):
//
// 1. Autograd from several roots with given gradients. A root is a gradient edge (the node and
//    input slot where a tensor's gradient enters the graph), taken when the record is made, so
//    that the tape keeps the graph of a record's inputs alive but not their values: holding the
//    tensors would keep every input's storage (and, through a view, its base's) until the
//    backward, beyond what the graph itself saves.
// 2. A grad_fn that fails: the outputs of a collective run under Tape::disabled() get one, so
//    that a plain loss.backward() reaching them stops with a message instead of silently
//    dropping every gradient upstream of the collective.
//
// Errors come back as a malloc'ed string, never as an exception.
#include <ATen/core/Tensor.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/edge.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

using torch::autograd::Edge;

namespace {

char* message(const char* what) { return strdup(what); }

}  // namespace

extern "C" {

// The gradient edge of *t (which must require grad), owned by the caller until
// ulysses_edge_free. Returns nullptr and sets *error on failure.
Edge* ulysses_gradient_edge(const at::Tensor* t, char** error) {
  try {
    *error = nullptr;
    Edge edge = torch::autograd::impl::gradient_edge(*t);
    if (!edge.function) {
      *error = message("the tensor does not require grad: it has no gradient edge");
      return nullptr;
    }
    return new Edge(std::move(edge));
  } catch (const std::exception& e) {
    *error = message(e.what());
  } catch (...) {
    *error = message("unknown C++ exception in ulysses_gradient_edge");
  }
  return nullptr;
}

void ulysses_edge_free(Edge* edge) { delete edge; }

// Runs autograd from every edges[i] with gradient grads[i] (tch's C_tensor, a torch::Tensor*),
// freeing the graph as it goes (no keep_graph), accumulating into the leaves' .grad, as
// torch::autograd::backward does for tensors. Returns nullptr on success, else a message to
// release with ulysses_free_error.
char* ulysses_backward_edges(Edge* const* edges, const at::Tensor* const* grads, int n) {
  try {
    torch::autograd::edge_list roots;
    torch::autograd::variable_list g;
    roots.reserve(n);
    g.reserve(n);
    for (int i = 0; i < n; ++i) {
      roots.push_back(*edges[i]);
      g.push_back(*grads[i]);
    }
    torch::autograd::Engine::get_default_engine().execute(
        roots, g, /*keep_graph=*/false, /*create_graph=*/false, /*accumulate_grad=*/true);
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception in the autograd engine");
  }
}

// Gives *out (a tensor with no grad_fn that does not require grad) a grad_fn whose backward
// fails with `msg`, when grad mode is on (off: nothing to do). Returns nullptr on success.
char* ulysses_failing_grad_fn(const at::Tensor* out, const char* msg) {
  try {
    if (!c10::GradMode::is_enabled()) {
      return nullptr;
    }
    auto node = std::make_shared<torch::autograd::Error>(std::string(msg));
    node->add_input_metadata(*out);
    torch::autograd::impl::set_gradient_edge(*out, Edge(std::move(node), 0));
    return nullptr;
  } catch (const std::exception& e) {
    return message(e.what());
  } catch (...) {
    return message("unknown C++ exception in ulysses_failing_grad_fn");
  }
}

void ulysses_free_error(char* message) { free(message); }

}  // extern "C"
