"""Build script: the Python package plus the optional C++ extension ``deqkern._C``.

The extension (csrc/spectral.cpp, ATen + pybind11) is built with ninja through
``torch.utils.cpp_extension``. It is optional: with ``DEQKERN_NO_EXT=1``, or when no
source is present, the package installs without it and ``deqkern.spectral`` uses its
pure-torch path (same numbers).
"""

import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc").glob("*.cpp"))


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
        "ext_modules": [ext],
        "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)},
    }


setup(**extension_kwargs())
