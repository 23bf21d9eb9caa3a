// torchtrt_ext._C: the stream-following runtime that every engine execution goes through.
//
// Runner::run(fn, inputs) executes fn(inputs, slot) for one engine:
//   * checks that every tensor input is on the engine's device (0-dim CPU scalars excepted);
//   * CUDA: makes the engine's device current and reads the caller's current stream on it.
//     - On a non-default stream, fn runs directly on that stream.
//     - On the legacy default stream, fn runs on this thread's side stream, a blocking stream that CUDA
//       orders against the legacy stream both ways (stream_bridge.h says why that is the fence).
//   * hands fn an execution slot: an index into the engine's per-stream state, never held by two
//     callers at once (stream_bridge.h: SlotPool).
//   * CPU build (or CPU engine): execution is synchronous; only the device check and slots apply.
//
// Runner::bind(callable, arguments, input_positions) lets the runtime call an engine's compiled function
// itself (callable(*arguments) with the inputs put in), so that no Python frame runs per call.
//
// Runner::run_graphed(fn, inputs) does the same, but replays CUDA graphs: per slot and per input
// signature, fn is captured once (on the slot's own capture stream, after a warm-up run) and every
// later call copies the inputs into the graph's static inputs, replays it and clones the outputs, all
// with the GIL released, so callers on several threads and streams run concurrently.

#include "stream_bridge.h"

#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_strided.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <unordered_map>

#ifdef TORCHTRT_EXT_WITH_CUDA
#include <ATen/cuda/MemPool.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include "batched_copy.h"
#endif

namespace py = pybind11;

namespace torchtrt_ext {
namespace {

PyObject* g_input_error = nullptr;  // torchtrt_ext.errors.InputError, set at import (else ValueError)

// Thrown for inputs the engine cannot take; pybind11 turns it into g_input_error (see PYBIND11_MODULE).
class BadInput : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

#ifdef TORCHTRT_EXT_WITH_CUDA

// How many input signatures one slot captures before further signatures run without graphs.
constexpr size_t kMaxGraphsPerSlot = 16;

// The input signature a graph is captured for: per input a tag, then for tensors dtype, sizes and
// strides, for Python scalars their value.
using GraphKey = std::vector<int64_t>;

struct GraphKeyHash {
  size_t operator()(const GraphKey& key) const {
    size_t h = key.size();
    for (int64_t v : key) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};

// torch >= 2.13 wants to hear when a capture into a pool starts and ends; 2.11 has no such call.
template <class Allocator>
auto mark_capture(Allocator* a, c10::DeviceIndex device, bool begin, int) -> decltype(a->markCaptureBegin(device)) {
  if (begin) {
    a->markCaptureBegin(device);
  } else {
    a->markCaptureEnd(device);
  }
}
template <class Allocator>
void mark_capture(Allocator*, c10::DeviceIndex, bool, long) {}

// One CUDA graph, captured with CUDA's own API on a stream this runtime owns, its memory in a private
// pool of torch's caching allocator. Not at::cuda::CUDAGraph: that registers torch's default RNG
// generator, whose capture flag is process-wide, so any torch.randn on another thread during our
// capture would fail ("Offset increment outside graph capture"). An engine that draws random numbers
// fails to capture here instead, and runs without a graph.
class PoolGraph {
 public:
  PoolGraph(c10::DeviceIndex device, cudaStream_t stream)
      : device_(device), stream_(stream), pool_(at::cuda::MemPool::graph_pool_handle(false)) {}
  PoolGraph(const PoolGraph&) = delete;
  PoolGraph& operator=(const PoolGraph&) = delete;

  void begin() {
    cudaStream_t stream = stream_;
    // Only allocations on our own stream go to the pool; no other code enqueues on it.
    c10::cuda::CUDACachingAllocator::beginAllocateToPool(device_, pool_,
                                                         [stream](cudaStream_t s) { return s == stream; });
    pool_begun_ = routing_ = true;
    C10_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
    capturing_ = true;
    mark_capture(c10::cuda::CUDACachingAllocator::get(), device_, true, 0);
  }

  void end() {
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
    capturing_ = false;
    finish_routing();
    if (ended != cudaSuccess || graph == nullptr) {
      (void)cudaGetLastError();
      throw std::runtime_error(std::string("CUDA graph capture failed: ") + cudaGetErrorString(ended));
    }
    const cudaError_t made = cudaGraphInstantiateWithFlags(&exec_, graph, cudaGraphInstantiateFlagAutoFreeOnLaunch);
    C10_CUDA_CHECK_WARN(cudaGraphDestroy(graph));
    if (made != cudaSuccess) {
      exec_ = nullptr;
      (void)cudaGetLastError();
      throw std::runtime_error(std::string("CUDA graph instantiation failed: ") + cudaGetErrorString(made));
    }
  }

  // After an error inside the capture: end it, drop whatever was captured, stop routing.
  void abort() noexcept {
    if (capturing_) {
      cudaGraph_t graph = nullptr;
      if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph) (void)cudaGraphDestroy(graph);
      (void)cudaGetLastError();
      capturing_ = false;
    }
    finish_routing();
  }

