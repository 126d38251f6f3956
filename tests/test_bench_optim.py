"""benchmarks/bench_optim.py: the bf16 weight updates' precision on its noisy quadratic, and the
script's files."""

import json

import pytest
from conftest import load_benchmark


def test_precision_orders_the_updates_against_fp64():
    """On the quadratic whose target lies ~50 steps away: bf16 AdamW stalls (its updates round away),
    the fp32 masters track fp64 AdamW to the weights' rounding, stochastic rounding close behind."""
    bench = load_benchmark("bench_optim")
    got = bench.precision(200, shape=(32, 512))
    ref = got["fp64 AdamW"]["remaining"]
    assert ref < 0.15
    assert got["bf16 AdamW"]["remaining"] > 0.8
    # at this weight scale one bf16 unit is a fair part of the distance: even the masters' weights,
    # rounded to bf16 at the end, stop short of fp64
    assert ref < got["fp32 masters"]["remaining"] < got["stochastic rounding"]["remaining"] < 3 * ref
    # torch's fused AdamW and its for-loop one: the same update up to fp32 rounding
    assert got["fp32 masters, loop"]["off_fp64"] == pytest.approx(got["fp32 masters"]["off_fp64"], rel=1e-3)
    off = {m: got[m]["off_fp64"] for m in bench.MODES}
    assert off["fp32 masters"] < off["stochastic rounding"] < off["bf16 AdamW"] / 4, off


@pytest.mark.slow  # one subprocess per optimizer
def test_script_writes_json_and_markdown(tmp_path):
    bench = load_benchmark("bench_optim")
    out = tmp_path / "o"
    assert bench.main(["--shapes", "tiny", "--rounds", "1", "--steps", "2", "--precision_steps", "5",
                       "--out", str(out)]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    rows = {r["mode"]: r for r in saved["rows"]}
    assert list(rows) == list(bench.MODES)
    n = sum(__import__("math").prod(s) for s in bench.param_shapes("tiny"))
    for r in rows.values():
        assert r["params"] == n and r["step_ms_median"] > 0
        assert r["bytes_per_param"] == pytest.approx(4 + r["growth_range"][0])  # one round: median = the run
    assert rows["fp32 masters"]["memory_vs_masters"] == 1.0
    md = out.with_suffix(".md").read_text()
    assert "| stochastic rounding |" in md and "remaining" in md
    with pytest.raises(SystemExit):
        bench.main(["--steps", "1"])


@pytest.mark.slow  # two train.py processes
def test_train_weight_update_runs_both_modes(tmp_path):
    bench = load_benchmark("train_weight_update")
    out = tmp_path / "t"
    tiny = ["--tiny_layers", "1", "--tiny_hidden", "32", "--tiny_heads", "2", "--tiny_kv_heads", "1",
            "--tokenizer_vocab", "300", "--max_train_examples", "8", "--batch_size", "4", "--max_steps", "2",
            "--eval", "none", "--stage", "sdpo", "--bf16", "true", "--num_negatives", "2"]
    assert bench.main(["--out", str(out), "--", *tiny]) == 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["train_args"] == tiny and list(saved["runs"]) == list(bench.MODES)
    for runs in saved["runs"].values():
        (r,) = runs
        assert len(r["loss"]) == 2 and r["peak_rss_mib"] > 100 and r["wall_s"] > 0
    # the same first step (the updates differ only from the first optimizer step on)
    assert saved["runs"]["fp32_masters"][0]["loss"][0] == saved["runs"]["stochastic_rounding"][0]["loss"][0]
    assert "| stochastic_rounding |" in out.with_suffix(".md").read_text()
