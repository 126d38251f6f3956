"""Shared inputs of the native backend's tests (not a test module): random groups, leaf tensors, and
the option sets that reach each row segment and each loss path. Fixtures are in conftest.py."""

import torch

V, D = 257, 60


def random_groups(seed, n_groups=4, vocab=V, max_k=5, max_len=4):
    """Variable K (0 negatives included), candidates of length 1, prompts of 1..8 tokens."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(n_groups):
        P = int(torch.randint(1, 9, (1,), generator=gen))
        K = int(torch.randint(0, max_k + 1, (1,), generator=gen))
        cands = [torch.randint(0, vocab, (int(torch.randint(1, max_len + 1, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(K + 1)]
        groups.append((torch.randint(0, vocab, (P,), generator=gen).tolist(), cands))
    return groups


def leaves(T, dtype=torch.float32, scale=1.0, seed=0, frozen=False):
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(T, D, generator=gen) * scale).to(dtype).requires_grad_(True)
    w = torch.randn(V, D, generator=gen).to(dtype).requires_grad_(not frozen)
    return h, w


def fp64_copies(h, w):
    return h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(w.requires_grad)


def num_tokens(batch):
    return batch.shape[0] * batch.shape[1]


# Row segments of the plain log-prob op: rows kept in the dW-shaped buffer (the first min(rows, D)),
# rows kept in the extra buffer (keep_elements), rows recomputed chunk by chunk; vocabulary blocks.
SEQ_OPTIONS = {
    "defaults": {},
    "recompute-all": dict(keep_elements=0, keep_in_grad=False),
    "recompute-rows-of-1-blocks-of-7": dict(keep_elements=0, keep_in_grad=False, block=7, chunk_rows=1),
    "extra-buffer-only": dict(keep_elements=V * 9, keep_in_grad=False, block=64, chunk_rows=5),
    "all-three-segments": dict(keep_elements=V * 9, block=50, chunk_rows=4),
    "one-block": dict(keep_elements=V * 3, block=10_000, chunk_rows=7),
}


# The S-DPO loss's two paths, named by the `path` option: the plain op's kernels over the whole batch
# (with a trainable weight, at most D rows all kept in the dW-shaped buffer), and the tiled kernel.
LOSS_PATHS = {"rows-in-grad-buffer": {"path": "whole_batch"}, "tiles": {"path": "tiled", "tile_elements": 1 << 23}}
