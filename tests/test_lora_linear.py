"""The fused LoRA linear layer: values and gradients against an fp64 computation by hand, the same
results as peft's layer inside a model, and peft's own forward wherever the fused one does not apply."""

import copy
import io

import pytest
import torch

peft = pytest.importorskip("peft")

from peft.tuners.lora.layer import Linear as PeftLinear  # noqa: E402

import sdpo_fast.lora_linear as ll  # noqa: E402
from sdpo_fast import candidate_sdpo_loss, pack_groups  # noqa: E402
from sdpo_fast.adapters import AdapterSwitch, fuse_lora_layers, lora_model  # noqa: E402
from sdpo_fast.model import enable_activation_checkpointing  # noqa: E402


class _Proj(torch.nn.Module):
    def __init__(self, k, n, bias):
        super().__init__()
        self.q_proj = torch.nn.Linear(k, n, bias=bias)

    def forward(self, x):
        return self.q_proj(x)


def _layer(dtype, *, bias=True, k=33, n=21, r=5, alpha=12.5, dropout=0.0, train_base=False, **lora):
    torch.manual_seed(0)
    model = _Proj(k, n, bias).to(dtype)
    model = lora_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q_proj"],
                                              **lora))
    layer = model.base_model.model.q_proj
    with torch.no_grad():  # B starts at 0: give the adapter's term a value
        layer.lora_B["default"].weight.normal_(0, 0.5)
    if train_base:
        layer.base_layer.requires_grad_(True)
    return model, layer


@pytest.fixture
def calls(monkeypatch):
    """How many times the fused function ran."""
    seen = [0]
    apply = ll.LoRALinearFunction.apply

    def counted(*args):
        seen[0] += 1
        return apply(*args)

    monkeypatch.setattr(ll.LoRALinearFunction, "apply", counted)
    return seen


def _grads(model, x, g):
    model.zero_grad(set_to_none=True)
    x.grad = None
    y = model(x)
    y.backward(g)
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), named


def _by_hand(layer, x, g):
    """fp64: ``x W^T + b + s (x A^T) B^T`` and its gradients, by autograd over these four ops."""
    name = "default"
    w = layer.base_layer.weight.detach().double().requires_grad_(layer.base_layer.weight.requires_grad)
    b = layer.base_layer.bias
    b = None if b is None else b.detach().double().requires_grad_(b.requires_grad)
    a = layer.lora_A[name].weight.detach().double().requires_grad_()
    bb = layer.lora_B[name].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = x64 @ w.t() + (0 if b is None else b) + layer.scaling[name] * ((x64 @ a.t()) @ bb.t())
    y.backward(g.double())
    grads = {"lora_A.default.weight": a.grad, "lora_B.default.weight": bb.grad}
    if w.requires_grad:
        grads["base_layer.weight"] = w.grad
        if b is not None:
            grads["base_layer.bias"] = b.grad
    return y.detach(), x64.grad, grads


def _short(name):
    return name.split("q_proj.")[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,train_base", [(True, False), (False, False), (True, True)])
def test_fused_layer_matches_fp64_and_is_no_worse_than_peft(calls, dtype, bias, train_base):
    model, layer = _layer(dtype, bias=bias, train_base=train_base)
    assert type(layer) is ll.FusedLoRALinear
    x = torch.randn(3, 7, 33, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 7, 21, dtype=dtype)
    want_y, want_dx, want = _by_hand(layer, x, g)
    y, dx, got = _grads(model, x, g)
    assert calls[0] == 1
    layer.__class__ = PeftLinear  # peft's own forward on the same weights
    peft_y, peft_dx, peft_got = _grads(model, x, g)
    assert calls[0] == 1
    assert {_short(n) for n in got} == set(want) == {_short(n) for n in peft_got}

    def err(a, b):
        return (a.double() - b).abs().max().item()

    scale = want_y.abs().max().item()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    pairs = [(y, peft_y, want_y), (dx, peft_dx, want_dx)]
    pairs += [(got[n], peft_got[n], want[_short(n)]) for n in got]
    for ours, theirs, exact in pairs:
        scale = max(exact.abs().max().item(), 1.0)
        assert err(ours, exact) <= tol * scale
        # no less accurate than peft's four modules (their bf16/fp16 roundings, plus a margin of one)
        assert err(ours, exact) <= 2 * err(theirs, exact) + tol * scale / 4


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_llama(dropout=0.0):
    model = lora_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


BATCH = ([([5, 6, 7, 8, 9], [[9, 10], [11], [12, 13, 14]]), ([20, 21, 2], [[22], [23, 24], [25, 26]])])


def _step(model):
    model.zero_grad(set_to_none=True)
    loss, _ = candidate_sdpo_loss(model, pack_groups(BATCH), torch.zeros(2, 3), sft_weight=0.5, backend="torch")
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_sdpo_step_equals_peft_layers(calls, checkpointing):
    model = _lora_llama()
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    layers = [m for m in model.modules() if type(m) is ll.FusedLoRALinear]
    assert len(layers) == 2 * len(TARGETS)
    loss, grads = _step(model)
    assert calls[0] >= len(layers)  # every layer ran fused (checkpointing runs the forward twice)
    for m in layers:
        m.__class__ = PeftLinear
    n_fused = calls[0]
    peft_loss, peft_grads = _step(model)
    assert calls[0] == n_fused
    assert set(grads) == set(peft_grads) and len(grads) == 2 * 2 * len(TARGETS)  # A and B of every layer
    torch.testing.assert_close(loss, peft_loss, rtol=1e-5, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], peft_grads[n], rtol=1e-4, atol=1e-6)


