"""The "native" backend (csrc/ C++ CPU kernels) against an fp64 per-candidate reference, the torch
backend and (when registered) the Triton backend under the interpreter."""

import os
import subprocess
import sys

import pytest
import torch

import sdpo_fast
from sdpo_fast import backends
from sdpo_fast.loss import fused_sdpo_loss, sdpo_loss

if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
    pytest.skip("SDPO_FAST_NO_EXT is set: the native extension is deliberately absent", allow_module_level=True)

# Without the flag the extension must load (a broken build fails here instead of skipping).
import sdpo_fast.native  # noqa: E402,F401

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


def naive_logps(hidden, weight, groups, batch):
    """[G, C] fp64: each candidate's tokens scored one by one from full log-softmax rows (no CSR layout)."""
    logp = (hidden.double() @ weight.double().T).log_softmax(-1)
    out = [[hidden.new_zeros((), dtype=torch.float64)] * batch.num_candidates for _ in groups]
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


def naive_loss(logps, ref, batch, beta, sft_weight):
    mask = batch.candidate_mask
    loss = sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=beta, rejected_mask=mask[:, 1:])
    return loss + sft_weight * (-logps[:, 0] / batch.candidate_lens[:, 0]).mean()


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


# The S-DPO loss's two paths with a trainable weight: a batch of at most D logit rows whose logits
# exceed the base tile runs through the plain op's kernels with every row kept in the dW-shaped buffer
# (for these tests' small batches, the base tile is shrunk to 1 element), unless a tile size is given.
LOSS_PATHS = ["rows-in-grad-buffer", "tiles"]


@pytest.fixture(params=LOSS_PATHS)
def loss_tile(request, monkeypatch):
    """tile_elements for the loss, selecting one path of LOSS_PATHS."""
    import sdpo_fast.native as nat

    if request.param == "tiles":
        return 1 << 23
    monkeypatch.setattr(nat, "DEFAULT_TILE_ELEMENTS", 1)
    return None


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


@pytest.fixture
def spy(monkeypatch):
    """watch(kernel, record): from then on every call of the extension's `kernel` appends
    record(args, outputs) to the list watch returns (one list for all watched kernels)."""
    import sdpo_fast.native as nat

    real, records, seen = nat.extension, {}, []

    class Spy:
        def __getattr__(self, name):
            kernel = getattr(real, name)
            if name not in records:
                return kernel

            def watched(*args):
                out = kernel(*args)
                seen.append(records[name](args, out))
                return out

            return watched

    monkeypatch.setattr(nat, "extension", Spy())

    def watch(kernel, record):
        records[kernel] = record
        return seen

    return watch


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
    assert seen[3][:3] == (True, sdpo_fast.native.DEFAULT_KEEP_ELEMENTS, False) and seen[3][3:] == (True, True, False)


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


