// What every part of torchtrt_ext.core._C shares: the exception for inputs an engine cannot take, whether
// this build has CUDA, and the message of everything the build without CUDA refuses.
//
// The extension is built from one set of files for both builds (setup.py): runner.cpp, weight_watch.cpp
// and module.cpp always; runner_cuda.cpp, graphs.cpp, copies.cpp and batched_copy.cu with CUDA, or
// cpu_stubs.cpp in their place without it. Only the CUDA files include CUDA headers.
//
// Error messages are built with std::string, never std::ostream (see slots.h).
#pragma once

#include <stdexcept>
#include <string>

// On the classes bound to Python: hidden, like pybind11's own types, which they hold or derive into
// (pybind11::class_<T>); with default visibility GCC warns for each. Nothing outside _C links to them.
#define TORCHTRT_EXT_HIDDEN __attribute__((visibility("hidden")))

namespace torchtrt_ext {

// Thrown for inputs the engine cannot take; module.cpp turns it into torchtrt_ext.errors.InputError.
class BadInput : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// True in the CUDA build (copies.cpp), false in the CPU build (cpu_stubs.cpp).
bool built_with_cuda();

}  // namespace torchtrt_ext
