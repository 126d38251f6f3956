"""LoRA adapters: kept in a bf16 base's dtype, and the cached on/off switch of the live reference
gives exactly the log-probs of peft's ``disable_adapter()``."""

import pytest
import torch

peft = pytest.importorskip("peft")

from sdpo_fast import candidate_logprobs, pack_groups  # noqa: E402
from sdpo_fast.adapters import AdapterSwitch, lora_model  # noqa: E402


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _lora(model):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    return lora_model(model, cfg)


def test_bf16_base_gets_bf16_adapters_fp32_base_fp32():
    lora = _lora(_tiny_llama(torch.bfloat16))
    dtypes = {p.dtype for n, p in lora.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}
    assert {p.dtype for n, p in lora.named_parameters() if p.requires_grad} == {torch.bfloat16}
    plain = _lora(_tiny_llama(torch.float32))
    assert {p.dtype for n, p in plain.named_parameters() if "lora_" in n} == {torch.float32}


def test_switch_gives_disable_adapter_logprobs_exactly_and_restores():
    torch.manual_seed(0)
    model = _lora(_tiny_llama())
    with torch.no_grad():  # B starts at 0: make the adapters change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    batch = pack_groups([([5, 6, 7, 8], [[9, 10], [11], [12, 13, 14]]), ([20, 21], [[22], [23, 24]])])
    switch = AdapterSwitch(model)
    assert switch.active and len(switch.layers) == 2 * 3  # 2 layers x 3 target modules
    with torch.no_grad():
        on = candidate_logprobs(model, batch, backend="torch")
        with model.disable_adapter():
            want = candidate_logprobs(model, batch, backend="torch")
        with switch.off():
            got = candidate_logprobs(model, batch, backend="torch")
        again = candidate_logprobs(model, batch, backend="torch")
    assert torch.equal(got, want)
    assert not torch.allclose(on, want)  # the adapters do something, so the switch did
    assert torch.equal(again, on)  # switched back on
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_switch_restores_after_an_error_and_does_nothing_without_lora():
    model = _lora(_tiny_llama())
    switch = AdapterSwitch(model)
    with pytest.raises(RuntimeError):
        with switch.off():
            assert all(layer.disable_adapters for layer in switch.layers)
            raise RuntimeError("boom")
    assert not any(layer.disable_adapters for layer in switch.layers)
    assert not AdapterSwitch(_tiny_llama()).active
