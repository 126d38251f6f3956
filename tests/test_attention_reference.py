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
