"""Backend registry: which implementation runs a fused op.

Each op (``"logprobs"``: fused linear + log-softmax + gather + per-candidate sum; ``"sdpo_loss"``:
the same plus the loss and its gradients in one op; ``"attention"``: shared-prefix attention) keeps a table ``name -> implementation``. Implementations register
themselves when their module imports; a backend whose requirements are missing (no GPU, no compiled
extension) simply never registers, so ``"auto"`` falls through to the next one.

Names: ``"cublas"`` (library GEMMs + Triton row kernels; log-prob ops only), ``"triton"`` (fully
fused Triton kernels), both on CUDA or on CPU under ``TRITON_INTERPRET=1``; ``"native"`` (the csrc CPU
extension), ``"torch"`` (the readable reference, any device).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch

BACKENDS = ("auto", "cublas", "triton", "native", "torch")
_REGISTRY: dict[str, dict[str, Callable]] = {"logprobs": {}, "sdpo_loss": {}, "attention": {}}

# Modules that register optional backends when they import. A module whose requirements are missing
# (triton not installed, csrc extension not built) raises ImportError and is skipped.
_OPTIONAL_MODULES = (
    "sdpo_fast.kernels.logprobs_cublas",
    "sdpo_fast.kernels.logprobs",
    "sdpo_fast.kernels.attention",
    "sdpo_fast.native",
)
_loaded = False


def _load_optional() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it needs does not
                warnings.warn(f"sdpo_fast: {name} unavailable ({exc}); its backend is skipped", stacklevel=3)
        except ImportError as exc:
            warnings.warn(f"sdpo_fast: {name} unavailable ({exc}); its backend is skipped", stacklevel=3)


# Preference of "auto" per device type; the first registered one wins. On CUDA "cublas" before
# "triton": its GEMMs are cuBLAS's, which the fused Triton GEMMs trail by ~1.7x on an H200
# (benchmarks/results/bench_logprob_h200*.md).
_AUTO_ORDER = {"cuda": ("cublas", "triton", "torch"), "cpu": ("native", "torch")}
_NEEDS_TRITON = ("cublas", "triton")


def register(op: str, name: str, fn: Callable) -> None:
    """Make ``fn`` the ``name`` implementation of ``op``."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops: {sorted(_REGISTRY)}")
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"unknown backend name {name!r}; names: {BACKENDS[1:]}")
    _REGISTRY[op][name] = fn


def available(op: str) -> tuple[str, ...]:
    """Backends registered for ``op``."""
    _load_optional()
    return tuple(_REGISTRY[op])


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on CPU only through its interpreter (tests)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """The backend name to run ``op`` on ``device`` (``"auto"`` picks the fastest registered)."""
    _load_optional()
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    table = _REGISTRY[op]
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("torch",)):
            if name in table and (name not in _NEEDS_TRITON or triton_usable(device)):
                return name
        return "torch"
    if backend not in table:
        raise ValueError(
            f"backend {backend!r} is not available for {op} here (available: {available(op)}); "
            "see the README for what each backend needs"
        )
    if backend in _NEEDS_TRITON and not triton_usable(device):
        raise ValueError(f"backend {backend!r} needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {device}")
    return backend


def get(op: str, backend: str, device: torch.device | str) -> Callable:
    return _REGISTRY[op][resolve(op, backend, device)]
