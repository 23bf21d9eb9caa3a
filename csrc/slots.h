// Execution slots, the part of the runtime's core that every build has (stream_bridge.h adds the CUDA
// part). Free of Python: used by the runner (runner.cpp) and by the standalone self-test (selftest.cu).
//
// Error messages are built with std::string, never std::ostream: ostream number formatting crashed
// inside a torch 2.11 process (the extension's libstdc++ locale facets against torch's), seen on the
// H200.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

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

}  // namespace torchtrt_ext
