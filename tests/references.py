"""The fp64 (or plain-model) naive references the tests compare against. Independent of the kernels'
layout: log-probs walk each candidate's tokens on the packed row over fully materialised logits,
the loss is the paper's formula group by group, attention uses a dense mask, and model-level
log-probs run every candidate with its own copy of the prompt through the unmodified model.
Every test module imports its references from here (no test module imports another)."""

import math

import torch
import torch.nn.functional as F

from sdpo_fast.loss import sdpo_loss


def reference_logps(hidden, weight, groups, batch):
    """``[G, C]`` fp64: per candidate, walk its tokens on the packed row and sum fp64 log-softmax of full
    logits (the prompt's last token predicts every candidate's first). Differentiable."""
    logp = (hidden.double() @ weight.double().T).log_softmax(-1)
    zero = torch.zeros((), dtype=torch.float64, device=hidden.device)
    out = [[zero] * batch.num_candidates for _ in groups]
    for gi, (prompt, cands) in enumerate(groups):
        start = int(batch.group_starts[gi])
        pos = start + len(prompt)
        for j, c in enumerate(cands):
            prev = start + len(prompt) - 1
            for i, tok in enumerate(c):
                out[gi][j] = out[gi][j] + logp[prev, tok]
                prev = pos + i
            pos += len(c)
    return torch.stack([torch.stack(row) for row in out])


def reference_loss(logps, ref_logps, groups, batch, beta, sft_weight):
    """Mean over groups of the S-DPO loss plus ``sft_weight`` times the chosen candidate's mean NLL."""
    mask = batch.candidate_mask
    per_group = sdpo_loss(logps[:, 0], logps[:, 1:], ref_logps[:, 0], ref_logps[:, 1:], beta, mask[:, 1:], "none")
    len_w = torch.tensor([len(c[0]) for _, c in groups], dtype=torch.float64, device=logps.device)
    return (per_group - sft_weight * logps[:, 0] / len_w).mean()


def naive_loss(logps, ref, batch, beta, sft_weight):
    """``reference_loss`` from the batch's own candidate lengths: S-DPO mean plus the SFT mean."""
    mask = batch.candidate_mask
    loss = sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=beta, rejected_mask=mask[:, 1:])
    return loss + sft_weight * (-logps[:, 0] / batch.candidate_lens[:, 0]).mean()


def naive_sdpo(pc, pr, rc, rr, beta, mask=None):
    """The paper's formula with a per-group Python loop in fp64: -log sigmoid(-log sum_j exp(...))."""
    out = []
    for g in range(pc.shape[0]):
        terms = [
            math.exp(beta * ((pr[g, j] - rr[g, j]) - (pc[g] - rc[g])).item())
            for j in range(pr.shape[1])
            if mask is None or mask[g, j]
        ]
        x = -math.log(sum(terms)) if terms else math.inf
        out.append(-math.log(1.0 / (1.0 + math.exp(-x))) if terms else 0.0)
    return torch.tensor(out, dtype=torch.float64)


def naive_model_logprobs(model, groups, C, device="cpu"):
    """``[G, C]``: each candidate with its own copy of the prompt through the unmodified model, full
    logits, log_softmax, summed over the candidate's tokens. Differentiable."""
    rows = [[torch.zeros((), device=device)] * C for _ in groups]
    for gi, (prompt, cands) in enumerate(groups):
        for j, c in enumerate(cands):
            logits = model(torch.tensor([prompt + c], device=device)).logits[0].float()
            lp = logits.log_softmax(-1)[len(prompt) - 1 : len(prompt) - 1 + len(c)]
            rows[gi][j] = lp.gather(1, torch.tensor(c, device=device)[:, None]).sum()
    return torch.stack([torch.stack(r) for r in rows])


def dense_attention(q, k, v, batch, scaling, dtype=torch.float64):
    """Dense-mask SDPA in ``dtype``; output [R, L, H, Dh] zeroed at padding; grads flow to the inputs."""
    mask = batch.attention_mask()
    o = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask, scale=scaling,
                                       enable_gqa=q.shape[1] != k.shape[1])
    real = (batch.group_ids >= 0)[:, :, None, None]
    return o.transpose(1, 2) * real


def _neg_log_sigmoid(x):
    return -F.logsigmoid(x)


