"""Shared-prefix attention behind ``transformers.AttentionInterface``.

``enable_shared_prefix(model)`` switches a HF model to the ``"sdpo_fast"`` attention implementation.
That implementation behaves exactly like ``"sdpa"`` for ordinary calls (generation, padded batches),
and runs shared-prefix attention when the forward receives the packing metadata as the extra keyword
``sdpo_batch=<PackedBatch>`` (transformers forwards unknown model kwargs to the attention function).

Why a mask function too: transformers would otherwise build a dense ``[R, 1, L, L]`` mask from the
restarting ``position_ids`` (and ``position_ids`` without a mask silently mis-attends). Inside
``packed_forward()`` our mask function returns ``None`` and the attention backend derives the mask from
the batch metadata; outside it, it defers to transformers' SDPA mask.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import backends
from .packing import PackedBatch

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
    impl = backends.get("attention", backend, query.device)
    out = impl(query, key, value, batch, scaling=scaling, dropout=dropout if module.training else 0.0)
    return out, None


def torch_shared_prefix_attention(query, key, value, batch: PackedBatch, scaling: float, dropout: float = 0.0):
    """Reference: per group, causal attention over the prompt, then every candidate token against
    [the whole prompt | its own candidate, causally], all candidates of the group in one batched
    product. Work is linear in K (a dense per-group mask would be quadratic).

    query ``[R, H, L, Dh]``, key/value ``[R, Hkv, L, Dh]`` -> ``[R, L, H, Dh]``; padding rows are 0.
    """
    R, H, L, Dh = query.shape
    Hkv = key.shape[1]
    g = H // Hkv
    out = query.new_zeros(R, L, H, Dh)
    for (row, start, _), (P, lens) in zip(batch.group_spans, batch.group_layout):
        q, k, v = query[row], key[row], value[row]
        prompt = slice(start, start + P)
        out[row, prompt] = F.scaled_dot_product_attention(
            q[None, :, prompt], k[None, :, prompt], v[None, :, prompt],
            is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=g > 1,
        )[0].transpose(0, 1)
        # Candidates padded to [C, m]; idx points at each candidate token (padding repeats the last).
        m = max(lens)
        offsets = [start + P + sum(lens[:j]) for j in range(len(lens))]
        idx = torch.tensor([[o + min(i, n - 1) for i in range(m)] for o, n in zip(offsets, lens)], device=q.device)
        valid = torch.arange(m, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]  # [C, m]
        qc = q[:, idx].view(Hkv, g, len(lens), m, Dh)  # [Hkv, g, C, m, Dh]
        kc, vc = k[:, idx], v[:, idx]  # [Hkv, C, m, Dh]
        kp, vp = k[:, prompt], v[:, prompt]  # [Hkv, P, Dh]
        s_prompt = torch.einsum("hgcmd,hpd->hgcmp", qc, kp) * scaling
        s_own = torch.einsum("hgcmd,hcnd->hgcmn", qc, kc) * scaling
        own_mask = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()[None] & valid[:, None, :]  # [C, m, n]
        s_own = s_own.masked_fill(~own_mask, float("-inf"))
        acc = torch.promote_types(q.dtype, torch.float32)  # half inputs: softmax in fp32
        probs = torch.softmax(torch.cat([s_prompt, s_own], dim=-1).to(acc), dim=-1).to(q.dtype)
        if dropout > 0:
            probs = F.dropout(probs, p=dropout)
        o = torch.einsum("hgcmp,hpd->hgcmd", probs[..., :P], vp) + torch.einsum("hgcmn,hcnd->hgcmd", probs[..., P:], vc)
        o = o.reshape(H, len(lens), m, Dh).permute(1, 2, 0, 3)  # [C, m, H, Dh]
        out[row, idx[valid]] = o[valid]
    return out


def enable_shared_prefix(model) -> None:
    """Switch ``model`` (a HF ``PreTrainedModel``) to the ``"sdpo_fast"`` attention implementation.

    Idempotent. Ordinary calls keep SDPA behaviour; packed calls get shared-prefix attention.
    """
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
backends.register("attention", "torch", torch_shared_prefix_attention)
