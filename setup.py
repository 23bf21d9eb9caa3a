"""Build torchtrt_ext and its C++ runtime (torchtrt_ext.core._C).

torch is not a build dependency: install with ``pip install --no-build-isolation .`` into an
environment that already has torch, so pip does not pull a multi-GB CUDA torch into an isolated build
environment. The runtime is built against CUDA when torch has CUDA (``torch.version.cuda``) and a CUDA
toolkit is found (``CUDA_HOME``); otherwise a CPU build, where execution is synchronous.
Set ``TORCHTRT_EXT_FORCE_CPU=1`` to force the CPU build.
"""

import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - message for people who skip the README
    sys.exit(
        "torchtrt_ext needs torch installed before it is built. Install torch first "
        "(pip install torch), then: pip install --no-build-isolation ."
    )


def _want_cuda() -> bool:
    if os.environ.get("TORCHTRT_EXT_FORCE_CPU") == "1":
        return False
    if torch.version.cuda is None:
        return False
    if CUDA_HOME is None:
        print(
            "torchtrt_ext: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME); "
            "building the CPU runtime, which cannot run CUDA engines",
            file=sys.stderr,
        )
        return False
    return True


def _extension():
    # Both builds compile `sources`; the CUDA build adds `cuda_sources`, the CPU build compiles
    # csrc/cpu_stubs.cpp (the same entry points, refusing CUDA work) in their place.
    sources = ["csrc/module.cpp", "csrc/runner.cpp", "csrc/weight_watch.cpp", "csrc/leaf_check.cpp"]
    cuda_sources = ["csrc/runner_cuda.cpp", "csrc/graphs.cpp", "csrc/copies.cpp", "csrc/batched_copy.cu"]
    depends = ["csrc/common.h", "csrc/copies.h", "csrc/leaf_check.h", "csrc/runner.h", "csrc/slots.h", "csrc/weight_watch.h"]
    cuda_depends = ["csrc/stream_bridge.h", "csrc/graphs.h", "csrc/batched_copy.h"]
    cxx = ["-O3", "-std=c++17"]
    if _want_cuda():
        return CUDAExtension(
            "torchtrt_ext.core._C",
            [*sources, *cuda_sources],
            depends=[*depends, *cuda_depends],
            define_macros=[("TORCHTRT_EXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        )
    return CppExtension(
        "torchtrt_ext.core._C", [*sources, "csrc/cpu_stubs.cpp"], depends=depends, extra_compile_args={"cxx": cxx}
    )


setup(
    name="torchtrt_ext",
    version="0.1.0",
    description="Stream-safe, refittable, weight-streaming inference engines for PyTorch",
    python_requires=">=3.11",
    packages=find_packages(include=["torchtrt_ext", "torchtrt_ext.*"]),
    install_requires=["torch>=2.11", "safetensors>=0.4", "numpy", "tqdm>=4"],  # numpy: torch warns at import without it
    extras_require={"test": ["pytest>=7", "pytest-xdist>=3", "safetensors>=0.4", "numpy", "import-linter>=2", "transformers>=5.17", "peft>=0.13"]},  # safetensors writes through numpy
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    entry_points={
        "torch_dynamo_backends": ["torchtrt_ext = torchtrt_ext.frontends.backend:torchtrt_ext_backend"],
        "console_scripts": ["torchtrt-ext = torchtrt_ext.cli:main"],
    },
)
