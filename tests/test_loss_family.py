"""The multi-negative loss family (``loss_type``: sdpo, dmpo, dpo_pairs, dynamic) against the direct fp64
formulas of ``references.naive_family``: values and gradients (autograd of the formula) with masks and
variable K, the K = 1 reduction, the closed-form dL/dlogp, the metrics' weights, every CPU backend of
the fused loss (torch, native; triton under TRITON_INTERPRET=1), and the train.py flag."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdpo_fast
from references import naive_family, naive_family_loss, reference_logps
from sdpo_fast import backends
from sdpo_fast.loss import LOSS_TYPES, fused_sdpo_loss, group_loss_and_grad, sdpo_loss, sdpo_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(seed, G=9, K=6, scale=3.0, ties=False):
    """Policy / reference log-probs ``[G]``, ``[G, K]`` (fp64 leaves) and a variable-K mask with a group of
    0, one of 1 and one of K real negatives. ``ties``: some negatives the policy scores exactly as the
    chosen one (dynamic's boundary is ``>=``)."""
    gen = torch.Generator().manual_seed(seed)
    pc = -torch.rand(G, generator=gen, dtype=torch.float64) * 10 * scale
    pr = -torch.rand(G, K, generator=gen, dtype=torch.float64) * 10 * scale
    rc = -torch.rand(G, generator=gen, dtype=torch.float64) * 10 * scale
    rr = -torch.rand(G, K, generator=gen, dtype=torch.float64) * 10 * scale
    k = torch.randint(0, K + 1, (G,), generator=gen)
    k[0], k[1], k[2] = 0, 1, K
    mask = torch.arange(K)[None, :] < k[:, None]
    if ties:
        pr[3, 0] = pc[3]
        pr[4, :] = pc[4]
    pr = pr.masked_fill(~mask, -1e4)  # junk in masked slots must not leak
    return [t.float().requires_grad_(i < 2) for i, t in enumerate((pc, pr, rc, rr))], mask


def _grads(fn, leaves):
    for t in leaves:
        t.grad = None
    fn().sum().backward()
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_value_and_gradient_match_the_direct_formula(loss_type, beta, ties):
    (pc, pr, rc, rr), mask = _inputs(int(beta * 10) + ties, ties=ties)
    got = sdpo_loss(pc, pr, rc, rr, beta, mask, "none", loss_type=loss_type)
    g_pc, g_pr = _grads(lambda: sdpo_loss(pc, pr, rc, rr, beta, mask, "none", loss_type=loss_type), (pc, pr))
    pc64, pr64 = (t.detach().double().requires_grad_(True) for t in (pc, pr))
    want = naive_family(pc64, pr64, rc.double(), rr.double(), beta, mask, loss_type)
    want.sum().backward()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(g_pc.double(), pc64.grad, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(g_pr.double(), pr64.grad, rtol=2e-5, atol=1e-6)
    assert got[0] == 0 and g_pc[0] == 0 and (g_pr[~mask] == 0).all()  # no negative: 0, masked: no gradient


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_closed_form_gradient_and_weights_are_the_autograd_ones(loss_type):
    (pc, pr, rc, rr), mask = _inputs(5)
    beta, sft = 0.7, 0.3
    G, K = pr.shape
    logps = torch.cat([pc[:, None], pr], 1).detach().double().requires_grad_(True)
    ref = torch.cat([rc[:, None], rr], 1).double()
    cmask = torch.cat([torch.ones(G, 1, dtype=torch.bool), mask], 1)
    lens = torch.randint(1, 6, (G, K + 1)) * cmask
    per = naive_family(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta, mask, loss_type)
    per = per - sft * logps[:, 0] / lens[:, 0]
    per.sum().backward()
    loss_g, grad = group_loss_and_grad(logps.detach().float(), ref.float(), cmask, lens, beta, sft, loss_type)
    torch.testing.assert_close(loss_g.double(), per.detach(), rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), logps.grad, rtol=2e-5, atol=1e-6)
    w = sdpo_metrics(pc, pr, rc, rr, beta, mask, loss_type=loss_type)["weights"]
    torch.testing.assert_close(beta * w.double(), logps.grad[:, 1:], rtol=2e-5, atol=1e-6)
    assert (w[~mask] == 0).all() and (w >= 0).all()


@pytest.mark.parametrize("loss_type", ["sdpo", "dmpo", "dpo_pairs"])
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_k1_is_dpo(loss_type, beta):
    (pc, pr, rc, rr), _ = _inputs(11, G=7, K=1)
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr[:, 0] - rr[:, 0])))
    torch.testing.assert_close(sdpo_loss(pc, pr, rc, rr, beta, reduction="none", loss_type=loss_type), dpo)


