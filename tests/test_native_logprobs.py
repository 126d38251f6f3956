"""The "native" backend's plain log-prob op (csrc/logprobs.cpp) against the fp64 per-candidate
reference: every row segment, the second backward, the frozen-weight projection, what is kept."""

import os

import pytest
import torch

import sdpo_fast

if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
    pytest.skip("SDPO_FAST_NO_EXT is set: the native extension is deliberately absent", allow_module_level=True)

# Without the flag the extension must load (a broken build fails here instead of skipping).
import sdpo_fast.kernels.logprobs.native as nat  # noqa: E402
from native_cases import (  # noqa: E402
    D, SEQ_OPTIONS, fp64_copies, leaves, num_tokens, random_groups,
)
from references import reference_logps as naive_logps  # noqa: E402


@pytest.mark.parametrize("opts", SEQ_OPTIONS.values(), ids=SEQ_OPTIONS.keys())
def test_logprobs_and_gradients_match_fp64(opts):
    groups = random_groups(0, n_groups=20)
    batch = sdpo_fast.pack_groups(groups, pad_to_multiple_of=8)
    assert batch.logit_rows.numel() > D + 9 + 4  # every segment of "all-three-segments" is non-empty
    h, w = leaves(num_tokens(batch))
    got = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **opts)
    assert got.dtype == torch.float32 and got.shape == batch.candidate_mask.shape
    upstream = torch.randn(got.shape)
    (got * upstream).sum().backward()

    h64, w64 = fp64_copies(h, w)
    ref = naive_logps(h64, w64, groups, batch)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    others = torch.ones(num_tokens(batch), dtype=torch.bool)
    others[batch.logit_rows] = False
    assert (h.grad[others] == 0).all()


@pytest.mark.parametrize("opts", [{}, SEQ_OPTIONS["all-three-segments"]], ids=["defaults", "all-three-segments"])
def test_second_backward_recomputes_the_kept_logits(opts):
    """The backward overwrites the logits the forward kept (and returns one buffer as dW); a second
    backward (retain_graph) must recompute them and still match fp64."""
    groups = random_groups(1, n_groups=20)
    batch = sdpo_fast.pack_groups(groups, pad_to_multiple_of=8)
    h, w = leaves(num_tokens(batch))
    out = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **opts)
    upstream = torch.randn(out.shape)
    h64, w64 = fp64_copies(h, w)
    (naive_logps(h64, w64, groups, batch) * upstream.double()).sum().backward()
    for retain in (True, False):
        h.grad = w.grad = None
        (out * upstream).sum().backward(retain_graph=retain)
        torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts", [{}, dict(block=7, chunk_rows=3), dict(block=10_000, chunk_rows=1)],
                         ids=["defaults", "blocks-of-7", "one-block"])
@pytest.mark.parametrize("confident", [False, True], ids=["random", "confident"])
def test_frozen_weight_projected_backward_matches_fp64(opts, confident):
    """Frozen weight: dHidden comes from the forward's softmax(logits) @ W (rescaled as each row's
    maximum grows block by block), including rows whose target has p ~ 1."""
    groups = random_groups(9, n_groups=20)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=9, scale=3.0 if confident else 1.0, frozen=True)
    if confident:
        with torch.no_grad():
            rows = batch.logit_rows.index_select(0, batch.target_rows)
            h[rows] += 0.5 * w[batch.target_ids]
    out = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **opts)
    upstream = torch.randn(out.shape)
    (out * upstream).sum().backward(retain_graph=True)
    h64, w64 = fp64_copies(h, w)
    ref = naive_logps(h64, w64, groups, batch)
    (ref * upstream.double()).sum().backward()
    torch.testing.assert_close(out.detach().double(), ref.detach(), rtol=1e-5, atol=1e-4)
    scale = h64.grad.abs().max()
    assert (h.grad.double() - h64.grad).abs().max() <= 1e-5 * scale
    first = h.grad.clone()
    h.grad = None
    (out * upstream).sum().backward()  # the projection is not consumed: a second backward is the same
    assert torch.equal(h.grad, first)


def test_nothing_kept_without_a_backward(spy):
    """Under no_grad, or when no input needs a gradient, the forward keeps no logits; with a frozen
    weight it keeps none either and projects instead; otherwise it fills both buffers."""
    # (keep_in_grad, keep_elements, project, kept_a, kept_b, u)
    seen = spy("logprobs_forward", lambda a, out: (a[6], a[7], a[10], out[2] is not None, out[3] is not None,
                                                   out[4] is not None))
    groups = random_groups(0, n_groups=20)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch))
    expected = naive_logps(h.detach().double(), w.detach().double(), groups, batch)
    with torch.no_grad():
        a = sdpo_fast.sequence_logprobs(h, w, batch, backend="native")
    b = sdpo_fast.sequence_logprobs(h.detach(), w.detach(), batch, backend="native")
    c = sdpo_fast.sequence_logprobs(h, w.detach(), batch, backend="native")
    d = sdpo_fast.sequence_logprobs(h, w, batch, backend="native")
    for out in (a, b, c, d):
        torch.testing.assert_close(out.detach().double(), expected, rtol=1e-5, atol=1e-4)
    assert seen[0] == seen[1] == (False, 0, False, False, False, False)
    assert seen[2] == (False, 0, True, False, False, True)  # frozen weight: projected, nothing kept
    assert seen[3][:3] == (True, nat.DEFAULT_KEEP_ELEMENTS, False) and seen[3][3:] == (True, True, False)
