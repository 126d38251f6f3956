"""Shared-prefix attention behind ``transformers.AttentionInterface``.

``enable_shared_prefix(model)`` switches a HF model to the ``"sdpo_fast"`` attention implementation.
That implementation behaves exactly like ``"sdpa"`` for ordinary calls (generation, padded batches),
and runs shared-prefix attention when the forward receives the packing metadata as the extra keyword
``sdpo_batch=<PackedBatch>`` (transformers forwards unknown model kwargs to the attention function).

Why a mask function too: transformers would otherwise build a dense ``[R, 1, L, L]`` mask from the
restarting ``position_ids`` (and ``position_ids`` without a mask silently mis-attends). Inside
``packed_forward()`` our mask function returns ``None`` and the attention backend derives the mask from
the batch metadata; outside it, it defers to transformers' SDPA mask. The attention backends
themselves (the torch reference and the Triton kernel) live in ``sdpo_fast/kernels/attention/``.
"""

from __future__ import annotations

import contextlib
import contextvars

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import backends

ATTN_IMPLEMENTATION = "sdpo_fast"
_IN_PACKED_FORWARD = contextvars.ContextVar("sdpo_fast_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward():
    """Within this context, models using ``"sdpo_fast"`` attention build no attention mask."""
    token = _IN_PACKED_FORWARD.set(True)
    try:
        yield
    finally:
        _IN_PACKED_FORWARD.reset(token)


def _mask(*args, **kwargs):
    if _IN_PACKED_FORWARD.get():
        return None
    return sdpa_mask(*args, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dispatch: shared-prefix when ``sdpo_batch`` is given, else plain SDPA.

    query ``[R, H, L, Dh]``, key/value ``[R, Hkv, L, Dh]`` (KV heads not repeated).
    Returns ``([R, L, H, Dh], None)``.
    """
    batch = kwargs.pop("sdpo_batch", None)
    backend = kwargs.pop("sdpo_attention_backend", "auto")
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("shared-prefix attention does not support attention logit soft-capping")
    window = kwargs.get("sliding_window")
    if window is not None and batch.max_span > window:
        raise NotImplementedError(
            f"a group spans {batch.max_span} positions, beyond the model's sliding window of {window}"
        )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    dropout = dropout if module.training else 0.0
    if dropout > 0 and backend == "auto":
        backend = "torch"  # the kernels implement no attention dropout
    impl = backends.get("attention", backend, query.device)
    out = impl(query, key, value, batch, scaling=scaling, dropout=dropout)
    return out, None


def enable_shared_prefix(model) -> None:
    """Switch ``model`` (a HF ``PreTrainedModel``) to the ``"sdpo_fast"`` attention implementation.

    Idempotent. Ordinary calls keep SDPA behaviour; packed calls get shared-prefix attention.
    """
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
