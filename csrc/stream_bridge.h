// The core of torchtrt_ext's runtime, free of Python: execution slots, and (CUDA builds) the stream
// bridge that decides where an engine runs relative to the caller's current stream.
//
// Used by the Python bindings (runtime.cpp) and by the standalone self-test (selftest.cu), which runs
// under compute-sanitizer without loading Python or torch's kernels.
//
// Error messages are built with std::string, never std::ostream: ostream number formatting crashed
// inside a torch 2.11 process (the extension's libstdc++ locale facets against torch's), seen on the
// H200.
#pragma once

#include <c10/core/Device.h>

#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef TORCHTRT_EXT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace torchtrt_ext {

constexpr int64_t kNoStream = -1;

// ---------------------------------------------------------------------------------------------
// Execution slots: an engine's per-stream state is indexed by slot. A slot is never held by two
// callers at once; it keeps affinity to the stream that last used it, and when it moves to another
// stream the grant says which stream must be waited for first.

struct Slot {
  bool busy = false;
  int64_t last_stream = kNoStream;  // id of the stream that last used this slot
  uint64_t last_used = 0;           // for least-recently-used hand-over
};

class SlotPool {
 public:
  explicit SlotPool(int64_t max_slots) : max_slots_(max_slots) {
    if (max_slots < 1) throw std::invalid_argument("max_slots must be at least 1, got " + std::to_string(max_slots));
  }

  struct Grant {
    int64_t slot;
    int64_t previous_stream;  // kNoStream when no fence is needed
  };

  // A slot for `stream`, or nothing when every slot is busy and no new one may be made.
  std::optional<Grant> try_acquire(int64_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    return try_take(stream);
  }

  // Like try_acquire, but waits for a slot to be released (call it without the GIL).
  Grant acquire(int64_t stream) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (auto grant = try_take(stream)) return *grant;
      released_.wait(lock);
    }
  }

  // Holds slot `i`, waiting while another caller has it; false when slot `i` was never created.
  // (Call it without the GIL.)
  bool hold(int64_t i) {
    std::unique_lock<std::mutex> lock(mutex_);
    if (i >= static_cast<int64_t>(slots_.size())) return false;
    released_.wait(lock, [&] { return !slots_[i].busy; });
    slots_[i].busy = true;
    return true;
  }

  void release(int64_t slot) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      slots_[slot].busy = false;
    }
    released_.notify_all();  // waiters may want any slot, or one particular slot
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(slots_.size());
  }

  int64_t max_slots() const { return max_slots_; }

 private:
  std::optional<Grant> try_take(int64_t stream) {
    std::optional<int64_t> fresh, lru;
    for (int64_t i = 0; i < static_cast<int64_t>(slots_.size()); ++i) {
      const Slot& s = slots_[i];
      if (s.busy) continue;
      if (s.last_stream == stream) return take(i, stream, kNoStream);
      if (s.last_stream == kNoStream && !fresh) fresh = i;
      if (!lru || s.last_used < slots_[*lru].last_used) lru = i;
    }
    if (fresh) return take(*fresh, stream, kNoStream);
    if (static_cast<int64_t>(slots_.size()) < max_slots_) {
      slots_.emplace_back();
      return take(static_cast<int64_t>(slots_.size()) - 1, stream, kNoStream);
    }
    if (lru) return take(*lru, stream, slots_[*lru].last_stream);
    return std::nullopt;
  }

  Grant take(int64_t i, int64_t stream, int64_t previous) {
    Slot& s = slots_[i];
    s.busy = true;
    s.last_stream = stream;
    s.last_used = ++clock_;
    return {i, previous};
  }

  const int64_t max_slots_;
  std::mutex mutex_;
  std::condition_variable released_;
  std::vector<Slot> slots_;
  uint64_t clock_ = 0;
};

// Releases a slot on every exit path, exceptions included.
class SlotLease {
 public:
  SlotLease(SlotPool& pool, int64_t slot) : pool_(pool), slot_(slot) {}
  ~SlotLease() { pool_.release(slot_); }
  SlotLease(const SlotLease&) = delete;
  SlotLease& operator=(const SlotLease&) = delete;

 private:
  SlotPool& pool_;
  int64_t slot_;
};

#ifdef TORCHTRT_EXT_WITH_CUDA

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

#endif  // TORCHTRT_EXT_WITH_CUDA

}  // namespace torchtrt_ext
