// Standalone check of the runtime core (slots.h, stream_bridge.h) for compute-sanitizer: no Python and
// none of torch's kernels, so it starts in seconds under the sanitizer. It uses c10's streams and
// caching allocator, as the extension does, and kernels of its own.
//
// Threads call a toy "engine" (y = 2x + 1) through the bridge, exactly as runner_cuda.cpp does: a
// producer stream writes x, the caller's stream (a custom stream, or the legacy default stream, where
// the bridge moves execution to a blocking side stream) runs the engine in an execution slot, and a
// consumer stream checks every element of y. Cross-stream use is declared with recordStream, as torch
// asks.
//
//   nvcc ... csrc/selftest.cu -o selftest && compute-sanitizer --tool memcheck ./selftest 4 400
#include "stream_bridge.h"

#include <c10/cuda/CUDACachingAllocator.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>

// libtorch_cuda installs this hook when torch's CUDA initialises; without torch, c10 aborts in
// MaybeSetDevice (used by CUDAGuard) unless someone does. Exported by libc10_cuda, declared nowhere public.
namespace c10::cuda::_internal {
void setHasPrimaryContext(bool (*func)(DeviceIndex));
}

using namespace torchtrt_ext;
using c10::cuda::CUDAStream;

namespace {

constexpr int kN = 1 << 16;

__global__ void produce(float* x, int n, float seed) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = seed + 1e-3f * static_cast<float>(i % 1024);
}

__global__ void engine(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = 2.0f * x[i] + 1.0f;
}

__global__ void verify(const float* y, int n, float seed, int* wrong) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && y[i] != 2.0f * (seed + 1e-3f * static_cast<float>(i % 1024)) + 1.0f) atomicAdd(wrong, 1);
}

c10::DataPtr allocate(size_t bytes, const CUDAStream& stream) {
  c10::cuda::CUDAStreamGuard guard(stream);
  return c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
}

void fence_event(const CUDAStream& before, const CUDAStream& after) {
  Event e;
  e.record(before);
  e.block(after);
}

void worker(int thread, int calls, SlotPool& pool, const std::vector<CUDAStream>& custom, int* wrong) {
  std::mt19937 rng(thread);
  const c10::DeviceIndex device = 0;
  const CUDAStream legacy = c10::cuda::getDefaultCUDAStream(device);
  const int blocks = (kN + 255) / 256;
  for (int call = 0; call < calls; ++call) {
    const CUDAStream& producer = custom[rng() % custom.size()];
    const CUDAStream& consumer = custom[rng() % custom.size()];
    const CUDAStream caller = (rng() % 3 == 0) ? legacy : custom[rng() % custom.size()];
    const float seed = static_cast<float>(rng() % 1000);

    c10::DataPtr x = allocate(kN * sizeof(float), producer);
    produce<<<blocks, 256, 0, producer.stream()>>>(static_cast<float*>(x.get()), kN, seed);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    fence_event(producer, caller);
    c10::cuda::CUDACachingAllocator::recordStream(x, caller);

    c10::DataPtr y;
    {
      c10::cuda::CUDAStreamGuard as_caller(caller);
      const Placement where = place(device);  // what Runner::run does
      std::optional<SlotPool::Grant> grant = pool.try_acquire(where.exec.id());
      if (!grant) grant = pool.acquire(where.exec.id());
      SlotLease lease(pool, grant->slot);
      if (grant->previous_stream != kNoStream && grant->previous_stream != where.exec.id()) {
        fence(CUDAStream::unpack3(grant->previous_stream, device, c10::DeviceType::CUDA), where.exec);
      }
      c10::cuda::CUDAStreamGuard on_exec(where.exec);
      y = allocate(kN * sizeof(float), where.exec);
      engine<<<blocks, 256, 0, where.exec.stream()>>>(static_cast<const float*>(x.get()),
                                                        static_cast<float*>(y.get()), kN);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    fence_event(caller, consumer);
    c10::cuda::CUDACachingAllocator::recordStream(y, consumer);
    verify<<<blocks, 256, 0, consumer.stream()>>>(static_cast<const float*>(y.get()), kN, seed, wrong);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 4;
  const int calls = argc > 2 ? std::atoi(argv[2]) : 400;
  C10_CUDA_CHECK(cudaFree(nullptr));  // create device 0's primary context: the only one this test uses
  c10::cuda::_internal::setHasPrimaryContext([](c10::DeviceIndex device) { return device == 0; });
  c10::cuda::CUDACachingAllocator::init(c10::cuda::device_count());
  c10::cuda::CUDAGuard guard(0);

  std::vector<CUDAStream> custom;
  // Streams of our own, as the runtime's capture streams are.
  for (int i = 0; i < 4; ++i) {
    cudaStream_t raw = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));
    custom.push_back(c10::cuda::getStreamFromExternal(raw, 0));
  }
  SlotPool pool(4);
  std::vector<int*> wrong(threads, nullptr);
  for (int t = 0; t < threads; ++t) {
    C10_CUDA_CHECK(cudaMalloc(&wrong[t], sizeof(int)));
    C10_CUDA_CHECK(cudaMemset(wrong[t], 0, sizeof(int)));
  }
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      try {
        c10::cuda::CUDAGuard device_guard(0);
        worker(t, calls, pool, custom, wrong[t]);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "selftest: thread %d failed: %s\n", t, e.what());
        std::exit(3);
      }
    });
  }
  for (auto& w : workers) w.join();
  C10_CUDA_CHECK(cudaDeviceSynchronize());
  int total = 0;
  for (int t = 0; t < threads; ++t) {
    int host = 0;
    C10_CUDA_CHECK(cudaMemcpy(&host, wrong[t], sizeof(int), cudaMemcpyDeviceToHost));
    total += host;
    C10_CUDA_CHECK(cudaFree(wrong[t]));
  }
  std::printf("selftest: %d threads x %d calls, %lld slots, %d wrong elements\n", threads, calls,
              static_cast<long long>(pool.size()), total);
  return total == 0 ? 0 : 1;
}
