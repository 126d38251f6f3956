"""The ``"torch"`` backend of shared-prefix attention: the readable reference the Triton kernel
(``launch.py``, ``triton.py``) is tested against; same signature as ``triton_shared_prefix_attention``.
Attention rule and layout: ``sdpo_fast.packing`` (a candidate token sees its group's prompt and its own
candidate, causally).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["torch_shared_prefix_attention"]


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
    for q, k, v, groups in zip(query.unbind(0), key.unbind(0), value.unbind(0), per_row):
        sizes = [n for n, _ in groups]
        pad = L - sum(sizes)
        chunks = zip(*(t.split(sizes + [pad], dim=1) for t in (q, k, v)))
        outs = [_group_attention(qg, kg, vg, P, lens, scaling, dropout) for (qg, kg, vg), (_, (P, lens)) in zip(chunks, groups)]
        rows_out.append(torch.cat(outs + [query.new_zeros(pad, H, Dh)]))
    return torch.stack(rows_out)
