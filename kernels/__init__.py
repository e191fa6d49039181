"""Selective-scan kernels: PyTorch reference, chunked CPU path and fused Triton kernels.

Installed as ``mamba_perception_kernels`` (``import mamba_perception_kernels``).
"""
