// batched_copy: many same-device tensor copies in one kernel launch (CUDA build only; batched_copy.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace torchtrt_ext {

// Copy src[i] into dst[i] for every i on the current CUDA stream of the destinations' device, in one
// kernel launch (plus one small host-to-device copy of the work table): pairs of contiguous tensors of
// one dtype and number of elements, all on one CUDA device. Every pair is checked before anything is
// enqueued (std::invalid_argument naming the pair and the fault). Zero-byte pairs are skipped; pairs
// whose data pointers are not both 16-byte aligned are copied by a cudaMemcpyAsync each on the same
// stream. No host-device synchronisation: it may be captured in a CUDA graph. Pairs must not overlap.
// Needs no GIL (the Python binding releases it).
void batched_copy(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src);

}  // namespace torchtrt_ext
