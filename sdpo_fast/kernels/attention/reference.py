"""The ``"torch"`` backend of shared-prefix attention: the readable reference the Triton kernel
(``launch.py``, ``triton.py``) is tested against; same signature as ``triton_shared_prefix_attention``.
Attention rule and layout: ``sdpo_fast.packing`` (a candidate token sees its group's prompt and its own
candidate, causally).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_attention_mask", "torch_shared_prefix_attention"]


def group_attention_mask(candidate_ids: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """Boolean shared-prefix mask of one group from its candidate ids ``[n]`` (-1 = prompt): rows
    ``first_row..n-1`` of the ``[n, n]`` mask (True = may attend). Causal, and a candidate token sees
    the prompt and its own candidate only."""
    idx = torch.arange(candidate_ids.shape[0], device=candidate_ids.device)
    causal = idx[first_row:, None] >= idx[None, :]
    rows = candidate_ids[first_row:, None]
    return causal & ((candidate_ids[None, :] == -1) | (rows == candidate_ids[None, :]))


def _group_attention(q, k, v, candidate_ids, P, lens, scaling, dropout):
    """One group: q ``[H, n, Dh]``, k/v ``[Hkv, n, Dh]``, candidate_ids ``[n]`` (n = P + sum(lens)) ->
    ``[n, H, Dh]``.

    Prompt tokens: causal attention over the prompt. Candidate tokens, all candidates in one call:
    attention over the whole group under the mask ``[sum(lens), n]`` that shows each one the prompt
    and its own candidate, causally. With one candidate the rule is plain causal attention over the
    group. SDPA accumulates half inputs in fp32.
    """
    gqa = q.shape[0] != k.shape[0]
    if len(lens) == 1:
        return F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
        )[0].transpose(0, 1)
    (qp, qc), (kp, _), (vp, _) = (t.split([P, t.shape[1] - P], dim=1) for t in (q, k, v))
    o_prompt = F.scaled_dot_product_attention(
        qp[None], kp[None], vp[None], is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )[0]
    mask = group_attention_mask(candidate_ids, first_row=P)  # [sum(lens), n]
    o_cands = F.scaled_dot_product_attention(
        qc[None], k[None], v[None], attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=gqa
    )[0]
    return torch.cat([o_prompt, o_cands], dim=1).transpose(0, 1)


def torch_shared_prefix_attention(query, key, value, batch, scaling: float, dropout: float = 0.0):
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
    for q, k, v, ids, groups in zip(query.unbind(0), key.unbind(0), value.unbind(0), batch.candidate_ids, per_row):
        sizes = [n for n, _ in groups]
        pad = L - sum(sizes)
        chunks = zip(*(t.split(sizes + [pad], dim=1) for t in (q, k, v)), ids.split(sizes + [pad]))
        outs = [_group_attention(qg, kg, vg, cg, P, lens, scaling, dropout)
                for (qg, kg, vg, cg), (_, (P, lens)) in zip(chunks, groups)]
        rows_out.append(torch.cat(outs + [query.new_zeros(pad, H, Dh)]))
    return torch.stack(rows_out)
