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


def _steps(runs, steps):
    """``_grads(step)`` into each ``(optimizer, params)`` of ``runs``, one optimizer step each, in turns."""
    for step in steps:
        for opt, ps in runs:
            for p, g in zip(ps, _grads(step)):
                p.grad = g
            opt.step()
            opt.zero_grad()


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
    _steps(((opt_a, a),), range(3))
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
    _steps(((opt_a, a), (opt_b, b)), range(3, 6))
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach(), pb.detach())
    assert torch.equal(opt_a.masters[0], opt_b.masters[0])


def test_the_trainer_takes_the_fused_adamw_on_cpu_and_a_for_loop_checkpoint_continues_in_it():
    """The CPU trainer's optimizer is torch's fused AdamW; a checkpoint written by the for-loop one (the
    CPU trainer before) loads into it and continues as the for-loop one would, to fp32 rounding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sdpo_fast.runtime import Runtime

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    rt = Runtime(LlamaForCausalLM(cfg), deepspeed_config=None, batch_size=2, max_grad_norm=1.0, weight_decay=0.0,
                 bf16=False, device=torch.device("cpu"))
    assert rt.optimizer.inner.defaults["fused"] is True

    loop_w, fused_w = _weights(), _weights()
    loop = MasterAdamW(loop_w, lr=LR, weight_decay=WD)
    _steps(((loop, loop_w),), range(3))
    buf = io.BytesIO()
    torch.save(loop.state_dict(), buf)
    buf.seek(0)
    fused = MasterAdamW(fused_w, lr=LR, weight_decay=WD, fused=True)
    with torch.no_grad():
        for pf, pl in zip(fused_w, loop_w):
            pf.copy_(pl)
    fused.load_state_dict(torch.load(buf, weights_only=True))
    _steps(((loop, loop_w), (fused, fused_w)), range(3, 9))
    for a, b in zip(loop.masters, fused.masters):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)
    assert not torch.equal(loop.masters[0], _weights()[0].float())  # the steps moved the weights


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


# ---------------------------------------------------------------- stochastic rounding, no masters

from sdpo_fast.optim import StochasticRoundingAdamW, round_stochastic_  # noqa: E402


def _bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 values of the bf16 numbers on either side of each float32 in ``x``: toward zero and away
    from it (equal where ``x`` is a bf16 number), from the fp64 value and the bf16 spacing at it."""
    v = x.double()
    spacing = torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))) - 7)
    toward = torch.trunc(v / spacing) * spacing
    away = torch.where(toward == v, toward, toward + torch.sign(v) * spacing)
    return toward, away


def test_round_stochastic_lands_on_a_neighbour_with_the_unbiased_probability():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(40, generator=g) * torch.logspace(-6, 3, 40).float(),
                   torch.tensor([0.0, 1.0, -2.5, 1.0 + 2**-9, -(1.0 + 3 * 2**-10)])])
    reps = 4000
    drawn = round_stochastic_(x.repeat(reps, 1).clone(), torch.Generator().manual_seed(0)).double()
    toward, away = _bf16_neighbours(x)
    assert bool(((drawn == toward) | (drawn == away)).all())
    assert torch.equal(drawn.to(torch.bfloat16).double(), drawn)  # exactly representable in bf16
    exact = toward == away
    assert bool((drawn[:, exact] == toward[exact]).all())  # bf16 values (0 included) do not move
    p = ((x.double() - toward) / (away - toward)).where(~exact, torch.zeros(()).double())
    frac_away = (drawn == away).double().mean(0)
    sigma = (p * (1 - p) / reps).sqrt().clamp_min(1e-3)
    assert bool(((frac_away - p).abs()[~exact] < 5 * sigma[~exact]).all()), (frac_away - p).abs().max()
    with pytest.raises(TypeError, match="float32"):
        round_stochastic_(torch.zeros(3, dtype=torch.bfloat16))


