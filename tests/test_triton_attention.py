"""Triton shared-prefix flash attention vs a dense-mask SDPA reference in fp64, the tile tables vs the
mask they must cover, and candidate log-probs of a tiny GQA Llama through the kernel vs the naive
per-candidate forward. On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py)."""

import copy

import pytest
import torch

import sdpo_fast
from references import dense_attention as dense_reference
from references import naive_model_logprobs
from sdpo_fast import backends
from sdpo_fast.attention import packed_forward
from sdpo_fast.kernels.attention.reference import torch_shared_prefix_attention
from sdpo_fast.logprobs import sequence_logprobs

attn = pytest.importorskip("sdpo_fast.kernels.attention.launch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = attn.INTERPRETER_CONFIG
# Different block sizes per kernel: query tiles of 32 hold several candidates, key tiles of 32 too.
MIXED = attn.AttentionConfig(fwd_m=32, fwd_n=16, dq_m=16, dq_n=32, dkdv_n=32, dkdv_m=16,
                             fwd_warps=4, fwd_stages=1, dq_warps=4, dq_stages=1, dkdv_warps=4, dkdv_stages=1)


def make_batch(spec, seed=0, vocab=50, **pack):
    """spec: list of (prompt_len, [candidate lens]) -> PackedBatch on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    groups = [
        (torch.randint(0, vocab, (P,), generator=gen).tolist(),
         [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lens])
        for P, lens in spec
    ]
    return sdpo_fast.pack_groups(groups, **pack).to(DEVICE)


# Several groups per row, odd lengths, 1-token prompt and candidates, padding at row ends, prompts
# shorter and longer than a block, a query tile spanning many short candidates.
SPECS = {
    "multi_group_rows": dict(spec=[(37, [5, 1, 17]), (3, [2]), (20, [9, 16, 3, 1])],
                             pack=dict(max_tokens_per_row=70, pad_to_multiple_of=8)),
    "tiny_and_long": dict(spec=[(1, [1]), (1, [1, 1, 2]), (45, [1, 2, 3, 1, 2, 1, 33])],
                          pack=dict(pad_to_multiple_of=16)),
}


def qkv(batch, H, Hkv, Dh, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    R, L = batch.shape
    # query in transformers' layout: [R, L, H, Dh] transposed to [R, H, L, Dh] (non-contiguous).
    q = torch.randn(R, L, H, Dh, generator=gen).transpose(1, 2)
    k = torch.randn(R, Hkv, L, Dh, generator=gen)
    v = torch.randn(R, Hkv, L, Dh, generator=gen)
    return [t.to(DEVICE, dtype).requires_grad_() for t in (q, k, v)]


def outputs_and_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(dout.to(o.dtype))
    return [o.detach()] + [t.grad for t in (q, k, v)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_against_reference(batch, H, Hkv, Dh, dtype, config):
    scaling = Dh ** -0.5
    q, k, v = qkv(batch, H, Hkv, Dh, dtype)
    R, L = batch.shape
    dout = torch.randn(R, L, H, Dh, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = outputs_and_grads(
        lambda q, k, v: attn.triton_shared_prefix_attention(q, k, v, batch, scaling, config=config), q, k, v, dout)
    want = outputs_and_grads(lambda q, k, v: dense_reference(q, k, v, batch, scaling), q, k, v, dout)
    # PyTorch's own error in the same dtype sets the bar (fp32 runs have an absolute floor).
    same = outputs_and_grads(lambda q, k, v: dense_reference(q, k, v, batch, scaling, dtype), q, k, v, dout)
    pad = batch.group_ids < 0
    for name, g, w, s in zip(("out", "dq", "dk", "dv"), got, want, same):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        err, bar = rel(g, w), max(2 * rel(s, w), 1e-5)
        assert err <= bar, f"{name}: relative error {err:.2e} > {bar:.2e} (torch {dtype}: {rel(s, w):.2e})"
    # Padding tokens: zero output, zero gradients.
    assert (got[0][pad] == 0).all()
    for grad in got[1:]:
        assert (grad.transpose(1, 2)[pad] == 0).all()


CPU_DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("case", list(SPECS))
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_matches_dense_fp64_reference(case, dtype):
    batch = make_batch(SPECS[case]["spec"], **SPECS[case]["pack"])
    check_against_reference(batch, H=4, Hkv=2, Dh=24, dtype=dtype, config=SMALL)


@pytest.mark.parametrize("H,Hkv,Dh", [(2, 2, 16), (4, 1, 32)])
def test_mha_mqa_and_mixed_blocks(H, Hkv, Dh):
    batch = make_batch([(21, [1, 7, 4, 2, 2, 3]), (40, [12, 1])], seed=3, max_tokens_per_row=64)
    check_against_reference(batch, H=H, Hkv=Hkv, Dh=Dh, dtype=torch.float32, config=MIXED)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case,dtype,Dh",
    [("multi_group_rows", torch.bfloat16, d) for d in (64, 80, 96, 128)]
    + [("multi_group_rows", torch.float16, 128), ("tiny_and_long", torch.bfloat16, 128)],
    ids=str,
)
def test_cuda_default_blocks(case, dtype, Dh):
    batch = make_batch(SPECS[case]["spec"], **SPECS[case]["pack"])
    check_against_reference(batch, H=8, Hkv=2, Dh=Dh, dtype=dtype, config=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_many_groups_long_prompts(dtype):
    gen = torch.Generator().manual_seed(5)
    spec = [(int(torch.randint(1, 700, (1,), generator=gen)),
             torch.randint(1, 40, (int(torch.randint(1, 17, (1,), generator=gen)),), generator=gen).tolist())
            for _ in range(12)]
    batch = make_batch(spec, max_tokens_per_row=2048)
    check_against_reference(batch, H=8, Hkv=2, Dh=128, dtype=dtype, config=None)


def visible(batch):
    """Dense [R, L, L] shared-prefix mask restricted to real tokens."""
    m = batch.attention_mask()[:, 0].clone()
    real = batch.group_ids >= 0
    return m & real[:, :, None] & real[:, None, :]


@pytest.mark.parametrize("block", [16, 32])
def test_query_tiles_visit_only_needed_keys(block):
    """Each real query in exactly one tile; range A is visible to every query of its tile; A and B
    together hold every key a query sees; B holds no key of another group or unrelated candidate."""
    batch = make_batch(SPECS["multi_group_rows"]["spec"] + [(1, [1, 40, 1])], max_tokens_per_row=80)
    vis, cand = visible(batch).cpu(), batch.candidate_ids.cpu()
    R, L = batch.shape
    covered = torch.zeros(R, L, dtype=torch.long)
    for row, qs, qe, a0, a1, b0, _, _ in attn.query_tiles(batch, block).cpu().tolist():
        if qs >= qe:
            continue
        assert qe - qs <= block
        covered[row, qs:qe] += 1
        assert vis[row, qs:qe, a0:a1].all()
        seen = torch.zeros(L, dtype=torch.bool)
        seen[a0:a1] = True
        seen[b0:qe] = True
        assert not (vis[row, qs:qe] & ~seen).any()
        own = set(cand[row, qs:qe].tolist()) | {-1}
        assert set(cand[row, b0:qe].tolist()) <= own
        assert (batch.group_ids[row, b0:qe].cpu() == batch.group_ids[row, qs].cpu()).all()
    assert torch.equal(covered, (batch.group_ids >= 0).long().cpu())


@pytest.mark.parametrize("block", [16, 32])
def test_key_tiles_cover_every_query_that_sees_them(block):
    batch = make_batch(SPECS["tiny_and_long"]["spec"] + [(30, [3, 3, 20])], max_tokens_per_row=90)
    vis = visible(batch).cpu()
    R, L = batch.shape
    covered = torch.zeros(R, L, dtype=torch.long)
    for row, ks, ke, m_end, q_end, *_ in attn.key_tiles(batch, block).cpu().tolist():
        if ks >= ke:
            continue
        covered[row, ks:ke] += 1
        sees = vis[row, :, ks:ke].any(1).nonzero().flatten()
        assert sees.min() >= ks and sees.max() < q_end
        assert vis[row, m_end:q_end, ks:ke].all()  # the unmasked part sees the whole tile
    assert torch.equal(covered, (batch.group_ids >= 0).long().cpu())


def test_agrees_with_torch_backend_and_rejects_bad_input():
    batch = make_batch([(5, [2, 1])])
    q, k, v = qkv(batch, 4, 2, 16, torch.float32)
    got = attn.triton_shared_prefix_attention(q, k, v, batch, 0.25, config=SMALL)
    want = torch_shared_prefix_attention(q, k, v, batch, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "triton" in backends.available("attention")
    with pytest.raises(NotImplementedError, match="dropout"):
        attn.triton_shared_prefix_attention(q, k, v, batch, 0.25, dropout=0.1)
    with pytest.raises(ValueError, match="multiple"):
        attn.triton_shared_prefix_attention(q[:, :3], k, v, batch, 0.25)
    with pytest.raises(ValueError, match="batch is"):
        attn.triton_shared_prefix_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], batch, 0.25)
    with pytest.raises(ValueError, match="power of two"):
        attn.AttentionConfig(fwd_m=24)


# ------------------------------------------------------------------------------------ end to end

V = 97


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).float()


def naive_logprobs(model, groups, C):
    return naive_model_logprobs(model, groups, C, DEVICE)


def triton_logprobs(model, batch):
    """candidate_logprobs with the triton backend; when the triton log-prob kernel is not available
    the decoder runs with triton attention and the torch log-prob reference."""
    if "triton" in backends.available("logprobs"):
        return sdpo_fast.candidate_logprobs(model, batch, backend="triton")
    sdpo_fast.attention.enable_shared_prefix(model)
    with packed_forward():
        hidden = model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                                     sdpo_batch=batch, sdpo_attention_backend="triton").last_hidden_state
    return sequence_logprobs(hidden, model.lm_head.weight, batch, backend="torch")


# "cublas" is a log-prob backend: candidate_logprobs runs its attention through the Triton kernel.
@pytest.mark.parametrize("backend", ["triton", "cublas"])
def test_candidate_logprobs_tiny_gqa_llama_matches_naive_forward_and_gradients(monkeypatch, backend):
    torch.manual_seed(0)
    calls = []
    kernel = backends.get("attention", "triton", DEVICE)
    monkeypatch.setitem(backends._loaded, ("attention", "triton"), lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = tiny_llama().to(DEVICE)
    naive = copy.deepcopy(model)
    naive.set_attn_implementation("eager")
    gen = torch.Generator().manual_seed(4)
    groups = []
    for P, lens in [(9, [3, 1, 2]), (1, [1, 4]), (23, [2, 1, 5, 1, 3])]:
        groups.append((torch.randint(0, V, (P,), generator=gen).tolist(),
                       [torch.randint(0, V, (n,), generator=gen).tolist() for n in lens]))
    batch = sdpo_fast.pack_groups(groups, vocab_size=V, max_tokens_per_row=48, pad_to_multiple_of=8).to(DEVICE)
    weights = torch.randn(batch.candidate_mask.shape, device=DEVICE) * batch.candidate_mask

    if backend == "triton":
        got = triton_logprobs(model, batch)
    else:
        got = sdpo_fast.candidate_logprobs(model, batch, backend="cublas")
    want = naive_logprobs(naive, groups, batch.num_candidates)
    mask = batch.candidate_mask
    assert len(calls) == model.config.num_hidden_layers  # the packed forward went through the kernel
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for (name, p), p_naive in zip(model.named_parameters(), naive.parameters()):
        torch.testing.assert_close(p.grad, p_naive.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow  # ahead-of-time compiles for sm_90
def test_kernels_compile_for_hopper_without_spills():
    """The CUDA default blocks compile for sm_90 (bf16, Dh=128) to HGMMA with no spills or local memory.
    Uses the ptxas inside the triton wheel (no GPU needed), in a subprocess without the interpreter."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("triton wheel without the CUDA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    res = subprocess.run([sys.executable, "-m", "sdpo_fast.kernels.attention.aot", "--head-dims", "128", "--check"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert sum(line.startswith("| 128 |") for line in res.stdout.splitlines()) == 3, res.stdout


@pytest.mark.slow  # runs the benchmark script end to end
def test_benchmark_script_runs_and_methods_agree(tmp_path):
    """benchmarks/bench_attention.py on a tiny CPU shape: writes JSON + markdown, and every method's
    output (dense SDPA, the torch reference, the naive layout) matches the kernel's. Timings unchecked."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--prompts", "5", "--ks", "2", "--cand", "1", "3", "--tokens", "30", "--repeats", "1",
                "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32",
                "--methods", "triton", "torch", "sdpa", "naive", "--out", str(tmp_path), "--name", "t"])
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert (tmp_path / "t.md").exists() and len(rows) == 1
    methods = rows[0]["methods"]
    assert set(methods) == {"triton", "torch", "sdpa", "naive"}
    for name, res in methods.items():
        assert "error" not in res, (name, res)
        assert res["max_rel_diff"] < 1e-4 and res["fwd_bwd_ms"] > 0, (name, res)
