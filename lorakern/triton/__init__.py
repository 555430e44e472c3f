"""Triton kernels: the portable backend. They run on CUDA devices and, under ``TRITON_INTERPRET=1``, on CPU
tensors (which is how CI tests them). One file per op family; :mod:`lorakern.triton.lora` holds the dense ops."""
