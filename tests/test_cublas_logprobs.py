"""``"cublas"`` backend (``sdpo_fast/kernels/logprobs/cublas.py``: library GEMMs + Triton row kernels) against
fp64 references.

On CPU the GEMMs are torch's and the row kernels run under ``TRITON_INTERPRET=1``; on CUDA the same
tests run with cuBLAS (bf16 too). References and tolerances are those of ``logprob_checks``:
fp64 log-softmax of materialised logits walked per candidate, fp64 autograd, and an error within 2x
the torch backend's own error in the same dtype plus a dtype floor.
"""

import math

import pytest
import torch

import sdpo_fast
from sdpo_fast import backends
from sdpo_fast.loss import fused_sdpo_loss

pytest.importorskip("triton")
cb = pytest.importorskip("sdpo_fast.kernels.logprobs.cublas")
from logprob_checks import (  # noqa: E402
    CASES, FLOOR, V, assert_close_rule, backend_loss, check_fused_loss, check_sequence_logprobs, rel, setup,
)
from references import reference_logps  # noqa: E402


def test_registered_and_preferred_on_cuda():
    assert "cublas" in backends.available("logprobs") and "cublas" in backends.available("sdpo_loss")
    assert backends.resolve("sdpo_loss", "auto", "cuda") == "cublas"
    assert backends.resolve("logprobs", "auto", "cuda") == "cublas"
    assert backends.resolve("attention", "auto", "cuda") == "triton"  # no cublas attention