  void replay(cudaStream_t stream) { C10_CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

  ~PoolGraph() {
    abort();
    if (exec_) C10_CUDA_CHECK_WARN(cudaGraphExecDestroy(exec_));
    if (pool_begun_) c10::cuda::CUDACachingAllocator::releasePool(device_, pool_);
  }

 private:
  void finish_routing() noexcept {
    if (!routing_) return;
    routing_ = false;
    mark_capture(c10::cuda::CUDACachingAllocator::get(), device_, false, 0);
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device_, pool_);
  }

  c10::DeviceIndex device_;
  cudaStream_t stream_;
  c10::MempoolId_t pool_;
  cudaGraphExec_t exec_ = nullptr;
  bool pool_begun_ = false, routing_ = false, capturing_ = false;
};

// A stream only this runtime enqueues on (torch's pool streams are shared round-robin with
// torch.cuda.Stream(), and another thread's work on a capturing stream would join the capture).
class OwnStream {
 public:
  explicit OwnStream(c10::DeviceIndex device) : device_(device) {
    c10::cuda::CUDAGuard guard(device);
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw_, cudaStreamNonBlocking));
  }
  OwnStream(const OwnStream&) = delete;
  OwnStream& operator=(const OwnStream&) = delete;
  ~OwnStream() {
    c10::cuda::CUDAGuard guard(device_);
    C10_CUDA_CHECK_WARN(cudaStreamSynchronize(raw_));
    C10_CUDA_CHECK_WARN(cudaStreamDestroy(raw_));
  }
  c10::cuda::CUDAStream stream() const { return c10::cuda::getStreamFromExternal(raw_, device_); }

 private:
  c10::DeviceIndex device_;
  cudaStream_t raw_ = nullptr;
};

struct GraphEntry {
  std::unique_ptr<PoolGraph> graph;  // declared first: destroyed after the tensors in its pool
  std::vector<at::Tensor> static_inputs;  // one per tensor input, in input order
  std::vector<at::Tensor> static_outputs;
};

// Per slot: its captured graphs and the stream captures happen on. Only the slot's holder touches it.
struct SlotGraphs {
  std::unordered_map<GraphKey, std::unique_ptr<GraphEntry>, GraphKeyHash> entries;
  std::unique_ptr<OwnStream> capture_stream;
  bool warned_full = false;
};

// The tensors among the inputs and the signature key; nullopt when an input cannot be captured
// (a CPU tensor, an overlapping or non-dense tensor, a Python object other than a scalar or None).
std::optional<GraphKey> graph_key(const py::tuple& inputs, std::vector<at::Tensor>& tensors,
                                  std::vector<Py_ssize_t>& positions) {
  GraphKey key;
  const Py_ssize_t n = PyTuple_GET_SIZE(inputs.ptr());
  key.reserve(n * 8);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyTuple_GET_ITEM(inputs.ptr(), i);
    if (THPVariable_Check(obj)) {
      const at::Tensor& t = THPVariable_Unpack(obj);
      // CPU scalars would be baked into the graph as constants; odd layouts cannot be copied into.
      if (!t.defined() || !t.is_cuda() || !t.is_non_overlapping_and_dense()) return std::nullopt;
      key.push_back(1);
      key.push_back(static_cast<int64_t>(t.scalar_type()));
      key.push_back(static_cast<int64_t>(t.device().type()));
      key.push_back(t.dim());
      for (int64_t s : t.sizes()) key.push_back(s);
      for (int64_t s : t.strides()) key.push_back(s);
      tensors.push_back(t);
      positions.push_back(i);
    } else if (PyBool_Check(obj)) {
      key.push_back(2);
      key.push_back(obj == Py_True);
    } else if (PyLong_Check(obj)) {
      int overflow = 0;
      const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
      if (overflow) return std::nullopt;
      key.push_back(3);
      key.push_back(v);
    } else if (PyFloat_Check(obj)) {
      const double v = PyFloat_AS_DOUBLE(obj);
      int64_t bits;
      std::memcpy(&bits, &v, sizeof bits);
      key.push_back(4);
      key.push_back(bits);
    } else if (obj == Py_None) {
      key.push_back(5);
    } else {
      return std::nullopt;
    }
  }
  return key;
}

std::vector<at::Tensor> tensors_of(const py::object& outputs) {
  std::vector<at::Tensor> result;
  if (!(py::isinstance<py::list>(outputs) || py::isinstance<py::tuple>(outputs))) return result;
  for (py::handle item : outputs) {
    if (!THPVariable_Check(item.ptr())) return {};
    result.push_back(THPVariable_Unpack(item.ptr()));
  }
  return result;
}
#endif  // TORCHTRT_EXT_WITH_CUDA

