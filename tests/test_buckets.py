"""Shape buckets (``sdpo_fast.buckets``): ``bucket_size``'s ladder, ``pack_bucketed``'s layout (the real
groups exactly as ``pack_groups`` lays them out, then trailing padding groups up to the bucket's
sizes), and the invariance the padding must keep: loss, metrics and every parameter gradient of
``candidate_sdpo_loss`` on the bucketed batch equal those of the unbucketed one, for every loss type
and the CPU backends, and for the CUDA-path ``"cublas"`` backend with its real Triton kernels under
``TRITON_INTERPRET=1`` (one chunk, and several chunks whose targets are found on the device). The
chunk plan of a bucketed batch depends on its bucket only."""

import math

import pytest
import torch
from conftest import tiny_llama as conftest_llama

import sdpo_fast
import sdpo_fast.model as sm
from sdpo_fast import backends, pack_groups
from sdpo_fast.buckets import bucket_size, pack_bucketed
from sdpo_fast.loss import LOSS_TYPES, GroupLoss, group_loss_and_grad

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61
# Small quanta: odd, small buckets (the defaults, 256 tokens and 64 rows, are for real batches).
Q = dict(row_quantum=24, rows_quantum=12)

# Two group sets of one bucket with different layouts: G = 3, C = 3 and 3 negatives in all each, but
# other prompt / candidate lengths, another spread of the negatives, 16 vs 17 tokens, 7 vs 8 rows.
GROUPS_A = [([1, 2, 3], [[4, 5], [6], [7, 8, 9]]), ([10], [[11], [12, 13]]), ([14, 15], [[16]])]
GROUPS_B = [([5], [[6], [7, 8], [9]]), ([1, 2, 3, 4], [[5, 6, 7, 8]]), ([8, 9], [[10, 11], [12]])]


def _rows(groups):
    return sum(1 + sum(len(c) - 1 for c in cs) for _, cs in groups)


def _tokens(groups):
    return sum(len(p) + sum(len(c) for c in cs) for p, cs in groups)


