"""``MasterAdamW``: AdamW on fp32 masters of half-precision weights, against an fp64 AdamW of the same
gradients (``torch.optim.AdamW`` on float64 copies, the independent reference); plain bf16 AdamW as
the negative control (the small updates it rounds away are what the masters keep)."""

import io

import pytest
import torch

from sdpo_fast.optim import MasterAdamW

LR, WD, STEPS = 1e-5, 0.01, 12


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_a = ((torch.rand(8, 301, generator=g) - 0.5) * 2 / 301**0.5).to(torch.bfloat16)  # LoRA's init scale
    bias = torch.randn(37, generator=g)  # an fp32 parameter beside it
    return [torch.nn.Parameter(lora_a), torch.nn.Parameter(bias)]


def _grads(step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(8, 301, generator=g).to(torch.bfloat16), torch.randn(37, generator=g)]


def test_updates_match_fp64_adamw_and_round_into_the_weights():
    params = _weights()
    ref = [torch.nn.Parameter(p.detach().double()) for p in params]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = MasterAdamW(params, lr=LR, weight_decay=WD)
    opt_ref = torch.optim.AdamW(ref, lr=LR, weight_decay=WD)
    opt_plain = torch.optim.AdamW(plain, lr=LR, weight_decay=WD)
    start = params[0].detach().clone()
    assert opt.masters[1] is params[1] and opt.masters[0].dtype == torch.float32
    for step in range(STEPS):
        grads = _grads(step)
        for ps, convert in ((params, lambda g: g), (ref, torch.Tensor.double), (plain, lambda g: g)):
            for p, g in zip(ps, grads):
                p.grad = convert(g.clone())
        opt.step()
        opt.zero_grad()
        opt_ref.step()
        opt_plain.step()
        assert all(p.grad is None for p in params)
    torch.testing.assert_close(opt.masters[0].double(), ref[0].detach(), rtol=0, atol=1e-7)
    assert torch.equal(params[1].detach(), plain[1].detach())  # an fp32 parameter: exactly AdamW's update
    assert torch.equal(params[0].detach(), opt.masters[0].to(torch.bfloat16))  # the weights are the rounded masters
    # the negative control: bf16 AdamW is far from the fp64 run, the masters' weights are within rounding
    ulp = torch.exp2(torch.floor(torch.log2(ref[0].detach().abs().clamp_min(1e-30))) - 7)  # bf16 spacing at the value
    err_master = ((params[0].detach().double() - ref[0].detach()).abs() / ulp).max().item()
    err_plain = ((plain[0].detach().double() - ref[0].detach()).abs() / ulp).max().item()
    assert err_master <= 0.51 and err_plain > 2 * err_master, (err_master, err_plain)
    assert (params[0] != start).float().mean() > (plain[0] != start).float().mean()


def test_master_grads_are_fp32_and_a_weight_without_gradient_stays():
    params = _weights()
    opt = MasterAdamW(params, lr=1e-2, weight_decay=0.0)
    assert opt._masters is None  # nothing allocated before the optimizer is used (an evaluation-only run)
    grads = _grads(0)
    params[0].grad = grads[0].clone()
    params[1].grad = None
    got = opt.master_grads()
    assert len(got) == 1 and got[0] is opt.masters[0] and got[0].grad.dtype == torch.float32
    torch.testing.assert_close(got[0].grad, grads[0].float(), rtol=0, atol=0)
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert opt.masters[0].grad is None  # the fp32 gradients live through the optimizer step only
    # a weight whose gradient is gone again is not updated
    opt.zero_grad()
    params[1].grad = grads[1].clone()
    kept = params[0].detach().clone()
    opt.step()
    assert torch.equal(params[0].detach(), kept) and opt.masters[0].grad is None
    assert not torch.equal(params[1].detach(), before)


def test_state_dict_round_trip_continues_exactly():
    a, b = _weights(), _weights()
    opt_a = MasterAdamW(a, lr=LR, weight_decay=WD)
    for step in range(3):
        for p, g in zip(a, _grads(step)):
            p.grad = g
        opt_a.step()
        opt_a.zero_grad()
    opt_b = MasterAdamW(b, lr=LR, weight_decay=WD)
    buf = io.BytesIO()  # through a file, as a checkpoint (a state dict in memory shares its tensors)
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    with torch.no_grad():
        for pb, pa in zip(b, a):
            pb.copy_(pa)
    opt_b.load_state_dict(state)
    torch.testing.assert_close(opt_b.masters[0], opt_a.masters[0], rtol=0, atol=0)
    for step in range(3, 6):
        for opt, ps in ((opt_a, a), (opt_b, b)):
            for p, g in zip(ps, _grads(step)):
                p.grad = g
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach(), pb.detach())
    assert torch.equal(opt_a.masters[0], opt_b.masters[0])


def test_a_plain_adamw_state_loads_and_wrong_masters_are_refused():
    params = _weights()
    plain = torch.optim.AdamW(params, lr=LR, weight_decay=WD)  # a checkpoint written before the masters
    for p, g in zip(params, _grads(0)):
        p.grad = g
    plain.step()
    opt = MasterAdamW(params, lr=LR, weight_decay=WD)
    opt.load_state_dict(plain.state_dict())
    torch.testing.assert_close(opt.masters[0], params[0].detach().float(), rtol=0, atol=0)
    assert opt.state[opt.masters[0]]["step"] == 1
    other = MasterAdamW([torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.bfloat16))], lr=LR)
    with pytest.raises(ValueError, match="master weights do not match"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="no parameters"):
        MasterAdamW([], lr=LR)


def test_a_bf16_lora_run_resumes_exactly_with_its_masters(tmp_path, one_thread, monkeypatch):
    """train.py in bf16 (LoRA adapters in bf16, fp32 masters in the optimizer): the checkpoint holds
    the masters, and a run resumed from it gives the uninterrupted run's losses bit for bit."""
    import json

    from sdpo_fast import train as train_mod

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    common = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400", "--max_train_examples", "12",
              "--batch_size", "4", "--max_steps", "3", "--eval", "none", "--num_negatives", "3", "--stage", "sdpo",
              "--lora", "--bf16", "true", "--sdpo_learning_rate", "1e-5", "--save_steps", "1"]

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r and "stage" in r]

    assert train_mod.main(["--output_dir", str(tmp_path / "a"), *common]) == 0
    state = torch.load(tmp_path / "a" / "checkpoint-sdpo-1" / "state.pt", weights_only=False)
    adapters = {n: t for n, t in state["trainable"].items() if "lora_" in n}
    assert adapters and all(t.dtype == torch.bfloat16 for t in adapters.values())
    masters = state["optimizer"]["masters"]
    assert len(masters) == len(state["trainable"]) and all(m.dtype == torch.float32 for m in masters)
    for m, t in zip(masters, state["trainable"].values()):  # the weights are the rounded masters
        assert torch.equal(m.to(torch.bfloat16), t)
    assert train_mod.main(["--output_dir", str(tmp_path / "b"), *common,
                           "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-sdpo-1")]) == 0
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 3