class Runner {
 public:
  Runner(const std::string& device, int64_t max_slots) : device_(device), pool_(max_slots) {
    if (device_.is_cuda()) {
#ifdef TORCHTRT_EXT_WITH_CUDA
      if (!device_.has_index()) device_ = c10::Device(c10::kCUDA, c10::cuda::current_device());
      graphs_.resize(max_slots);
#else
      throw std::runtime_error(
          "torchtrt_ext._C was built without CUDA (torch had no CUDA, or CUDA_HOME was not found at "
          "build time), so it cannot run an engine on " + device_.str() +
          ". Rebuild with CUDA_HOME set: pip install --no-build-isolation -e .");
#endif
    } else if (!device_.is_cpu()) {
      throw std::invalid_argument("engines run on cpu or cuda devices, got " + device_.str());
    }
  }

  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;

  ~Runner() {
#ifdef TORCHTRT_EXT_WITH_CUDA
    // Replays may still run on the GPU: their pools' memory must not be handed out before they end.
    if (graphs_captured() > 0) {
      c10::cuda::CUDAGuard guard(device_.index());
      C10_CUDA_CHECK_WARN(cudaDeviceSynchronize());
    }
#endif
  }

  py::object run(py::handle fn, py::tuple inputs) {
    check_inputs(inputs);
#ifdef TORCHTRT_EXT_WITH_CUDA
    if (device_.is_cuda()) return run_cuda(fn, inputs);
#endif
    const std::shared_ptr<Bound> bound = bound_;  // this call's binding, whatever bind() does meanwhile
    SlotPool::Grant grant = acquire(/*stream=*/0);
    SlotLease lease(pool_, grant.slot);
#ifdef TORCHTRT_EXT_WITH_CUDA
    Use use(bound.get(), grant.slot, std::nullopt);
#else
    Use use(bound.get(), grant.slot);
#endif
    return invoke(fn, inputs, grant.slot, bound.get());
  }

  py::object run_graphed(py::handle fn, py::tuple inputs) {
#ifdef TORCHTRT_EXT_WITH_CUDA
    if (device_.is_cuda()) {
      check_inputs(inputs);
      return run_graphed_cuda(fn, inputs);
    }
#endif
    throw std::invalid_argument("CUDA graphs need a CUDA engine, but this one runs on " + device_.str());
  }

  // Drop every captured graph (after the engine's weights move to new addresses, say). Each slot is
  // held in turn, so no caller is replaying a graph while it goes.
  void clear_graphs() {
#ifdef TORCHTRT_EXT_WITH_CUDA
    py::gil_scoped_release no_gil;
    for (size_t s = 0; s < graphs_.size(); ++s) {
      if (!pool_.hold(static_cast<int64_t>(s))) continue;  // never created: nothing captured
      SlotLease lease(pool_, static_cast<int64_t>(s));
      // A replay may still run on the GPU; its pool's memory must not be handed out before it ends.
      if (!graphs_[s].entries.empty()) C10_CUDA_CHECK(cudaDeviceSynchronize());
      graphs_[s].entries.clear();
      graphs_[s].warned_full = false;
    }
#endif
  }

  // Let the runtime call the engine's compiled function itself: callable(*args), where args is
  // `arguments` (the weights, in place) with the call's inputs put at `input_positions`. From then on
  // fn is not called; no Python frame runs between the caller and the compiled code. A new binding
  // (new weight tensors, say) takes effect at the next call; a call never sees half of a binding.
  //   weights_id: names the weight buffers in `arguments`; CUDA graphs are kept per weights_id, so
  //     graphs captured for another buffer stay valid for when it is bound again.
  //   fence: calls on any stream that use this binding first wait for the work enqueued on the
  //     caller's current stream so far (the refit's copies into those weights).
  //   track: record, per slot, the end of every call's GPU work, so that retire() can wait for all
  //     uses of this binding once it is replaced (for writing into its weights again).
  void bind(py::object callable, py::list arguments, std::vector<int64_t> input_positions, int64_t weights_id,
            bool fence, bool track) {
    auto bound = std::make_shared<Bound>();
    bound->callable = std::move(callable);
    for (py::handle a : arguments) bound->arguments.push_back(py::reinterpret_borrow<py::object>(a));
    for (int64_t p : input_positions) {
      if (p < 0 || p >= static_cast<int64_t>(bound->arguments.size())) {
        throw std::invalid_argument("input position " + std::to_string(p) + " is outside the " +
                                    std::to_string(bound->arguments.size()) + " arguments");
      }
    }
    bound->input_positions = std::move(input_positions);
    bound->weights_id = weights_id;
    bound->track = track;
#ifdef TORCHTRT_EXT_WITH_CUDA
    if (device_.is_cuda()) {
      bound->fenced.assign(pool_.max_slots(), 0);
      if (track) bound->last_use.resize(pool_.max_slots());
      if (fence) {
        c10::cuda::CUDAGuard guard(device_.index());
        bound->ready = std::make_unique<Event>();
        bound->ready->record(c10::cuda::getCurrentCUDAStream(device_.index()));
      }
    }
#endif
    retired_ = std::move(bound_);
    bound_ = std::move(bound);  // under the GIL, like every reader
  }

