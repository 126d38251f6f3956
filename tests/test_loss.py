"""S-DPO loss on sequence log-probs, and the torch fused loss, against fp64 references."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdpo_fast
from references import naive_sdpo
from sdpo_fast.loss import fused_sdpo_loss, group_loss_and_grad, sdpo_loss, sdpo_metrics


def rand_logps(G, K, scale=3.0):
    return (
        -torch.rand(G, dtype=torch.float64) * scale,
        -torch.rand(G, K, dtype=torch.float64) * scale,
        -torch.rand(G, dtype=torch.float64) * scale,
        -torch.rand(G, K, dtype=torch.float64) * scale,
    )


@pytest.mark.parametrize("beta", [0.1, 1.0, 2.5])
@pytest.mark.parametrize("K", [1, 3, 15])
def test_matches_paper_formula(beta, K):
    pc, pr, rc, rr = rand_logps(6, K)
    got = sdpo_loss(pc, pr, rc, rr, beta=beta, reduction="none")
    torch.testing.assert_close(got.double(), naive_sdpo(pc, pr, rc, rr, beta), rtol=1e-5, atol=1e-6)


def test_k1_is_dpo_sigmoid_loss():
    pc, pr, rc, rr = rand_logps(8, 1)
    beta = 0.7
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr[:, 0] - rr[:, 0])))
    torch.testing.assert_close(sdpo_loss(pc, pr, rc, rr, beta=beta, reduction="none").double(), dpo, rtol=1e-6, atol=1e-7)


def test_no_overflow_for_huge_reward_gaps():
    G, K = 3, 4
    zeros = torch.zeros(G, K)
    pc = torch.zeros(G)
    # Negatives beat the chosen by 1e4 nats: exp would overflow; the loss is ~ the gap.
    pr = torch.full((G, K), 1e4)
    loss = sdpo_loss(pc, pr, torch.zeros(G), zeros, beta=1.0, reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, torch.full((G,), 1e4 + math.log(K)), rtol=1e-6, atol=1e-2)
    # Chosen far ahead: loss underflows to ~0, gradients stay finite.
    pr = torch.full((G, K), -1e4, requires_grad=True)
    loss = sdpo_loss(pc, pr, torch.zeros(G), zeros, beta=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-30) and torch.isfinite(pr.grad).all()


def test_mask_equals_dropping_negatives():
    pc, pr, rc, rr = rand_logps(4, 5)
    mask = torch.tensor(
        [[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool
    )
    got = sdpo_loss(pc, pr, rc, rr, beta=1.3, rejected_mask=mask, reduction="none")
    torch.testing.assert_close(got.double(), naive_sdpo(pc, pr, rc, rr, 1.3, mask), rtol=1e-5, atol=1e-6)
    # Garbage in masked slots must not leak, not even inf/nan.
    pr2 = pr.masked_fill(~mask, float("nan"))
    got2 = sdpo_loss(pc, pr2, rc, rr, beta=1.3, rejected_mask=mask, reduction="none")
    torch.testing.assert_close(got2, got)
    assert got[3].item() == 0.0


def test_reductions():
    pc, pr, rc, rr = rand_logps(5, 3)
    per = sdpo_loss(pc, pr, rc, rr, reduction="none")
    assert per.shape == (5,)
    torch.testing.assert_close(sdpo_loss(pc, pr, rc, rr, reduction="mean"), per.mean())
    torch.testing.assert_close(sdpo_loss(pc, pr, rc, rr, reduction="sum"), per.sum())
    with pytest.raises(ValueError, match="reduction"):
        sdpo_loss(pc, pr, rc, rr, reduction="max")


def test_gradient_is_closed_form():
    pc, pr, rc, rr = rand_logps(4, 6)
    mask = torch.rand(4, 6) > 0.3
    beta = 0.9
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    sdpo_loss(pc, pr, rc, rr, beta=beta, rejected_mask=mask, reduction="sum").backward()
    s = sdpo_metrics(pc, pr, rc, rr, beta=beta, rejected_mask=mask)["weights"].double()
    torch.testing.assert_close(pr.grad, beta * s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pc.grad, -beta * s.sum(1), rtol=1e-5, atol=1e-7)


def test_metrics():
    pc = torch.tensor([0.0, 0.0])
    pr = torch.tensor([[-1.0, -2.0, 5.0], [-1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    z = torch.zeros(2)
    m = sdpo_metrics(pc, pr, z, torch.zeros(2, 3), beta=2.0, rejected_mask=mask)
    torch.testing.assert_close(m["accuracy"], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(m["chosen_rewards"], torch.zeros(2))
    torch.testing.assert_close(m["reward_margins"], torch.tensor([2.0, -10.0]))
    assert torch.isnan(m["rejected_rewards"][0, 2]) and m["rejected_rewards"][1, 2] == 10.0
    e = torch.exp(torch.tensor([-2.0, -4.0, 10.0]))
    torch.testing.assert_close(m["weights"][1], e / (1 + e.sum()))
    torch.testing.assert_close(m["weights"][0], torch.cat([e[:2] / (1 + e[:2].sum()), torch.zeros(1)]))


def test_shape_errors():
    pc, pr, rc, rr = rand_logps(3, 2)
    with pytest.raises(ValueError, match="rejected_logps"):
        sdpo_loss(pc, pr[0], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        sdpo_loss(pc, pr, rc, rr[:, :1])
    with pytest.raises(ValueError, match="rejected_mask"):
        sdpo_loss(pc, pr, rc, rr, rejected_mask=torch.ones(3, 2))


def test_group_loss_and_grad_matches_autograd():
    G, C = 5, 4
    logps = -torch.rand(G, C, dtype=torch.float64) * 4
    ref = -torch.rand(G, C, dtype=torch.float64) * 4
    mask = torch.rand(G, C) > 0.3
    mask[:, 0] = True
    lens = torch.randint(1, 6, (G, C))
    beta, sft = 0.8, 0.4
    lp = logps.clone().requires_grad_(True)
    expected = sdpo_loss(lp[:, 0], lp[:, 1:], ref[:, 0], ref[:, 1:], beta, mask[:, 1:], reduction="none") - sft * lp[
        :, 0
    ] / lens[:, 0]
    expected.sum().backward()
    loss_g, grad = group_loss_and_grad(logps, ref, mask, lens, beta, sft)
    torch.testing.assert_close(loss_g.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), lp.grad.masked_fill(~mask, 0.0), rtol=1e-5, atol=1e-6)


def _random_groups(gen, n_groups, vocab, max_k=4):
    groups = []
    for _ in range(n_groups):
        P = int(torch.randint(1, 7, (1,), generator=gen))
        K = int(torch.randint(1, max_k + 1, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (P,), generator=gen).tolist()
        cands = [
            torch.randint(0, vocab, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(K + 1)
        ]
        groups.append((prompt, cands))
    return groups


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_torch_backend_matches_materialised_reference(frozen, reduction):
    gen = torch.Generator().manual_seed(3)
    V, D = 257, 60
    batch = sdpo_fast.pack_groups(_random_groups(gen, 4, V), pad_to_multiple_of=8)
    T = batch.shape[0] * batch.shape[1]
    h = torch.randn(T, D, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, generator=gen, requires_grad=not frozen)
    ref = -torch.rand(batch.num_groups, batch.num_candidates, generator=gen) * 5
    beta, sft = 0.6, 0.25

    loss, metrics = fused_sdpo_loss(h, w, batch, ref, beta=beta, sft_weight=sft, reduction=reduction, backend="torch", chunk_rows=5)
    loss.mul(1.7).backward()
    gh, gw = h.grad.clone(), (None if frozen else w.grad.clone())
    h.grad = None
    if not frozen:
        w.grad = None

    logp_tok = (h @ w.T).log_softmax(-1)[batch.logit_rows[batch.target_rows], batch.target_ids]
    lp = torch.zeros(batch.num_groups * batch.num_candidates, dtype=torch.float64)
    lp = lp.index_add(0, batch.target_candidates, logp_tok).view(batch.num_groups, -1)
    m = batch.candidate_mask
    per = sdpo_loss(lp[:, 0], lp[:, 1:], ref[:, 0].double(), ref[:, 1:].double(), beta, m[:, 1:], reduction="none")
    per = per - sft * lp[:, 0] / batch.candidate_lens[:, 0]
    expected = per.mean() if reduction == "mean" else per.sum()
    expected.mul(1.7).backward()

    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["logps"].double(), lp.detach().masked_fill(~m, 0.0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gh, h.grad, rtol=1e-5, atol=1e-6)
    if frozen:
        assert w.grad is None
    else:
        torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)


def test_fused_ref_from_hidden_and_errors():
    gen = torch.Generator().manual_seed(4)
    V, D = 31, 12
    batch = sdpo_fast.pack_groups(_random_groups(gen, 2, V))
    T = batch.shape[0] * batch.shape[1]
    h, ref_h = torch.randn(T, D), torch.randn(T, D)
    w = torch.randn(V, D)
    ref = sdpo_fast.sequence_logprobs(ref_h, w, batch, backend="torch")
    a, _ = fused_sdpo_loss(h, w, batch, ref, backend="torch")
    b, _ = fused_sdpo_loss(h, w, batch, ref_hidden=ref_h, backend="torch")
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="ref_logps"):
        fused_sdpo_loss(h, w, batch, backend="torch")
    with pytest.raises(ValueError, match="reduction"):
        fused_sdpo_loss(h, w, batch, ref, reduction="none", backend="torch")
    with pytest.raises(ValueError, match=r"\[G, C\]"):
        fused_sdpo_loss(h, w, batch, ref[:, :1], backend="torch")
