// Copies, streams and events that Python drives directly: weight streaming's copy streams and fences,
// copy_async, and the binding of batched_copy.cu. CUDA build: copies.cpp; CPU build: cpu_stubs.cpp.
//
// Streams and events are objects that own their CUDA handle (RAII): it is destroyed with the object, so
// none outlives its last Python reference. live_streams() and live_events() count the objects alive.
#pragma once

#include "common.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

// cudaStream_t is CUstream_st*, cudaEvent_t is CUevent_st*: named here so that this header, which the
// CPU build includes too, needs no CUDA header.
struct CUstream_st;
struct CUevent_st;

namespace torchtrt_ext {

// A new non-blocking CUDA stream on `device` that only its owner enqueues on (torch's pool streams are
// shared round-robin with torch.cuda.Stream(), and copies there could wait behind unrelated work).
class TORCHTRT_EXT_HIDDEN CopyStream {
 public:
  explicit CopyStream(int64_t device);
  CopyStream(const CopyStream&) = delete;
  CopyStream& operator=(const CopyStream&) = delete;
  ~CopyStream();

  int64_t device() const { return device_; }
  CUstream_st* raw() const { return raw_; }

 private:
  int64_t device_;
  CUstream_st* raw_ = nullptr;
};

// A CUDA event without timing on `device`, for weight streaming's per-segment fences (Python's event
// wrappers cost tens of microseconds per segment on a slow host; see streaming.py). Named FenceEvent in
// C++ (stream_bridge.h has the runtime's internal Event); _C.Event in Python.
class TORCHTRT_EXT_HIDDEN FenceEvent {
 public:
  explicit FenceEvent(int64_t device);
  FenceEvent(const FenceEvent&) = delete;
  FenceEvent& operator=(const FenceEvent&) = delete;
  ~FenceEvent();

  int64_t device() const { return device_; }
  CUevent_st* raw() const { return raw_; }

 private:
  int64_t device_;
  CUevent_st* raw_ = nullptr;
};

// How many CopyStream / FenceEvent objects exist now (0 in the CPU build, which cannot make any).
int64_t live_streams();
int64_t live_events();

// Copy src[i] into dst[i], one cudaMemcpyAsync per pair in one C++ loop (no dispatcher or Python work
// per pair): contiguous pairs of one dtype and size, dst on a CUDA device, src on the same device or in
// pinned host memory that outlives the copy (the caller's promise: no event is recorded with torch's
// host allocator). Every pair is checked before any copy is enqueued. The copies run on `stream`, or
// with none on the current stream of the destinations' device. With a stream given, it first waits
// for `wait` and afterwards records `record` there (either may be none): weight streaming's fence, ring
// copies and fence of one segment in one call. The GIL is released while it enqueues.
void copy_async(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, const CopyStream* stream,
                const FenceEvent* wait, const FenceEvent* record);

// batched_copy.cu's batched_copy (every pair in one kernel launch on the current stream), with the GIL
// released while it checks and enqueues. The CPU build has the same entry point: it checks the lengths
// and refuses any pair.
void batched_copy_unlocked(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src);

// The current stream of `device` waits for `event`; or records it.
void current_wait(int64_t device, const FenceEvent& event);
void current_record(int64_t device, const FenceEvent& event);

}  // namespace torchtrt_ext
