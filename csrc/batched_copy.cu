// batched_copy: every (dst, src) pair of same-device CUDA tensors copied by ONE kernel launch.
//
// Refit from CUDA tensors copies ~200 weights; one launch per copy makes it launch-bound (host time ~
// total time). Here the host builds a work table, one entry per pair (destination, source, bytes, the
// pair's first tile), in pinned host memory, copies it to the device on the current stream (torch's
// caching host allocator keeps the pinned block until that copy is done) and launches one grid of
// tiles: a tile is 64 KiB of one pair. Each block finds its pair by a binary search over the first
// tiles, then copies its tile with 16-byte loads, kUnroll of them in flight per thread before the
// stores, and the bytes past the last 16-byte boundary of a pair one by one. Pairs whose pointers are
// not both 16-byte aligned (views at odd offsets) are a cudaMemcpyAsync each on the same stream.
// Nothing synchronises the host with the device, so a CUDA graph may capture it.

#include "batched_copy.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace torchtrt_ext {
namespace {

constexpr int kThreads = 256;              // threads per block
constexpr int kVecBytes = 16;              // one uint4
constexpr int kUnroll = 8;                 // 16-byte loads in flight per thread before its stores
constexpr int64_t kTileBytes = 64 << 10;   // bytes per block
static_assert(kTileBytes % (int64_t{kVecBytes} * kThreads * kUnroll) == 0, "a full tile is whole unrolled steps");
static_assert(sizeof(uint4) == kVecBytes, "uint4 is 16 bytes");

// One pair in the work table (four int64 values in the table tensor).
struct alignas(16) Work {
  int64_t dst;         // destination address
  int64_t src;         // source address
  int64_t bytes;       // > 0
  int64_t first_tile;  // tiles of the pairs before this one
};
static_assert(sizeof(Work) == 4 * sizeof(int64_t), "Work is four int64 values");

// At most 64 registers (4 blocks of 256 per SM): 8 x 16 bytes in flight per thread, no spills.
__global__ void __launch_bounds__(kThreads, 4) batched_copy_kernel(const Work* __restrict__ table, int pairs) {
  const int64_t tile = static_cast<int64_t>(blockIdx.x);
  // This tile's pair: the last entry whose first tile is <= tile (first tiles strictly increase, as
  // every entry has at least one byte). Every thread of the block reads the same entries (a broadcast).
  int lo = 0;
  int hi = pairs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (__ldg(&table[mid].first_tile) <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t dst_address = __ldg(&table[lo].dst);
  const int64_t src_address = __ldg(&table[lo].src);
  const int64_t bytes = __ldg(&table[lo].bytes);
  const int64_t start = (tile - __ldg(&table[lo].first_tile)) * kTileBytes;
  const int64_t left = bytes - start;
  const int len = static_cast<int>(left < kTileBytes ? left : kTileBytes);  // 1 .. kTileBytes

  char* __restrict__ d = reinterpret_cast<char*>(dst_address) + start;
  const char* __restrict__ s = reinterpret_cast<const char*>(src_address) + start;
  // Both are global memory (the compiler cannot see it through the table): plain STG stores, not
  // generic ones.
  __builtin_assume(__isGlobal(d));
  __builtin_assume(__isGlobal(s));
  uint4* __restrict__ vd = reinterpret_cast<uint4*>(d);  // 16-byte aligned: the base is, start is 64 KiB steps
  const uint4* __restrict__ vs = reinterpret_cast<const uint4*>(s);

  // The 16-byte body: kUnroll loads in flight per thread, then their stores (a full tile is two such
  // steps of the block). The loops are kept rolled so that ptxas keeps that shape without spilling.
  const int vecs = len / kVecBytes;
  int i = static_cast<int>(threadIdx.x);
#pragma unroll 1
  for (; i + (kUnroll - 1) * kThreads < vecs; i += kUnroll * kThreads) {
    uint4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = __ldg(vs + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) vd[i + u * kThreads] = r[u];
  }
#pragma unroll 1
  for (; i < vecs; i += kThreads) vd[i] = __ldg(vs + i);
  // The last tile's bytes past the pair's last 16-byte boundary (fewer than 16).
#pragma unroll 1
  for (int b = vecs * kVecBytes + static_cast<int>(threadIdx.x); b < len; b += kThreads) d[b] = __ldg(s + b);
}

std::string pair_error(size_t i, const std::string& fault) {
  return "batched_copy: pair " + std::to_string(i) + " " + fault;
}

// Every pair checked before anything is enqueued.
void check_pairs(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  if (dst.size() != src.size()) {
    throw std::invalid_argument("batched_copy: dst and src differ in length (" + std::to_string(dst.size()) +
                                " and " + std::to_string(src.size()) + " tensors)");
  }
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    if (!d.defined() || !s.defined()) throw std::invalid_argument(pair_error(i, "holds an undefined tensor"));
    if (!d.is_cuda()) {
      throw std::invalid_argument(pair_error(i, "has its destination on " + d.device().str() + ", not on a CUDA device"));
    }
    if (s.device() != d.device()) {
      throw std::invalid_argument(pair_error(i, "has its source on " + s.device().str() + " and its destination on " +
                                                    d.device().str() + ": both must be on the same CUDA device"));
    }
    if (d.device() != dst[0].device()) {
      throw std::invalid_argument(pair_error(i, "is on " + d.device().str() + " and pair 0 on " +
                                                    dst[0].device().str() + ": one call copies on one device"));
    }
    if (d.scalar_type() != s.scalar_type()) {
      throw std::invalid_argument(pair_error(i, std::string("has dtypes that differ (destination ") +
                                                    c10::toString(d.scalar_type()) + ", source " +
                                                    c10::toString(s.scalar_type()) + ")"));
    }
    if (d.numel() != s.numel()) {
      throw std::invalid_argument(pair_error(i, "has sizes that differ (" + std::to_string(d.numel()) +
                                                    " elements in the destination, " + std::to_string(s.numel()) +
                                                    " in the source)"));
    }
    if (!d.is_contiguous()) throw std::invalid_argument(pair_error(i, "has a destination that is not contiguous"));
    if (!s.is_contiguous()) throw std::invalid_argument(pair_error(i, "has a source that is not contiguous"));
    if (d.is_conj() || s.is_conj() || d.is_neg() || s.is_neg()) {
      throw std::invalid_argument(pair_error(i, "has a tensor with its conjugate or negative bit set (resolve it first)"));
    }
  }
}

}  // namespace

