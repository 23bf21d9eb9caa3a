// LeafCheck (leaf_check.h).
#include "leaf_check.h"

#include <torch/csrc/autograd/python_variable.h>

#include <stdexcept>

namespace torchtrt_ext {

LeafCheck::LeafCheck(std::vector<int64_t> positions, std::vector<at::Tensor> examples,
                     std::vector<std::vector<int64_t>> sizes, std::vector<int64_t> formats) {
  if (examples.size() != positions.size() || sizes.size() != positions.size() || formats.size() != positions.size()) {
    throw std::invalid_argument("LeafCheck: positions, examples, sizes and formats differ in length");
  }
  static const at::MemoryFormat kFormats[] = {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast,
                                              at::MemoryFormat::ChannelsLast3d};
  leaves_.reserve(positions.size());
  for (size_t i = 0; i < positions.size(); ++i) {
    if (formats[i] < 0 || formats[i] > 2) throw std::invalid_argument("LeafCheck: a memory format code is 0, 1 or 2");
    leaves_.push_back({positions[i], examples[i].scalar_type(), examples[i].device(), std::move(sizes[i]), kFormats[formats[i]]});
  }
}

int64_t LeafCheck::first_unsure(const py::list& flat) const {
  const Py_ssize_t n = PyList_GET_SIZE(flat.ptr());
  for (const Leaf& leaf : leaves_) {
    if (leaf.position >= n) return leaf.position;
    PyObject* item = PyList_GET_ITEM(flat.ptr(), leaf.position);  // borrowed
    if (!THPVariable_Check(item)) return leaf.position;
    const at::Tensor& t = THPVariable_Unpack(item);
    if (!t.defined() || t.scalar_type() != leaf.dtype || t.device() != leaf.device) return leaf.position;
    const c10::IntArrayRef sizes = t.sizes();
    if (sizes.size() != leaf.sizes.size()) return leaf.position;
    for (size_t d = 0; d < sizes.size(); ++d) {
      if (sizes[d] != leaf.sizes[d]) return leaf.position;
    }
    if (!t.is_contiguous(leaf.format)) return leaf.position;
  }
  return -1;
}

bool same_tensors(const py::tuple& picked, const py::tuple& weights, const py::tuple& pointers) {
  const Py_ssize_t n = PyTuple_GET_SIZE(picked.ptr());
  if (PyTuple_GET_SIZE(weights.ptr()) != n || PyTuple_GET_SIZE(pointers.ptr()) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(picked.ptr(), i);  // borrowed
    if (item != PyTuple_GET_ITEM(weights.ptr(), i) || !THPVariable_Check(item)) return false;
    const at::Tensor& t = THPVariable_Unpack(item);
    if (!t.defined() || !t.has_storage()) return false;
    const unsigned long long expected = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(pointers.ptr(), i));
    if (expected == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) != expected) return false;
  }
  return true;
}

}  // namespace torchtrt_ext
