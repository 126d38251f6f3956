"""Triton kernels of sdpo_fast, installed as ``sdpo_fast.kernels``.

Each kernel family has a module with its ``@triton.jit`` kernels and launchers; the readable torch
reference it is tested against lives in ``sdpo_fast`` (e.g. ``sdpo_fast.logprobs``).
"""
