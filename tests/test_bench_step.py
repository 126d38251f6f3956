"""Smoke tests of benchmarks/bench_step.py: the tiny CPU sweep runs end to end and writes its results.

Timings are never asserted; the benchmark itself checks that (b) and (c) give (a)'s log-probs, loss
and gradient norm (strict in float32), and these tests check that those checks ran and passed.
"""

import json

import pytest
import torch
from conftest import load_benchmark

TINY = [
    "--preset", "cpu", "--device", "cpu", "--layers", "1", "--hidden", "32", "--intermediate", "64",
    "--heads", "4", "--kv-heads", "2", "--vocab", "257", "--prompt-lens", "7", "--cand-len", "3",
    "--repeats", "1", "--warmup", "0", "--lora-rank", "4", "--threads", "1",
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
    argv = TINY + ["--ks", "1", "3", "--modes", "full", "lora", "--groups", "2", "--out", str(tmp_path), "--name", "t"]
    meta, rows, paths = bench.main(argv, flce_provider=reference_flce)

    assert set(paths) == {"json", "md", "png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(paths["json"].read_text())
    assert result["meta"]["device"].startswith("cpu")
    assert {"torch", "transformers", "peft"} <= set(result["meta"]["versions"])
    assert set(result["meta"]["sdpo_fast_backends"]) == {"attention", "logprobs", "sdpo_loss"}

    # every (mode, K, method) ran; (b) and (c) agree with (a) on log-probs, loss and gradient norm
    assert {(r["mode"], r["K"], r["method"]) for r in result["rows"]} == {
        (m, k, x) for m in ("full", "lora") for k in (1, 3) for x in "abc"
    }
    for r in result["rows"]:
        assert r["status"] == "ok" and r["ms"] > 0 and r["grad_norm"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["data_tokens"] / (r["ms"] / 1e3), rel=1e-3)
        if r["method"] != "a":
            assert r["check"] == "ok", r
    # (c) processes each prompt once: 2 groups x (7 + (K+1) * 3) tokens; (a) and (b) repeat it
    for r in result["rows"]:
        expect = 2 * (7 + (r["K"] + 1) * 3) if r["method"] == "c" else 2 * (r["K"] + 1) * (7 + 3)
        assert r["tokens_processed"] == expect
    assert len(result["summary"]) == 4 and all("speedup_c_vs_a" in s and "speedup_c_vs_b" in s for s in result["summary"])
    assert result["largest_k"] == {"full P=7": {"a": 3, "b": 3, "c": 3}, "lora P=7": {"a": 3, "b": 3, "c": 3}}

    text = paths["md"].read_text()
    assert "## lora, prompt 7 tokens" in text and "![step time and memory vs K](t.png)" in text

    # --replot rebuilds the same markdown (and the PNG) from the JSON alone
    paths["md"].unlink()
    paths["png"].unlink()
    bench.main(["--replot", str(paths["json"])])
    assert paths["md"].read_text() == text and paths["png"].exists()


def test_without_fused_ce_b_is_skipped_with_a_note(bench, tmp_path):
    argv = TINY + ["--ks", "1", "--modes", "lora", "--out", str(tmp_path), "--no-plot"]
    meta, rows, paths = bench.main(argv, flce_provider=lambda device: (None, "not installed"))
    assert [r["method"] for r in rows] == ["a", "c"]
    assert any("(b) skipped" in n for n in meta["notes"])
    assert "png" not in paths and "(b) skipped" in paths["md"].read_text()


def test_out_of_memory_is_marked_and_the_sweep_goes_on(bench, tmp_path, monkeypatch):
    """(a) failing with OOM at K = 3 is reported as "OOM" while (c) still runs."""
    naive = bench.naive_logprobs

    def naive_or_oom(model, data):
        if data.k >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return naive(model, data)

    monkeypatch.setattr(bench, "naive_logprobs", naive_or_oom)
    argv = TINY + ["--ks", "1", "3", "--modes", "full", "--methods", "a", "c", "--out", str(tmp_path), "--no-plot"]
    _, rows, paths = bench.main(argv)
    status = {(r["K"], r["method"]): r["status"] for r in rows}
    assert status == {(1, "a"): "ok", (1, "c"): "ok", (3, "a"): "OOM", (3, "c"): "ok"}
    result = json.loads(paths["json"].read_text())
    assert result["largest_k"] == {"full P=7": {"a": 1, "c": 3}}
    assert "| 3 | OOM |" in paths["md"].read_text()


def test_bf16_rows_are_checked_against_an_fp32_copy(bench, tmp_path):
    """In 16 bits every method, (a) included, is measured against (a) on an fp32 copy of the model;
    (c)'s log-probs are no further from that reference than twice (a)'s (plus the floor)."""
    argv = TINY + ["--dtype", "bfloat16", "--ks", "1", "3", "--modes", "full", "lora", "--methods", "a", "c",
                   "--out", str(tmp_path), "--no-plot"]
    _, rows, _ = bench.main(argv)
    for r in rows:
        assert r["status"] == "ok" and "ref32_loss_abs_err" in r, r
        if r["method"] == "c":
            a = next(x for x in rows if (x["mode"], x["K"], x["method"]) == (r["mode"], r["K"], "a"))
            assert r["check"] == "ok", r
            assert r["ref32_logps_rel_err"] <= 2 * a["ref32_logps_rel_err"] + bench.REF32_FLOOR["logps_rel_err"]


@pytest.mark.parametrize("bad", [["--ks", "0"], ["--repeats", "0"], ["--heads", "3"], ["--threads", "0"]])
def test_bad_arguments_raise(bench, bad):
    with pytest.raises(ValueError):
        bench.parse_args(TINY + bad)


@pytest.mark.gpu
def test_gpu_path_tiny_bf16(bench, tmp_path):
    """The GPU code path (bf16, CUDA events, max_memory_allocated, Triton backends) on a tiny model."""
    argv = [
        "--preset", "gpu", "--device", "cuda", "--layers", "2", "--hidden", "128", "--intermediate", "256",
        "--heads", "4", "--kv-heads", "2", "--vocab", "1000", "--prompt-lens", "64", "--ks", "1", "7",
        "--repeats", "2", "--out", str(tmp_path), "--no-plot",
    ]
    meta, rows, _ = bench.main(argv, flce_provider=reference_flce)
    assert meta["dtype"] == "bfloat16" and meta["sdpo_fast_backends"]["sdpo_loss"] == "cublas"
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["mem_mib"] >= r["step_mib"] > 0, r
        if r["method"] != "a":
            assert r["check"] == "ok", r
