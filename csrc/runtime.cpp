// torchtrt_ext._C: the stream-following runtime that every engine execution goes through.
//
// Runner::run(fn, inputs) executes fn(inputs, slot) for one engine:
//   * checks that every tensor input is on the engine's device (0-dim CPU scalars excepted);
//   * CUDA: makes the engine's device current and reads the caller's current stream on it.
//     - On a non-default stream, fn runs directly on that stream.
//     - On the legacy default stream, fn runs on this thread's pooled side stream, fenced by events
//       both ways (the side stream waits for the caller's prior work; the caller waits for the
//       engine's work), and every output is recorded on the caller's stream so the caching allocator
//       never reuses its memory under the caller's feet.
//   * hands fn an execution slot: an index into the engine's per-stream state, never held by two
//     callers at once. A slot keeps affinity to the stream that last used it; when a slot moves to
//     another stream, the new stream first waits for the work enqueued on the old one.
//   * CPU build (or CPU engine): execution is synchronous; only the device check and slots apply.
//
// The slot pool is guarded by a mutex that is never held while the GIL is taken; a caller that finds
// every slot busy waits on a condition variable with the GIL released.

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/core/Device.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef TORCHTRT_EXT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace torchtrt_ext {
namespace {

constexpr int64_t kNoStream = -1;

PyObject* g_input_error = nullptr;  // torchtrt_ext.errors.InputError, set at import (else ValueError)

// Thrown for inputs the engine cannot take; pybind11 turns it into g_input_error (see PYBIND11_MODULE).
class InputDeviceError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Slot {
  bool busy = false;
  int64_t last_stream = kNoStream;  // id of the stream that last used this slot
  uint64_t last_used = 0;           // for least-recently-used hand-over
};

// A pool of execution slots for one engine. acquire() returns the slot to use on `stream` and, where
// the slot last served another stream, that stream's id (the caller must order after it).
class SlotPool {
 public:
  explicit SlotPool(int64_t max_slots) : max_slots_(max_slots) {}

  struct Grant {
    int64_t slot;
    int64_t previous_stream;  // kNoStream when no fence is needed
  };

  // Takes a slot for `stream`, or returns nothing when every slot is busy and no new one may be made.
  std::optional<Grant> try_acquire(int64_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    return try_take(stream);
  }

  // Like try_acquire, but waits for a slot to be released (call without the GIL).
  Grant acquire(int64_t stream) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (auto grant = try_take(stream)) return *grant;
      released_.wait(lock);
    }
  }

  void release(int64_t slot) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      slots_[slot].busy = false;
    }
    released_.notify_one();
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
constexpr int kMaxDevices = 64;

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

// Per thread and device: the pooled side stream used for callers on the legacy default stream, and
// the two events that fence it. Re-recording an event is safe: a wait binds to the record that
// precedes it at the time the wait is enqueued.
struct ThreadStreamState {
  std::optional<c10::cuda::CUDAStream> side;
  Event caller_ready;
  Event engine_done;
};

ThreadStreamState& thread_state(c10::DeviceIndex index) {
  thread_local std::vector<std::unique_ptr<ThreadStreamState>> states(kMaxDevices);
  auto& state = states.at(index);
  if (!state) {
    state = std::make_unique<ThreadStreamState>();
    state->side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, index);
  }
  return *state;
}

void record_outputs_on(py::handle outputs, const c10::cuda::CUDAStream& stream) {
  auto record = [&](py::handle obj) {
    if (!THPVariable_Check(obj.ptr())) return;
    const at::Tensor& t = THPVariable_Unpack(obj.ptr());
    if (t.defined() && t.is_cuda()) {
      c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
    }
  };
  if (py::isinstance<py::list>(outputs) || py::isinstance<py::tuple>(outputs)) {
    for (py::handle item : outputs) record(item);
  } else {
    record(outputs);
  }
}
#endif

class Runner {
 public:
  Runner(const std::string& device, int64_t max_slots)
      : device_(device), pool_(max_slots) {
    // Messages are built with std::string, never std::ostream (see check_inputs).
    if (max_slots < 1) throw std::invalid_argument("max_slots must be at least 1, got " + std::to_string(max_slots));
    if (device_.is_cuda()) {
#ifdef TORCHTRT_EXT_WITH_CUDA
      if (!device_.has_index()) device_ = c10::Device(c10::kCUDA, c10::cuda::current_device());
#else
      throw std::runtime_error(
          "torchtrt_ext._C was built without CUDA (torch had no CUDA, or CUDA_HOME was not found at "
          "build time), so it cannot run an engine on " + device_.str() +
          ". Rebuild with CUDA_HOME set: pip install --no-build-isolation -e .");
#endif
    } else {
      if (!device_.is_cpu()) throw std::invalid_argument("engines run on cpu or cuda devices, got " + device_.str());
    }
  }

  py::object run(py::handle fn, py::tuple inputs) {
    check_inputs(inputs);
#ifdef TORCHTRT_EXT_WITH_CUDA
    if (device_.is_cuda()) return run_cuda(fn, inputs);
#endif
    SlotPool::Grant grant = acquire(/*stream=*/0);
    SlotLease lease(pool_, grant.slot);
    return fn(inputs, grant.slot);
  }