  // Wait until no call uses the binding that the latest bind() replaced: on the host, until no call is
  // still enqueuing work with it; on the GPU, the caller's current stream waits for the end of the
  // work of every call that used it (recorded when it was bound with track=True). After this, work
  // enqueued on the current stream may overwrite that binding's weights.
  void retire() {
    if (!retired_) return;
    std::shared_ptr<Bound> old = std::move(retired_);
    {
      py::gil_scoped_release no_gil;  // calls still using it need the GIL to finish
      while (old->active.load(std::memory_order_acquire) != 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
#ifdef TORCHTRT_EXT_WITH_CUDA
      if (device_.is_cuda()) {
        c10::cuda::CUDAGuard guard(device_.index());
        const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
        for (const auto& e : old->last_use) {
          if (e) e->block(current);
        }
      }
#endif
    }
  }

  std::string device() const { return device_.str(); }
  int64_t slots_created() { return pool_.size(); }
  int64_t max_slots() const { return pool_.max_slots(); }

  int64_t graphs_captured() const {
#ifdef TORCHTRT_EXT_WITH_CUDA
    int64_t n = 0;
    for (const auto& g : graphs_) {
      for (const auto& e : g.entries) n += e.second->graph ? 1 : 0;
    }
    return n;
#else
    return 0;
#endif
  }

 private:
  void check_inputs(const py::tuple& inputs) const {
    const Py_ssize_t n = PyTuple_GET_SIZE(inputs.ptr());
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* obj = PyTuple_GET_ITEM(inputs.ptr(), i);
      if (!THPVariable_Check(obj)) continue;
      const at::Tensor& t = THPVariable_Unpack(obj);
      if (!t.defined() || t.device() == device_) continue;
      if (t.is_cpu() && t.dim() == 0) continue;  // CPU scalars mix with any device
      const std::string engine_device = device_.str();
      throw BadInput("input " + std::to_string(i) + " is on " + t.device().str() +
                             " but the engine runs on " + engine_device + "; every tensor input must be on " +
                             engine_device + " (move it with .to('" + engine_device + "'))");
    }
  }

  struct Bound {
    py::object callable;
    std::vector<py::object> arguments;
    std::vector<int64_t> input_positions;
    int64_t weights_id = 0;
    bool track = false;
    std::atomic<int64_t> active{0};  // calls between taking this binding and recording their use
#ifdef TORCHTRT_EXT_WITH_CUDA
    std::unique_ptr<Event> ready;                  // what every call waits for before its first use
    std::vector<char> fenced;                      // per slot: already waited for `ready`
    std::vector<std::unique_ptr<Event>> last_use;  // per slot, with track: end of its latest call
#endif
  };

  // One call's use of a binding: waits for the binding's fence on the execution stream (once per
  // slot), counts the call as active, and at the end records the call's end for retire(). Only the
  // slot's holder touches the slot's entries.
  class Use {
   public:
#ifdef TORCHTRT_EXT_WITH_CUDA
    Use(Bound* bound, int64_t slot, std::optional<c10::cuda::CUDAStream> exec)
        : bound_(bound), slot_(slot), exec_(exec) {
      if (!bound_) return;
      bound_->active.fetch_add(1, std::memory_order_acq_rel);
      if (exec_ && bound_->ready && !bound_->fenced[slot_]) {
        bound_->ready->block(*exec_);
        bound_->fenced[slot_] = 1;
      }
    }
    ~Use() {
      if (!bound_) return;
      if (exec_ && bound_->track) {
        auto& e = bound_->last_use[slot_];
        if (!e) e = std::make_unique<Event>();
        try {
          e->record(*exec_);
        } catch (...) {
          // a failed record leaves the previous one; retire() then waits for an earlier point
        }
      }
      bound_->active.fetch_sub(1, std::memory_order_acq_rel);
    }
#else
    Use(Bound* bound, int64_t slot) : bound_(bound), slot_(slot) {
      if (bound_) bound_->active.fetch_add(1, std::memory_order_acq_rel);
    }
    ~Use() {
      if (bound_) bound_->active.fetch_sub(1, std::memory_order_acq_rel);
    }
#endif
    Use(const Use&) = delete;
    Use& operator=(const Use&) = delete;

   private:
    Bound* bound_;
    int64_t slot_;
#ifdef TORCHTRT_EXT_WITH_CUDA
    std::optional<c10::cuda::CUDAStream> exec_;
#endif
  };

