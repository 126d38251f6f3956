"""Backend table: which implementation runs a fused op, written out as code.

Ops: ``"logprobs"`` (fused linear + log-softmax + gather + per-candidate sum), ``"sdpo_loss"`` (the
same plus the loss and its gradients in one op; the same backend modules, through the loss driver in
``sdpo_fast.loss``), ``"attention"`` (shared-prefix attention). For each op the table below maps a
backend name to a loader that imports the implementation when it is first asked for: a backend
module of ``sdpo_fast/kernels/logprobs/`` (the contract is in
``sdpo_fast/kernels/logprobs/reference.py``) or an attention function of ``sdpo_fast/kernels/attention/``.
Nothing registers itself at import time. A loader that fails (no
GPU build of triton, no compiled extension) is remembered with its reason, which the error message of
an explicit request repeats; ``"auto"`` then falls through to the next name, with one warning.

Names: ``"cublas"`` (library GEMMs + Triton row kernels; log-prob ops only), ``"triton"`` (fully
fused Triton kernels), both on CUDA or on CPU under ``TRITON_INTERPRET=1``; ``"native"`` (the csrc CPU
extension), ``"torch"`` (the readable reference, any device).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch

BACKENDS = ("auto", "cublas", "triton", "native", "torch")


def _logprobs_torch():
    from .kernels.logprobs import reference

    return reference


def _logprobs_triton():
    from .kernels.logprobs import triton

    return triton


def _logprobs_cublas():
    from .kernels.logprobs import cublas

    return cublas


def _logprobs_native():
    from .kernels.logprobs import native

    return native


def _attention_torch():
    from .kernels.attention.reference import torch_shared_prefix_attention

    return torch_shared_prefix_attention


def _attention_triton():
    from .kernels.attention.launch import triton_shared_prefix_attention

    return triton_shared_prefix_attention


_LOGPROB_BACKENDS = {"cublas": _logprobs_cublas, "triton": _logprobs_triton, "native": _logprobs_native,
                     "torch": _logprobs_torch}
TABLE: dict[str, dict[str, Callable[[], Any]]] = {
    "logprobs": _LOGPROB_BACKENDS,
    "sdpo_loss": _LOGPROB_BACKENDS,
    "attention": {"triton": _attention_triton, "torch": _attention_torch},
}

# Preference of "auto" per device type; the first available one wins. On CUDA "cublas" before
# "triton": its GEMMs are the library's, which the fused Triton GEMMs trail on an H200
# (benchmarks/results/bench_logprob_h200*.md).
AUTO_ORDER = {"cuda": ("cublas", "triton", "torch"), "cpu": ("native", "torch")}
_NEEDS_TRITON = ("cublas", "triton")

_loaded: dict[tuple[str, str], Any] = {}
_unavailable: dict[Callable, str] = {}  # loader -> reason it failed


def _load(op: str, name: str):
    """The implementation of ``op`` by backend ``name``, or None (the reason kept in ``_unavailable``)."""
    key = (op, name)
    if key in _loaded:
        return _loaded[key]
    loader = TABLE[op].get(name)
    if loader is None or loader in _unavailable:
        return None
    try:
        impl = loader()
    except ImportError as exc:
        _unavailable[loader] = str(exc)
        warnings.warn(f"sdpo_fast: the {name} backend is unavailable ({exc}); it is skipped", stacklevel=4)
        return None
    _loaded[key] = impl
    return impl


def unavailable_reason(op: str, name: str) -> str | None:
    """Why backend ``name`` of ``op`` could not be loaded (None if it loaded or was never tried)."""
    loader = TABLE[op].get(name)
    if loader is None:
        return f"{op} has no {name} implementation"
    return _unavailable.get(loader)


def available(op: str) -> tuple[str, ...]:
    """Backends of ``op`` that load here (loads each of them once)."""
    if op not in TABLE:
        raise ValueError(f"unknown op {op!r}; ops: {sorted(TABLE)}")
    return tuple(name for name in TABLE[op] if _load(op, name) is not None)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, and on CPU only through its interpreter (tests)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """The backend name to run ``op`` on ``device`` (``"auto"`` picks the fastest available)."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if name in TABLE[op] and (name not in _NEEDS_TRITON or triton_usable(device)) and _load(op, name):
                return name
        return "torch"
    if _load(op, backend) is None:
        reason = unavailable_reason(op, backend)
        raise ValueError(
            f"backend {backend!r} is not available for {op} here ({reason}; available: {available(op)}); "
            "see the README for what each backend needs"
        )
    if backend in _NEEDS_TRITON and not triton_usable(device):
        raise ValueError(f"backend {backend!r} needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {device}")
    return backend


def implementation(op: str, name: str):
    """The implementation of ``op`` by backend ``name`` (not ``"auto"``), whatever the device: a backend
    module of ``sdpo_fast/kernels/logprobs/`` for the log-prob ops, the attention function for ``"attention"``.
    Raises ValueError with the reason when it cannot be loaded."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {name!r}")
    impl = _load(op, name)
    if impl is None:
        raise ValueError(f"backend {name!r} is not available for {op} here ({unavailable_reason(op, name)})")
    return impl


def get(op: str, backend: str, device: torch.device | str):
    """The implementation of ``op`` that runs on ``device`` for ``backend`` (``"auto"`` resolved)."""
    return _load(op, resolve(op, backend, device))