  std::string device() const { return device_.str(); }
  int64_t slots_created() { return pool_.size(); }
  int64_t max_slots() const { return pool_.max_slots(); }

 private:
  void check_inputs(const py::tuple& inputs) const {
    const Py_ssize_t n = PyTuple_GET_SIZE(inputs.ptr());
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyTuple_GET_ITEM(inputs.ptr(), i);
      if (!THPVariable_Check(obj)) continue;
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (!t.defined() || t.device() == device_) continue;
      if (t.is_cpu() && t.dim() == 0) continue;  // CPU scalars mix with any device
      // Plain string concatenation: std::ostream number formatting crashed inside a torch 2.11
      // process (the extension's libstdc++ locale facets against torch's), seen on the H200.
      const std::string engine_device = device_.str();
      throw InputDeviceError("input " + std::to_string(i) + " is on " + t.device().str() +
                             " but the engine runs on " + engine_device + "; every tensor input must be on " +
                             engine_device + " (move it with .to('" + engine_device + "'))");
    }
  }

  SlotPool::Grant acquire(int64_t stream) {
    if (auto grant = pool_.try_acquire(stream)) return *grant;
    py::gil_scoped_release no_gil;  // every slot is busy: wait without blocking other Python threads
    return pool_.acquire(stream);
  }

#ifdef TORCHTRT_EXT_WITH_CUDA
  py::object run_cuda(py::handle fn, const py::tuple& inputs) {
    const c10::DeviceIndex index = device_.index();
    c10::cuda::CUDAGuard device_guard(index);
    const c10::cuda::CUDAStream caller = c10::cuda::getCurrentCUDAStream(index);
    const bool on_default = caller == c10::cuda::getDefaultCUDAStream(index);

    if (!on_default) {
      SlotPool::Grant grant = acquire(caller.id());
      SlotLease lease(pool_, grant.slot);
      fence_previous(grant, caller);
      return fn(inputs, grant.slot);
    }

    ThreadStreamState& ts = thread_state(index);
    const c10::cuda::CUDAStream side = *ts.side;
    SlotPool::Grant grant = acquire(side.id());
    SlotLease lease(pool_, grant.slot);
    fence_previous(grant, side);
    ts.caller_ready.record(caller);
    ts.caller_ready.block(side);
    // The caller waits for the side stream on every exit, an exception from fn included: its inputs
    // may be freed and reused on the caller's stream as soon as this returns.
    struct JoinCaller {
      ThreadStreamState& ts;
      const c10::cuda::CUDAStream& side;
      const c10::cuda::CUDAStream& caller;
      bool joined = false;
      void join() {
        ts.engine_done.record(side);
        ts.engine_done.block(caller);
        joined = true;
      }
      ~JoinCaller() {
        if (joined) return;
        try {
          join();
        } catch (...) {
          // Already unwinding from fn's exception, which is the error the caller sees.
        }
      }
    } join{ts, side, caller};
    py::object outputs;
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      outputs = fn(inputs, grant.slot);
    }
    join.join();
    record_outputs_on(outputs, caller);
    return outputs;
  }

  // A slot that last served another stream: order this stream after everything enqueued there so far.
  // Skipped while `stream` is being captured into a CUDA graph: nothing runs during capture, and a
  // wait on work outside the capture would invalidate it; ordering at replay is the caller's.
  void fence_previous(const SlotPool::Grant& grant, const c10::cuda::CUDAStream& stream) {
    if (grant.previous_stream == kNoStream || grant.previous_stream == stream.id()) return;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
    if (capture != cudaStreamCaptureStatusNone) return;
    const c10::cuda::CUDAStream previous =
        c10::cuda::CUDAStream::unpack3(grant.previous_stream, device_.index(), c10::DeviceType::CUDA);
    Event handoff;
    handoff.record(previous);
    handoff.block(stream);
  }
#endif

  c10::Device device_;
  SlotPool pool_;
};

bool built_with_cuda() {
#ifdef TORCHTRT_EXT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace torchtrt_ext

PYBIND11_MODULE(_C, m) {
  using torchtrt_ext::Runner;
  m.doc() = "torchtrt_ext runtime: stream-following execution of engines";
  m.def("built_with_cuda", &torchtrt_ext::built_with_cuda,
        "True when this extension was built against CUDA (streams, events, side streams).");
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const torchtrt_ext::InputDeviceError& e) {
      PyErr_SetString(torchtrt_ext::g_input_error ? torchtrt_ext::g_input_error : PyExc_ValueError, e.what());
    }
  });
  m.def(
      "set_input_error",
      [](py::object cls) {
        cls.inc_ref();  // kept for the life of the process
        torchtrt_ext::g_input_error = cls.ptr();
      },
      "Set the exception class raised for inputs on the wrong device.");
  py::class_<Runner>(m, "Runner")
      .def(py::init<const std::string&, int64_t>(), py::arg("device"), py::arg("max_slots"))
      .def("run", &Runner::run, py::arg("fn"), py::arg("inputs"),
           "Call fn(inputs, slot) on the caller's current stream (or a fenced side stream when the "
           "caller is on the legacy default stream) and return its result.")
      .def_property_readonly("device", &Runner::device)
      .def_property_readonly("slots_created", &Runner::slots_created)
      .def_property_readonly("max_slots", &Runner::max_slots);
}
