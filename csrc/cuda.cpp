// CUDA through libtorch, for a process that drives a GPU: make a device current, the current
// stream's handle, the caching allocator's statistics, a device synchronisation, and the flash
// attention kernel's forward (with its log-sum-exp) and backward, which tch 0.24 does not
// expose (the forward returns SymInts). libtorch's
// device-generic at::accelerator API reaches CUDA once libtorch_cuda is loaded (src/device), so
// this file needs libtorch's headers only, no CUDA toolkit, and links against nothing tch does
// not already link. Errors come back as a malloc'ed string, never as an exception.
#include <ATen/DeviceAccelerator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/record_stream.h>
#include <c10/core/Allocator.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <exception>

namespace {

// The accelerator must be CUDA: libtorch_cuda loaded and a device present.
void require_cuda() {
  auto acc = at::accelerator::getAccelerator(false);
  if (!acc.has_value() || *acc != c10::DeviceType::CUDA) {
    throw std::runtime_error("this libtorch has no CUDA (libtorch_cuda.so is not loaded)");
  }
}

template <typename F>
char* guarded(F f) {
  try {
    require_cuda();
    f();
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception");
  }
}

}  // namespace

extern "C" {

// Makes `index` the calling thread's current CUDA device for libtorch: its kernels, allocations
// and streams on this thread go to it. It does not bind a CUDA context for certain: in torch 2.11
// setDeviceIndex goes to c10::cuda::SetDevice(i, force = false), which skips cudaSetDevice when
// cudaGetDevice() already returns i (0 on a fresh thread, with no context bound), and the runtime
// binds its context lazily, at its first call that needs one. c10::cuda::set_device(i, true)
// would force it, but its header needs the CUDA toolkit, which this file builds without; so code
// that calls the driver API itself (the NCCL backend: communicators, side streams, events) binds
// the device's primary context through the driver (src/comm/nccl/cuda.rs, bind_primary_context).
char* ulysses_cuda_set_device(int index) {
  return guarded([&] { at::accelerator::setDeviceIndex(static_cast<c10::DeviceIndex>(index)); });
}

// The handle (a cudaStream_t) of libtorch's current stream on `index`: the stream its kernels
// run on (the legacy default stream, a null handle, unless a caller set another).
char* ulysses_cuda_current_stream(int index, void** out) {
  return guarded([&] {
    *out = at::accelerator::getCurrentStream(static_cast<c10::DeviceIndex>(index)).native_handle();
  });
}

// The caching allocator's bytes on `index`: out[0] allocated now, out[1] peak allocated,
// out[2] reserved now, out[3] peak reserved (all pools).
char* ulysses_cuda_memory(int index, int64_t* out) {
  return guarded([&] {
    auto stats = at::accelerator::getDeviceStats(static_cast<c10::DeviceIndex>(index));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
    // The driver's view of the whole device (cudaMemGetInfo): free and total bytes.
    const auto [free, total] = at::accelerator::getMemoryInfo(static_cast<c10::DeviceIndex>(index));
    out[4] = static_cast<int64_t>(free);
    out[5] = static_cast<int64_t>(total);
  });
}

// Sets the allocator's peaks on `index` back to the current values.
char* ulysses_cuda_reset_peak(int index) {
  return guarded([&] { at::accelerator::resetPeakStats(static_cast<c10::DeviceIndex>(index)); });
}

// Waits until every kernel queued on `index` has finished.
char* ulysses_cuda_synchronize(int index) {
  return guarded([&] { at::accelerator::synchronizeDevice(static_cast<c10::DeviceIndex>(index)); });
}

// Flash attention forward of q [b, h, s_q, d] over k, v [b, h, s_k, d] (bf16 or f16, CUDA):
// out[0] the output [b, h, s_q, d], out[1] the log-sum-exp [b, h, s_q] (f32), both new tensors
// the caller owns (tch's C_tensor, a torch::Tensor*).
char* ulysses_flash_forward(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, int causal,
                            double scale, at::Tensor** out) {
  return guarded([&] {
    auto r = at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, causal != 0, false, scale);
    out[0] = new at::Tensor(std::get<0>(r));
    out[1] = new at::Tensor(std::get<1>(r));
  });
}

// Flash attention backward given the final output `o` and log-sum-exp `lse` of these queries
// (over every key block, as ring attention merges them) and the output gradient `dout`: grads
// [0] dq, [1] dk, [2] dv, new tensors the caller owns. Dense batch (no cumulative sequence
// lengths), no dropout (the random state is then unused).
char* ulysses_flash_backward(const at::Tensor* dout, const at::Tensor* q, const at::Tensor* k,
                             const at::Tensor* v, const at::Tensor* o, const at::Tensor* lse, int causal,
                             double scale, at::Tensor** grads) {
  return guarded([&] {
    auto unused = at::empty({}, at::dtype(at::kLong));
    auto r = at::_scaled_dot_product_flash_attention_backward(*dout, *q, *k, *v, *o, *lse, at::Tensor(), at::Tensor(),
                                                              q->size(2), k->size(2), 0.0, causal != 0, unused, unused,
                                                              scale);
    grads[0] = new at::Tensor(std::get<0>(r));
    grads[1] = new at::Tensor(std::get<1>(r));
    grads[2] = new at::Tensor(std::get<2>(r));
  });
}

void ulysses_cuda_free_error(char* message) { free(message); }

// Copies `src` into `dst` (the same shape and dtype; one of them on cuda:`index`, the other in
// pinned host memory) on a side stream from libtorch's pool, after everything queued on the
// current stream so far (so `src` is complete), without the host waiting: the activation
// offload's copy to the host after a block's forward and back before its backward. The GPU
// tensor is recorded on the side stream, so the caching allocator does not hand its memory to
// another tensor before the copy is done. `*event` receives a c10::Event recorded on the side
// stream after the copy: pass it to ulysses_event_block before the current stream uses `dst`,
// to ulysses_event_wait before the host reads it, then to ulysses_event_free.
char* ulysses_copy_on_side_stream(at::Tensor* dst, const at::Tensor* src, int index, void** event) {
  return guarded([&] {
    const c10::Device device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
    const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    const c10::Stream current = impl.getStream(device);
    const c10::Stream side = impl.getStreamFromGlobalPool(device, false);
    c10::Event ready(c10::DeviceType::CUDA);
    ready.record(current);
    ready.block(side);
    {
      c10::StreamGuard on_side(side);
      dst->copy_(*src, /*non_blocking=*/true);
    }
    const at::Tensor& gpu = src->is_cuda() ? *src : *dst;
    gpu.record_stream(side);
    auto* done = new c10::Event(c10::DeviceType::CUDA);
    done->record(side);
    *event = done;
  });
}

// Makes cuda:`index`'s current stream wait (on the GPU) for `event`.
char* ulysses_event_block(void* event, int index) {
  return guarded([&] {
    const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    static_cast<c10::Event*>(event)->block(
        impl.getStream(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index))));
  });
}

// Waits on the host until `event` has happened.
char* ulysses_event_wait(void* event) {
  return guarded([&] { static_cast<c10::Event*>(event)->synchronize(); });
}

// Releases an event from ulysses_copy_on_side_stream.
void ulysses_event_free(void* event) { delete static_cast<c10::Event*>(event); }

}  // extern "C"