def random_groups(seed, n_groups, max_k=3):
    """Groups with 0..max_k negatives (a group without one included), odd lengths, ids in [1, V)."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        K = 0 if g == 1 else int(torch.randint(0, max_k + 1, (1,), generator=gen))
        P = int(torch.randint(1, 6, (1,), generator=gen))
        lens = torch.randint(1, 4, (K + 1,), generator=gen).tolist()
        groups.append((torch.randint(1, V, (P,), generator=gen).tolist(),
                       [torch.randint(1, V, (n,), generator=gen).tolist() for n in lens]))
    return groups


# ---- bucket_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("quantum", [1, 3, 7, 64, 256])
def test_bucket_size_ladder(quantum):
    sizes = [bucket_size(n, quantum) for n in range(1, 3000)]
    for n, b in enumerate(sizes, start=1):
        assert b >= n and b >= quantum
        assert b <= max(quantum, 1.25 * n + 1), (n, b)
        if n <= quantum:
            assert b == quantum
    assert all(a <= b for a, b in zip(sizes, sizes[1:]))  # monotone
    assert all(bucket_size(b, quantum) == b for b in set(sizes))  # a bucket is its own bucket
    # few buckets: four per doubling above the quantum (what makes one graph serve many batches)
    assert len(set(sizes)) <= 4 * math.ceil(math.log2(3000 / quantum) + 1)


def test_bucket_size_values():
    assert [bucket_size(n) for n in range(1, 13)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12]
    assert [bucket_size(n, 64) for n in (1, 64, 65, 80, 81, 97, 113, 128, 129)] == [64, 64, 80, 80, 96, 112, 128, 128,
                                                                                    160]


@pytest.mark.parametrize("n, quantum", [(0, 1), (-3, 1), (5, 0), (5, -1)])
def test_bucket_size_rejects_bad_sizes(n, quantum):
    with pytest.raises(ValueError):
        bucket_size(n, quantum)


# ---- pack_bucketed: layout -------------------------------------------------------------------------


def _check_against_pack_groups(groups, quanta):
    """Shapes equal the key, the real groups are pack_groups's, the padding groups are chosen-only."""
    batch = pack_bucketed(groups, vocab_size=V, **quanta)
    ref = pack_groups(groups, vocab_size=V)
    G = len(groups)
    L, G_b, C, Nr, N = batch.bucket
    assert batch.input_ids.shape == (1, L) and batch.position_ids.shape == (1, L)
    assert batch.group_ids.shape == batch.candidate_ids.shape == (1, L)
    assert batch.candidate_mask.shape == batch.candidate_lens.shape == (G_b, C)
    assert batch.prompt_lens.shape == batch.group_starts.shape == batch.group_lens.shape == (G_b,)
    assert batch.logit_rows.shape == (Nr,) and batch.row_ptr.shape == (Nr + 1,)
    assert batch.target_ids.shape == batch.target_rows.shape == batch.target_candidates.shape == (N,)
    assert L == bucket_size(L, quanta["row_quantum"]) and Nr == bucket_size(Nr, quanta["rows_quantum"])  # on the ladder
    assert C == ref.num_candidates and N - Nr == ref.num_targets - ref.logit_rows.shape[0]  # one per negative

    assert batch.padding_groups >= 1 and batch.num_real_groups == G and G_b == G + batch.padding_groups
    assert G_b == bucket_size(G + 1)  # the group count rounded up on the ladder, one padding group at least
    # the real groups: pack_groups's layout, host metadata and tensors (they come first)
    assert batch.group_layout[:G] == ref.group_layout
    assert batch.group_spans[:G] == ref.group_spans and batch.group_rows[:G] == ref.group_rows
    T, nr, nt = ref.num_tokens, ref.logit_rows.shape[0], ref.num_targets
    for name in ("input_ids", "position_ids", "group_ids", "candidate_ids"):
        assert torch.equal(getattr(batch, name)[:, :T], getattr(ref, name)[:, :T]), name
    for name in ("candidate_mask", "candidate_lens", "prompt_lens", "group_starts", "group_lens"):
        assert torch.equal(getattr(batch, name)[:G], getattr(ref, name)), name
    assert torch.equal(batch.logit_rows[:nr], ref.logit_rows) and torch.equal(batch.row_ptr[: nr + 1], ref.row_ptr)
    for name in ("target_rows", "target_ids", "target_candidates"):
        assert torch.equal(getattr(batch, name)[:nt], getattr(ref, name)), name

    # padding groups: a one-token pad prompt, the chosen candidate only, filling Nr exactly
    pad = batch.candidate_mask[G:]
    assert pad[:, 0].all() and not pad[:, 1:].any()
    assert (batch.candidate_lens[G:, 0] >= 1).all() and (batch.candidate_lens[G:, 1:] == 0).all()
    assert all(p == 1 and len(lens) == 1 for p, lens in batch.group_layout[G:])
    assert (batch.prompt_lens[G:] == 1).all()
    assert (batch.target_ids[nt:] == 0).all() and (batch.target_candidates[nt:] % C == 0).all()
    assert batch.group_rows[-1][1] == Nr and batch.group_rows[-1][3] == N
    used = batch.group_spans[-1][2]  # the padding groups follow the real ones; then padding slots
    assert batch.group_spans[G][1] == T and used <= L and (batch.group_ids[0, used:] == -1).all()
    assert batch.num_tokens == T and batch.max_span == ref.max_span  # of the real groups
    return batch


@pytest.mark.parametrize("seed, n_groups", [(0, 1), (1, 3), (2, 6), (3, 9), (4, 10), (5, 17)])
@pytest.mark.parametrize("quanta", [Q, dict(row_quantum=256, rows_quantum=64), dict(row_quantum=1, rows_quantum=1)],
                         ids=["small", "default", "unit"])
def test_pack_bucketed_layout(seed, n_groups, quanta):
    _check_against_pack_groups(random_groups(seed, n_groups), quanta)


def test_two_group_sets_share_a_bucket():
    a, b = pack_bucketed(GROUPS_A, vocab_size=V, **Q), pack_bucketed(GROUPS_B, vocab_size=V, **Q)
    assert a.group_layout != b.group_layout and a.group_rows != b.group_rows
    assert _tokens(GROUPS_A) != _tokens(GROUPS_B) and _rows(GROUPS_A) != _rows(GROUPS_B)
    assert a.bucket == b.bucket == (24, 4, 3, 12, 15)
    assert a.padding_groups == b.padding_groups == 1
    for name, t in vars(a).items():
        if isinstance(t, torch.Tensor):
            assert t.shape == getattr(b, name).shape and t.dtype == getattr(b, name).dtype, name
    # the unbucketed batches of the same groups have other shapes (the negative control)
    pa, pb = pack_groups(GROUPS_A), pack_groups(GROUPS_B)
    assert pa.shape != pb.shape and pa.logit_rows.shape != pb.logit_rows.shape