  // fn(inputs, slot), or the bound callable with the inputs put into its arguments. Needs the GIL.
  static py::object invoke(py::handle fn, const py::tuple& inputs, int64_t slot, const Bound* bound) {
    if (!bound) return fn(inputs, slot);
    const Py_ssize_t n = PyTuple_GET_SIZE(inputs.ptr());
    if (n != static_cast<Py_ssize_t>(bound->input_positions.size())) {
      throw BadInput("the engine takes " + std::to_string(bound->input_positions.size()) + " inputs, got " +
                     std::to_string(n));
    }
    py::tuple args(bound->arguments.size());
    for (size_t i = 0; i < bound->arguments.size(); ++i) {
      PyTuple_SET_ITEM(args.ptr(), i, bound->arguments[i].inc_ref().ptr());
    }
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(inputs.ptr(), i);
      PyObject* old = PyTuple_GET_ITEM(args.ptr(), bound->input_positions[i]);
      Py_INCREF(item);
      PyTuple_SET_ITEM(args.ptr(), bound->input_positions[i], item);
      Py_DECREF(old);
    }
    PyObject* result = PyObject_Call(bound->callable.ptr(), args.ptr(), nullptr);
    if (result == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(result);
  }

  SlotPool::Grant acquire(int64_t stream) {
    if (auto grant = pool_.try_acquire(stream)) return *grant;
    py::gil_scoped_release no_gil;  // every slot is busy: wait without blocking other Python threads
    return pool_.acquire(stream);
  }

#ifdef TORCHTRT_EXT_WITH_CUDA
  // A slot that last served another stream: order this stream after everything enqueued there so far.
  void fence_previous(const SlotPool::Grant& grant, const c10::cuda::CUDAStream& stream) {
    if (grant.previous_stream == kNoStream || grant.previous_stream == stream.id()) return;
    fence(c10::cuda::CUDAStream::unpack3(grant.previous_stream, device_.index(), c10::DeviceType::CUDA), stream);
  }

  py::object run_cuda(py::handle fn, const py::tuple& inputs) {
    const std::shared_ptr<Bound> bound = bound_;  // this call's binding, whatever bind() does meanwhile
    c10::cuda::CUDAGuard device_guard(device_.index());
    const Placement where = place(device_.index());
    SlotPool::Grant grant = acquire(where.exec.id());
    SlotLease lease(pool_, grant.slot);
    fence_previous(grant, where.exec);
    Use use(bound.get(), grant.slot, where.exec);
    if (where.exec == where.caller) return invoke(fn, inputs, grant.slot, bound.get());  // no stream switch
    c10::cuda::CUDAStreamGuard stream_guard(where.exec);
    return invoke(fn, inputs, grant.slot, bound.get());
  }

