// WeightWatch: watches where a module keeps its weights, entries (dict, key) of modules'
// _parameters/_buffers. changed() lists the entries whose tensor was replaced (another object in the
// dict), moved to new memory (.data swapped) or written in place (version counter) since accept(); one
// pass in C++, cheap enough to run on every call of the drop-in wrapper. The same in every build.
#pragma once

#include "common.h"

#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <vector>

namespace torchtrt_ext {

namespace py = pybind11;

class TORCHTRT_EXT_HIDDEN WeightWatch {
 public:
  void add(py::dict owner, py::str key);

  std::vector<int64_t> changed() const;

  // Take entry i's current state as the new reference.
  void accept(int64_t i);

  void accept_all();

  size_t size() const { return entries_.size(); }

 private:
  struct Entry {
    py::dict owner;
    py::str key;
    py::object object;
    uint32_t version;
    const void* data;
    bool tensor;  // the object at the snapshot is a tensor; any other object (a submodule) is compared by identity only
  };

  static void snapshot(Entry& e);

  std::vector<Entry> entries_;
};

}  // namespace torchtrt_ext