def test_num_candidates_pads_the_candidate_axis():
    batch = pack_bucketed(GROUPS_A, num_candidates=5, **Q)
    assert batch.bucket[2] == 5 and batch.candidate_mask.shape[1] == 5
    assert not batch.candidate_mask[:, 3:].any()


@pytest.mark.parametrize("groups, kwargs, match", [
    ([([1, 2], [[3, V]])], dict(vocab_size=V), "outside the vocabulary"),
    ([([1, -1], [[3]])], dict(vocab_size=V), "outside the vocabulary"),
    ([], {}, "no groups"),
    ([([], [[3]])], {}, "empty prompt"),
    ([([1], [])], {}, "no candidates"),
    ([([1], [[2], []])], {}, "empty candidate"),
    ([([1], [[2], [3], [4]])], dict(num_candidates=2), "more than num_candidates"),
    ([([1, 2, 3], [[4, 5, 6]])], dict(max_positions=5), "maximum of 5"),
    ([([1.5], [[2]])], {}, "integers"),
])
def test_bad_groups_raise_as_pack_groups_does(groups, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack_groups(groups, **kwargs)
    with pytest.raises(ValueError, match=match):
        pack_bucketed(groups, **kwargs, **Q)


def test_a_padding_group_longer_than_max_positions():
    """One real group of 1 logit row: its padding group must fill the other 63 rows of the default bucket."""
    groups = [([1], [[2]])]
    pack_bucketed(groups, max_positions=8, rows_quantum=4)
    with pytest.raises(ValueError, match="does not fit 8 positions"):
        pack_bucketed(groups, max_positions=8)


@pytest.mark.parametrize("pad", [-1, 61])
def test_a_pad_id_outside_the_vocabulary_is_refused(pad):
    """The padding groups' tokens are scored targets, so the pad id must be a token of the vocabulary
    (pack_groups writes it only into unscored slots)."""
    groups = [([1, 2], [[3], [4]])]
    assert pack_bucketed(groups, vocab_size=61, pad_token_id=60, **Q).target_ids.max() <= 60
    with pytest.raises(ValueError, match=f"pad_token_id {pad} outside the vocabulary"):
        pack_bucketed(groups, vocab_size=61, pad_token_id=pad, **Q)


def test_group_loss_zeroes_padding_groups():
    """GroupLoss: loss and dL/dlogp of the padding groups are 0 (their SFT term too), for every slice."""
    batch = pack_bucketed(random_groups(4, 5), **Q)
    G, C = batch.candidate_mask.shape
    real = batch.num_real_groups
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(G, C, generator=gen) * 5
    ref = -torch.rand(G, C, generator=gen) * 5
    for loss_type in LOSS_TYPES:
        args = (ref, batch.candidate_mask, batch.candidate_lens, 0.7, 0.5, loss_type)
        plain_l, plain_g = group_loss_and_grad(logps, *args)
        assert (plain_l[real:] != 0).all()  # the SFT term, without the padding rule
        loss = GroupLoss(*args, padding_groups=batch.padding_groups)
        for groups in (slice(None), slice(0, real), slice(real - 1, G), slice(real, G)):
            got_l, got_g = loss(logps[groups], groups=groups)
            idx = torch.arange(G)[groups]
            keep = idx < real
            torch.testing.assert_close(got_l, torch.where(keep, plain_l[groups], 0.0), rtol=0, atol=0)
            torch.testing.assert_close(got_g, torch.where(keep[:, None], plain_g[groups], 0.0), rtol=0, atol=0)


# ---- loss and gradient invariance on a tiny Llama --------------------------------------------------


def tiny_llama(layers=2, heads=4, kv_heads=2):
    return conftest_llama(V, hidden=32, intermediate=48, layers=layers, heads=heads, kv_heads=kv_heads,
                          max_positions=128)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _ref(batch, seed):
    """Random reference log-probs of the real groups (0 where masked), and the same padded with zero rows."""
    gen = torch.Generator().manual_seed(seed)
    real = batch.candidate_mask[: batch.num_real_groups]
    ref = (-torch.rand(real.shape, generator=gen) * 8).masked_fill(~real, 0.0)
    return ref, torch.cat([ref, ref.new_zeros(batch.padding_groups, ref.shape[1])])


def _loss_and_grads(model, batch, ref, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    loss, metrics = sdpo_fast.candidate_sdpo_loss(model, batch, ref, **kwargs)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), metrics, grads


METRICS = ("logps", "accuracy", "reward_margins", "weights", "chosen_rewards", "rejected_rewards")


def _assert_invariant(model, groups, backend, rtol, atol, reductions=("mean", "sum"), quanta=Q, **kwargs):
    bucketed = pack_bucketed(groups, vocab_size=V, **quanta)
    plain = pack_groups(groups, vocab_size=V)
    assert bucketed.padding_groups >= 1 and bucketed.shape != plain.shape
    ref, ref_b = _ref(bucketed, seed=len(groups))
    G = len(groups)
    for reduction in reductions:
        want_l, want_m, want_g = _loss_and_grads(model, plain, ref, backend=backend, reduction=reduction, **kwargs)
        got_l, got_m, got_g = _loss_and_grads(model, bucketed, ref_b, backend=backend, reduction=reduction, **kwargs)
        assert torch.isfinite(want_l) and want_l != 0
        torch.testing.assert_close(got_l, want_l, rtol=rtol, atol=atol)
        for key in METRICS:
            assert got_m[key].shape[0] == G, key  # over the real groups only
            torch.testing.assert_close(got_m[key], want_m[key], rtol=rtol, atol=atol, equal_nan=True, msg=key)
        assert len(got_g) == len(want_g) > 0
        for g, w in zip(got_g, want_g):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol)
        assert any(w.abs().max() > 0 for w in want_g)
    return bucketed


