"""Packaging glue that pyproject.toml cannot express: the optional C++ CPU extension.

The package layout (kernels/ installed as ditflow.kernels) is declared in pyproject.toml. The
extension ``ditflow._C`` (csrc/) is built only when asked, against the torch already installed:

    DITFLOW_BUILD_EXT=1 pip install -e . --no-build-isolation

Without it (the default) nothing is compiled and the CPU path uses the PyTorch reference.
"""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("DITFLOW_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension(
        "ditflow._C", ["csrc/flow_attention_cpu.cpp"],
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
