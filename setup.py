"""Build script. The Python package installs everywhere; the CUDA extension (lorakern._C, from csrc/) is optional
and arrives with the CUDA-kernels issue: installing never depends on it, and the torch / triton backends work
without it."""

from setuptools import setup

setup()