def _skip_unavailable(backend):
    if backend not in backends.available("sdpo_loss"):
        pytest.skip(f"{backend} backend unavailable here")


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_loss_and_grads_do_not_see_the_padding(llama, backend, loss_type, sft_weight):
    _skip_unavailable(backend)
    groups = random_groups(10, 5)
    _assert_invariant(llama, groups, backend, rtol=1e-5, atol=1e-6, beta=0.7, sft_weight=sft_weight,
                      loss_type=loss_type)


def test_mean_divides_by_the_real_groups(llama):
    """mean = sum / real groups, a group without negatives (K = 0) counted as real."""
    groups = random_groups(11, 4)
    assert len(groups[1][1]) == 1
    batch = pack_bucketed(groups, vocab_size=V, **Q)
    _, ref = _ref(batch, 0)
    mean, _ = sdpo_fast.candidate_sdpo_loss(llama, batch, ref, backend="torch", sft_weight=0.5)
    total, _ = sdpo_fast.candidate_sdpo_loss(llama, batch, ref, backend="torch", sft_weight=0.5, reduction="sum")
    torch.testing.assert_close(mean * 4, total, rtol=1e-6, atol=1e-6)
    assert batch.num_groups > 4


# The CUDA-path backend on CPU: library GEMMs + the Triton row kernels under TRITON_INTERPRET=1 (set by
# conftest). chunk_rows: None = one chunk (the whole-group fused loss); 7 < Nr = 12 = several chunks,
# which for the bucketed batch are row ranges whose targets are found on the device (Chunk.t0 None).
@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if torch.cuda.is_available():
        pytest.skip("the CPU interpreter run (CUDA runs it on the device)")


@pytest.fixture
def torch_attention(monkeypatch):
    """The cublas loss kernels with the torch attention (the Triton attention interpreted is slow)."""
    monkeypatch.setattr(sm, "_attention_backend_for", lambda backend: "torch")