@pytest.mark.parametrize("max_rows", [1, 3, 7, 1000])
@pytest.mark.parametrize("whole_groups", [False, True])
def test_plan_covers_rows_and_targets_once(max_rows, whole_groups):
    """Every logit row and target in exactly one chunk, each chunk's targets on its own rows, whole
    groups when asked (or None when a group is longer than a chunk)."""
    groups = [([1, 2, 3], [[4, 5, 6, 7], [8], [9, 10]]), ([11], [[12]]), ([13, 14], [[15, 16], [17, 18, 19]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=32, max_tokens_per_row=20)
    chunks = cb.plan_chunks(batch, max_rows, whole_groups)
    rows_per_group = [1 + sum(len(c) - 1 for c in cs) for _, cs in groups]
    if whole_groups and max(rows_per_group) > max_rows:
        assert chunks is None
        return
    Nr, N = batch.logit_rows.shape[0], batch.num_targets
    assert [c.r0 for c in chunks] == [0] + [c.r1 for c in chunks[:-1]] and chunks[-1].r1 == Nr
    assert [c.t0 for c in chunks] == [0] + [c.t1 for c in chunks[:-1]] and chunks[-1].t1 == N
    for c in chunks:
        assert 0 < c.r1 - c.r0 <= max_rows
        t_rows = batch.target_rows[c.t0 : c.t1]
        assert ((t_rows >= c.r0) & (t_rows < c.r1)).all()
        assert int(batch.row_ptr[c.r0]) == c.t0 and int(batch.row_ptr[c.r1]) == c.t1
        if whole_groups:
            assert c.groups is not None
            gsel = set(range(*c.groups))
            assert set((batch.target_candidates[c.t0 : c.t1] // batch.num_candidates).tolist()) == gsel


@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3"])
@pytest.mark.parametrize("device,dtype", CASES)
def test_sequence_logprobs_and_grads(device, dtype, chunk_rows):
    check_sequence_logprobs(device, dtype, "cublas", dict(chunk_rows=chunk_rows))


# chunk_rows: 1000 = one chunk; 6 = whole groups, several chunks (groups of 5, 3, 2, 2, 4 rows);
# 4 = a group longer than a chunk, so the loss falls back to forward, loss, recomputing backward.
@pytest.mark.parametrize("chunk_rows", [1000, 6, 4], ids=["one-chunk", "group-chunks", "split-groups"])
@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
@pytest.mark.parametrize("device,dtype", CASES)
def test_fused_sdpo_loss(device, dtype, sft_weight, chunk_rows):
    groups = check_fused_loss(device, dtype, "cublas", dict(chunk_rows=chunk_rows), sft_weight)
    rows = [1 + sum(len(c) - 1 for c in cs) for _, cs in groups]
    assert rows == [5, 3, 2, 2, 4]  # what the chunk sizes above were chosen for


@pytest.mark.parametrize("device,dtype", CASES)
def test_frozen_weight_and_no_grad(device, dtype):
    """LoRA: no dW, dhidden still right; without any gradient only the forward runs."""
    groups, batch, hidden, weight = setup(device, dtype, seed=5, n_groups=3)
    G, C = batch.candidate_mask.shape
    ref_logps = torch.zeros(G, C, device=device)
    loss_g, logps, dh, dw = backend_loss("cublas", hidden, weight, batch, ref_logps, 1.0, 0.0, True, False, chunk_rows=4)
    assert dw is None and dh is not None
    loss_n, logps_n, dh_n, dw_n = backend_loss("cublas", hidden, weight, batch, ref_logps, 1.0, 0.0, False, False)
    assert dh_n is None and dw_n is None
    torch.testing.assert_close(loss_n, loss_g)
    torch.testing.assert_close(logps_n, logps)

    h = hidden.clone().requires_grad_(True)
    loss, _ = fused_sdpo_loss(h, weight, batch, ref_logps, backend="cublas", chunk_rows=4)
    loss.backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, dh / G)

    h2 = hidden.clone().requires_grad_(True)
    sdpo_fast.sequence_logprobs(h2, weight, batch, backend="cublas", chunk_rows=4).sum().backward()
    h64 = hidden.double().requires_grad_(True)
    reference_logps(h64, weight.double(), groups, batch).sum().backward()
    h3 = hidden.clone().requires_grad_(True)
    sdpo_fast.sequence_logprobs(h3, weight, batch, backend="torch").sum().backward()
    assert_close_rule("dhidden", h2.grad, h64.grad, h3.grad, dtype)


@pytest.mark.parametrize("device,dtype", CASES + [pytest.param("cpu", torch.bfloat16, id="cpu-bf16")])
def test_confident_target_cancellation(device, dtype):
    """p(target) ~ 0.999: the row kernel forms g (1 - p) in fp32 before the cast, so the row's
    gradient keeps its relative precision, and so does the token's log-prob (~ -1e-3)."""
    groups = [([5, 9, 2], [[7, 11], [3]]), ([4], [[8], [100, 200, 17]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=V).to(device)
    T = batch.shape[0] * batch.shape[1]
    D = 60
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) / math.sqrt(D)
    row = int(batch.group_starts[0]) + 3  # the hidden state of token 7 predicts token 11
    logits = hidden[row] @ weight.T
    others = torch.cat([logits[:11], logits[12:]]).logsumexp(0)
    weight[11] += (others + math.log(0.999 / 0.001) - logits[11]) * hidden[row] / hidden[row].pow(2).sum()
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    p = torch.softmax(hidden[row].double() @ weight.double().T, 0)[11].item()
    assert 0.998 < p < 0.9995

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = sdpo_fast.sequence_logprobs(h, w, batch, backend="cublas")
    out[0, 0].backward()
    h64 = hidden.double().requires_grad_(True)
    ref = reference_logps(h64, weight.double(), groups, batch)
    ref[0, 0].backward()
    assert rel(h.grad[row], h64.grad[row]) < 5 * FLOOR[dtype]
    # The GEMM writes logits in the input dtype (as eager does); given those logits the log-prob is
    # exact to fp32: compare with fp64 log-softmax of the rounded logits (identity weight: logits in).
    rounded = (hidden.double() @ weight.double().T).to(dtype).double()
    ref_rounded = reference_logps(rounded, torch.eye(V, dtype=torch.float64, device=device), groups, batch)
    assert abs((out[0, 0] - ref_rounded[0, 0]).item()) < 0.02 * abs(math.log(p)) + 1e-5


@pytest.mark.parametrize("device,dtype", [CASES[0], CASES[4]])
def test_large_vocab_partial_block(device, dtype):
    """V = 151936 (Qwen2): the row kernels' last column block is partial; targets sit in it."""
    Vb, Db = 151936, 16
    groups = [([1, 2], [[Vb - 1, 5], [Vb - 300]]), ([3], [[Vb - 1], [7, Vb - 2], [9]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=Vb).to(device)
    T = batch.shape[0] * batch.shape[1]
    hidden = torch.randn(T, Db, device=device, dtype=dtype)
    weight = torch.randn(Vb, Db, device=device, dtype=dtype) / 2
    opts = dict(block=1024, chunk_rows=2)
    results = {}
    for backend, kw in (("cublas", opts), ("torch", {})):
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = sdpo_fast.sequence_logprobs(h, w, batch, backend=backend, **kw)
        upstream = torch.linspace(-1, 1, out.numel(), device=device).view(out.shape)
        (out * upstream).sum().backward()
        results[backend] = (out, h.grad, w.grad)
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref = reference_logps(h64, w64, groups, batch)
    (ref * torch.linspace(-1, 1, ref.numel(), device=device).view(ref.shape).double()).sum().backward()
    for name, got, r, t in zip(("logps", "dhidden", "dweight"), results["cublas"], (ref.detach(), h64.grad, w64.grad),
                               results["torch"]):
        assert_close_rule(name, got, r, t, dtype)


def test_bad_options():
    _, batch, hidden, weight = setup("cpu", torch.float32, n_groups=2)
    with pytest.raises(ValueError, match="power of two"):
        sdpo_fast.sequence_logprobs(hidden, weight, batch, backend="cublas", block=24)
    with pytest.raises(ValueError, match="unknown cublas option"):
        sdpo_fast.sequence_logprobs(hidden, weight, batch, backend="cublas", block_m=16)
    with pytest.raises(ValueError, match="positive int"):
        sdpo_fast.sequence_logprobs(hidden, weight, batch, backend="cublas", chunk_rows=0)
    with pytest.raises(ValueError, match="dtype"):
        sdpo_fast.sequence_logprobs(hidden, weight.half(), batch, backend="cublas")