def test_stochastic_rounding_adamw_is_fp64_adamw_in_expectation():
    """4000 replicas of a bf16 LoRA-like weight, each given the same gradients: the replicas' mean
    follows the fp64 AdamW within a small fraction of a bf16 unit, where plain bf16 AdamW (the
    negative control) stays units away; the fp32 moments are the fp64 ones to fp32 rounding."""
    reps, lr = 4000, LR
    w0 = _weights()[0].detach()[:, :64].clone()
    params = [torch.nn.Parameter(w0.expand(reps, *w0.shape).clone())]
    ref = [torch.nn.Parameter(w0.double().clone())]
    plain = [torch.nn.Parameter(w0.clone())]
    opt = StochasticRoundingAdamW(params, lr=lr, weight_decay=WD, seed=0)
    opt_ref = torch.optim.AdamW(ref, lr=lr, weight_decay=WD)
    opt_plain = torch.optim.AdamW(plain, lr=lr, weight_decay=WD)
    for step in range(STEPS):
        grad = _grads(step)[0][:, :64].clone()
        params[0].grad = grad.expand(reps, *grad.shape).clone()
        ref[0].grad = grad.double()
        plain[0].grad = grad.clone()
        for o in (opt, opt_ref, opt_plain):
            o.step()
        opt.zero_grad()
    assert params[0].dtype == torch.bfloat16 and params[0].grad is None
    st, st_ref = opt.state[params[0]], opt_ref.state[ref[0]]
    assert st["step"] == STEPS and st["exp_avg"].dtype == torch.float32
    for key in ("exp_avg", "exp_avg_sq"):  # fp32 accumulation: a few units of fp32 rounding at the sums' scale
        scale = st_ref[key].abs().max().item()
        torch.testing.assert_close(st[key][0].double(), st_ref[key], rtol=0, atol=4 * 2**-24 * scale)
    # the bf16 spacing along the way: at the larger of the start and the end (a weight passing near 0
    # is rounded at the coarser spacings of its path)
    biggest = torch.maximum(ref[0].detach().abs(), w0.double().abs())
    ulp = torch.exp2(torch.floor(torch.log2(biggest.clamp_min(1e-30))) - 7)
    err_mean = ((params[0].detach().double().mean(0) - ref[0].detach()).abs() / ulp).max().item()
    err_plain = ((plain[0].detach().double() - ref[0].detach()).abs() / ulp).max().item()
    assert err_mean < 0.15 and err_plain > 1.0, (err_mean, err_plain)
    # every replica moved, not just in expectation: the spread is that of the rounding noise
    spread = (params[0].detach().double().std(0) / ulp).max().item()
    assert 0 < spread < 2.5, spread


def test_fp32_parameters_get_torch_adamw_exactly_and_chunks_change_no_moment():
    g = torch.Generator().manual_seed(5)
    start = [torch.randn(29, 11, generator=g).to(torch.bfloat16), torch.randn(101, generator=g), torch.randn(3, generator=g)]
    grads = [[torch.randn(t.shape, generator=g).to(t.dtype) for t in start] for _ in range(4)]
    runs = {}
    for chunk in (1 << 24, 7):  # 7: every parameter split into slices, slices of several batched together
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = StochasticRoundingAdamW(ps, lr=1e-2, weight_decay=0.1, seed=1, chunk=chunk)
        for step, gs in enumerate(grads):
            ps[0].grad, ps[1].grad = gs[0].clone(), gs[1].clone()
            ps[2].grad = None  # never a gradient: never updated, no state
            opt.step()
            opt.zero_grad()
        runs[chunk] = (ps, opt)
    ref = torch.nn.Parameter(start[1].clone())
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    for gs in grads:
        ref.grad = gs[1].clone()
        opt_ref.step()
    for ps, opt in runs.values():
        assert torch.equal(ps[1].detach(), ref.detach())
        assert torch.equal(ps[2].detach(), start[2]) and ps[2] not in opt.state
    (a, opt_a), (b, opt_b) = runs.values()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt_a.state[a[0]][key], opt_b.state[b[0]][key])
    assert not torch.equal(a[0].detach(), start[0])


def test_stochastic_rounding_state_round_trip_continues_bit_for_bit_and_bad_input_is_refused():
    a, b = _weights(), _weights()
    opt_a = StochasticRoundingAdamW(a, lr=LR, weight_decay=WD, seed=7)
    _steps(((opt_a, a),), range(3))
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    opt_b = StochasticRoundingAdamW(b, lr=LR, weight_decay=WD, seed=0)  # the seed comes from the state
    with torch.no_grad():
        for pb, pa in zip(b, a):
            pb.copy_(pa)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    _steps(((opt_a, a), (opt_b, b)), range(3, 8))
    for pa, pb in zip(a, b):
        assert torch.equal(pa.detach(), pb.detach())
    # memory: two fp32 moments per parameter, no fp32 copy of the bf16 weight
    assert all(set(st) == {"step", "exp_avg", "exp_avg_sq"} for st in opt_b.state.values())
    assert sum(t.numel() * t.element_size() for st in opt_b.state.values() for t in st.values()
               if torch.is_tensor(t)) == 8 * sum(p.numel() for p in b)
    with pytest.raises(ValueError, match="not a StochasticRoundingAdamW state"):
        opt_b.load_state_dict(MasterAdamW(_weights(), lr=LR).state_dict())
    other = StochasticRoundingAdamW([torch.nn.Parameter(torch.zeros(8, 300, dtype=torch.bfloat16))], lr=LR)
    with pytest.raises(ValueError, match="do not match"):
        other.load_state_dict(opt_b.state_dict())
    with pytest.raises(ValueError, match="bfloat16 or float32, got torch.float16"):
        StochasticRoundingAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))])
    with pytest.raises(ValueError, match="no parameters"):
        StochasticRoundingAdamW([])