  py::object run_graphed_cuda(py::handle fn, const py::tuple& inputs) {
    std::vector<at::Tensor> tensors;
    std::vector<Py_ssize_t> positions;
    std::optional<GraphKey> key = graph_key(inputs, tensors, positions);
    const std::shared_ptr<Bound> bound = bound_;  // this call's binding, whatever bind() does meanwhile
    if (key) key->push_back(bound ? bound->weights_id : -1);  // graphs read these weights' addresses
    c10::cuda::CUDAGuard device_guard(device_.index());
    const Placement where = place(device_.index());
    SlotPool::Grant grant = acquire(where.exec.id());
    SlotLease lease(pool_, grant.slot);
    fence_previous(grant, where.exec);
    c10::cuda::CUDAStreamGuard stream_guard(where.exec);
    Use use(bound.get(), grant.slot, where.exec);

    SlotGraphs& slot = graphs_[grant.slot];
    GraphEntry* entry = nullptr;
    if (key && !is_capturing(where.exec)) {  // inside the caller's own capture, just run fn
      auto found = slot.entries.find(*key);
      if (found != slot.entries.end()) {
        if (found->second->graph) entry = found->second.get();  // else: this signature failed to capture
      } else if (slot.entries.size() < kMaxGraphsPerSlot) {
        entry = capture(fn, inputs, tensors, positions, grant.slot, where.exec, slot, std::move(*key), bound.get());
      } else if (!slot.warned_full) {
        slot.warned_full = true;
        const std::string message = "torchtrt_ext: an engine slot holds " + std::to_string(kMaxGraphsPerSlot) +
                                    " CUDA graphs (one per input signature); further signatures run without graphs";
        if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) < 0) throw py::error_already_set();
      }
    }
    if (entry == nullptr) {  // not capturable: run as usual
      at::NoGradGuard no_grad;
      return invoke(fn, inputs, grant.slot, bound.get());
    }

    std::vector<at::Tensor> outputs;
    {
      py::gil_scoped_release no_gil;
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < tensors.size(); ++i) entry->static_inputs[i].copy_(tensors[i], /*non_blocking=*/true);
      entry->graph->replay(where.exec.stream());
      outputs.reserve(entry->static_outputs.size());
      for (const at::Tensor& out : entry->static_outputs) outputs.push_back(out.clone());
    }
    py::list result(outputs.size());
    for (size_t i = 0; i < outputs.size(); ++i) {
      result[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(outputs[i])));
    }
    return result;
  }

  // Capture fn for this slot and input signature. The capture runs on the slot's own non-blocking
  // stream (never on a blocking side stream, see stream_bridge.h), after one warm-up run there that
  // creates per-stream library state (cuBLAS workspaces) outside the capture.
  GraphEntry* capture(py::handle fn, const py::tuple& inputs, const std::vector<at::Tensor>& tensors,
                      const std::vector<Py_ssize_t>& positions, int64_t slot_index,
                      const c10::cuda::CUDAStream& exec, SlotGraphs& slot, GraphKey key, const Bound* bound) {
    at::NoGradGuard no_grad;
    auto entry = std::make_unique<GraphEntry>();
    py::tuple static_args(PyTuple_GET_SIZE(inputs.ptr()));
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(inputs.ptr()); ++i) {
      static_args[i] = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(inputs.ptr(), i));
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      at::Tensor s = at::empty_strided(tensors[i].sizes(), tensors[i].strides(), tensors[i].options());
      s.copy_(tensors[i], /*non_blocking=*/true);
      static_args[positions[i]] = py::reinterpret_steal<py::object>(THPVariable_Wrap(s));
      entry->static_inputs.push_back(std::move(s));
    }
    if (!slot.capture_stream) slot.capture_stream = std::make_unique<OwnStream>(device_.index());
    const c10::cuda::CUDAStream cs = slot.capture_stream->stream();
    fence(exec, cs);
    {
      c10::cuda::CUDAStreamGuard on_capture_stream(cs);
      invoke(fn, static_args, slot_index, bound);  // warm-up, outside the capture
      // fn ran fine just now, so an error from here on is the capture's: warn, and let this signature
      // run without a graph from now on (a graph-less entry remembers that).
      std::string failure;
      try {
        auto graph = std::make_unique<PoolGraph>(device_.index(), cs.stream());
        graph->begin();
        py::object outs;
        try {
          outs = invoke(fn, static_args, slot_index, bound);
        } catch (...) {
          graph->abort();
          throw;
        }
        graph->end();
        entry->static_outputs = tensors_of(outs);
        if (entry->static_outputs.empty() && !outs.is_none() && py::len(outs) != 0) {
          throw std::runtime_error("the engine did not return a list of tensors");
        }
        entry->graph = std::move(graph);
      } catch (py::error_already_set& e) {
        failure = e.what();
      } catch (const std::exception& e) {
        failure = e.what();
      }
      if (!failure.empty()) {
        entry->static_outputs.clear();
        entry->static_inputs.clear();
        slot.entries.emplace(std::move(key), std::move(entry));
        const std::string message = "torchtrt_ext: could not capture a CUDA graph for this input signature, so it "
                                    "runs without one: " + failure.substr(0, 500);
        if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) < 0) throw py::error_already_set();
        return nullptr;
      }
    }
    fence(cs, exec);
    GraphEntry* raw = entry.get();
    slot.entries.emplace(std::move(key), std::move(entry));
    return raw;
  }

  std::vector<SlotGraphs> graphs_;
#endif

  c10::Device device_;
  SlotPool pool_;
  std::shared_ptr<Bound> bound_;    // read and replaced under the GIL
  std::shared_ptr<Bound> retired_;  // the binding bind() replaced, until retire()
};

// Watches where a module keeps its weights: entries (dict, key) of modules' _parameters/_buffers.
// changed() lists the entries whose tensor was replaced (another object in the dict), moved to new
// memory (.data swapped) or written in place (version counter) since accept(); one pass in C++,
// cheap enough to run on every call of the drop-in wrapper.
class WeightWatch {
 public:
  void add(py::dict owner, py::str key) {
    Entry e{owner, key, py::none(), 0, nullptr};
    snapshot(e);
    entries_.push_back(std::move(e));
  }

  std::vector<int64_t> changed() const {
    std::vector<int64_t> result;
    for (size_t i = 0; i < entries_.size(); ++i) {
      const Entry& e = entries_[i];
      PyObject* current = PyDict_GetItemWithError(e.owner.ptr(), e.key.ptr());  // borrowed
      if (current == nullptr && PyErr_Occurred()) throw py::error_already_set();
      if (current != e.object.ptr()) {
        result.push_back(static_cast<int64_t>(i));
        continue;
      }
      if (current == nullptr || !THPVariable_Check(current)) continue;
      const at::Tensor& t = THPVariable_Unpack(current);
      if (t.unsafeGetTensorImpl()->version_counter().current_version() != e.version || t.data_ptr() != e.data) {
        result.push_back(static_cast<int64_t>(i));
      }
    }
    return result;
  }

  // Take entry i's current state as the new reference.
  void accept(int64_t i) {
    if (i < 0 || i >= static_cast<int64_t>(entries_.size())) throw std::out_of_range("no watch entry " + std::to_string(i));
    snapshot(entries_[i]);
  }

