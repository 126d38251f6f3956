"""The "native" backend's S-DPO loss (csrc/sdpo_loss.cpp and the whole-batch path) against the fp64
per-candidate reference: tiles, the default tile, the path decision, frozen / 3-D hidden, extreme logits, bf16."""

import os

import pytest
import torch

import sdpo_fast
from sdpo_fast.loss import fused_sdpo_loss

if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
    pytest.skip("SDPO_FAST_NO_EXT is set: the native extension is deliberately absent", allow_module_level=True)

# Without the flag the extension must load (a broken build fails here instead of skipping).
import sdpo_fast.kernels.logprobs.native as nat  # noqa: E402
from native_cases import (  # noqa: E402
    D, V, fp64_copies, leaves, num_tokens, random_groups,
)
from references import naive_loss, reference_logps as naive_logps  # noqa: E402


# tile_elements: default (every group in one tile, no recompute); ~6 rows (groups merged where they
# fit, the larger ones recomputed); 1 (every group over budget: the recompute fallback throughout).
@pytest.mark.parametrize("tile", [None, V * 6, 1])
@pytest.mark.parametrize("beta,sft_weight", [(1.0, 0.0), (0.3, 0.5)])
def test_fused_loss_and_gradients_match_fp64(tile, beta, sft_weight):
    groups = random_groups(1, n_groups=5)
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=40)
    h, w = leaves(num_tokens(batch), seed=1)
    ref = torch.randn(batch.candidate_mask.shape, dtype=torch.float64) - 8.0

    loss, metrics = fused_sdpo_loss(h, w, batch, ref.float(), beta=beta, sft_weight=sft_weight,
                                    backend="native", tile_elements=tile)
    loss.backward()
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    loss64 = naive_loss(logps64, ref, batch, beta, sft_weight)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_default_tile_grows_to_hold_the_largest_group(spy):
    """The loss's default tile is raised to the largest group's rows x V (no recompute), up to a cap
    (the limits given here at this vocabulary's scale), and the kernel receives exactly that default;
    an explicit tile_elements is taken as given. Gradients against fp64."""

    groups = random_groups(5, n_groups=6, max_k=8, max_len=6)
    batch = sdpo_fast.pack_groups(groups)
    group_of_row = batch.target_candidates[batch.row_ptr[:-1]] // batch.candidate_mask.shape[1]
    largest = int(torch.bincount(group_of_row).max())
    assert largest > 3
    assert nat.default_tile_elements(batch, V, base=V * 3, cap=V * 1000) == largest * V
    assert nat.default_tile_elements(batch, V, base=V * 3, cap=V * 2) == V * 3  # the cap never lowers the base
    assert nat.default_tile_elements(batch, V, base=V * 3, cap=V * 4) == V * 4
    assert nat.default_tile_elements(batch, V * 10**6) == nat.MAX_TILE_ELEMENTS
    assert nat.default_tile_elements(batch, V) == nat.DEFAULT_TILE_ELEMENTS  # largest * V is below the base

    seen = spy("sdpo_loss", lambda a, out: a[-1])
    h, w = leaves(num_tokens(batch), seed=5)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    loss, _ = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.1, backend="native")
    loss.backward()
    fused_sdpo_loss(h.detach(), w, batch, ref, backend="native", tile_elements=V * 5)
    assert seen == [nat.default_tile_elements(batch, V), V * 5]
    h64, w64 = fp64_copies(h, w)
    naive_loss(naive_logps(h64, w64, groups, batch), ref.double(), batch, 1.0, 0.1).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_the_path_decision():
    """``loss_path`` (what path="auto" runs): the plain op's kernels (every row kept in the dW-shaped
    buffer) for a trainable weight, at most D rows and more logits than the base tile, without a tile
    size; projected for a frozen weight; otherwise the tiled kernel."""
    base = V * 10  # a base tile of 10 rows
    decide = lambda rows, frozen=False, tile_given=False: nat.loss_path(  # noqa: E731
        rows, V, D, True, not frozen, tile_given, base_tile=base)
    assert decide(30) == "whole_batch"
    assert decide(30, frozen=True) == "whole_batch"
    assert decide(30, tile_given=True) == "tiled"
    assert decide(D + 1) == "tiled"
    assert decide(10) == "tiled"  # fits the base tile
    assert nat.loss_path(30, V, D, False, True, False, base_tile=base) == "whole_batch"  # dW only
    assert nat.loss_path(D, V, D, True, True, False) == "tiled"  # at the real base tile


