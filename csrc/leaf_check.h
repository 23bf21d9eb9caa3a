// LeafCheck: the part of an input signature's check that runs on every call of the drop-in wrapper,
// in one pass in C++: each tensor leaf of fixed shape has the recorded dtype, device, sizes and dense
// memory format. A decode step passes a KV cache of dozens of tensors; in Python the same checks cost
// about 4 us per tensor. Anything it is unsure of (another type, a size or a format that differs, a
// tensor that is not dense in the recorded format) goes to the Python check, which decides and words
// the mismatch. The same in every build.
#pragma once

#include "common.h"

#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <vector>

namespace torchtrt_ext {

namespace py = pybind11;

class TORCHTRT_EXT_HIDDEN LeafCheck {
 public:
  // positions: where each checked leaf is in the flattened call; examples: a tensor of each leaf's
  // dtype and device (empty); sizes: each leaf's sizes; formats: 0 contiguous, 1 channels_last,
  // 2 channels_last_3d.
  LeafCheck(std::vector<int64_t> positions, std::vector<at::Tensor> examples, std::vector<std::vector<int64_t>> sizes,
            std::vector<int64_t> formats);

  // -1 when every checked leaf fits; else the position of the first leaf that needs the full check.
  int64_t first_unsure(const py::list& flat) const;

 private:
  struct Leaf {
    int64_t position;
    at::ScalarType dtype;
    at::Device device;
    std::vector<int64_t> sizes;
    at::MemoryFormat format;
  };
  std::vector<Leaf> leaves_;
};

// The backend's per-call check that a dynamo graph's weight arguments are the tensors an engine was
// built for, at the same memory: item i of `picked` is item i of `weights` (identity) and its data
// pointer is pointers[i]. False on any difference (or a tensor without memory: the caller's own check
// decides then). About 75 ns per weight in Python; dynamo graphs of a Hugging Face layer pass 16-160.
TORCHTRT_EXT_HIDDEN bool same_tensors(const py::tuple& picked, const py::tuple& weights, const py::tuple& pointers);

}  // namespace torchtrt_ext
