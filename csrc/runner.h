// Runner: the stream-following runtime that every engine execution goes through.
//
// Runner::run(fn, inputs) executes fn(inputs, slot) for one engine:
//   * checks that every tensor input is on the engine's device (0-dim CPU scalars excepted);
//   * CUDA: makes the engine's device current and reads the caller's current stream on it.
//     - On a non-default stream, fn runs directly on that stream.
//     - On the legacy default stream, fn runs on this thread's side stream, a blocking stream that CUDA
//       orders against the legacy stream both ways (stream_bridge.h says why that is the fence).
//   * hands fn an execution slot: an index into the engine's per-stream state, never held by two
//     callers at once (slots.h: SlotPool).
//   * CPU build (or CPU engine): execution is synchronous; only the device check and slots apply.
//
// Runner::bind(callable, arguments, input_positions) lets the runtime call an engine's compiled function
// itself (callable(*arguments) with the inputs put in), so that no Python frame runs per call.
//
// Runner::run_graphed(fn, inputs) does the same, but replays CUDA graphs: per slot and per input
// signature, fn is captured once (on the slot's own capture stream, after a warm-up run) and every
// later call copies the inputs into the graph's static inputs, replays it and clones the outputs, all
// with the GIL released, so callers on several threads and streams run concurrently (graphs.h). Inputs
// that the code writes in place are not copied: their graphs are captured on them, per address.
//
// runner.cpp holds what every engine does (device checks, slots, bindings, the call itself);
// runner_cuda.cpp the CUDA engines' half (streams, fences, graphs). The CPU build has no CUDA engine:
// it compiles cpu_stubs.cpp in place of runner_cuda.cpp, and its Runner refuses a CUDA device.
#pragma once

#include "common.h"
#include "slots.h"

#include <torch/csrc/utils/pybind.h>

#include <c10/core/Device.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace torchtrt_ext {

namespace py = pybind11;

struct BindingFences;  // a CUDA engine's binding: its events (runner_cuda.cpp)
struct SlotGraphs;     // a CUDA engine's slot: its captured graphs (graphs.h)

class TORCHTRT_EXT_HIDDEN Runner {
 public:
  // written: the inputs (by index) that the engine's code writes in place; run_graphed captures them
  // at their own addresses (graphs.h).
  Runner(const std::string& device, int64_t max_slots, const std::vector<int64_t>& written = {});
  Runner(const Runner&) = delete;
  Runner& operator=(const Runner&) = delete;
  ~Runner();  // with the CUDA half: CUDA engines wait for graph replays still running

  py::object run(py::handle fn, py::tuple inputs);
  py::object run_graphed(py::handle fn, py::tuple inputs);

  // Drop every captured graph (after the engine's weights move to new addresses, say). Each slot is
  // held in turn, so no caller is replaying a graph while it goes.
  void clear_graphs();

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
            bool fence, bool track);

  // Wait until no call uses the binding that the latest bind() replaced: on the host, until no call is
  // still enqueuing work with it; on the GPU, the caller's current stream waits for the end of the
  // work of every call that used it (recorded when it was bound with track=True). After this, work
  // enqueued on the current stream may overwrite that binding's weights.
  void retire();

  std::string device() const { return device_.str(); }
  int64_t slots_created() { return pool_.size(); }
  int64_t max_slots() const { return pool_.max_slots(); }
  int64_t graphs_captured() const;

 private:
  struct Bound {
    py::object callable;
    std::vector<py::object> arguments;
    std::vector<int64_t> input_positions;
    int64_t weights_id = 0;
    bool track = false;
    std::atomic<int64_t> active{0};  // calls between taking this binding and recording their use
    // CUDA engines: what calls wait for and record (runner_cuda.cpp). A shared_ptr deletes it with the
    // deleter of the code that made it, so neither this header nor the CPU build needs its definition.
    std::shared_ptr<BindingFences> fences;
  };

  // Counts a call as using a binding (Bound::active) for as long as it lives; retire() waits for 0.
  class Active {
   public:
    explicit Active(Bound* bound) : bound_(bound) {
      if (bound_) bound_->active.fetch_add(1, std::memory_order_acq_rel);
    }
    ~Active() {
      if (bound_) bound_->active.fetch_sub(1, std::memory_order_acq_rel);
    }
    Active(const Active&) = delete;
    Active& operator=(const Active&) = delete;

   private:
    Bound* bound_;
  };

  // A CUDA call's use of a binding: Active, plus the binding's fences (runner_cuda.cpp).
  class Use;

  void check_inputs(const py::tuple& inputs) const;
  // fn(inputs, slot), or the bound callable with the inputs put into its arguments. Needs the GIL.
  static py::object invoke(py::handle fn, const py::tuple& inputs, int64_t slot, const Bound* bound);
  SlotPool::Grant acquire(int64_t stream);

  // The CUDA engines' half, called only when device_ is a CUDA device: runner_cuda.cpp, or in the CPU
  // build cpu_stubs.cpp, whose init_cuda() refuses the device (so the others are never reached there).
  // ~Runner() is defined in the same two files.
  void init_cuda();
  py::object run_cuda(py::handle fn, const py::tuple& inputs);
  py::object run_graphed_cuda(py::handle fn, const py::tuple& inputs);
  void clear_graphs_cuda();
  void bind_cuda(Bound& bound, bool fence);
  void retire_cuda(const Bound& old);  // called without the GIL
  int64_t graphs_captured_cuda() const;

  // CUDA engines: per slot, its graphs (a shared_ptr for the reason given at Bound::fences).
  std::shared_ptr<std::vector<SlotGraphs>> graphs_;
  c10::Device device_;
  SlotPool pool_;
  std::vector<char> written_;       // per input index: written in place by the engine's code
  std::shared_ptr<Bound> bound_;    // read and replaced under the GIL
  std::shared_ptr<Bound> retired_;  // the binding bind() replaced, until retire()
};

}  // namespace torchtrt_ext
