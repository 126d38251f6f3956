"""candidate_logprobs through HF models vs the naive layout: each candidate run with its own copy of
the prompt through an unmodified (eager attention) copy of the model."""

import copy

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import sdpo_fast
from sdpo_fast.model import enable_activation_checkpointing
from references import naive_model_logprobs
from sdpo_fast.loss import sdpo_loss

V = 101


def tiny(arch):
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=2))
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=None))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=1))
    if arch == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(**common, num_attention_heads=4, rotary_pct=0.5))
    raise ValueError(arch)


def random_groups(seed, n_groups=3):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for _ in range(n_groups):
        P = int(torch.randint(1, 10, (1,), generator=gen))
        K = int(torch.randint(1, 5, (1,), generator=gen))  # K varies per group
        prompt = torch.randint(0, V, (P,), generator=gen).tolist()
        lens = torch.randint(1, 5, (K + 1,), generator=gen).tolist()
        lens[int(torch.randint(0, K + 1, (1,), generator=gen))] = 1  # a 1-token candidate in every group
        groups.append((prompt, [torch.randint(0, V, (n,), generator=gen).tolist() for n in lens]))
    return groups


def naive_logprobs(model, groups, C):
    return naive_model_logprobs(model, groups, C)


def loss_of(logps, ref, mask):
    return sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=0.5, rejected_mask=mask[:, 1:])


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gpt_neox"])
def test_matches_naive_forward_loss_and_every_gradient(arch):
    torch.manual_seed(0)
    model = tiny(arch).float()
    naive = copy.deepcopy(model)
    naive.set_attn_implementation("eager")
    groups = random_groups(1)
    batch = sdpo_fast.pack_groups(
        groups, vocab_size=V, max_positions=model.config.max_position_embeddings, pad_to_multiple_of=8
    )
    ref = -torch.rand(batch.candidate_mask.shape) * 10

    got = sdpo_fast.candidate_logprobs(model, batch, backend="torch")
    want = naive_logprobs(naive, groups, batch.num_candidates)
    mask = batch.candidate_mask
    assert rel_err(got[mask], want[mask]) < 1e-4
    assert (got[~mask] == 0).all()

    loss_of(got, ref, mask).backward()
    loss_of(want, ref, mask).backward()
    named = dict(naive.named_parameters())
    for name, p in model.named_parameters():
        q = named[name]
        assert p.grad is not None and q.grad is not None, name
        assert rel_err(p.grad, q.grad) < 1e-3, name


def test_several_rows_eval_mode_and_plain_calls_unchanged():
    torch.manual_seed(1)
    model = tiny("llama").eval()
    groups = random_groups(2, n_groups=4)
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=30, pad_to_multiple_of=4)
    assert batch.shape[0] > 1
    with torch.no_grad():
        got = sdpo_fast.candidate_logprobs(model, batch, backend="torch")
        want = naive_logprobs(model, groups, batch.num_candidates)
    assert not got.requires_grad
    assert model.config._attn_implementation == "sdpo_fast"
    mask = batch.candidate_mask
    assert rel_err(got[mask], want[mask]) < 1e-4

    # Ordinary calls on the switched model still behave like SDPA, padding included.
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("sdpa")
    ids = torch.randint(0, V, (2, 7))
    am = torch.ones(2, 7, dtype=torch.long)
    am[1, :3] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=am).logits[am.bool()], reference(ids, attention_mask=am).logits[am.bool()])
        g1 = model.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
        g2 = reference.generate(ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    base = tiny("llama")
    naive = copy.deepcopy(base)
    naive.set_attn_implementation("eager")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    naive = peft.get_peft_model(naive, copy.deepcopy(cfg))
    naive.load_state_dict(model.state_dict())
    groups = random_groups(3)
    batch = sdpo_fast.pack_groups(groups)
    ref = -torch.rand(batch.candidate_mask.shape) * 10
    got = sdpo_fast.candidate_logprobs(model, batch, backend="torch")
    want = naive_logprobs(naive, groups, batch.num_candidates)
    mask = batch.candidate_mask
    assert rel_err(got[mask], want[mask]) < 1e-4
    loss_of(got, ref, mask).backward()
    loss_of(want, ref, mask).backward()
    named = dict(naive.named_parameters())
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n, _ in trained)
    for name, p in trained:
        assert rel_err(p.grad, named[name].grad) < 1e-3, name
    # The reference model of LoRA S-DPO: adapters disabled equals the base model.
    with torch.no_grad(), model.disable_adapter():
        off = sdpo_fast.candidate_logprobs(model, batch, backend="torch")
    with torch.no_grad(), naive.disable_adapter():
        base_naive = naive_logprobs(naive, groups, batch.num_candidates)
    assert rel_err(off[mask], base_naive[mask]) < 1e-4


def test_gradient_checkpointing():
    torch.manual_seed(4)
    model = tiny("qwen2")
    plain = copy.deepcopy(model)
    enable_activation_checkpointing(model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    model.train()
    plain.train()
    groups = random_groups(5)
    batch = sdpo_fast.pack_groups(groups)
    ref = -torch.rand(batch.candidate_mask.shape) * 10
    mask = batch.candidate_mask
    loss_of(sdpo_fast.candidate_logprobs(model, batch, backend="torch"), ref, mask).backward()
    loss_of(sdpo_fast.candidate_logprobs(plain, batch, backend="torch"), ref, mask).backward()
    named = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, named[name].grad) < 1e-5, name


def test_sliding_window_too_short_is_refused():
    model = MistralForCausalLM(
        MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    )
    batch = sdpo_fast.pack_groups([([1, 2, 3, 4], [[5, 6], [7]])])
    with pytest.raises(NotImplementedError, match="sliding window"):
        sdpo_fast.candidate_logprobs(model, batch, backend="torch")


@pytest.mark.parametrize("sft_weight", [0.0, 0.3])
def test_candidate_sdpo_loss_matches_naive(sft_weight):
    torch.manual_seed(6)
    model = tiny("llama")
    naive = copy.deepcopy(model)
    naive.set_attn_implementation("eager")
    groups = random_groups(7)
    batch = sdpo_fast.pack_groups(groups)
    ref = -torch.rand(batch.candidate_mask.shape) * 10
    loss, metrics = sdpo_fast.candidate_sdpo_loss(model, batch, ref, beta=0.5, sft_weight=sft_weight, backend="torch")
    loss.backward()
    want = naive_logprobs(naive, groups, batch.num_candidates)
    mask = batch.candidate_mask
    expected = sdpo_loss(want[:, 0], want[:, 1:], ref[:, 0], ref[:, 1:], beta=0.5, rejected_mask=mask[:, 1:], reduction="none")
    expected = (expected - sft_weight * want[:, 0] / batch.candidate_lens[:, 0]).mean()
    expected.backward()
    assert abs(loss.item() - expected.item()) < 1e-4 * max(1.0, abs(expected.item()))
    assert rel_err(metrics["logps"][mask], want.detach()[mask]) < 1e-4
    named = dict(naive.named_parameters())
    for name, p in model.named_parameters():
        assert rel_err(p.grad, named[name].grad) < 1e-3, name