def test_each_path_runs_its_kernel_and_matches_fp64(spy):
    """The ``path`` option runs the named kernel ("auto" follows loss_path: a frozen weight projects,
    a given tile tiles), each against fp64."""
    seen = spy("logprobs_forward", lambda a, out: ("plain", a[6], a[10]))  # keep_in_grad, project
    spy("sdpo_loss", lambda a, out: ("tiled", a[-1]))
    cases = {  # name: (frozen, options, expected kernel call)
        "whole-batch": (False, {"path": "whole_batch", "chunk_rows": 5}, ("plain", True, False)),
        "tiled": (False, {"path": "tiled"}, None),
        "tiled-with-a-tile": (False, {"path": "tiled", "tile_elements": V * 4}, ("tiled", V * 4)),
        "auto-frozen-weight": (True, {}, ("plain", False, True)),
        "auto-tile-given": (False, {"tile_elements": V * 6}, ("tiled", V * 6)),
        "tiled-frozen-weight": (True, {"path": "tiled", "tile_elements": V * 6}, ("tiled", V * 6)),
    }
    for i, (name, (frozen, opts, expected)) in enumerate(cases.items()):
        groups = random_groups(10 + i, n_groups=4, max_k=6, max_len=5)
        batch = sdpo_fast.pack_groups(groups)
        if expected is None:
            expected = ("tiled", nat.default_tile_elements(batch, V))
        h, w = leaves(num_tokens(batch), seed=i, frozen=frozen)
        ref = torch.randn(batch.candidate_mask.shape) - 6.0
        seen.clear()
        loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.2, backend="native", **opts)
        loss.backward()
        assert seen == [expected], name
        h64, w64 = fp64_copies(h, w)
        logps64 = naive_logps(h64, w64, groups, batch)
        naive_loss(logps64, ref.double(), batch, 1.0, 0.2).backward()
        torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
        if not frozen:
            torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_path_options_are_checked():
    groups = random_groups(3)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=3)
    ref = torch.zeros(batch.candidate_mask.shape)
    with pytest.raises(ValueError, match="path must be one of"):
        fused_sdpo_loss(h, w, batch, ref, backend="native", path="fast")
    with pytest.raises(ValueError, match="whole_batch path takes no tile"):
        fused_sdpo_loss(h, w, batch, ref, backend="native", path="whole_batch", tile_elements=V)


@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_frozen_weight_both_ops(chunk_rows):
    """Frozen weight: the loss runs the projected forward over all rows (chunk_rows per GEMM)."""
    groups = random_groups(2)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=2, frozen=True)
    h64, w64 = fp64_copies(h, w)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0

    loss, _ = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.2, backend="native", chunk_rows=chunk_rows)
    loss.backward()
    naive_loss(naive_logps(h64, w64, groups, batch), ref.double(), batch, 1.0, 0.2).backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)

    h.grad = h64.grad = None
    sdpo_fast.sequence_logprobs(h, w, batch, backend="native", chunk_rows=chunk_rows).sum().backward()
    naive_logps(h64, w64, groups, batch).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)


def test_frozen_hidden_and_3d_hidden(loss_opts):
    """Only dW wanted (hidden without grad), hidden given as [R, L, D]."""
    groups = random_groups(7)
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=30)
    R, L = batch.shape
    h, w = leaves(R * L, seed=7)
    h = h.detach().view(R, L, D)
    h64, w64 = fp64_copies(h.view(R * L, D), w)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    loss, _ = fused_sdpo_loss(h, w, batch, ref, backend="native", **loss_opts)
    loss.backward()
    naive_loss(naive_logps(h64, w64, groups, batch), ref.double(), batch, 1.0, 0.0).backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)

    # the plain op with only dW wanted: rows kept in the dW-shaped buffer, in the extra one, recomputed
    w.grad = w64.grad = None
    upstream = torch.randn(batch.candidate_mask.shape)
    lp = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", keep_elements=V * 3, block=64, chunk_rows=5)
    (lp * upstream).sum().backward()
    (naive_logps(h64, w64, groups, batch) * upstream.double()).sum().backward()
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)

    w.grad = w64.grad = h64.grad = None
    h3 = h.clone().requires_grad_(True)
    sdpo_fast.sequence_logprobs(h3, w, batch, backend="native").sum().backward()
    naive_logps(h64, w64, groups, batch).sum().backward()
    assert h3.grad.shape == (R, L, D)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h3.grad.view(R * L, D).double(), h64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sft_weight", [0.0, 0.4])