  void accept_all() {
    for (Entry& e : entries_) snapshot(e);
  }

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    py::dict owner;
    py::str key;
    py::object object;
    uint32_t version;
    const void* data;
  };

  static void snapshot(Entry& e) {
    PyObject* current = PyDict_GetItemWithError(e.owner.ptr(), e.key.ptr());
    if (current == nullptr && PyErr_Occurred()) throw py::error_already_set();
    e.object = current ? py::reinterpret_borrow<py::object>(current) : py::object();
    e.version = 0;
    e.data = nullptr;
    if (current != nullptr && THPVariable_Check(current)) {
      const at::Tensor& t = THPVariable_Unpack(current);
      e.version = t.unsafeGetTensorImpl()->version_counter().current_version();
      e.data = t.defined() ? t.data_ptr() : nullptr;
    }
  }

  std::vector<Entry> entries_;
};

// Copy src[i] into dst[i] on the current stream, one cudaMemcpyAsync per pair in one C++ loop (no
// dispatcher or Python work per pair): contiguous pairs of one dtype and size, dst on a CUDA device,
// src on the same device or in pinned host memory that outlives the copy (the caller's promise: no
// event is recorded with torch's host allocator). Every pair is checked before any copy is enqueued.
// cudaMemcpyAsync of each pair, on `stream` (a handle; 0: the current stream of the destinations'
// device). With a stream given, it first waits for event `wait` and afterwards records event `record`
// there (0: none): weight streaming's fence, ring copies and fence of one segment in one call.
void copy_async(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, int64_t stream, int64_t wait,
                int64_t record) {
  if (dst.size() != src.size()) throw std::invalid_argument("copy_async: dst and src differ in length");
#ifdef TORCHTRT_EXT_WITH_CUDA
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
  if (stream == 0 && (wait != 0 || record != 0)) {
    throw std::invalid_argument("copy_async: wait and record need a stream");
  }
  if (stream == 0 && dst.empty()) return;
  std::optional<c10::cuda::CUDAGuard> guard;
  if (!dst.empty()) guard.emplace(dst[0].device().index());
  const cudaStream_t on = stream != 0 ? reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream))
                                      : c10::cuda::getCurrentCUDAStream(dst[0].device().index()).stream();
  py::gil_scoped_release no_gil;
  if (wait != 0) C10_CUDA_CHECK(cudaStreamWaitEvent(on, reinterpret_cast<cudaEvent_t>(static_cast<intptr_t>(wait)), 0));
  for (size_t i = 0; i < dst.size(); ++i) {
    const size_t bytes = static_cast<size_t>(dst[i].numel()) * dst[i].element_size();
    if (bytes == 0) continue;
    C10_CUDA_CHECK(cudaMemcpyAsync(dst[i].data_ptr(), src[i].data_ptr(), bytes, cudaMemcpyDefault, on));
  }
  if (record != 0) C10_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(static_cast<intptr_t>(record)), on));
#else
  (void)stream;
  (void)wait;
  (void)record;
  if (!dst.empty()) throw std::invalid_argument("copy_async: this build has no CUDA");
#endif
}

// batched_copy.cu's batched_copy (every pair in one kernel launch on the current stream), with the GIL
// released while it checks and enqueues. The CPU build has the same entry point: it checks the lengths
// and refuses any pair.
void batched_copy_unlocked(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
#ifdef TORCHTRT_EXT_WITH_CUDA
  py::gil_scoped_release no_gil;
  torchtrt_ext::batched_copy(dst, src);
#else
  if (dst.size() != src.size()) {
    throw std::invalid_argument("batched_copy: dst and src differ in length (" + std::to_string(dst.size()) +
                                " and " + std::to_string(src.size()) + " tensors)");
  }
  if (!dst.empty()) throw std::invalid_argument("batched_copy: this build has no CUDA");
#endif
}

// A new non-blocking stream on `device`, owned by the caller for the life of the process (wrapped in
// Python with torch.cuda.ExternalStream): unlike torch's pool streams, no other code enqueues on it.
int64_t create_stream(int64_t device) {
#ifdef TORCHTRT_EXT_WITH_CUDA
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t raw = nullptr;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(raw));
#else
  throw std::invalid_argument("create_stream: this build has no CUDA");
#endif
}

// Weight streaming's per-segment fences and copies, one call each (Python's stream contexts and event
// wrappers cost tens of microseconds per segment on a slow host; see streaming.py). Events are plain
// CUDA events without timing, created here and named by their handle.
int64_t create_event(int64_t device) {
#ifdef TORCHTRT_EXT_WITH_CUDA
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaEvent_t raw = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&raw, cudaEventDisableTiming));
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(raw));
#else
  (void)device;
  throw std::invalid_argument("create_event: this build has no CUDA");
#endif
}

void destroy_event(int64_t event) {
#ifdef TORCHTRT_EXT_WITH_CUDA
  if (event != 0) C10_CUDA_CHECK_WARN(cudaEventDestroy(reinterpret_cast<cudaEvent_t>(static_cast<intptr_t>(event))));
#else
  (void)event;
#endif
}

// The current stream of `device` waits for `event`; or records it.
void current_wait(int64_t device, int64_t event) {
#ifdef TORCHTRT_EXT_WITH_CUDA
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  C10_CUDA_CHECK(cudaStreamWaitEvent(s, reinterpret_cast<cudaEvent_t>(static_cast<intptr_t>(event)), 0));
#else
  (void)device;
  (void)event;
  throw std::invalid_argument("current_wait: this build has no CUDA");
#endif
}

