"""Triton fused log-probs and S-DPO loss (``sdpo_fast/kernels/logprobs/triton.py``) against fp64 torch references.

On CPU the kernels run under ``TRITON_INTERPRET=1`` (set by conftest) with fp32/fp16 and tiny shapes;
the same tests run on CUDA (bf16 too) when a GPU is present. The references are independent of the
kernels' layout: log-probs walk each candidate's tokens on the packed row and take fp64
``log_softmax`` of fully materialised logits; gradients come from fp64 autograd. Tolerances follow the
error of the torch backend in the same dtype (measured in the same test) plus a dtype floor.
"""

import math

import pytest
import torch

import sdpo_fast
from sdpo_fast import backends
from sdpo_fast.loss import fused_sdpo_loss

pytest.importorskip("triton")
lp = pytest.importorskip("sdpo_fast.kernels.logprobs.triton")
from logprob_checks import (  # noqa: E402
    CASES, FLOOR, SMALL, SPLIT, D, V, assert_close_rule, backend_loss, check_fused_loss, check_sequence_logprobs,
    options_for, rel, setup,
)
from references import reference_logps, reference_loss  # noqa: E402

def test_registered():
    assert "triton" in backends.available("logprobs")
    assert "triton" in backends.available("sdpo_loss")


@pytest.mark.parametrize("opts", [SMALL, SPLIT], ids=["one-slice", "split"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_sequence_logprobs_and_grads(device, dtype, opts):
    out, ref = check_sequence_logprobs(device, dtype, "triton", options_for(device, opts))
    # Logits stay fp32 inside the kernels whatever the input dtype: log-probs are fp32-accurate.
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("reuse", [False, True], ids=["recompute", "reuse-logits"])
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
@pytest.mark.parametrize("device,dtype", CASES)
def test_fused_sdpo_loss(device, dtype, sft_weight, reuse):
    """Loss, log-probs and both gradients; the gradient pass either recomputes the logit tiles or
    reads the forward's stored fp32 logits."""
    opts = dict(options_for(device, SPLIT), reuse_logits_bytes=(1 << 30) if reuse else 0)
    check_fused_loss(device, dtype, "triton", opts, sft_weight)


@pytest.mark.parametrize("device,dtype", CASES)
def test_frozen_weight(device, dtype):
    """LoRA: the lm_head is frozen, no dW is computed, dhidden is still right."""
    groups, batch, hidden, weight = setup(device, dtype, seed=5, n_groups=3)
    opts = options_for(device, SMALL)
    G, C = batch.candidate_mask.shape
    ref_logps = torch.zeros(G, C, device=device)
    _, _, dh, dw = backend_loss("triton", hidden, weight, batch, ref_logps, 1.0, 0.0, True, False, **opts)
    assert dw is None

    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_sdpo_loss(h, weight, batch, ref_logps, backend="triton", **opts)
    loss.backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, dh / G)

    h2 = hidden.clone().requires_grad_(True)
    sdpo_fast.sequence_logprobs(h2, weight, batch, backend="triton", **opts).sum().backward()
    h64 = hidden.double().requires_grad_(True)
    reference_logps(h64, weight.double(), groups, batch).sum().backward()
    h3 = hidden.clone().requires_grad_(True)
    sdpo_fast.sequence_logprobs(h3, weight, batch, backend="torch").sum().backward()
    assert_close_rule("dhidden", h2.grad, h64.grad, h3.grad, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
def test_confident_target_cancellation(device, dtype):
    """p(target) ~ 0.999 on a single-target row: dL/dlogit = g (1 - p) must not cancel, and the
    chosen candidate's log-prob (~ -1e-3) must keep its relative precision."""
    groups = [([5, 9, 2], [[7, 11], [3]]), ([4], [[8], [100, 200, 17]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=V).to(device)
    T = batch.shape[0] * batch.shape[1]
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / math.sqrt(D)
    # Row predicting token 11 (2nd token of group 0's chosen candidate) is the hidden state of token 7.
    row = int(batch.group_starts[0]) + 3
    logits = hidden[row] @ weight.T
    others = torch.cat([logits[:11], logits[12:]]).logsumexp(0)
    target_logit = others + math.log(0.999 / 0.001)
    weight[11] += (target_logit - logits[11]) * hidden[row] / hidden[row].pow(2).sum()
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    p = torch.softmax(hidden[row].double() @ weight.double().T, 0)[11].item()
    assert 0.998 < p < 0.9995

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = sdpo_fast.sequence_logprobs(h, w, batch, backend="triton", **options_for(device, SMALL))
    out[0, 0].backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = reference_logps(h64, w64, groups, batch)
    ref[0, 0].backward()
    # The 2nd token's log-prob is ~ -1e-3: relative error of the candidate sum and of the row's gradient.
    assert rel(h.grad[row], h64.grad[row]) < 5 * FLOOR[dtype]
    tok2 = math.log(p)
    assert abs((out[0, 0] - ref[0, 0]).item()) < 0.02 * abs(tok2) + (1e-4 if dtype != torch.float32 else 1e-6)
    # The same gradient from a softmax rounded to the input dtype before (p - 1) is far worse.
    p_low = torch.softmax(hidden[row].double() @ weight.double().T, 0).to(dtype).double()
    p_low = p_low.cpu()
    naive_grad_row = -(p_low - torch.nn.functional.one_hot(torch.tensor(11), V).to(p_low)) @ weight.double().cpu()
    if dtype != torch.float32:
        assert rel(naive_grad_row, h64.grad[row].cpu()) > rel(h.grad[row], h64.grad[row])


@pytest.mark.parametrize("device,dtype", [CASES[0], CASES[2]])
def test_large_vocab_last_partial_tile(device, dtype):
    """V = 151936 (Qwen2): 149 vocabulary tiles, the last one partial; targets in the last tile."""
    Vb, Db = 151936, 16
    groups = [([1, 2], [[Vb - 1, 5], [Vb - 300]]), ([3], [[Vb - 1], [7, Vb - 2], [9]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=Vb).to(device)
    T = batch.shape[0] * batch.shape[1]
    hidden = torch.randn(T, Db, device=device, dtype=dtype)
    weight = torch.randn(Vb, Db, device=device, dtype=dtype) / 2
    opts = dict(block_m=16, block_v=1024, block_d=16, block_t=16)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = sdpo_fast.sequence_logprobs(h, w, batch, backend="triton", **opts)
    upstream = torch.randn(out.shape, device=device)
    (out * upstream).sum().backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = reference_logps(h64, w64, groups, batch)
    (ref * upstream.double()).sum().backward()
    assert rel(out, ref) < 1e-5
    assert rel(h.grad, h64.grad) < 1e-5
    assert rel(w.grad, w64.grad) < 1e-5


@pytest.mark.parametrize("device,dtype", [CASES[1], CASES[4]])
def test_ref_hidden_path_and_rerun(device, dtype):
    """ref_logps computed by the same kernel from ref_hidden; two runs agree (atomic segment sums)."""
    groups, batch, hidden, weight = setup(device, dtype, seed=7, n_groups=3)
    opts = options_for(device, SMALL)
    ref_hidden = hidden + 0.1 * torch.randn_like(hidden)
    loss_a, m_a = fused_sdpo_loss(hidden, weight, batch, ref_hidden=ref_hidden, backend="triton", **opts)
    ref_logps = sdpo_fast.sequence_logprobs(ref_hidden, weight, batch, backend="triton", **opts)
    loss_b, m_b = fused_sdpo_loss(hidden, weight, batch, ref_logps, backend="triton", **opts)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(m_a["logps"], m_b["logps"], rtol=0, atol=1e-5)
    ref64 = reference_logps(ref_hidden, weight, groups, batch)
    loss64 = reference_loss(reference_logps(hidden, weight, groups, batch), ref64, groups, batch, 1.0, 0.0)
    # Log-probs are fp32-accurate given the 16-bit inputs, so the loss is too.
    assert abs(loss_a.item() - loss64.item()) < 1e-4 * max(1.0, abs(loss64.item()))


def test_bad_inputs():
    groups, batch, hidden, weight = setup("cpu", torch.float32, n_groups=2)
    with pytest.raises(ValueError, match="power of two"):
        sdpo_fast.sequence_logprobs(hidden, weight, batch, backend="triton", block_m=24)
    with pytest.raises(ValueError, match="unknown triton option"):
        sdpo_fast.sequence_logprobs(hidden, weight, batch, backend="triton", chunk_rows=4)
    with pytest.raises(ValueError, match="dtype"):
        sdpo_fast.sequence_logprobs(hidden, weight.half(), batch, backend="triton")
    with pytest.raises(ValueError, match=">= 16"):
        sdpo_fast.sequence_logprobs(hidden, weight, batch, backend="triton", block_d=8)


@pytest.mark.gpu
def test_int64_offsets_cuda():
    """weight with more than 2**31 elements: row * D offsets overflow int32."""
    Vb, Db = 151936, 14336  # 2.18e9 elements, 4.4 GB in bf16
    groups = [([1, 2], [[Vb - 1, 5], [Vb - 3]]), ([3], [[Vb - 2], [7]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=Vb).to("cuda")
    T = batch.shape[0] * batch.shape[1]
    hidden = torch.randn(T, Db, device="cuda", dtype=torch.bfloat16) / 8
    weight = (torch.randn(Vb, Db, device="cuda", dtype=torch.bfloat16) / 8)
    w = weight.requires_grad_(True)
    out = sdpo_fast.sequence_logprobs(hidden, w, batch, backend="triton")
    out.sum().backward()
    ids = torch.tensor([Vb - 1, Vb - 2, Vb - 3, 5, 7], device="cuda")
    h32, w_sub = hidden.float(), weight.detach().float()
    ref = reference_logps(h32, w_sub, groups, batch).float()
    assert rel(out, ref) < 2e-2
    # dW rows of the targets, from fp32 logits of the few logit rows.
    rows = batch.logit_rows
    logits = h32[rows] @ w_sub.T
    dl = -torch.softmax(logits, -1) * (batch.row_ptr[1:] - batch.row_ptr[:-1]).float()[:, None]
    dl.index_put_((batch.target_rows, batch.target_ids), torch.ones_like(batch.target_ids, dtype=torch.float32),
                  accumulate=True)
    ref_dw = dl[:, ids].T @ h32[rows]
    assert rel(w.grad[ids], ref_dw) < 2e-2


@pytest.mark.slow  # ahead-of-time compiles for sm_90
def test_kernels_compile_for_hopper():
    """The CUDA default blocks compile for sm_90 (bf16) to wgmma with 16-byte cp.async loads and no
    spills. Uses the ptxas inside the triton wheel (no GPU needed), in a subprocess without the
    interpreter."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("triton wheel without the CUDA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-m", "sdpo_fast.kernels.logprobs.aot", "--check"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    # five kernels of sdpo_fast/kernels/logprobs/triton.py, two row kernels of sdpo_fast/kernels/logprobs/cublas.py
    assert sum(line.startswith("| _") for line in res.stdout.splitlines()) == 7, res.stdout