def test_dynamic_k1_is_dpo_with_its_margin_beta():
    """K = 1: the one negative is the boundary set, D = B so d2 = 0, beta_1 = beta (1 + tanh((d1 - 6) / |d1|) / 2)."""
    beta = 0.8
    pc = torch.tensor([-5.0, -5.0, -9.0])
    pr = torch.tensor([[-3.0], [-20.0], [-9.0]])  # above the chosen, far below it (the fallback), tied
    rc, rr = torch.tensor([-6.0, -4.0, -7.0]), torch.tensor([[-2.0], [-21.0], [-8.0]])
    d1 = pc - pr[:, 0]
    f = torch.where(d1 != 0, 1 + 0.5 * torch.tanh((d1 - 6) / d1.abs()), torch.full_like(d1, 0.5))
    assert f.tolist() == pytest.approx([1 + 0.5 * math.tanh(-8 / 2), 1 + 0.5 * math.tanh(9 / 15), 0.5])
    dpo = -F.logsigmoid(beta * f * ((pc - rc) - (pr[:, 0] - rr[:, 0])))
    torch.testing.assert_close(sdpo_loss(pc, pr, rc, rr, beta, reduction="none", loss_type="dynamic"), dpo)


def test_dynamic_uses_the_boundary_negatives_only():
    """Negatives below the chosen item's policy score get no gradient while one reaches it."""
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([[-4.0, -5.0, -30.0, -40.0]], requires_grad=True)
    rc, rr = torch.tensor([-5.5]), torch.full((1, 4), -6.0)
    sdpo_loss(pc, pr, rc, rr, 1.0, loss_type="dynamic").backward()
    assert (pr.grad[0, :2] > 0).all() and (pr.grad[0, 2:] == 0).all()
    torch.testing.assert_close(pc.grad, -pr.grad.sum(1))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_no_negative_columns_at_all(loss_type):
    """C = 1 (the SFT batch shape): every type gives 0 and no gradient."""
    pc = torch.tensor([-3.0, -4.0], requires_grad=True)
    empty = torch.zeros(2, 0)
    loss = sdpo_loss(pc, empty, torch.zeros(2), empty, loss_type=loss_type)
    loss.backward()
    assert loss.item() == 0 and (pc.grad == 0).all()


def test_bad_loss_type():
    (pc, pr, rc, rr), mask = _inputs(0)
    with pytest.raises(ValueError, match="loss_type must be one of sdpo, dmpo, dpo_pairs, dynamic"):
        sdpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type"):
        sdpo_metrics(pc, pr, rc, rr, loss_type="SDPO")


# ---- every backend of the fused loss: one driver, one contract -------------------------------------

V, D = 97, 24


