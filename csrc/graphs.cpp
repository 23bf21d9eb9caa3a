// CUDA graphs for Runner::run_graphed (graphs.h): capture, replay, and the pool and stream they use.
#include "graphs.h"

#include <torch/csrc/autograd/python_variable.h>

#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty_strided.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <cstring>
#include <string>

namespace torchtrt_ext {
namespace {

bool is_written(const std::vector<char>& written, Py_ssize_t i) {
  return i < static_cast<Py_ssize_t>(written.size()) && written[i] != 0;
}

// The same memory seen the same way: address, dtype, sizes and strides.
bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && b.defined() && a.data_ptr() == b.data_ptr() && a.scalar_type() == b.scalar_type() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

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

std::vector<at::Tensor> tensors_of(const py::object& outputs) {
  std::vector<at::Tensor> result;
  if (!(py::isinstance<py::list>(outputs) || py::isinstance<py::tuple>(outputs))) return result;
  for (py::handle item : outputs) {
    if (!THPVariable_Check(item.ptr())) return {};
    result.push_back(THPVariable_Unpack(item.ptr()));
  }
  return result;
}

}  // namespace

PoolGraph::PoolGraph(c10::DeviceIndex device, cudaStream_t stream)
    : device_(device), stream_(stream), pool_(at::cuda::MemPool::graph_pool_handle(false)) {}

void PoolGraph::begin() {
  cudaStream_t stream = stream_;
  // Only allocations on our own stream go to the pool; no other code enqueues on it.
  c10::cuda::CUDACachingAllocator::beginAllocateToPool(device_, pool_,
                                                       [stream](cudaStream_t s) { return s == stream; });
  pool_begun_ = routing_ = true;
  C10_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
  mark_capture(c10::cuda::CUDACachingAllocator::get(), device_, true, 0);
}

void PoolGraph::end() {
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

void PoolGraph::abort() noexcept {
  if (capturing_) {
    cudaGraph_t graph = nullptr;
    if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    capturing_ = false;
  }
  finish_routing();
}

PoolGraph::~PoolGraph() {
  abort();
  if (exec_) C10_CUDA_CHECK_WARN(cudaGraphExecDestroy(exec_));
  if (pool_begun_) c10::cuda::CUDACachingAllocator::releasePool(device_, pool_);
}

void PoolGraph::finish_routing() noexcept {
  if (!routing_) return;
  routing_ = false;
  mark_capture(c10::cuda::CUDACachingAllocator::get(), device_, false, 0);
  c10::cuda::CUDACachingAllocator::endAllocateToPool(device_, pool_);
}

OwnStream::OwnStream(c10::DeviceIndex device) : device_(device) {
  c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw_, cudaStreamNonBlocking));
}

OwnStream::~OwnStream() {
  c10::cuda::CUDAGuard guard(device_);
  C10_CUDA_CHECK_WARN(cudaStreamSynchronize(raw_));
  C10_CUDA_CHECK_WARN(cudaStreamDestroy(raw_));
}

std::optional<GraphKey> graph_key(const py::tuple& inputs, const std::vector<char>& written,
                                  std::vector<at::Tensor>& tensors, std::vector<Py_ssize_t>& positions) {
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
      if (is_written(written, i)) {
        key.push_back(6);
        key.push_back(static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr())));
      }
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

