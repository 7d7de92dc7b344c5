"""Packaging glue that pyproject.toml cannot express: the optional C++ CPU extension.

The package layout (kernels/ installed as ditflow.kernels) is declared in pyproject.toml.
"""

from setuptools import setup

setup()
