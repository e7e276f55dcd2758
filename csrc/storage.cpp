// Storage of a tensor freed and re-allocated in place, and a gradient dropped: what ZeRO-3 needs
// (src/train/zero.rs) and tch 0.24 does not expose. A block's parameters are views of one flat
// buffer; autograd saves views of them (`weight.t()` for a linear), which share the buffer's
// StorageImpl. Freeing the bytes of that StorageImpl (as PyTorch's FSDP does with
// `untyped_storage().resize_(0)`) releases the block's memory while every view stays valid, and
// re-allocating it before the block is used again makes the views see the gathered values.
// Errors come back as a malloc'ed string, never as an exception.
#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

extern "C" {

// Sets the byte size of `t`'s storage to `nbytes`: 0 frees it; anything else allocates that many
// bytes with the storage's own allocator (CPU or CUDA), uninitialised (the caller fills them).
// Returns nullptr on success, else a message to release with ulysses_free_error.
char* ulysses_storage_resize(const at::Tensor* t, size_t nbytes) {
  try {
    c10::StorageImpl* storage = t->storage().unsafeGetStorageImpl();
    if (!storage->resizable() || storage->allocator() == nullptr) {
      return strdup("this tensor's storage cannot be resized (external memory)");
    }
    if (nbytes == storage->nbytes()) {
      return nullptr;
    }
    at::DataPtr data = nbytes == 0 ? at::DataPtr(nullptr, storage->device())
                                   : storage->allocator()->allocate(nbytes);
    storage->set_data_ptr_noswap(std::move(data));
    storage->set_nbytes(nbytes);
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in ulysses_storage_resize");
  }
}

// Bytes held by `t`'s storage (0 once freed).
size_t ulysses_storage_nbytes(const at::Tensor* t) { return t->storage().nbytes(); }

// Drops `t`'s gradient (t.grad = None): the next backward creates a fresh one.
char* ulysses_clear_grad(const at::Tensor* t) {
  try {
    t->mutable_grad().reset();
    return nullptr;
  } catch (const std::exception& e) {
    return strdup(e.what());
  } catch (...) {
    return strdup("unknown C++ exception in ulysses_clear_grad");
  }
}

}  // extern "C"
