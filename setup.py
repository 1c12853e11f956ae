"""Build script: the Python package plus the optional extensions ``deqkern._C`` and
``deqkern._cluster``.

``deqkern._C`` (csrc/spectral.cpp, ATen + pybind11) is built with ninja through
``torch.utils.cpp_extension``. It is optional: with ``DEQKERN_NO_EXT=1``, or when no
source is present, the package installs without it and ``deqkern.spectral`` uses its
pure-torch path (same numbers).

``deqkern._cluster`` (csrc/cuda/: the one-launch cell solve on Hopper thread-block
clusters) is built only where torch is a CUDA build and nvcc is found (``CUDA_HOME``), for
sm_90; ``DEQKERN_NO_CUDA_EXT=1`` skips it. Without it the Triton kernels solve the cell.
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))
CUDA_SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc" / "cuda").glob("*.c[pu]*"))


def cuda_extension() -> list:
    """``deqkern._cluster`` where torch has CUDA and nvcc is there, else nothing."""
    if os.environ.get("DEQKERN_NO_CUDA_EXT") == "1" or not CUDA_SOURCES:
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        return []
    return [CUDAExtension(
        name="deqkern._cluster",
        sources=CUDA_SOURCES,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90"]},
    )]


def extension_kwargs() -> dict:
    if os.environ.get("DEQKERN_NO_EXT") == "1" or not SOURCES:
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension(
        name="deqkern._C",
        sources=SOURCES,
        extra_compile_args=["-O3", "-std=c++17"],
    )
    return {
        "ext_modules": [ext, *cuda_extension()],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(**extension_kwargs())
