"""The torch shared-prefix attention reference against SDPA with the dense mask, in fp64."""

import pytest
import torch
import torch.nn.functional as F

import sdpo_fast
from sdpo_fast.kernels.attention.reference import torch_shared_prefix_attention


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("rows", [None, 20])
def test_matches_dense_mask_sdpa(heads, kv_heads, rows):
    gen = torch.Generator().manual_seed(heads + (rows or 0))
    groups = []
    for P, lens in [(5, [1, 3, 2]), (1, [4]), (7, [2, 1, 1, 5, 3]), (3, [1, 1])]:
        groups.append((torch.randint(0, 50, (P,), generator=gen).tolist(), [[1] * n for n in lens]))
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=rows, pad_to_multiple_of=8)
    R, L = batch.shape
    Dh = 12
    q = torch.randn(R, heads, L, Dh, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(R, kv_heads, L, Dh, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(R, kv_heads, L, Dh, dtype=torch.float64, generator=gen, requires_grad=True)
    got = torch_shared_prefix_attention(q, k, v, batch, scaling=0.3)
    reps = heads // kv_heads
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1), attn_mask=batch.attention_mask(), scale=0.3
    ).transpose(1, 2)
    real = (batch.group_ids >= 0)[..., None, None]
    torch.testing.assert_close(got, want * real)
    upstream = torch.randn(got.shape, dtype=torch.float64, generator=gen) * real
    grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    grads_want = torch.autograd.grad((want * upstream).sum(), (q, k, v))
    for a, b in zip(grads, grads_want):
        torch.testing.assert_close(a, b)


def _batch_and_qkv(dtype, heads=4, kv_heads=2, Dh=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = [(list(range(1, P + 1)), [[1] * n for n in lens]) for P, lens in [(6, [2, 3, 1]), (2, [5]), (4, [1, 1])]]
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=None, pad_to_multiple_of=8)
    R, L = batch.shape
    q = torch.randn(R, heads, L, Dh, dtype=torch.float64, generator=gen)
    k = torch.randn(R, kv_heads, L, Dh, dtype=torch.float64, generator=gen)
    v = torch.randn(R, kv_heads, L, Dh, dtype=torch.float64, generator=gen)
    return batch, q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_and_single_precision_match_fp64(dtype, atol):
    """Lower precisions against the fp64 dense-mask result (SDPA accumulates half inputs in fp32)."""
    batch, q, k, v = _batch_and_qkv(dtype)
    got = torch_shared_prefix_attention(q, k, v, batch, scaling=0.4)
    assert got.dtype == dtype
    reps = q.shape[1] // k.shape[1]
    want = F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(reps, 1), v.double().repeat_interleave(reps, 1),
        attn_mask=batch.attention_mask(), scale=0.4,
    ).transpose(1, 2) * (batch.group_ids >= 0)[..., None, None]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=0)


def test_dropout_is_unbiased_and_random():
    """Attention dropout: one draw differs from the dropout-free output, the mean of many draws converges
    to it (dropout rescales the kept probabilities by 1 / (1 - p)); padding stays 0."""
    batch, q, k, v = _batch_and_qkv(torch.float64, seed=3)
    exact = torch_shared_prefix_attention(q, k, v, batch, scaling=0.4)
    torch.manual_seed(0)
    draws = torch.stack([torch_shared_prefix_attention(q, k, v, batch, scaling=0.4, dropout=0.3) for _ in range(4000)])
    assert (draws[0] - exact).abs().max() > 0.05
    pad = batch.group_ids < 0
    assert draws[:, pad].abs().max() == 0
    stderr = draws.std(0) / 4000**0.5
    assert ((draws.mean(0) - exact).abs() <= 5 * stderr + 1e-12).all()