def _fused_case(seed):
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for K in (0, 1, 3, 5, 2):
        P = int(torch.randint(1, 6, (1,), generator=gen))
        cands = [torch.randint(0, V, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(K + 1)]
        groups.append((torch.randint(0, V, (P,), generator=gen).tolist(), cands))
    batch = sdpo_fast.pack_groups(groups, max_tokens_per_row=24)
    T = batch.shape[0] * batch.shape[1]
    h = torch.randn(T, D, generator=gen)
    w = torch.randn(V, D, generator=gen) / math.sqrt(D) * 3
    ref = (reference_logps(h, w, groups, batch) + torch.randn(batch.candidate_mask.shape, generator=gen)).float()
    return groups, batch, h, w, ref * batch.candidate_mask


def _backend_params():
    out = [pytest.param("cpu", "torch", {}, id="torch"),
           pytest.param("cpu", "native", {}, id="native"),
           pytest.param("cpu", "native", {"tile_elements": 1}, id="native-recompute"),
           pytest.param("cuda", "cublas", {}, id="cuda-cublas", marks=pytest.mark.gpu),
           pytest.param("cuda", "triton", {}, id="cuda-triton", marks=pytest.mark.gpu)]
    try:
        import sdpo_fast.kernels.logprobs.triton  # noqa: F401
        out.append(pytest.param("cpu", "triton", dict(block_m=16, block_v=32, block_d=16, block_t=16),
                                id="triton-interp"))
    except Exception:  # no triton: the case is absent, as in test_triton_logprobs.py
        pass
    return out


@pytest.mark.parametrize("device,backend,opts", _backend_params())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_loss_every_backend_matches_fp64(loss_type, device, backend, opts):
    if backend not in backends.available("sdpo_loss"):
        pytest.skip(f"{backend} backend unavailable here")
    groups, batch, hidden, weight, ref = _fused_case(7)
    batch, hidden, weight, ref = batch.to(device), hidden.to(device), weight.to(device), ref.to(device)
    beta, sft = 0.7, 0.2
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss, metrics = fused_sdpo_loss(h, w, batch, ref, beta=beta, sft_weight=sft, backend=backend,
                                    loss_type=loss_type, **opts)
    (loss * 2.0).backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    logps64 = reference_logps(h64, w64, groups, batch)
    loss64 = naive_family_loss(logps64, ref.double(), batch, beta, sft, loss_type)
    (loss64 * 2.0).backward()
    torch.testing.assert_close(loss.double(), loss64.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    m = batch.candidate_mask
    want_w = sdpo_metrics(logps64[:, 0].detach(), logps64[:, 1:].detach(), ref[:, 0], ref[:, 1:], beta, m[:, 1:],
                          loss_type=loss_type)["weights"]
    torch.testing.assert_close(metrics["weights"], want_w.to(device), rtol=1e-4, atol=1e-5)


def test_loss_types_differ_on_the_same_batch():
    """The types are different losses (a wiring that ignored loss_type would give one value)."""
    _, batch, h, w, ref = _fused_case(8)
    values = {t: fused_sdpo_loss(h, w, batch, ref, backend="torch", loss_type=t)[0].item() for t in LOSS_TYPES}
    assert len({round(v, 6) for v in values.values()}) == len(LOSS_TYPES), values
    with pytest.raises(ValueError, match="loss_type"):
        fused_sdpo_loss(h, w, batch, ref, backend="torch", loss_type="nope")


# ---- train.py --------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--loss_type", "ipo"], "error: --loss_type must be one of sdpo, dmpo, dpo_pairs, dynamic, got 'ipo'"),
    (["--negatives", "top"], "error: --negatives must be one of random, hard, boundary, got 'top'"),
])
def test_train_rejects_a_bad_loss_type_or_negatives_in_process(tmp_path, capsys, args, message):
    """As tests/test_train.py's config errors: ``main(argv)`` in this process, one stderr line, status 2."""
    from sdpo_fast.train import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["--output_dir", str(tmp_path / "o")] + args)
    assert exc.value.code == 2
    assert [line for line in capsys.readouterr().err.splitlines() if line.strip()] == [message]
    assert not (tmp_path / "o").exists()


def test_yaml_config_takes_loss_type_negatives_and_k(tmp_path):
    from sdpo_fast.config import parse_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("loss_type: dmpo\nnegatives: boundary\nnum_negatives: 15\n")
    _, data_args, train_args = parse_args(["--config", str(cfg)])
    assert (train_args.loss_type, data_args.negatives, data_args.num_negatives) == ("dmpo", "boundary", 15)
    _, data_args, train_args = parse_args(["--config", str(cfg), "--loss_type", "dynamic", "--negatives", "hard"])
    assert (train_args.loss_type, data_args.negatives) == ("dynamic", "hard")