def test_a_bf16_full_run_with_stochastic_rounding_resumes_exactly(tmp_path, one_thread, monkeypatch, capsys):
    """train.py --weight_update stochastic_rounding, full-parameter bf16: the checkpoint holds the
    moments and the rounding generator and no master copy; a resumed run gives the uninterrupted
    run's losses bit for bit; resuming it with the default --weight_update is refused, naming the flag."""
    import json

    from sdpo_fast import train as train_mod
    from sdpo_fast.config import parse_args
    from sdpo_fast.errors import UserError

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    common = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400", "--max_train_examples", "12",
              "--batch_size", "4", "--max_steps", "3", "--eval", "none", "--num_negatives", "3", "--stage", "sdpo",
              "--bf16", "true", "--sdpo_learning_rate", "1e-4", "--save_steps", "1"]
    sr = ["--weight_update", "stochastic_rounding"]

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows if "loss" in r and "stage" in r]

    assert train_mod.main(["--output_dir", str(tmp_path / "a"), *common, *sr]) == 0
    state = torch.load(tmp_path / "a" / "checkpoint-sdpo-1" / "state.pt", weights_only=False)
    assert all(t.dtype == torch.bfloat16 for t in state["trainable"].values())
    saved = state["optimizer"]["sr_adamw"]
    assert "masters" not in state["optimizer"] and saved["generators"]
    assert len(saved["state"]) == len(state["trainable"])
    manifest = json.loads((tmp_path / "a" / "checkpoint-sdpo-1" / "checkpoint.json").read_text())
    assert "stochastic_rounding" in json.dumps(manifest)
    assert train_mod.main(["--output_dir", str(tmp_path / "b"), *common, *sr,
                           "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-sdpo-1")]) == 0
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and len(losses(tmp_path / "a")) == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--output_dir", str(tmp_path / "c"), *common,
                        "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-sdpo-1")])
    assert exc.value.code == 2 and "--weight_update" in capsys.readouterr().err
    for bad, message in ((["--weight_update", "bf16"], "--weight_update must be one of fp32_masters, stochastic_rounding"),
                         ([*sr, "--deepspeed", "configs/zero3.json"], "for one process without --deepspeed")):
        with pytest.raises(UserError, match=message):
            parse_args(bad)


def test_clipping_norm_is_fp32_for_bf16_gradients_and_unchanged_for_fp32():
    """``Runtime``'s clip (``_clip_fp32``): clip_grad_norm_'s result for fp32 gradients, bit for bit;
    for bf16 gradients (stochastic rounding keeps them as the weights' own) an fp32 norm, where
    clip_grad_norm_ returns a bf16 one."""
    from sdpo_fast.runtime import _clip_fp32

    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(30, 7, generator=g) * 3, torch.randn(11, generator=g)]
    a = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    b = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
    for p, q, t in zip(a, b, grads):
        p.grad, q.grad = t.clone(), t.clone()
    assert torch.equal(_clip_fp32(a, 1.0), torch.nn.utils.clip_grad_norm_(b, 1.0))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a, b))
    half = [torch.nn.Parameter(torch.zeros(t.shape, dtype=torch.bfloat16)) for t in grads]
    for p, t in zip(half, grads):
        p.grad = t.to(torch.bfloat16)
    exact = torch.cat([p.grad.double().reshape(-1) for p in half]).norm().item()
    norm = _clip_fp32(half, 1.0)
    assert norm.dtype == torch.float32 and norm.item() == pytest.approx(exact, rel=1e-6)
    clipped = torch.cat([p.grad.double().reshape(-1) for p in half]).norm().item()
    assert clipped == pytest.approx(1.0, rel=1e-2)  # bf16 gradients scaled to the limit
    assert _clip_fp32([], 1.0).item() == 0.0
