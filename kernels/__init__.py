"""Triton kernels, each beside its PyTorch reference and autograd wiring.

Installed as ``harness.kernels`` (see pyproject.toml) so that it never shadows Hugging Face's
top-level ``kernels`` package.
"""
