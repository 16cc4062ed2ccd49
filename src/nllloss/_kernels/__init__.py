"""The engines' kernels: ``cpu`` (numba, for NumPy arrays and zero-copy views of CPU
tensors) and ``triton`` (Triton, for CUDA tensors). Each declares the problems it supports
(``supports``); the routes (``nllloss._routes``) hand it only those.
"""
