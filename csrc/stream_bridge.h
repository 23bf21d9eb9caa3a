// The stream bridge (CUDA builds only): where an engine runs relative to the caller's current stream,
// and the events and fences between streams. With slots.h, the core of torchtrt_ext's runtime, free of
// Python.
//
// Used by the runner's CUDA half (runner_cuda.cpp), CUDA graphs (graphs.cpp) and by the standalone
// self-test (selftest.cu), which runs under compute-sanitizer without loading Python or torch's kernels.
// The CPU build compiles none of them (setup.py), so nothing there includes this header.
#pragma once

#include "slots.h"

#include <c10/core/Device.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <mutex>
#include <optional>
#include <vector>

namespace torchtrt_ext {

// A CUDA event without timing, created on first record on the recording stream's device.
class Event {
 public:
  Event() = default;
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  ~Event() {
    if (event_ != nullptr) cudaEventDestroy(event_);  // deferred by CUDA until the event completes
  }

  void record(const c10::cuda::CUDAStream& stream) {
    if (event_ == nullptr) {
      c10::cuda::CUDAGuard guard(stream.device_index());
      C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming));
    }
    C10_CUDA_CHECK(cudaEventRecord(event_, stream.stream()));
  }

  // Enqueue on `stream` a wait for the work recorded before the latest record().
  void block(const c10::cuda::CUDAStream& stream) const {
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), event_, 0));
  }

 private:
  cudaEvent_t event_ = nullptr;
};

inline bool is_capturing(const c10::cuda::CUDAStream& stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

// Order `after` behind everything enqueued on `before` so far. Skipped while `after` is being captured
// into a CUDA graph: nothing runs during capture, and a wait on work outside the capture would
// invalidate it; ordering at replay is the caller's.
inline void fence(const c10::cuda::CUDAStream& before, const c10::cuda::CUDAStream& after) {
  if (before == after || is_capturing(after)) return;
  Event e;
  e.record(before);
  e.block(after);
}

// Side streams for callers on the legacy default stream: a small process-wide pool per device of
// *blocking* streams (created without cudaStreamNonBlocking). CUDA orders blocking streams against the
// legacy default stream both ways: work on the side stream starts after the legacy stream's earlier
// work, and later legacy-stream work waits for it. That is exactly the fence the caller needs, with
// no event per call, and it also keeps the caching allocator's stream-ordered reuse of the engine's
// outputs (allocated on the side stream, freed by the caller) safe without record_stream.
// Never capture a CUDA graph on these streams: a blocking stream cannot be captured while anything
// else uses the legacy stream (cudaErrorStreamCaptureImplicit).
class SideStreams {
 public:
  static constexpr int kPerDevice = 8;

  // This thread's side stream on `device`: threads are spread round-robin over the pool.
  static c10::cuda::CUDAStream for_this_thread(c10::DeviceIndex device) {
    thread_local std::vector<std::optional<c10::cuda::CUDAStream>> mine;  // no lock after the first call
    if (mine.size() <= static_cast<size_t>(device)) mine.resize(device + 1);
    if (!mine[device]) {
      auto& pool = instance().pool(device);
      int choice;
      {
        std::lock_guard<std::mutex> lock(pool.mutex);
        choice = pool.next++ % kPerDevice;
      }
      mine[device] = pool.stream(choice, device);
    }
    return *mine[device];
  }

 private:
  struct DevicePool {
    std::mutex mutex;
    cudaStream_t streams[kPerDevice] = {};
    int next = 0;

    c10::cuda::CUDAStream stream(int i, c10::DeviceIndex device) {
      std::lock_guard<std::mutex> lock(mutex);
      if (streams[i] == nullptr) {
        c10::cuda::CUDAGuard guard(device);
        C10_CUDA_CHECK(cudaStreamCreateWithFlags(&streams[i], cudaStreamDefault));  // blocking
      }
      return c10::cuda::getStreamFromExternal(streams[i], device);
    }
  };

  static SideStreams& instance() {
    static SideStreams* self = new SideStreams();  // never destroyed: streams live as long as the process
    return *self;
  }

  DevicePool& pool(c10::DeviceIndex device) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& slot = pools_[device];
    if (!slot) slot = std::make_unique<DevicePool>();
    return *slot;
  }

  std::mutex mutex_;
  std::unique_ptr<DevicePool> pools_[64];
};

// Where one engine call runs: on the caller's current stream when it is not the legacy default stream,
// else on this thread's blocking side stream.
struct Placement {
  c10::cuda::CUDAStream caller;
  c10::cuda::CUDAStream exec;
};

inline Placement place(c10::DeviceIndex device) {
  const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(device);
  if (caller != c10::cuda::getDefaultCUDAStream(device)) return {caller, caller};
  return {caller, SideStreams::for_this_thread(device)};
}

}  // namespace torchtrt_ext