def naive_family(pc, pr, rc, rr, beta, mask, loss_type):
    """``[G]`` fp64 loss of each multi-negative ``loss_type`` by its direct formula, group by group over
    the real negatives (``mask`` ``[G, K]`` bool, None = all), differentiable in the policy log-probs.

    sdpo: -log sigmoid(-log sum_j exp(beta (r_j - r_w))); dmpo: -log sigmoid(beta r_w - beta/K sum_j r_j);
    dpo_pairs: 1/K sum_j -log sigmoid(beta (r_w - r_j)); dynamic (DynamicPO): boundary set B = {j: p_j >=
    p_w} (p: policy log-probs; else the top-scored negatives), D the other real negatives (else B), m the
    mean p over D, beta_j = beta (1 + tanh((d1 - d2 - 6) / (|d1| + |d2|)) / 2) with d1 = p_w - p_j,
    d2 = p_j - m, as plain floats (no gradient), loss -log sigmoid(1/|B| sum_{j in B} beta_j (r_w - r_j)).
    A group without real negatives gives 0."""
    G, K = pr.shape
    out = []
    for g in range(G):
        real = [j for j in range(K) if mask is None or bool(mask[g, j])]
        if not real:
            out.append(torch.zeros((), dtype=torch.float64, device=pc.device))
            continue
        r_w = pc[g].double() - rc[g].double()
        r = {j: pr[g, j].double() - rr[g, j].double() for j in real}
        if loss_type == "sdpo":
            x = -torch.log(sum(torch.exp(beta * (r[j] - r_w)) for j in real))
            out.append(_neg_log_sigmoid(x))
        elif loss_type == "dmpo":
            out.append(_neg_log_sigmoid(beta * r_w - beta / len(real) * sum(r[j] for j in real)))
        elif loss_type == "dpo_pairs":
            out.append(sum(_neg_log_sigmoid(beta * (r_w - r[j])) for j in real) / len(real))
        elif loss_type == "dynamic":
            p_w = float(pc[g].detach())
            p = {j: float(pr[g, j].detach()) for j in real}
            boundary = [j for j in real if p[j] >= p_w] or [j for j in real if p[j] == max(p.values())]
            rest = [j for j in real if j not in boundary] or boundary
            m = sum(p[j] for j in rest) / len(rest)
            betas = {}
            for j in boundary:
                d1, d2 = p_w - p[j], p[j] - m
                den = abs(d1) + abs(d2)
                betas[j] = beta * (1 + 0.5 * (math.tanh((d1 - d2 - 6.0) / den) if den > 0 else -1.0))
            out.append(_neg_log_sigmoid(sum(betas[j] * (r_w - r[j]) for j in boundary) / len(boundary)))
        else:
            raise ValueError(loss_type)
    return torch.stack(out)


def naive_family_loss(logps, ref, batch, beta, sft_weight, loss_type):
    """``naive_family`` mean over groups plus ``sft_weight`` times the chosen candidate's mean NLL (fp64)."""
    mask = batch.candidate_mask
    per = naive_family(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta, mask[:, 1:], loss_type)
    return (per - sft_weight * logps[:, 0].double() / batch.candidate_lens[:, 0].double()).mean()


@torch.no_grad()
def naive_item_scores(model, prompt, items):
    """``[len(items)]`` fp64: each item (token ids ending with EOS) after its own copy of ``prompt``
    through the unmodified model, one plain forward per item, log-softmax in fp64, summed."""
    out = []
    for c in items:
        logp = model(torch.tensor([list(prompt) + list(c)])).logits[0].double().log_softmax(-1)
        out.append(sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c)))
    return torch.tensor(out, dtype=torch.float64)


@torch.no_grad()
def naive_constrained_greedy(model, prompt, candidates):
    """Index of the candidate (token ids ending with EOS) that greedy decoding picks when each step
    may only continue a candidate: a plain loop, the whole sequence through the model each step (no
    cache, no padding), the allowed tokens found by scanning the candidates."""
    gen = []
    while True:
        allowed = sorted({c[len(gen)] for c in candidates if len(c) > len(gen) and list(c[: len(gen)]) == gen})
        logits = model(torch.tensor([list(prompt) + gen])).logits[0, -1].double()
        gen.append(max(allowed, key=lambda t: logits[t].item()))
        done = [j for j, c in enumerate(candidates) if list(c) == gen]
        if done:
            return done[0]
