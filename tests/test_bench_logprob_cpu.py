"""Smoke test of benchmarks/bench_logprob_cpu.py at a tiny shape: every row runs, the rows give
eager's loss (an independent check of the native and chunked paths on the benchmark's own inputs),
and the per-round ratios are reported. Timings are never asserted."""

import json

import pytest
from conftest import load_benchmark

TINY = ["--groups", "2", "--cands", "3", "--cand-len", "4", "--prompt-len", "5", "--dim", "32", "--vocab", "300",
        "--repeats", "3"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_logprob_cpu")


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-weight", "frozen-weight"])
def test_tiny_run_writes_results_and_rows_agree(bench, tmp_path, frozen):
    result = bench.main(TINY + ["--no-memory", "--out", str(tmp_path)] + (["--frozen-weight"] if frozen else []))
    (path,) = tmp_path.glob("logprob_cpu*.json")  # the name records a shape other than the issue's
    assert path.name == "logprob_cpu_v300_g2" + ("_frozen_weight" if frozen else "") + ".json"
    saved = json.loads(path.read_text())
    assert saved["seconds"].keys() == result["seconds"].keys()
    assert {"eager", "torch_chunked"} <= set(result["seconds"])
    if result["native_gemm_engine"] == "onednn":  # the BLAS rows measure what oneDNN gains, same process
        assert {"native_logprobs_blas", "native_fused_blas"} <= set(result["seconds"])
    eager = result["loss"]["eager"]
    for name, loss in result["loss"].items():
        assert loss == pytest.approx(eager, rel=1e-5, abs=1e-6), name
    for name, pr in result["speedup_vs_eager_per_round"].items():
        assert len(result["rounds_seconds"][name]) == 3
        assert pr["min"] <= pr["median"] <= pr["max"]
    assert ("dweight" in result["bare_gemm_seconds"]) is not frozen
    md = path.with_suffix(".md").read_text()
    assert "per round" in md and all(f"| {name} |" in md for name in result["seconds"])
