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
    dropout = dropout if module.training else 0.0
    if dropout > 0 and backend == "auto":
        backend = "torch"  # the kernels implement no attention dropout
    impl = backends.get("attention", backend, query.device)
    out = impl(query, key, value, batch, scaling=scaling, dropout=dropout)
    return out, None


def _group_attention(q, k, v, P, lens, scaling, dropout):
    """One group: q ``[H, n, Dh]``, k/v ``[Hkv, n, Dh]`` (n = P + sum(lens)) -> ``[n, H, Dh]``.

    Prompt tokens: causal attention over the prompt. Candidate tokens: all candidates at once, padded
    to ``[C, m]``, each against [the whole prompt | its own candidate, causally].
    """
    H, _, Dh = q.shape
    Hkv = k.shape[0]
    g = H // Hkv
    (qp, qc), (kp, kc), (vp, vc) = (t.split([P, t.shape[1] - P], dim=1) for t in (q, k, v))
    o_prompt = F.scaled_dot_product_attention(
        qp[None], kp[None], vp[None], is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=g > 1
    )[0].transpose(0, 1)
    C, m = len(lens), max(lens)
    starts = [sum(lens[:j]) for j in range(C)]
    idx = torch.tensor([[o + min(i, n - 1) for i in range(m)] for o, n in zip(starts, lens)], device=q.device)
    valid = torch.arange(m, device=q.device)[None, :] < torch.tensor(lens, device=q.device)[:, None]  # [C, m]
    qc = qc[:, idx].view(Hkv, g, C, m, Dh)
    kc, vc = kc[:, idx], vc[:, idx]  # [Hkv, C, m, Dh]; padding repeats a candidate's last token, masked
    s_prompt = torch.einsum("hgcmd,hpd->hgcmp", qc, kp) * scaling
    s_own = torch.einsum("hgcmd,hcnd->hgcmn", qc, kc) * scaling
    own_mask = torch.ones(m, m, dtype=torch.bool, device=q.device).tril()[None] & valid[:, None, :]  # [C, m, n]
    s_own = s_own.masked_fill(~own_mask, float("-inf"))
    acc = torch.promote_types(q.dtype, torch.float32)  # half inputs: softmax in fp32
    probs = torch.softmax(torch.cat([s_prompt, s_own], dim=-1).to(acc), dim=-1).to(q.dtype)
    if dropout > 0:
        probs = F.dropout(probs, p=dropout)
    o = torch.einsum("hgcmp,hpd->hgcmd", probs[..., :P], vp) + torch.einsum("hgcmn,hcnd->hgcmd", probs[..., P:], vc)
    o_cands = o.reshape(H, C, m, Dh).permute(1, 2, 0, 3)[valid]  # [sum(lens), H, Dh] in packed order
    return torch.cat([o_prompt, o_cands])


def torch_shared_prefix_attention(query, key, value, batch: PackedBatch, scaling: float, dropout: float = 0.0):
    """Reference shared-prefix attention, group by group (work linear in K).

    query ``[R, H, L, Dh]``, key/value ``[R, Hkv, L, Dh]`` -> ``[R, L, H, Dh]``; padding rows are 0.
    Inputs are cut with one ``split`` per row and outputs joined with one ``cat``, so autograd never
    allocates a full-size gradient per group (a slice's backward would).
    """
    R, H, L, Dh = query.shape
    per_row = [[] for _ in range(R)]
    for (row, start, end), layout in zip(batch.group_spans, batch.group_layout):
        per_row[row].append((end - start, layout))
    rows_out = []
    for q, k, v, groups in zip(query.unbind(0), key.unbind(0), value.unbind(0), per_row):
        sizes = [n for n, _ in groups]
        pad = L - sum(sizes)
        chunks = zip(*(t.split(sizes + [pad], dim=1) for t in (q, k, v)))
        outs = [_group_attention(qg, kg, vg, P, lens, scaling, dropout) for (qg, kg, vg), (_, (P, lens)) in zip(chunks, groups)]
        rows_out.append(torch.cat(outs + [query.new_zeros(pad, H, Dh)]))
    return torch.stack(rows_out)


def enable_shared_prefix(model) -> None:
    """Switch ``model`` (a HF ``PreTrainedModel``) to the ``"sdpo_fast"`` attention implementation.

    Idempotent. Ordinary calls keep SDPA behaviour; packed calls get shared-prefix attention.
    """
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
backends.register("attention", "torch", torch_shared_prefix_attention)