def test_falls_back_to_peft_where_fusing_does_not_apply(calls):
    model, layer = _layer(torch.float32, dropout=0.25)
    x = torch.randn(4, 33)
    model.train()
    torch.manual_seed(1)
    y = model(x)
    layer.__class__ = PeftLinear
    torch.manual_seed(1)
    assert torch.equal(y, model(x)) and calls[0] == 0  # dropout on: peft's forward, the same draws
    layer.__class__ = ll.FusedLoRALinear
    model.eval()  # dropout off in eval mode: fused
    model(x)
    assert calls[0] == 1

    model, layer = _layer(torch.float32)
    base = layer.base_layer(x)
    fused = model(x)
    assert calls[0] == 2
    with AdapterSwitch(model).off():
        assert torch.equal(model(x), base)  # disabled: the base layer alone
    layer.merge()
    torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-6)  # merged: the merged base layer
    layer.unmerge()
    handle = layer.base_layer.register_forward_pre_hook(lambda m, a: None)  # as DeepSpeed ZeRO-3's gather
    torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-6)
    handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert calls[0] == 2
    model(x)
    assert calls[0] == 3

    for lora in (dict(use_dora=True), dict(lora_bias=True)):  # DoRA; a bias on B
        model, layer = _layer(torch.float32, **lora)
        assert type(layer) is ll.FusedLoRALinear
        y = model(x)
        assert calls[0] == 3
        layer.__class__ = PeftLinear
        assert torch.equal(y, model(x))

    model, layer = _layer(torch.bfloat16)  # fp32 adapters on a bf16 base (peft's default): peft casts
    layer.lora_A.float()
    layer.lora_B.float()
    xb = x.bfloat16()
    y = model(xb)
    assert calls[0] == 3
    layer.__class__ = PeftLinear
    assert torch.equal(y, model(xb))


def test_merge_save_copy_and_pickle():
    model = _lora_llama()
    fused, _ = _step(model)
    state = model.state_dict()
    clone = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (clone, loaded):
        assert sum(type(m) is ll.FusedLoRALinear for m in other.modules()) == 2 * len(TARGETS)
        torch.testing.assert_close(_step(other)[0], fused, rtol=0, atol=0)
    plain = lora_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for m in plain.modules():
        if type(m) is ll.FusedLoRALinear:
            m.__class__ = PeftLinear
    assert list(plain.state_dict()) == list(state)  # the same keys as peft's layers
    merged = model.merge_and_unload()
    assert not any(isinstance(m, PeftLinear) for m in merged.modules())
    with torch.no_grad():
        got, _ = candidate_sdpo_loss(merged, pack_groups(BATCH), torch.zeros(2, 3), sft_weight=0.5, backend="torch")
    torch.testing.assert_close(got, fused, rtol=1e-5, atol=1e-6)


def test_fuse_counts_and_leaves_other_layers():
    plain = peft.get_peft_model(_tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                               task_type="CAUSAL_LM"))
    assert fuse_lora_layers(plain) == 4
    assert fuse_lora_layers(plain) == 0  # already fused
    assert fuse_lora_layers(_tiny_llama()) == 0
