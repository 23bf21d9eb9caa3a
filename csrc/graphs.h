// CUDA graphs for Runner::run_graphed (CUDA build only): per execution slot and input signature, the
// engine call is captured once on the slot's own stream, into a private memory pool, and replayed with
// its inputs copied into the graph's static inputs and its outputs cloned out.
//
// Inputs the engine's code writes in place (a KV cache) are the exception: a graph replaying on a copy
// would write the copy. Such an input is captured at its own address, which joins the signature: the
// graph writes the caller's tensor itself, and a call passing another tensor there gets another graph.
#pragma once

#include "stream_bridge.h"

#include <torch/csrc/utils/pybind.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/MemPool.h>

#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <vector>

namespace torchtrt_ext {

namespace py = pybind11;

// How many input signatures one slot captures before further signatures run without graphs (or, for
// graphs captured on written inputs' addresses, one unused for kEvictAfterUses calls makes room).
constexpr size_t kMaxGraphsPerSlot = 16;
constexpr uint64_t kEvictAfterUses = 2 * kMaxGraphsPerSlot;

// The input signature a graph is captured for: per input a tag, then for tensors dtype, sizes and
// strides (and for a written input its address), for Python scalars their value.
using GraphKey = std::vector<int64_t>;

struct GraphKeyHash {
  size_t operator()(const GraphKey& key) const {
    size_t h = key.size();
    for (int64_t v : key) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};

// One CUDA graph, captured with CUDA's own API on a stream this runtime owns, its memory in a private
// pool of torch's caching allocator. Not at::cuda::CUDAGraph: that registers torch's default RNG
// generator, whose capture flag is process-wide, so any torch.randn on another thread during our
// capture would fail ("Offset increment outside graph capture"). An engine that draws random numbers
// fails to capture here instead, and runs without a graph.
class PoolGraph {
 public:
  PoolGraph(c10::DeviceIndex device, cudaStream_t stream);
  PoolGraph(const PoolGraph&) = delete;
  PoolGraph& operator=(const PoolGraph&) = delete;
  ~PoolGraph();

  void begin();
  void end();
  // After an error inside the capture: end it, drop whatever was captured, stop routing.
  void abort() noexcept;
  void replay(cudaStream_t stream) { C10_CUDA_CHECK(cudaGraphLaunch(exec_, stream)); }

 private:
  void finish_routing() noexcept;

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
  explicit OwnStream(c10::DeviceIndex device);
  OwnStream(const OwnStream&) = delete;
  OwnStream& operator=(const OwnStream&) = delete;
  ~OwnStream();
  c10::cuda::CUDAStream stream() const { return c10::cuda::getStreamFromExternal(raw_, device_); }

 private:
  c10::DeviceIndex device_;
  cudaStream_t raw_ = nullptr;
};

struct GraphEntry {
  std::unique_ptr<PoolGraph> graph;  // declared first: destroyed after the tensors in its pool
  // One per tensor input, in input order; undefined for a written input (the graph uses the caller's
  // own tensor, at the address in the key, and holds no reference to it).
  std::vector<at::Tensor> static_inputs;
  // One per output. An output that is a written input itself (a KV cache the code updates and returns)
  // is undefined here, and output_source names that input (its index among the tensor inputs): the
  // replay returns the caller's own tensor, neither a clone nor a new address for the next call.
  std::vector<at::Tensor> static_outputs;
  std::vector<int64_t> output_source;  // per output: -1, or the tensor input it is
  bool by_address = false;  // captured on a written input's own address (part of its key)
  uint64_t last_use = 0;    // the slot's use count at its latest replay (for evict_by_address)
};

// Per slot: its captured graphs and the stream captures happen on. Only the slot's holder touches it.
struct SlotGraphs {
  std::unordered_map<GraphKey, std::unique_ptr<GraphEntry>, GraphKeyHash> entries;
  std::unique_ptr<OwnStream> capture_stream;
  bool warned_full = false;
  uint64_t uses = 0;
};

// Make room in a full slot: drop the graph captured on a written input's address that replayed least
// recently, if it has not for kEvictAfterUses calls (a server that makes a new KV cache per request
// would otherwise fill the slot with graphs of caches long gone, and run without graphs from then on).
// Waits for `exec` first (the slot's latest work, its replays included). False when no graph may go.
// Needs the GIL (released while waiting).
bool evict_by_address(SlotGraphs& slot, const c10::cuda::CUDAStream& exec);

// The tensors among the inputs and the signature key; nullopt when an input cannot be captured
// (a CPU tensor, an overlapping or non-dense tensor, a Python object other than a scalar or None).
// written[i] != 0: input i is written by the engine's code (its address joins the key).
std::optional<GraphKey> graph_key(const py::tuple& inputs, const std::vector<char>& written,
                                  std::vector<at::Tensor>& tensors, std::vector<Py_ssize_t>& positions);

// The engine call a graph captures, with the inputs given (Runner::invoke for the call's slot and
// binding). Needs the GIL.
using EngineCall = std::function<py::object(const py::tuple& inputs)>;

// Capture `call` for this slot and input signature (`tensors` at `positions` of `inputs`, from
// graph_key), ordered after `exec`; the entry is kept in `slot` under `key`. The warm-up run before the
// capture computes on copies of every tensor input, written ones included, so that the caller's
// tensors are written once, by the replay that follows. Returns nullptr, with a RuntimeWarning, when
// the capture fails: the entry then remembers that this signature runs without a graph. Needs the GIL.
GraphEntry* capture(const EngineCall& call, const py::tuple& inputs, const std::vector<char>& written,
                    const std::vector<at::Tensor>& tensors, const std::vector<Py_ssize_t>& positions,
                    c10::DeviceIndex device, const c10::cuda::CUDAStream& exec, SlotGraphs& slot, GraphKey key);

// Replay `entry` on `stream` with `tensors` as its inputs (copied into its static inputs, except the
// written ones, which are the captured tensors themselves); returns the outputs (cloned) as a list.
// The copies, the replay and the clones run without the GIL.
py::list replay(GraphEntry& entry, const std::vector<at::Tensor>& tensors, const c10::cuda::CUDAStream& stream);

}  // namespace torchtrt_ext
