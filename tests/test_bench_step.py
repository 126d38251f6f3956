"""Tests of benchmarks/bench_step.py (code in benchmarks/step/): the tiny CPU sweep runs end to end and
writes its results; gradient accumulation, the micro-batch search and the CUDA-graph buckets are right.

Timings are never asserted; the benchmark itself checks that (b) and (c) give (a)'s log-probs, loss
and gradient norm (strict in float32), and these tests check that those checks ran and passed.
"""

import json

import pytest
import torch
from conftest import load_benchmark

TINY = [
    "--preset", "cpu", "--device", "cpu", "--layers", "1", "--hidden", "32", "--intermediate", "64",
    "--heads", "4", "--kv-heads", "2", "--vocab", "257", "--shapes", "7x3", "--groups-per-step", "2",
    "--refs", "precomputed", "--repeats", "1", "--warmup", "0", "--lora-rank", "4", "--threads", "1",
]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_step")


def reference_flce(device):
    """A plain torch stand-in for Cut Cross-Entropy / Liger: per-token NLL [N] with full logits."""

    def nll(h, w, t):
        return torch.nn.functional.cross_entropy((h @ w.t()).float(), t, reduction="none")

    return "torch stand-in", nll


@pytest.mark.slow  # runs the benchmark sweep end to end
def test_cpu_sweep_writes_json_markdown_png(bench, tmp_path):
    argv = TINY + ["--ks", "1", "3", "--runs", "tiny-1b:full", "tiny-7b:lora", "--refs", "precomputed", "live",
                   "--out", str(tmp_path), "--name", "t"]
    meta, rows, paths = bench.main(argv, flce_provider=reference_flce)

    assert set(paths) == {"json", "md", "png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    assert result["meta"]["device"].startswith("cpu")
    assert {"torch", "transformers", "peft"} <= set(result["meta"]["versions"])
    assert set(result["meta"]["sdpo_fast_backends"]) == {"attention", "logprobs", "sdpo_loss"}

    # every (run, K, ref, method) ran; (b) and (c) agree with (a) on log-probs, loss and gradient norm
    assert {(r["config"], r["K"], r["ref"], r["method"]) for r in result["rows"]} == {
        (c, k, ref, x) for c in ("tiny-1b:full", "tiny-7b:lora") for k in (1, 3) for ref in ("precomputed", "live")
        for x in "abc"
    }
    for r in result["rows"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["grad_norm"] > 0
        assert r["micro_batch"] == 2 and r["accumulation"] == 1  # nothing runs out of memory here
        assert r["tokens_per_s"] == pytest.approx(r["data_tokens"] / (r["ms"] / 1e3), rel=1e-3)
        assert r["groups_per_s"] == pytest.approx(2 / (r["ms"] / 1e3), rel=1e-3)
        assert r["epoch_h"] == pytest.approx(78_000 / r["groups_per_s"] / 3600, rel=1e-3)
        if r["method"] != "a":
            assert r["check"] == "ok", r
    # (c) processes each prompt once: 2 groups x (7 + (K+1) * 3) tokens; (a) and (b) repeat it
    for r in result["rows"]:
        expect = 2 * (7 + (r["K"] + 1) * 3) if r["method"] == "c" else 2 * (r["K"] + 1) * (7 + 3)
        assert r["tokens_processed"] == expect
    assert len(result["summary"]) == 8 and all("speedup_c_vs_a" in s and "speedup_c_vs_b" in s for s in result["summary"])
    assert result["largest_k"]["tiny-1b:full 7x3 N=2 live"] == {"a": 3, "b": 3, "c": 3}

    text = paths["md"].read_text()
    assert "## tiny-7b:lora, shape 7x3, 2 groups per step, reference live" in text
    assert "![groups/s and speed-up vs K](t.png)" in text

    # --replot rebuilds the same markdown (and the PNG) from the JSON alone
    paths["md"].unlink()
    paths["png"].unlink()
    bench.main(["--replot", str(paths["json"])])
    assert paths["md"].read_text() == text and paths["png"].exists()


def test_paper_shape_has_the_papers_lengths(bench):
    shape = bench.shapes.parse_shape("paper")
    groups = bench.shapes.make_groups(64, shape, 3, 100, seed=0)
    prompts = [len(p) for p, _ in groups]
    titles = [len(c) for _, cs in groups for c in cs]
    assert 150 <= min(prompts) and max(prompts) <= 190 and 160 <= sum(prompts) / len(prompts) <= 180
    assert 3 <= min(titles) and max(titles) <= 8 and len(set(titles)) > 3
    assert all(len(cs) == 4 for _, cs in groups)


def test_without_fused_ce_b_is_skipped_with_a_note(bench, tmp_path):
    argv = TINY + ["--ks", "1", "--runs", "tiny-7b:lora", "--out", str(tmp_path), "--no-plot"]
    meta, rows, paths = bench.main(argv, flce_provider=lambda device: (None, "not installed"))
    assert [r["method"] for r in rows] == ["a", "c"]
    assert any("(b) skipped" in n for n in meta["notes"])
    assert "png" not in paths and "(b) skipped" in paths["md"].read_text()


@pytest.mark.slow  # end to end: benchmark cells run whole
def test_out_of_memory_halves_the_micro_batch_then_marks_oom(bench, tmp_path, monkeypatch):
    """(a) runs out of memory above one group per micro-batch at K = 1 (so it accumulates over 4
    micro-batches) and at every size at K = 3 ("OOM"), while (c) runs the whole step at once."""
    naive = bench.methods.naive_logprobs

    def naive_or_oom(model, mb):
        if mb.k >= 3 or mb.groups > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return naive(model, mb)

    monkeypatch.setattr(bench.methods, "naive_logprobs", naive_or_oom)
    argv = TINY + ["--ks", "1", "3", "--runs", "tiny-1b:full", "--methods", "a", "c", "--groups-per-step", "4",
                   "--out", str(tmp_path), "--no-plot"]
    _, rows, paths = bench.main(argv)
    by = {(r["K"], r["method"]): r for r in rows}
    assert {k: r["status"] for k, r in by.items()} == {(1, "a"): "ok", (1, "c"): "ok", (3, "a"): "OOM", (3, "c"): "ok"}
    assert (by[1, "a"]["micro_batch"], by[1, "a"]["accumulation"]) == (1, 4)
    assert by[1, "a"]["search"] == "4:OOM 2:OOM 1:ok"
    assert (by[1, "c"]["micro_batch"], by[3, "c"]["micro_batch"]) == (4, 4)
    result = json.loads(paths["json"].read_text())
    assert result["largest_k"] == {"tiny-1b:full 7x3 N=4 precomputed": {"a": 1, "c": 3}}
    assert "| 3 | OOM |" in paths["md"].read_text()


def test_what_counts_as_out_of_memory(bench):
    """The micro-batch search halves on CUDA's and the CPU allocator's OOMs and on cuBLAS's failed
    workspace allocation; any other error propagates."""
    is_oom = bench.microbatch.is_oom
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"))
    assert not is_oom(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_oom(ValueError("out of memory"))


def test_cpu_memory_cap_counts_as_out_of_memory(bench, monkeypatch):
    """With ``cpu_mem_cap_mib`` a micro-batch whose RSS growth exceeds the cap is refused like an OOM."""
    growth = iter([300.0, 150.0, 75.0])

    class FakeRSS:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.mib = next(growth)
            return False

    monkeypatch.setattr(bench.microbatch, "PeakRSS", FakeRSS)
    args = bench.parse_args(TINY + ["--ks", "1"])
    cfg = bench.shapes.model_config("tiny-1b", args.overrides)
    model, opt = bench.sweep.build_model(cfg, "full", args, torch.device("cpu"))
    methods, _ = bench.methods.build_methods(["c"], "cpu", None, "fused")
    groups = bench.shapes.make_groups(4, bench.shapes.parse_shape("7x3"), 1, 257, seed=0)
    m, tried = bench.microbatch.find_micro_batch(methods["c"], model, opt, groups, 1, 257, torch.device("cpu"),
                                                 "precomputed", False, cpu_mem_cap_mib=100.0)
    assert m == 1 and [(s, st) for s, st, _ in tried] == [(4, "over cap (300 MiB)"), (2, "over cap (150 MiB)"), (1, "ok")]
    assert bench.microbatch.halvings(32, None) == [32, 16, 8, 4, 2, 1] and bench.microbatch.halvings(32, 12) == [12, 6, 3, 1]


@pytest.mark.parametrize("key", ["a", "c"])
def test_gradient_accumulation_matches_one_micro_batch(bench, key):
    """The step's gradient over micro-batches of 1 and 2 groups equals the whole step's (4 groups), for
    (a) and (c), with a live LoRA reference."""
    args = bench.parse_args(TINY + ["--ks", "3"])
    dev = torch.device("cpu")
    cfg = bench.shapes.model_config("tiny-7b", args.overrides)
    model, opt = bench.sweep.build_model(cfg, "lora", args, dev)
    for p in model.parameters():  # LoRA B starts at 0: move it so the adapters matter
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    methods, _ = bench.methods.build_methods([key], "cpu", None, "fused")
    groups = bench.shapes.make_groups(4, bench.shapes.parse_shape("paper"), 3, 257, seed=1)
    ref = bench.microbatch.Reference("live", model, True)
    grads = {}
    for size in (4, 2, 1):
        opt.zero_grad(set_to_none=True)
        for mb in bench.shapes.split(groups, size, 3, 257, dev):
            bench.microbatch.micro_step(methods[key], model, mb, ref, 4)
        grads[size] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()
    for size in (2, 1):
        torch.testing.assert_close(grads[size], grads[4], rtol=1e-4, atol=1e-6)
    assert grads[4].abs().max() > 0


@pytest.mark.slow  # end to end: benchmark cells run whole
def test_bf16_rows_are_checked_against_an_fp32_copy(bench, tmp_path):
    """In 16 bits every method, (a) included, is measured against (a) on an fp32 copy of the model;
    (c)'s log-probs are no further from that reference than twice (a)'s (plus the floor)."""
    argv = TINY + ["--dtype", "bfloat16", "--ks", "1", "3", "--runs", "tiny-1b:full", "tiny-1b:lora",
                   "--methods", "a", "c", "--out", str(tmp_path), "--no-plot"]
    _, rows, _ = bench.main(argv)
    for r in rows:
        assert r["status"] == "ok" and "ref32_loss_abs_err" in r, r
        if r["method"] == "c":
            a = next(x for x in rows if (x["config"], x["K"], x["method"]) == (r["config"], r["K"], "a"))
            assert r["check"] == "ok", r
            assert r["ref32_logps_rel_err"] <= 2 * a["ref32_logps_rel_err"] + bench.REF32_FLOOR["logps_rel_err"]


@pytest.mark.parametrize("bad", [["--ks", "0"], ["--repeats", "0"], ["--heads", "3"], ["--threads", "0"],
                                 ["--runs", "tiny-1b"], ["--runs", "gpt9:lora"], ["--shapes", "7by3"],
                                 ["--groups-per-step", "0"], ["--micro-batch", "0"]])
def test_bad_arguments_raise(bench, bad):
    with pytest.raises(ValueError):
        bench.parse_args(TINY + bad)


def test_cuda_graphs_refused_on_cpu(bench):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bench.parse_args(TINY + ["--cuda-graphs"])


# ----------------------------------------------------------------------------- CUDA-graph buckets


def test_a_graphed_sweep_checks_its_replays(bench, tmp_path, monkeypatch):
    """``--cuda-graphs`` through the whole sweep (its graphs run eagerly: the capture is CUDA's): the
    (c) row carries the replay-against-eager check and the usual timing; (a) stays eager."""
    import functools

    monkeypatch.setattr(bench.graphs, "refuse_unless_cuda", lambda device: None)
    monkeypatch.setattr(bench.graphs, "GraphedSteps", functools.partial(bench.graphs.GraphedSteps, capture=False))
    argv = TINY + ["--ks", "3", "--runs", "tiny-7b:lora", "--methods", "a", "c", "--cuda-graphs", "--warmup", "1",
                   "--out", str(tmp_path), "--name", "g", "--no-plot"]
    with pytest.raises(ValueError, match="--warmup >= 1"):
        bench.parse_args(argv + ["--warmup", "0"])
    meta, rows, paths = bench.main(argv)
    assert meta["cuda_graphs"] is True
    by = {r["method"]: r for r in rows}
    assert by["c"]["status"] == "ok" and by["c"]["graph_check"] == "ok", by["c"]
    assert by["c"]["graph_grad_rel_err"] < 1e-5 and by["c"]["check"] == "ok"
    assert "graph_check" not in by["a"] and by["a"]["status"] == "ok"
    assert "graph_check" in paths["md"].read_text()


@pytest.mark.parametrize("backend_mode", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_graphed_step_matches_the_eager_step(bench, backend_mode):
    """(c) through ``GraphedSteps`` (bucketed micro-batches, gradients accumulated across them; run
    eagerly here, ``capture=False``) gives the eager (c) step's gradients, micro-batch by micro-batch
    layouts differing, so a graph captured per bucket trains the same step. Buckets themselves:
    tests/test_buckets.py."""
    args = bench.parse_args(TINY + ["--ks", "3"])
    dev = torch.device("cpu")
    cfg = bench.shapes.model_config("tiny-1b", args.overrides)
    torch.manual_seed(0)
    model, _ = bench.sweep.build_model(cfg, backend_mode, args, dev)
    groups = bench.shapes.make_groups(6, bench.shapes.parse_shape("paper"), 3, 257, seed=5)
    table = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    ref = bench.microbatch.Reference("precomputed", model, backend_mode == "lora", table=table)
    params = [p for p in model.parameters() if p.requires_grad]

    plain = bench.shapes.split(groups, 2, 3, 257, dev)
    model.zero_grad(set_to_none=True)
    for mb in plain:
        loss, _ = __import__("sdpo_fast").candidate_sdpo_loss(model, mb.batch, ref(None, model, mb), reduction="sum")
        (loss / 6).backward()
    want = [p.grad.clone() for p in params]

    bucketed = bench.shapes.split(groups, 2, 3, 257, dev, bucketed=True)
    assert all(mb.batch.bucket is not None and mb.batch.padding_groups >= 1 for mb in bucketed)
    assert len({mb.batch.group_layout for mb in bucketed}) == 3  # three layouts
    graphed = bench.graphs.GraphedSteps(model, bucketed, ref, 6, capture=False)
    for _ in range(2):  # a second step starts from zero gradients again
        graphed.run()
        for p, w in zip(params, want):
            torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
    checked = graphed.check()  # what the benchmark writes into a graphed row
    assert checked["graph_check"] == "ok" and checked["graph_grad_rel_err"] < 1e-5, checked
    assert checked["graph_loss_rel_err"] < 1e-6, checked
    step = graphed.graphs.step  # a replay that returned another loss is caught
    graphed.graphs.step = lambda batch, table: tuple(x * 1.1 for x in step(batch, table))
    wrong = graphed.check()
    assert wrong["graph_check"] == "MISMATCH" and abs(wrong["graph_loss_rel_err"] - 0.1) < 1e-3, wrong

    def wrong_gradients(batch, table):  # the right loss, gradients 5% off
        out = step(batch, table)
        torch._foreach_mul_(graphed.graphs.grads, 1.05)
        return out

    graphed.graphs.step = wrong_gradients
    wrong = graphed.check()
    assert wrong["graph_check"] == "MISMATCH" and wrong["graph_loss_rel_err"] < 1e-6, wrong
    assert abs(wrong["graph_grad_rel_err"] - 0.05) < 1e-3, wrong
    with pytest.raises(ValueError, match="packed into buckets"):
        bench.graphs.GraphedSteps(model, plain, ref, 6, capture=False)
    with pytest.raises(ValueError, match="precomputed"):
        bench.graphs.GraphedSteps(model, bucketed, bench.microbatch.Reference("live", model, True), 6, capture=False)