// The capture runs on the slot's own non-blocking stream (never on a blocking side stream, see
// stream_bridge.h), after one warm-up run there that creates per-stream library state (cuBLAS
// workspaces) outside the capture.
GraphEntry* capture(const EngineCall& call, const py::tuple& inputs, const std::vector<char>& written,
                    const std::vector<at::Tensor>& tensors, const std::vector<Py_ssize_t>& positions,
                    c10::DeviceIndex device, const c10::cuda::CUDAStream& exec, SlotGraphs& slot, GraphKey key) {
  at::NoGradGuard no_grad;
  auto entry = std::make_unique<GraphEntry>();
  // static_args: what the graph is captured with; warm_args: what the warm-up runs on (the same,
  // except that a written input is a scratch copy there, and the caller's own tensor in the graph).
  const Py_ssize_t n = PyTuple_GET_SIZE(inputs.ptr());
  py::tuple static_args(n), warm_args(n);
  std::vector<at::Tensor> scratch;  // the warm-up's copies of written inputs
  for (Py_ssize_t i = 0; i < n; ++i) {
    static_args[i] = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(inputs.ptr(), i));
    warm_args[i] = static_args[i];
  }
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor s = at::empty_strided(tensors[i].sizes(), tensors[i].strides(), tensors[i].options());
    s.copy_(tensors[i], /*non_blocking=*/true);
    py::object wrapped = py::reinterpret_steal<py::object>(THPVariable_Wrap(s));
    warm_args[positions[i]] = wrapped;
    if (is_written(written, positions[i])) {
      entry->static_inputs.emplace_back();  // the caller's tensor, at the address in the key
      scratch.push_back(std::move(s));
    } else {
      static_args[positions[i]] = wrapped;
      entry->static_inputs.push_back(std::move(s));
    }
  }
  entry->by_address = !scratch.empty();  // a failed capture too: evictable like the others
  entry->last_use = ++slot.uses;
  if (!slot.capture_stream) slot.capture_stream = std::make_unique<OwnStream>(device);
  const c10::cuda::CUDAStream cs = slot.capture_stream->stream();
  fence(exec, cs);
  {
    c10::cuda::CUDAStreamGuard on_capture_stream(cs);
    // The scratch copies go when this returns (or throws), while the warm-up may still run on the
    // capture stream: their memory is not reused before that stream's work so far is done.
    for (const at::Tensor& s : scratch) c10::cuda::CUDACachingAllocator::recordStream(s.storage().data_ptr(), cs);
    call(warm_args);  // warm-up, outside the capture
    // The call ran fine just now, so an error from here on is the capture's: warn, and let this
    // signature run without a graph from now on (a graph-less entry remembers that).
    std::string failure;
    try {
      auto graph = std::make_unique<PoolGraph>(device, cs.stream());
      graph->begin();
      py::object outs;
      try {
        outs = call(static_args);
      } catch (...) {
        graph->abort();
        throw;
      }
      graph->end();
      entry->static_outputs = tensors_of(outs);
      if (entry->static_outputs.empty() && !outs.is_none() && py::len(outs) != 0) {
        throw std::runtime_error("the engine did not return a list of tensors");
      }
      entry->output_source.assign(entry->static_outputs.size(), -1);
      for (size_t j = 0; j < entry->static_outputs.size(); ++j) {
        const at::Tensor& out = entry->static_outputs[j];
        for (size_t k = 0; k < tensors.size(); ++k) {
          if (is_written(written, positions[k]) && same_view(out, tensors[k])) {
            entry->output_source[j] = static_cast<int64_t>(k);
            entry->static_outputs[j] = at::Tensor();  // the caller's, not the graph's to hold
            break;
          }
        }
      }
      entry->graph = std::move(graph);
    } catch (py::error_already_set& e) {
      failure = e.what();
    } catch (const std::exception& e) {
      failure = e.what();
    }
    if (!failure.empty()) {
      fence(cs, exec);  // the static copies, freed here, may still be read on the capture stream
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

bool evict_by_address(SlotGraphs& slot, const c10::cuda::CUDAStream& exec) {
  auto oldest = slot.entries.end();
  for (auto it = slot.entries.begin(); it != slot.entries.end(); ++it) {
    if (it->second->by_address && (oldest == slot.entries.end() || it->second->last_use < oldest->second->last_use)) {
      oldest = it;
    }
  }
  // Only a graph out of use for a while: caches taken in turn, more of them than the slot holds,
  // would otherwise evict at every call (a wait, a warm-up and a capture each); they run without.
  if (oldest == slot.entries.end() || slot.uses - oldest->second->last_use < kEvictAfterUses) return false;
  {
    py::gil_scoped_release no_gil;
    // Every replay of this slot's graphs is ordered before the work on `exec` so far (a slot that
    // served another stream was fenced on it): once that is done, its pool can be handed out.
    C10_CUDA_CHECK(cudaStreamSynchronize(exec.stream()));
  }
  slot.entries.erase(oldest);
  return true;
}

py::list replay(GraphEntry& entry, const std::vector<at::Tensor>& tensors, const c10::cuda::CUDAStream& stream) {
  std::vector<at::Tensor> outputs;
  {
    py::gil_scoped_release no_gil;
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (entry.static_inputs[i].defined()) entry.static_inputs[i].copy_(tensors[i], /*non_blocking=*/true);
    }
    entry.graph->replay(stream.stream());
    outputs.reserve(entry.static_outputs.size());
    for (size_t j = 0; j < entry.static_outputs.size(); ++j) {
      const int64_t source = entry.output_source[j];
      outputs.push_back(source >= 0 ? tensors[source] : entry.static_outputs[j].clone());
    }
  }
  py::list result(outputs.size());
  for (size_t i = 0; i < outputs.size(); ++i) {
    result[i] = py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(outputs[i])));
  }
  return result;
}

}  // namespace torchtrt_ext
