// What the build without CUDA does instead: setup.py compiles this file in place of runner_cuda.cpp,
// graphs.cpp, copies.cpp and batched_copy.cu. It defines the same entry points; each refuses CUDA work
// with an error that says how to get a CUDA build, and the counts of CUDA objects are 0.
#include "common.h"
#include "copies.h"
#include "runner.h"

#include <stdexcept>
#include <string>

namespace torchtrt_ext {
namespace {

std::string without_cuda(const std::string& what) {
  return "torchtrt_ext.core._C was built without CUDA (torch had no CUDA, or CUDA_HOME was not found at build time), "
         "so it cannot " + what + ". Rebuild with CUDA_HOME set: pip install --no-build-isolation -e .";
}

}  // namespace

bool built_with_cuda() { return false; }

// Runner: no engine runs on CUDA, so init_cuda() refuses the device and the rest of the CUDA half is
// never reached.

Runner::~Runner() = default;

void Runner::init_cuda() { throw std::runtime_error(without_cuda("run an engine on " + device_.str())); }

py::object Runner::run_cuda(py::handle, const py::tuple&) {
  throw std::runtime_error(without_cuda("run an engine on " + device_.str()));
}

py::object Runner::run_graphed_cuda(py::handle, const py::tuple&) {
  throw std::runtime_error(without_cuda("run an engine on " + device_.str()));
}

void Runner::clear_graphs_cuda() {}

void Runner::bind_cuda(Bound&, bool) {}

void Runner::retire_cuda(const Bound&) {}

int64_t Runner::graphs_captured_cuda() const { return 0; }

// Streams and events: none can be made.

CopyStream::CopyStream(int64_t device) : device_(device) {
  throw std::runtime_error(without_cuda("make a CopyStream (a CUDA stream) on device " + std::to_string(device)));
}

CopyStream::~CopyStream() = default;

FenceEvent::FenceEvent(int64_t device) : device_(device) {
  throw std::runtime_error(without_cuda("make an Event (a CUDA event) on device " + std::to_string(device)));
}

FenceEvent::~FenceEvent() = default;

int64_t live_streams() { return 0; }
int64_t live_events() { return 0; }

// Copies: nothing to copy is fine; any pair is refused.

void copy_async(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src, const CopyStream*,
                const FenceEvent*, const FenceEvent*) {
  if (dst.size() != src.size()) throw std::invalid_argument("copy_async: dst and src differ in length");
  if (!dst.empty()) throw std::invalid_argument("copy_async: this build has no CUDA");
}

void batched_copy_unlocked(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  if (dst.size() != src.size()) {
    throw std::invalid_argument("batched_copy: dst and src differ in length (" + std::to_string(dst.size()) +
                                " and " + std::to_string(src.size()) + " tensors)");
  }
  if (!dst.empty()) throw std::invalid_argument("batched_copy: this build has no CUDA");
}

void current_wait(int64_t, const FenceEvent&) { throw std::invalid_argument("current_wait: this build has no CUDA"); }

void current_record(int64_t, const FenceEvent&) {
  throw std::invalid_argument("current_record: this build has no CUDA");
}

}  // namespace torchtrt_ext