void current_record(int64_t device, int64_t event) {
#ifdef TORCHTRT_EXT_WITH_CUDA
  const cudaStream_t s = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  C10_CUDA_CHECK(cudaEventRecord(reinterpret_cast<cudaEvent_t>(static_cast<intptr_t>(event)), s));
#else
  (void)device;
  (void)event;
  throw std::invalid_argument("current_record: this build has no CUDA");
#endif
}

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
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const torchtrt_ext::BadInput& e) {
      PyErr_SetString(torchtrt_ext::g_input_error ? torchtrt_ext::g_input_error : PyExc_ValueError, e.what());
    }
  });
  m.def("copy_async", &torchtrt_ext::copy_async, py::arg("dst"), py::arg("src"), py::arg("stream") = 0,
        py::arg("wait") = 0, py::arg("record") = 0,
        "cudaMemcpyAsync of contiguous tensor pairs (device or pinned host source) on `stream` (a handle; 0: "
        "the current stream); with a stream, first wait for event `wait` and then record event `record` there "
        "(0: none).");
  m.def("batched_copy", &torchtrt_ext::batched_copy_unlocked, py::arg("dst"), py::arg("src"),
        "Copy src[i] into dst[i] for every pair in ONE kernel launch on the current stream of the destinations' "
        "device: contiguous pairs of one dtype and size, all on one CUDA device (pairs not 16-byte aligned "
        "are a cudaMemcpyAsync each). Every pair is checked before anything is enqueued; no host-device "
        "synchronisation (CUDA-graph capturable); the GIL is released.");
  m.def("create_stream", &torchtrt_ext::create_stream, py::arg("device"),
        "A new non-blocking CUDA stream (its handle), never shared with torch's stream pool.");
  m.def("create_event", &torchtrt_ext::create_event, py::arg("device"),
        "A CUDA event without timing on `device` (its handle); free it with destroy_event.");
  m.def("destroy_event", &torchtrt_ext::destroy_event, py::arg("event"), "Free an event from create_event.");
  m.def("current_wait", &torchtrt_ext::current_wait, py::arg("device"), py::arg("event"),
        "The current stream of `device` waits for the event (a handle).");
  m.def("current_record", &torchtrt_ext::current_record, py::arg("device"), py::arg("event"),
        "Record the event (a handle) on the current stream of `device`.");
  m.def("built_with_cuda", &torchtrt_ext::built_with_cuda,
        "True when this extension was built against CUDA (streams, events, side streams).");
  m.def(
      "set_input_error",
      [](py::object cls) {
        cls.inc_ref();  // kept for the life of the process
        torchtrt_ext::g_input_error = cls.ptr();
      },
      "Set the exception class raised for inputs the engine cannot take.");
  py::class_<torchtrt_ext::WeightWatch>(m, "WeightWatch")
      .def(py::init<>())
      .def("add", &torchtrt_ext::WeightWatch::add, py::arg("owner"), py::arg("key"))
      .def("changed", &torchtrt_ext::WeightWatch::changed,
           "Indices of the entries replaced, moved or written in place since they were accepted.")
      .def("accept", &torchtrt_ext::WeightWatch::accept, py::arg("index"))
      .def("accept_all", &torchtrt_ext::WeightWatch::accept_all)
      .def("__len__", &torchtrt_ext::WeightWatch::size);
  py::class_<Runner>(m, "Runner")
      .def(py::init<const std::string&, int64_t>(), py::arg("device"), py::arg("max_slots"))
      .def("run", &Runner::run, py::arg("fn"), py::arg("inputs"),
           "Call fn(inputs, slot) on the caller's current stream (or this thread's side stream when the "
           "caller is on the legacy default stream) and return its result.")
      .def("run_graphed", &Runner::run_graphed, py::arg("fn"), py::arg("inputs"),
           "Like run, but capture fn once per slot and input signature as a CUDA graph and replay it "
           "(inputs copied in, outputs cloned out, without the GIL). fn must return a list of tensors.")
      .def("clear_graphs", &Runner::clear_graphs, "Drop every captured CUDA graph.")
      .def("bind", &Runner::bind, py::arg("callable"), py::arg("arguments"), py::arg("input_positions"),
           py::arg("weights_id") = 0, py::arg("fence") = false, py::arg("track") = false,
           "Call callable(*arguments) with the inputs put at input_positions instead of fn (see runtime.cpp).")
      .def("retire", &Runner::retire,
           "Wait (host, and the current stream) until no call uses the binding the latest bind() replaced.")
      .def_property_readonly("device", &Runner::device)
      .def_property_readonly("slots_created", &Runner::slots_created)
      .def_property_readonly("max_slots", &Runner::max_slots)
      .def_property_readonly("graphs_captured", &Runner::graphs_captured);
}
