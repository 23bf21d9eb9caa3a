// Runner (runner.h), the CUDA engines' half (CUDA build only): where a call runs (stream_bridge.h), the
// fences of bindings and slots, and CUDA graphs (graphs.h).
#include "runner.h"

#include "graphs.h"

#include <ATen/core/grad_mode.h>

namespace torchtrt_ext {

// A CUDA engine's binding: what calls wait for and record.
struct BindingFences {
  std::unique_ptr<Event> ready;                  // what every call waits for before its first use
  std::vector<char> fenced;                      // per slot: already waited for `ready`
  std::vector<std::unique_ptr<Event>> last_use;  // per slot, with track: end of its latest call
};

// One call's use of a binding: counts the call as active, waits for the binding's fence on the execution
// stream (once per slot), and at the end records the call's end for retire(). Only the slot's holder
// touches the slot's entries.
class Runner::Use {
 public:
  Use(Bound* bound, int64_t slot, const c10::cuda::CUDAStream& exec)
      : active_(bound), bound_(bound), slot_(slot), exec_(exec) {
    BindingFences* f = bound_ ? bound_->fences.get() : nullptr;
    if (f && f->ready && !f->fenced[slot_]) {
      f->ready->block(exec_);
      f->fenced[slot_] = 1;
    }
  }
  ~Use() {
    if (!bound_ || !bound_->track) return;
    auto& e = bound_->fences->last_use[slot_];
    if (!e) e = std::make_unique<Event>();
    try {
      e->record(exec_);
    } catch (...) {
      // a failed record leaves the previous one; retire() then waits for an earlier point
    }
  }
  Use(const Use&) = delete;
  Use& operator=(const Use&) = delete;

 private:
  Active active_;  // declared first: the call counts as active before its fence and until after its record
  Bound* bound_;
  int64_t slot_;
  c10::cuda::CUDAStream exec_;
};

namespace {

// A slot that last served another stream: order this stream after everything enqueued there so far.
void fence_previous(const SlotPool::Grant& grant, const c10::cuda::CUDAStream& stream, c10::DeviceIndex device) {
  if (grant.previous_stream == kNoStream || grant.previous_stream == stream.id()) return;
  fence(c10::cuda::CUDAStream::unpack3(grant.previous_stream, device, c10::DeviceType::CUDA), stream);
}

}  // namespace

Runner::~Runner() {
  // Replays may still run on the GPU: their pools' memory must not be handed out before they end.
  if (graphs_captured() > 0) {
    c10::cuda::CUDAGuard guard(device_.index());
    C10_CUDA_CHECK_WARN(cudaDeviceSynchronize());
  }
}

void Runner::init_cuda() {
  if (!device_.has_index()) device_ = c10::Device(c10::kCUDA, c10::cuda::current_device());
  graphs_ = std::make_shared<std::vector<SlotGraphs>>(pool_.max_slots());
}

py::object Runner::run_cuda(py::handle fn, const py::tuple& inputs) {
  const std::shared_ptr<Bound> bound = bound_;  // this call's binding, whatever bind() does meanwhile
  c10::cuda::CUDAGuard device_guard(device_.index());
  const Placement where = place(device_.index());
  SlotPool::Grant grant = acquire(where.exec.id());
  SlotLease lease(pool_, grant.slot);
  fence_previous(grant, where.exec, device_.index());
  Use use(bound.get(), grant.slot, where.exec);
  if (where.exec == where.caller) return invoke(fn, inputs, grant.slot, bound.get());  // no stream switch
  c10::cuda::CUDAStreamGuard stream_guard(where.exec);
  return invoke(fn, inputs, grant.slot, bound.get());
}

py::object Runner::run_graphed_cuda(py::handle fn, const py::tuple& inputs) {
  std::vector<at::Tensor> tensors;
  std::vector<Py_ssize_t> positions;
  std::optional<GraphKey> key = graph_key(inputs, written_, tensors, positions);
  const std::shared_ptr<Bound> bound = bound_;  // this call's binding, whatever bind() does meanwhile
  if (key) key->push_back(bound ? bound->weights_id : -1);  // graphs read these weights' addresses
  c10::cuda::CUDAGuard device_guard(device_.index());
  const Placement where = place(device_.index());
  SlotPool::Grant grant = acquire(where.exec.id());
  SlotLease lease(pool_, grant.slot);
  fence_previous(grant, where.exec, device_.index());
  c10::cuda::CUDAStreamGuard stream_guard(where.exec);
  Use use(bound.get(), grant.slot, where.exec);

  SlotGraphs& slot = (*graphs_)[grant.slot];
  GraphEntry* entry = nullptr;
  if (key && !is_capturing(where.exec)) {  // inside the caller's own capture, just run fn
    auto found = slot.entries.find(*key);
    if (found != slot.entries.end()) {
      if (found->second->graph) entry = found->second.get();  // else: this signature failed to capture
    } else if (slot.entries.size() < kMaxGraphsPerSlot || evict_by_address(slot, where.exec)) {
      const int64_t slot_index = grant.slot;
      const EngineCall call = [&](const py::tuple& args) { return invoke(fn, args, slot_index, bound.get()); };
      entry = capture(call, inputs, written_, tensors, positions, device_.index(), where.exec, slot, std::move(*key));
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
  entry->last_use = ++slot.uses;
  return replay(*entry, tensors, where.exec);
}

void Runner::clear_graphs_cuda() {
  std::vector<SlotGraphs>& graphs = *graphs_;
  py::gil_scoped_release no_gil;
  for (size_t s = 0; s < graphs.size(); ++s) {
    if (!pool_.hold(static_cast<int64_t>(s))) continue;  // never created: nothing captured
    SlotLease lease(pool_, static_cast<int64_t>(s));
    // A replay may still run on the GPU; its pool's memory must not be handed out before it ends.
    if (!graphs[s].entries.empty()) C10_CUDA_CHECK(cudaDeviceSynchronize());
    graphs[s].entries.clear();
    graphs[s].warned_full = false;
  }
}

void Runner::bind_cuda(Bound& bound, bool fence) {
  auto fences = std::make_shared<BindingFences>();
  fences->fenced.assign(pool_.max_slots(), 0);
  if (bound.track) fences->last_use.resize(pool_.max_slots());
  if (fence) {
    c10::cuda::CUDAGuard guard(device_.index());
    fences->ready = std::make_unique<Event>();
    fences->ready->record(c10::cuda::getCurrentCUDAStream(device_.index()));
  }
  bound.fences = std::move(fences);
}

void Runner::retire_cuda(const Bound& old) {
  c10::cuda::CUDAGuard guard(device_.index());
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device_.index());
  for (const auto& e : old.fences->last_use) {
    if (e) e->block(current);
  }
}

int64_t Runner::graphs_captured_cuda() const {
  int64_t n = 0;
  for (const auto& g : *graphs_) {
    for (const auto& e : g.entries) n += e.second->graph ? 1 : 0;
  }
  return n;
}

}  // namespace torchtrt_ext
