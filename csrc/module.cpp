// torchtrt_ext.core._C: the Python bindings of the runtime (runner.h, weight_watch.h, copies.h).
#include "common.h"
#include "copies.h"
#include "leaf_check.h"
#include "runner.h"
#include "weight_watch.h"

#include <torch/csrc/utils/pybind.h>

namespace py = pybind11;

namespace {

PyObject* g_input_error = nullptr;  // torchtrt_ext.errors.InputError, set at import (else ValueError)

}  // namespace

PYBIND11_MODULE(_C, m) {
  using torchtrt_ext::CopyStream;
  using torchtrt_ext::FenceEvent;
  using torchtrt_ext::Runner;
  m.doc() = "torchtrt_ext runtime: stream-following execution of engines";
  py::register_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const torchtrt_ext::BadInput& e) {
      PyErr_SetString(g_input_error ? g_input_error : PyExc_ValueError, e.what());
    }
  });
  py::class_<CopyStream>(m, "CopyStream")
      .def(py::init<int64_t>(), py::arg("device"),
           "A new non-blocking CUDA stream on `device`, never shared with torch's stream pool; destroyed with "
           "this object (work already enqueued on it still completes).")
      .def_property_readonly("device", &CopyStream::device);
  py::class_<FenceEvent>(m, "Event")
      .def(py::init<int64_t>(), py::arg("device"),
           "A CUDA event without timing on `device`; destroyed with this object (once its work is done).")
      .def_property_readonly("device", &FenceEvent::device);
  m.def("live_streams", &torchtrt_ext::live_streams, "How many CopyStream objects exist now.");
  m.def("live_events", &torchtrt_ext::live_events, "How many Event objects exist now.");
  m.def("copy_async", &torchtrt_ext::copy_async, py::arg("dst"), py::arg("src"), py::arg("stream") = py::none(),
        py::arg("wait") = py::none(), py::arg("record") = py::none(),
        "cudaMemcpyAsync of contiguous tensor pairs (device or pinned host source) on `stream` (a CopyStream; "
        "None: the current stream); with a stream, first wait for Event `wait` and then record Event `record` "
        "there (None: no wait, no record).");
  m.def("batched_copy", &torchtrt_ext::batched_copy_unlocked, py::arg("dst"), py::arg("src"),
        "Copy src[i] into dst[i] for every pair in ONE kernel launch on the current stream of the destinations' "
        "device: contiguous pairs of one dtype and size, all on one CUDA device (pairs not 16-byte aligned "
        "are a cudaMemcpyAsync each). Every pair is checked before anything is enqueued; no host-device "
        "synchronisation (CUDA-graph capturable); the GIL is released.");
  m.def("current_wait", &torchtrt_ext::current_wait, py::arg("device"), py::arg("event"),
        "The current stream of `device` waits for the Event.");
  m.def("current_record", &torchtrt_ext::current_record, py::arg("device"), py::arg("event"),
        "Record the Event on the current stream of `device`.");
  m.def("built_with_cuda", &torchtrt_ext::built_with_cuda,
        "True when this extension was built against CUDA (streams, events, side streams).");
  m.def(
      "set_input_error",
      [](py::object cls) {
        cls.inc_ref();  // kept for the life of the process
        g_input_error = cls.ptr();
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
  py::class_<torchtrt_ext::LeafCheck>(m, "LeafCheck")
      .def(py::init<std::vector<int64_t>, std::vector<at::Tensor>, std::vector<std::vector<int64_t>>, std::vector<int64_t>>(),
           py::arg("positions"), py::arg("examples"), py::arg("sizes"), py::arg("formats"))
      .def("first_unsure", &torchtrt_ext::LeafCheck::first_unsure, py::arg("flat"),
           "-1 when every checked leaf of the flattened call fits; else the position of the first to check in full.");
  m.def("same_tensors", &torchtrt_ext::same_tensors, py::arg("picked"), py::arg("weights"), py::arg("pointers"),
        "Whether picked[i] is weights[i] with data pointer pointers[i], for every i.");
  py::class_<Runner>(m, "Runner")
      .def(py::init<const std::string&, int64_t, const std::vector<int64_t>&>(), py::arg("device"), py::arg("max_slots"),
           py::arg("written") = std::vector<int64_t>{},
           "written: the inputs (by index) that the engine's code writes in place; CUDA graphs are captured on "
           "them, per address, instead of on copies.")
      .def("run", &Runner::run, py::arg("fn"), py::arg("inputs"),
           "Call fn(inputs, slot) on the caller's current stream (or this thread's side stream when the "
           "caller is on the legacy default stream) and return its result.")
      .def("run_graphed", &Runner::run_graphed, py::arg("fn"), py::arg("inputs"),
           "Like run, but capture fn once per slot and input signature as a CUDA graph and replay it "
           "(inputs copied in, outputs cloned out, without the GIL). fn must return a list of tensors.")
      .def("clear_graphs", &Runner::clear_graphs, "Drop every captured CUDA graph.")
      .def("bind", &Runner::bind, py::arg("callable"), py::arg("arguments"), py::arg("input_positions"),
           py::arg("weights_id") = 0, py::arg("fence") = false, py::arg("track") = false,
           "Call callable(*arguments) with the inputs put at input_positions instead of fn (see runner.h).")
      .def("retire", &Runner::retire,
           "Wait (host, and the current stream) until no call uses the binding the latest bind() replaced.")
      .def_property_readonly("device", &Runner::device)
      .def_property_readonly("slots_created", &Runner::slots_created)
      .def_property_readonly("max_slots", &Runner::max_slots)
      .def_property_readonly("graphs_captured", &Runner::graphs_captured);
}
