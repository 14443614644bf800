"""Everything is in pyproject.toml but the compiled helpers, which cffi builds through
setuptools' ``cffi_modules`` (vexport/native/build.py)."""

from setuptools import setup

setup(cffi_modules=["vexport/native/build.py:ffibuilder"])
