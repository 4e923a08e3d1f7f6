"""Build entry point. Metadata lives in pyproject.toml.

The optional C++/CUDA extension (csrc/) will be built from here once it exists, switched by
environment variables; until then this only delegates to setuptools.
"""

from setuptools import setup

setup()