def test_default_tile_grows_to_hold_the_largest_group(monkeypatch, spy):
    """The loss's default tile is raised to the largest group's rows x V (no recompute), up to a cap;
    shown here with the two limits scaled down to this vocabulary, against fp64."""
    import sdpo_fast.native as nat

    groups = random_groups(5, n_groups=6, max_k=8, max_len=6)
    batch = sdpo_fast.pack_groups(groups)
    group_of_row = batch.target_candidates[batch.row_ptr[:-1]] // batch.candidate_mask.shape[1]
    sizes = torch.bincount(group_of_row)
    assert sizes.max() > 3
    monkeypatch.setattr(nat, "DEFAULT_TILE_ELEMENTS", V * 3)
    monkeypatch.setattr(nat, "MAX_TILE_ELEMENTS", V * 1000)
    assert nat.default_tile_elements(batch, V) == int(sizes.max()) * V
    monkeypatch.setattr(nat, "MAX_TILE_ELEMENTS", V * 2)
    assert nat.default_tile_elements(batch, V) == V * 3  # the cap never lowers the base default
    monkeypatch.setattr(nat, "MAX_TILE_ELEMENTS", V * 4)
    assert nat.default_tile_elements(batch, V) == V * 4

    monkeypatch.setattr(nat, "MAX_TILE_ELEMENTS", V * 1000)
    seen = spy("sdpo_loss", lambda a, out: a[-1])
    h, w = leaves(num_tokens(batch), seed=5)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    loss, _ = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.1, backend="native")
    loss.backward()
    fused_sdpo_loss(h.detach(), w, batch, ref, backend="native", tile_elements=V * 5)
    assert seen == [int(sizes.max()) * V, V * 5]  # an explicit tile_elements is taken as given
    h64, w64 = fp64_copies(h, w)
    naive_loss(naive_logps(h64, w64, groups, batch), ref.double(), batch, 1.0, 0.1).backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_loss_path_follows_rows_weight_and_tile(monkeypatch, spy):
    """Which kernel the loss runs: the plain op's (keeping all rows in the dW-shaped buffer) for a
    trainable weight, at most D rows and more logits than the base tile, without a tile size;
    projected for a frozen weight; otherwise the tiled kernel. Every case against fp64."""
    import sdpo_fast.native as nat

    monkeypatch.setattr(nat, "DEFAULT_TILE_ELEMENTS", V * 10)  # base tile: 10 rows
    seen = spy("logprobs_forward", lambda a, out: ("plain", a[6], a[10]))  # keep_in_grad, project
    spy("sdpo_loss", lambda a, out: ("tiled", a[-1]))
    cases = {  # name: (groups, max_k, max_len, frozen, options)
        "few-rows": (4, 6, 5, False, {}),
        "frozen-weight": (4, 6, 5, True, {}),
        "tile-given": (4, 6, 5, False, {"tile_elements": V * 4}),
        "chunk-rows-given": (4, 6, 5, False, {"chunk_rows": 5}),
        "more-rows-than-D": (12, 6, 5, False, {}),
        "fits-the-base-tile": (1, 1, 2, False, {}),
    }
    for name, (n_groups, max_k, max_len, frozen, opts) in cases.items():
        groups = random_groups(10 + n_groups, n_groups=n_groups, max_k=max_k, max_len=max_len)
        batch = sdpo_fast.pack_groups(groups)
        rows = batch.logit_rows.numel()
        expected = {
            "few-rows": ("plain", True, False),
            "frozen-weight": ("plain", False, True),
            "tile-given": ("tiled", V * 4),
            "chunk-rows-given": ("tiled", V * 5),
            "more-rows-than-D": ("tiled", nat.default_tile_elements(batch, V)),
            "fits-the-base-tile": ("tiled", V * 10),
        }[name]
        assert (10 < rows <= D) if n_groups == 4 else (rows > D if n_groups == 12 else rows <= 10), (name, rows)
        h, w = leaves(num_tokens(batch), seed=n_groups, frozen=frozen)
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


