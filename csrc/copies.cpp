// Copies, streams and events that Python drives directly (copies.h), CUDA build.
#include "copies.h"

#include "batched_copy.h"
#include "common.h"

#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <optional>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace torchtrt_ext {
namespace {

std::atomic<int64_t> g_live_streams{0};
std::atomic<int64_t> g_live_events{0};

}  // namespace

bool built_with_cuda() { return true; }

CopyStream::CopyStream(int64_t device) : device_(device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t raw = nullptr;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
  raw_ = raw;
  g_live_streams.fetch_add(1, std::memory_order_relaxed);
}

// No synchronisation: cudaStreamDestroy returns at once, and CUDA frees the stream once the work
// enqueued on it so far is done, so copies still in flight complete.
CopyStream::~CopyStream() {
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    C10_CUDA_CHECK_WARN(cudaStreamDestroy(raw_));
  } catch (...) {
    // no CUDA left to ask (a forked child, say): nothing to free
  }
  g_live_streams.fetch_sub(1, std::memory_order_relaxed);
}

FenceEvent::FenceEvent(int64_t device) : device_(device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaEvent_t raw = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&raw, cudaEventDisableTiming));
  raw_ = raw;
  g_live_events.fetch_add(1, std::memory_order_relaxed);
}

// Deferred by CUDA until the event completes; waits enqueued on it before stay valid.
FenceEvent::~FenceEvent() {
  C10_CUDA_CHECK_WARN(cudaEventDestroy(raw_));
  g_live_events.fetch_sub(1, std::memory_order_relaxed);
}

int64_t live_streams() { return g_live_streams.load(std::memory_order_relaxed); }
int64_t live_events() { return g_live_events.load(std::memory_order_relaxed); }

void copy_async(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, const CopyStream* stream,
                const FenceEvent* wait, const FenceEvent* record) {
  if (dst.size() != src.size()) throw std::invalid_argument("copy_async: dst and src differ in length");
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    const bool source_ok = s.device() == d.device() || (s.is_cpu() && s.is_pinned());
    if (!d.is_cuda() || !source_ok || d.scalar_type() != s.scalar_type() || d.numel() != s.numel() ||
        !d.is_contiguous() || !s.is_contiguous()) {
      throw std::invalid_argument("copy_async: pair " + std::to_string(i) +
                                  " is not two contiguous tensors of one dtype and size, the destination on a CUDA "
                                  "device and the source on it or in pinned host memory");
    }
  }
  if (stream == nullptr && (wait != nullptr || record != nullptr)) {
    throw std::invalid_argument("copy_async: wait and record need a stream");
  }
  if (stream == nullptr && dst.empty()) return;
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!dst.empty()) guard.emplace(dst[0].device().index());
  const cudaStream_t on =
      stream != nullptr ? stream->raw() : c10::cuda::getCurrentCUDAStream(dst[0].device().index()).stream();
  py::gil_scoped_release no_gil;  // the stream and events stay alive: the caller's arguments hold them
  if (wait != nullptr) C10_CUDA_CHECK(cudaStreamWaitEvent(on, wait->raw(), 0));
  for (size_t i = 0; i < dst.size(); ++i) {
    const size_t bytes = static_cast<size_t>(dst[i].numel()) * dst[i].element_size();
    if (bytes == 0) continue;
    C10_CUDA_CHECK(cudaMemcpyAsync(dst[i].data_ptr(), src[i].data_ptr(), bytes, cudaMemcpyDefault, on));
  }
  if (record != nullptr) C10_CUDA_CHECK(cudaEventRecord(record->raw(), on));
}

void batched_copy_unlocked(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  py::gil_scoped_release no_gil;
  batched_copy(dst, src);
}

void current_wait(int64_t device, const FenceEvent& event) {
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  C10_CUDA_CHECK(cudaStreamWaitEvent(s, event.raw(), 0));
}

void current_record(int64_t device, const FenceEvent& event) {
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  C10_CUDA_CHECK(cudaEventRecord(event.raw(), s));
}

}  // namespace torchtrt_ext