@pytest.mark.parametrize("chunk_rows", [None, 7], ids=["one-chunk", "device-chunks"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_cublas_loss_kernels_do_not_see_the_padding(llama, interpreter, torch_attention, cublas, loss_type,
                                                    chunk_rows):
    batch = pack_bucketed(GROUPS_A, vocab_size=V, **Q)
    Nr = batch.bucket[3]
    if chunk_rows is None:  # what the CPU chunk budget gives: one whole-group chunk
        cpu_rows = (1 << 20) // (4 * V)  # the CPU chunk budget of fp32 logits
        assert cublas.plan_chunks(batch, cpu_rows, whole_groups=True) == [cublas.Chunk(0, Nr, 0, 15, (0, 4))]
    else:  # no whole-group plan: the generic path's row chunks, targets found on the device
        assert cublas.plan_chunks(batch, chunk_rows, whole_groups=True) is None
        plan = cublas.plan_chunks(batch, chunk_rows, whole_groups=False)
        assert len(plan) == math.ceil(Nr / chunk_rows) > 1 and all(c.t0 is None for c in plan)
    _assert_invariant(llama, GROUPS_A, "cublas", rtol=1e-5, atol=1e-6, reductions=("mean",), beta=0.7,
                      sft_weight=0.5, loss_type=loss_type, options={"chunk_rows": chunk_rows})


@pytest.mark.slow  # the interpreted attention kernels: ~6 s
def test_cublas_with_triton_attention_does_not_see_the_padding(interpreter):
    """The whole CUDA code path interpreted (the Triton attention zero-fills a bucketed batch's outputs),
    on a 1-layer model, several device-side chunks."""
    model = tiny_llama(layers=1, heads=2, kv_heads=1)
    assert sm._attention_backend_for("cublas") == "triton"
    _assert_invariant(model, GROUPS_B, "cublas", rtol=1e-5, atol=1e-6, reductions=("sum",), beta=0.7, sft_weight=0.5,
                      options={"chunk_rows": 7})


# ---- plan_chunks -----------------------------------------------------------------------------------


@pytest.fixture
def cublas():
    pytest.importorskip("triton")
    import sdpo_fast.kernels.logprobs.cublas as cb

    return cb


def test_plan_is_the_buckets(cublas):
    a, b = pack_bucketed(GROUPS_A, **Q), pack_bucketed(GROUPS_B, **Q)
    L, G, C, Nr, N = a.bucket
    assert a.bucket == b.bucket and a.group_rows != b.group_rows
    for max_rows, whole in ((Nr, True), (Nr, False), (1000, True), (7, False), (5, False), (1, False)):
        pa, pb = cublas.plan_chunks(a, max_rows, whole), cublas.plan_chunks(b, max_rows, whole)
        assert pa == pb, (max_rows, whole)
        if max_rows >= Nr:
            assert pa == [cublas.Chunk(0, Nr, 0, N, (0, G))]
        else:
            assert [(c.r0, c.r1) for c in pa] == [(r, min(Nr, r + max_rows)) for r in range(0, Nr, max_rows)]
            assert all(c.t0 is None and c.t1 is None and c.groups is None for c in pa)
    assert cublas.plan_chunks(a, Nr - 1, True) is None and cublas.plan_chunks(b, 7, True) is None


def test_plans_of_unbucketed_batches_differ(cublas):
    """Negative control: the host plans of the same groups, unbucketed, follow their layouts."""
    a, b = pack_groups(GROUPS_A), pack_groups(GROUPS_B)
    for max_rows, whole in ((1000, True), (1000, False), (7, False), (5, True), (3, False)):
        pa, pb = cublas.plan_chunks(a, max_rows, whole), cublas.plan_chunks(b, max_rows, whole)
        assert pa is not None and pb is not None and pa != pb, (max_rows, whole)


@pytest.mark.parametrize("max_rows", [1, 5, 7, 11])
def test_device_side_targets_cover_each_target_once(cublas, max_rows):
    """Chunk.targets of a bucketed multi-chunk plan: every target inside exactly one chunk, on its own row."""
    batch = pack_bucketed(random_groups(5, 4), **Q)
    plan = cublas.plan_chunks(batch, max_rows, whole_groups=False)
    hits = torch.zeros(batch.num_targets, dtype=torch.long)
    for c in plan:
        local, ids, keys, inside = c.targets(batch)
        assert inside is not None and local.shape == ids.shape == keys.shape == inside.shape == (batch.num_targets,)
        assert ((local >= 0) & (local < c.r1 - c.r0)).all()
        assert torch.equal(local[inside] + c.r0, batch.target_rows[inside])
        assert torch.equal(ids, batch.target_ids) and torch.equal(keys, batch.target_candidates)
        hits += inside.long()
    assert (hits == 1).all()