@pytest.fixture(params=["onednn", "blas"])
def gemm_engine(request, monkeypatch):
    """Runs a test on each library the native GEMMs can use (gemm.cpp): oneDNN's matmul where torch
    has it, and torch's BLAS, which torch.backends.mkldnn.enabled = False selects."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", request.param == "onednn")
    if sdpo_fast.native.gemm_engine() != request.param:
        pytest.skip(f"{request.param} GEMMs are not available with this torch / CPU")
    return request.param


def test_gemm_engine_follows_the_mkldnn_switch_and_the_size(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert sdpo_fast.native.gemm_engine() == "blas"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    assert sdpo_fast.native.gemm_engine() in ("onednn", "blas")
    assert sdpo_fast.native.gemm_engine(work=(1 << 28) - 1) == "blas"  # small calls: no per-shape JIT


@pytest.mark.parametrize("tile", [None, 1])
def test_vocabulary_split_into_blocks(tile, gemm_engine):
    """V = 2053: the GEMMs run as several vocabulary blocks (5 of up to 411 columns, the last one
    short; the loss's tile is stored block by block); dH sums the blocks' partials in a fixed order,
    so a rerun is bitwise equal. On both GEMM libraries: the batch is large enough (rows x V x D over
    2**28) for oneDNN, and D = 257 is odd."""
    vocab, dim = 2053, 257
    groups = random_groups(8, n_groups=40, vocab=vocab, max_k=8, max_len=6)
    batch = sdpo_fast.pack_groups(groups)
    assert sdpo_fast.native.gemm_engine(batch.logit_rows.numel() * vocab * dim) == gemm_engine
    gen = torch.Generator().manual_seed(8)
    h = (torch.randn(num_tokens(batch), dim, generator=gen) * 0.25).requires_grad_(True)
    w = (torch.randn(vocab, dim, generator=gen) * 0.25).requires_grad_(True)
    ref = torch.randn(batch.candidate_mask.shape) - 9.0
    loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.3, backend="native", tile_elements=tile)
    loss.backward()
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    naive_loss(logps64, ref.double(), batch, 1.0, 0.3).backward()
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    fused_sdpo_loss(h, w, batch, ref, sft_weight=0.3, backend="native", tile_elements=tile)[0].backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])

    h.grad = w.grad = h64.grad = w64.grad = None
    upstream = torch.randn(batch.candidate_mask.shape)
    # the plain op: default blocks of 512 columns (the last one 5 wide), or narrow blocks and small chunks
    seq = {} if tile is None else dict(keep_elements=0, keep_in_grad=False, block=100, chunk_rows=2)
    lp = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **seq)
    (lp * upstream).sum().backward()
    (naive_logps(h64, w64, groups, batch) * upstream.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    first = (lp.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    lp = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **seq)
    (lp * upstream).sum().backward()
    assert torch.equal(lp.detach(), first[0]) and torch.equal(h.grad, first[1]) and torch.equal(w.grad, first[2])


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


def test_frozen_hidden_and_3d_hidden(loss_tile):
    """Only dW wanted (hidden without grad), hidden given as [R, L, D]."""
    groups = random_groups(7)
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=30)
    R, L = batch.shape
    h, w = leaves(R * L, seed=7)
    h = h.detach().view(R, L, D)
    h64, w64 = fp64_copies(h.view(R * L, D), w)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    loss, _ = fused_sdpo_loss(h, w, batch, ref, backend="native", tile_elements=loss_tile)
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
def test_shared_rows_and_repeated_tokens(sft_weight, loss_tile):
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
                                    tile_elements=loss_tile)
    loss.backward()
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    naive_loss(logps64, ref.double(), batch, 1.0, sft_weight).backward()
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_confident_and_extreme_logits(loss_tile):
    """Logits spanning hundreds of nats (exp underflow) and p(target) ~ 1: (p - 1) must not cancel."""
    groups = random_groups(4, n_groups=3, max_len=2)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=4, scale=3.0)
    with torch.no_grad():  # make each target dominate its row: p(target) close to 1
        rows = batch.logit_rows.index_select(0, batch.target_rows)
        h[rows] += 0.5 * w[batch.target_ids]
    ref = torch.randn(batch.candidate_mask.shape) - 2.0
    loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.3, backend="native", tile_elements=loss_tile)
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
    for nat, tor, s in zip(errors["native"], errors["torch"], slack):
        assert nat <= tor + s, errors
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


def test_agrees_with_torch_and_triton_and_is_deterministic():
    groups = random_groups(6, n_groups=3)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=6)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    names = ["native", "torch"] + (["triton"] if "triton" in backends.available("logprobs") else [])
    results = {}
    for name in names + ["native"]:  # native twice: bitwise rerun check
        h.grad = w.grad = None
        lp = sdpo_fast.sequence_logprobs(h, w, batch, backend=name)
        (lp * torch.linspace(-1, 1, lp.numel()).view(lp.shape)).sum().backward()
        out = [lp.detach(), h.grad.clone(), w.grad.clone()]
        h.grad = w.grad = None
        loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.2, backend=name)
        loss.backward()
        out += [loss.detach(), metrics["logps"], h.grad.clone(), w.grad.clone()]
        if name in results:
            assert all(torch.equal(a, b) for a, b in zip(out, results[name])), "native is not deterministic"
        results[name] = out
    for name in names[1:]:
        for a, b in zip(results["native"], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"native vs {name}")


def test_auto_prefers_native_on_cpu():
    assert backends.resolve("logprobs", "auto", "cpu") == "native"
    assert backends.resolve("sdpo_loss", "auto", "cpu") == "native"


def test_bad_options_raise():
    batch = sdpo_fast.pack_groups([([1, 2], [[3], [4]])])
    h, w = leaves(num_tokens(batch))
    with pytest.raises(ValueError, match="keep_elements"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", keep_elements=-1)
    with pytest.raises(ValueError, match="block"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", block=0)
    with pytest.raises(ValueError, match="chunk_rows"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", chunk_rows=2.5)
    with pytest.raises(TypeError, match="tile_elements"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", tile_elements=10)
    with pytest.raises(ValueError, match="tile_elements"):
        fused_sdpo_loss(h, w, batch, torch.zeros(batch.candidate_mask.shape), backend="native", tile_elements=0)
    with pytest.raises(ValueError, match="not both"):
        fused_sdpo_loss(h, w, batch, torch.zeros(batch.candidate_mask.shape), backend="native", tile_elements=10,
                        chunk_rows=2)


def test_skipped_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch, sdpo_fast\n"
        "from sdpo_fast import backends\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    b = sdpo_fast.pack_groups([([1, 2], [[3], [4, 5]])])\n"
        "    h, w = torch.randn(b.shape[1], 8), torch.randn(16, 8)\n"
        "    out = sdpo_fast.sequence_logprobs(h, w, b)\n"
        "    out = sdpo_fast.sequence_logprobs(h, w, b)\n"
        "    assert backends.resolve('logprobs', 'auto', 'cpu') == 'torch'\n"
        "    assert 'native' not in backends.available('sdpo_loss')\n"
        "msgs = [str(c.message) for c in caught if 'native' in str(c.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'torch backend' in msgs[0] and 'SDPO_FAST_NO_EXT' in msgs[0], msgs[0]\n"
        "assert torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SDPO_FAST_NO_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def test_wheel_ships_the_sources_for_a_first_use_build(tmp_path):
    """A wheel built without the extension (what an install that cannot see torch produces) carries
    csrc/ as sdpo_fast/_csrc, and, installed away from any checkout, native.py compiles from there."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SDPO_FAST_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(root)], env=env, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("sdpo_fast-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    assert {f"sdpo_fast/_csrc/{n}" for n in ("sdpo_native.cpp", "rowops.cpp", "rowops.h", "gemm.cpp", "gemm.h")} <= names
    assert not any(n.endswith(".so") for n in names)
    # The compiler is stubbed: only which sources it would be given matters here (a real build takes a minute).
    code = (
        "import sys\n"
        # this environment's editable install would hand out the checkout's prebuilt extension
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import torch.utils.cpp_extension as ce\n"
        "seen = []\n"
        "def load(name, sources, **kw):\n"
        "    seen.extend(sources)\n"
        "    raise RuntimeError('stub compiler')\n"
        "ce.load = load\n"
        "try:\n"
        "    import sdpo_fast.native\n"
        "except ImportError as exc:\n"
        "    assert 'stub compiler' in str(exc), exc\n"
        "print('\\n'.join(seen))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SDPO_FAST_NO_EXT"}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    sources = [Path(s) for s in res.stdout.split()]
    assert [s.name for s in sources] == ["sdpo_native.cpp", "rowops.cpp", "gemm.cpp"]
    assert all(s.parent == site / "sdpo_fast" / "_csrc" and s.is_file() for s in sources), sources