void batched_copy(const std::vector<at::Tensor>& dst, const std::vector<at::Tensor>& src) {
  check_pairs(dst, src);
  if (dst.empty()) return;
  const c10::Device device = dst[0].device();
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Which pairs the kernel takes (both pointers 16-byte aligned, at least one byte) and how many tiles;
  // the others are a cudaMemcpyAsync each. A pair whose source is its destination needs nothing.
  struct Pair {
    void* dst;
    const void* src;
    int64_t bytes;
  };
  std::vector<Pair> kernel_pairs;
  std::vector<Pair> memcpy_pairs;
  kernel_pairs.reserve(dst.size());
  int64_t tiles = 0;
  for (size_t i = 0; i < dst.size(); ++i) {
    const Pair pair{dst[i].mutable_data_ptr(), src[i].const_data_ptr(), static_cast<int64_t>(dst[i].nbytes())};
    if (pair.bytes == 0 || pair.dst == pair.src) continue;
    if (((reinterpret_cast<uintptr_t>(pair.dst) | reinterpret_cast<uintptr_t>(pair.src)) % kVecBytes) == 0) {
      kernel_pairs.push_back(pair);
      tiles += (pair.bytes + kTileBytes - 1) / kTileBytes;
    } else {
      memcpy_pairs.push_back(pair);
    }
  }
  if (tiles > std::numeric_limits<int32_t>::max()) {  // the grid's x limit (2^31 - 1 tiles: 128 TiB)
    throw std::invalid_argument("batched_copy: " + std::to_string(tiles) + " tiles of 64 KiB is more than one launch takes");
  }

  // The work table, filled in pinned host memory and copied to the device on the stream (allocated
  // before anything is enqueued, so a failure here leaves nothing half done).
  at::Tensor table;
  if (!kernel_pairs.empty()) {
    const int64_t n = static_cast<int64_t>(kernel_pairs.size());
    at::Tensor host = at::empty({n * 4}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.mutable_data_ptr<int64_t>();
    int64_t first = 0;
    for (int64_t k = 0; k < n; ++k) {
      const Pair& pair = kernel_pairs[static_cast<size_t>(k)];
      h[4 * k + 0] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(pair.dst));
      h[4 * k + 1] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(pair.src));
      h[4 * k + 2] = pair.bytes;
      h[4 * k + 3] = first;
      first += (pair.bytes + kTileBytes - 1) / kTileBytes;
    }
    // Asynchronous (pinned source) on the current stream of `device`; the host allocator records an
    // event there and reuses the block only once the copy is done.
    table = host.to(at::TensorOptions().device(device), /*non_blocking=*/true);
  }

  for (const Pair& pair : memcpy_pairs) {
    C10_CUDA_CHECK(cudaMemcpyAsync(pair.dst, pair.src, static_cast<size_t>(pair.bytes), cudaMemcpyDeviceToDevice, stream));
  }
  if (!kernel_pairs.empty()) {
    const auto* work = reinterpret_cast<const Work*>(table.const_data_ptr<int64_t>());
    batched_copy_kernel<<<static_cast<unsigned int>(tiles), kThreads, 0, stream>>>(
        work, static_cast<int>(kernel_pairs.size()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace torchtrt_ext
