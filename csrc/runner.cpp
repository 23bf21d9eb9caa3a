// Runner (runner.h): what every engine does, in every build. CUDA engines branch into runner_cuda.cpp.
#include "runner.h"

#include "common.h"

#include <torch/csrc/autograd/python_variable.h>

#include <chrono>
#include <thread>

namespace torchtrt_ext {

Runner::Runner(const std::string& device, int64_t max_slots, const std::vector<int64_t>& written)
    : device_(device), pool_(max_slots) {
  for (int64_t i : written) {
    if (i < 0) throw std::invalid_argument("written input index " + std::to_string(i) + " is negative");
    if (static_cast<size_t>(i) >= written_.size()) written_.resize(i + 1, 0);
    written_[i] = 1;
  }
  if (device_.is_cuda()) {
    init_cuda();
  } else if (!device_.is_cpu()) {
    throw std::invalid_argument("engines run on cpu or cuda devices, got " + device_.str());
  }
}

py::object Runner::run(py::handle fn, py::tuple inputs) {
  check_inputs(inputs);
  if (device_.is_cuda()) return run_cuda(fn, inputs);
  const std::shared_ptr<Bound> bound = bound_;  // this call's binding, whatever bind() does meanwhile
  SlotPool::Grant grant = acquire(/*stream=*/0);
  SlotLease lease(pool_, grant.slot);
  Active active(bound.get());
  return invoke(fn, inputs, grant.slot, bound.get());
}

py::object Runner::run_graphed(py::handle fn, py::tuple inputs) {
  if (device_.is_cuda()) {
    check_inputs(inputs);
    return run_graphed_cuda(fn, inputs);
  }
  throw std::invalid_argument("CUDA graphs need a CUDA engine, but this one runs on " + device_.str());
}

void Runner::clear_graphs() {
  if (device_.is_cuda()) clear_graphs_cuda();  // a CPU engine captures nothing
}

void Runner::bind(py::object callable, py::list arguments, std::vector<int64_t> input_positions, int64_t weights_id,
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
  if (device_.is_cuda()) bind_cuda(*bound, fence);  // a CPU engine's calls are synchronous: no fence
  retired_ = std::move(bound_);
  bound_ = std::move(bound);  // under the GIL, like every reader
}

void Runner::retire() {
  if (!retired_) return;
  std::shared_ptr<Bound> old = std::move(retired_);
  {
    py::gil_scoped_release no_gil;  // calls still using it need the GIL to finish
    while (old->active.load(std::memory_order_acquire) != 0) std::this_thread::sleep_for(std::chrono::microseconds(20));
    if (device_.is_cuda()) retire_cuda(*old);
  }
  // `old` (Python objects) goes here, with the GIL held again
}

int64_t Runner::graphs_captured() const { return device_.is_cuda() ? graphs_captured_cuda() : 0; }

void Runner::check_inputs(const py::tuple& inputs) const {
  const Py_ssize_t n = PyTuple_GET_SIZE(inputs.ptr());
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* obj = PyTuple_GET_ITEM(inputs.ptr(), i);
    if (!THPVariable_Check(obj)) continue;
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.defined() || t.device() == device_) continue;
    if (t.is_cpu() && t.dim() == 0) continue;  // CPU scalars mix with any device
    const std::string engine_device = device_.str();
    throw BadInput("input " + std::to_string(i) + " is on " + t.device().str() + " but the engine runs on " +
                   engine_device + "; every tensor input must be on " + engine_device + " (move it with .to('" +
                   engine_device + "'))");
  }
}

py::object Runner::invoke(py::handle fn, const py::tuple& inputs, int64_t slot, const Bound* bound) {
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

SlotPool::Grant Runner::acquire(int64_t stream) {
  if (auto grant = pool_.try_acquire(stream)) return *grant;
  py::gil_scoped_release no_gil;  // every slot is busy: wait without blocking other Python threads
  return pool_.acquire(stream);
}

}  // namespace torchtrt_ext