def test_shared_rows_and_repeated_tokens(sft_weight, loss_opts):
    """Candidates of one token (every target on the prompt's shared last row), repeated first tokens
    and identical candidates; with sft_weight 0 the shared row's summed dL/dlogp is exactly 0."""
    groups = [
        ([5, 9, 2], [[7], [7], [11], [200], [7]]),
        ([4], [[1, 2, 3], [1, 2], [1], [256, 0, 0, 0]]),
        ([8, 8], [[3]]),
    ]
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=3)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=sft_weight, backend="native",
                                    **loss_opts)
    loss.backward()
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    naive_loss(logps64, ref.double(), batch, 1.0, sft_weight).backward()
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_confident_and_extreme_logits(loss_opts):
    """Logits spanning hundreds of nats (exp underflow) and p(target) ~ 1: (p - 1) must not cancel."""
    groups = random_groups(4, n_groups=3, max_len=2)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=4, scale=3.0)
    with torch.no_grad():  # make each target dominate its row: p(target) close to 1
        rows = batch.logit_rows.index_select(0, batch.target_rows)
        h[rows] += 0.5 * w[batch.target_ids]
    ref = torch.randn(batch.candidate_mask.shape) - 2.0
    loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.3, backend="native", **loss_opts)
    loss.backward()
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    naive_loss(logps64, ref.double(), batch, 1.0, 0.3).backward()
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=1e-4)
    scale_h, scale_w = h64.grad.abs().max(), w64.grad.abs().max()
    assert (h.grad.double() - h64.grad).abs().max() <= 1e-5 * scale_h
    assert (w.grad.double() - w64.grad).abs().max() <= 1e-5 * scale_w

    # the plain op on the same rows (kept and recomputed segments both)
    h.grad = w.grad = h64.grad = w64.grad = None
    upstream = torch.randn(batch.candidate_mask.shape)
    lp = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", keep_elements=V * 2, block=100)
    (lp * upstream).sum().backward()
    (naive_logps(h64, w64, groups, batch) * upstream.double()).sum().backward()
    assert (h.grad.double() - h64.grad).abs().max() <= 1e-5 * h64.grad.abs().max()
    assert (w.grad.double() - w64.grad).abs().max() <= 1e-5 * w64.grad.abs().max()


def test_bf16_inputs_beat_torch_error():
    """bf16 hidden/weight: native computes in fp32, so its error against fp64 (on the same bf16
    values) is at most the torch backend's, which rounds logits to bf16."""
    groups = random_groups(5)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), dtype=torch.bfloat16, seed=5)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    naive_loss(logps64, ref.double(), batch, 1.0, 0.1).backward()

    errors = {}
    for backend in ("native", "torch"):
        h.grad = w.grad = None
        loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.1, backend=backend)
        loss.backward()
        assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
        errors[backend] = [
            (metrics["logps"].double() - logps64.detach()).abs().max().item(),
            (h.grad.double() - h64.grad).abs().max().item(),
            (w.grad.double() - w64.grad).abs().max().item(),
        ]
    # gradients come back in bf16 in both backends: allow one bf16 rounding of the largest entry
    slack = [1e-4, 2 ** -8 * h64.grad.abs().max().item(), 2 ** -8 * w64.grad.abs().max().item()]
    for got, tor, s in zip(errors["native"], errors["torch"], slack):
        assert got <= tor + s, errors
    assert errors["native"][0] < 1e-3  # fp32 log-probs of bf16 inputs: no bf16 logit rounding

    # the plain op, trainable and frozen weight: bf16 gradients within one bf16 rounding of fp64
    upstream = torch.randn(batch.candidate_mask.shape)
    for frozen in (False, True):
        hb, wb = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(not frozen)
        h64b, w64b = fp64_copies(hb, wb)
        lp = sdpo_fast.sequence_logprobs(hb, wb, batch, backend="native", block=100)
        (lp * upstream).sum().backward()
        (naive_logps(h64b, w64b, groups, batch) * upstream.double()).sum().backward()
        assert lp.dtype == torch.float32 and hb.grad.dtype == torch.bfloat16
        torch.testing.assert_close(lp.detach().double(), naive_logps(h64b, w64b, groups, batch).detach(),
                                   rtol=1e-5, atol=1e-3)
        assert (hb.grad.double() - h64b.grad).abs().max() <= 2 ** -8 * h64b.grad.abs().max()
        if not frozen:
            assert wb.grad.dtype == torch.bfloat16
            assert (wb.grad.double() - w64b.grad).abs().max() <= 2 ** -8 * w64b.grad.abs().max()
