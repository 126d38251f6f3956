"""Shared cases and checks of the Triton and cuBLAS log-prob backends' tests (not a test module):
the device/dtype cases, the tolerance rule (within 2x the torch backend's own error in the same dtype
plus a dtype floor) and the two checks against the fp64 references of ``references.py``."""

import math

import pytest
import torch

import sdpo_fast
from references import reference_logps, reference_loss
from sdpo_fast import backends
from sdpo_fast.logprobs import backend_options
from sdpo_fast.loss import GroupLoss, fused_sdpo_loss, loss_and_grads

V, D = 257, 60
# Small tiles so that the tiny shapes still span several row blocks, vocabulary tiles and D steps.
SMALL = dict(block_m=16, block_v=64, block_d=32, block_t=16)
# Split the forward over 2 vocabulary ranges and the gradient pass over 3 slices (128 + 128 + 1).
SPLIT = dict(SMALL, v_splits=2, slice_cols=128)

CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]
# Relative (norm) error allowed on top of twice the torch backend's own error in the same dtype.
FLOOR = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_groups(seed, n_groups=4, vocab=V):
    """Random groups: prompts of 1..6 tokens, 0..4 negatives, candidates of 1..3 tokens (at least one of
    length 1, one group with 4 negatives)."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for gi in range(n_groups):
        P = int(torch.randint(1, 7, (1,), generator=gen))
        K = 4 if gi == 0 else int(torch.randint(0, 5, (1,), generator=gen))
        prompt = torch.randint(0, vocab, (P,), generator=gen).tolist()
        lens = [1 if (gi == 0 and j == 0) else int(torch.randint(1, 4, (1,), generator=gen)) for j in range(K + 1)]
        groups.append((prompt, [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens]))
    return groups


def rel(got, ref):
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def assert_close_rule(name, got, ref, torch_got, dtype):
    """``got`` within 2x the torch backend's error (same dtype, same inputs) plus the dtype floor."""
    e, e_torch = rel(got, ref), rel(torch_got, ref)
    assert e <= 2 * e_torch + FLOOR[dtype], f"{name}: rel error {e:.2e} vs torch backend {e_torch:.2e}"


def setup(device, dtype, seed=0, n_groups=4, scale=1.0, **pack):
    groups = make_groups(seed, n_groups)
    batch = sdpo_fast.pack_groups(groups, vocab_size=V, **pack).to(device)
    T = batch.shape[0] * batch.shape[1]
    gen = torch.Generator().manual_seed(seed + 1)
    hidden = (torch.randn(T, D, generator=gen) * scale).to(device, dtype)
    weight = (torch.randn(V, D, generator=gen) / math.sqrt(D) * 3).to(device, dtype)
    return groups, batch, hidden, weight


def grads_of(fn, hidden, weight, need_w=True):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(need_w)
    out = fn(h, w)
    return out, h, w


def options_for(device, opts):
    """CPU: the given small tiles. CUDA: the production defaults for SMALL, else the small tiles."""
    if device == "cpu":
        return opts
    return {} if opts is SMALL else {**opts, "num_stages": 2}


def check_sequence_logprobs(device, dtype, backend, kw):
    """``backend`` (options ``kw``) vs fp64 on random groups packed into rows of 48: log-probs, dhidden
    and dweight within the rule; exact zeros off the logit rows. Returns the backend's log-probs and
    the fp64 reference."""
    groups, batch, hidden, weight = setup(device, dtype, pad_to_multiple_of=8, max_tokens_per_row=48)
    upstream = torch.randn(batch.candidate_mask.shape, device=device)
    results = {}
    for name, opts in ((backend, kw), ("torch", {})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = sdpo_fast.sequence_logprobs(h, w, batch, backend=name, **opts)
        (out * upstream).sum().backward()
        results[name] = (out, h.grad, w.grad)
    out, dh, dw = results[backend]
    assert out.dtype == torch.float32 and out.shape == batch.candidate_mask.shape
    assert dh.dtype == dtype and dw.dtype == dtype

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = reference_logps(h64, w64, groups, batch)
    (ref * upstream.double()).sum().backward()
    assert (out[~batch.candidate_mask] == 0).all()
    for name, got, r, t in zip(("logps", "dhidden", "dweight"), results[backend], (ref.detach(), h64.grad, w64.grad),
                               results["torch"]):
        assert torch.isfinite(got).all(), name
        assert_close_rule(name, got, r, t, dtype)
    others = torch.ones(dh.shape[0], dtype=torch.bool, device=device)
    others[batch.logit_rows] = False
    assert (dh[others] == 0).all()  # prompt bodies and padding get exactly zero gradient
    return out, ref.detach()


def check_fused_loss(device, dtype, backend, kw, sft_weight, seed=3, n_groups=5):
    """``fused_sdpo_loss`` through ``backend`` (options ``kw``) vs fp64 autograd: loss, log-probs and
    both gradients within the rule (backward scaled by 3: it only scales the forward's gradients).
    Returns the groups used."""
    groups, batch, hidden, weight = setup(device, dtype, seed=seed, n_groups=n_groups)
    beta = 0.7
    G, C = batch.candidate_mask.shape
    ref_logps = (reference_logps(hidden, weight, groups, batch) + torch.randn(G, C, device=device)).float()
    ref_logps = ref_logps * batch.candidate_mask
    results = {}
    for name, opts in ((backend, kw), ("torch", {})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss, metrics = fused_sdpo_loss(h, w, batch, ref_logps, beta=beta, sft_weight=sft_weight, backend=name, **opts)
        (loss * 3.0).backward()
        results[name] = (loss, metrics["logps"], h.grad, w.grad)

    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    logps64 = reference_logps(h64, w64, groups, batch)
    loss64 = reference_loss(logps64, ref_logps.double(), groups, batch, beta, sft_weight)
    (loss64 * 3.0).backward()
    refs = (loss64.detach(), logps64.detach(), h64.grad, w64.grad)
    for name, got, r, t in zip(("loss", "logps", "dhidden", "dweight"), results[backend], refs, results["torch"]):
        assert torch.isfinite(got).all(), name
        assert_close_rule(name, got, r, t, dtype)
    return groups


def backend_loss(backend, hidden, weight, batch, ref_logps, beta, sft_weight, need_h, need_w, **options):
    """The loss driver on ``backend`` with explicit gradient flags: ``(loss_g, logps, dh, dw)``."""
    impl = backends.get("sdpo_loss", backend, hidden.device)
    opts = backend_options("sdpo_loss", backend, hidden.device, options)
    loss = GroupLoss(ref_logps, batch.candidate_mask, batch.candidate_lens, beta, sft_weight)
    with torch.no_grad():
        return loss_and_grads(impl, hidden, weight, batch, loss, need_h, need_w, opts)
