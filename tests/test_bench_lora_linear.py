"""benchmarks/bench_lora_linear.py: both sides counted and timed on the same weights."""

import json

import pytest
from conftest import load_benchmark

pytest.importorskip("peft")


def test_bench_lora_linear_writes_both_sides(tmp_path, one_thread):
    bench = load_benchmark("bench_lora_linear")
    bench.main(["--device", "cpu", "--cells", "32x2", "--layers", "2", "--rounds", "2", "--steps", "1",
                "--lora-rank", "4", "--out", str(tmp_path), "--name", "t"])
    (row,) = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert row["lora_layers"] == 2 * 7 and row["groups"] == 2
    assert row["fused_loss"] == pytest.approx(row["peft_loss"], rel=1e-6)
    assert row["fused_grad_norm"] == pytest.approx(row["peft_grad_norm"], rel=1e-4) and row["fused_grad_norm"] > 0
    # the forward and backward dispatch fewer ops fused; the optimizer's are the same
    assert row["fused_ops"]["forward"] < row["peft_ops"]["forward"]
    assert row["fused_ops"]["backward"] < row["peft_ops"]["backward"]
    assert row["fused_ops"]["optimizer"] == row["peft_ops"]["optimizer"]
    assert row["peft_over_fused_ops"] == pytest.approx(row["peft_ops_total"] / row["fused_ops_total"])
    assert len(row["fused_round_ms"]) == len(row["peft_round_ms"]) == 1
    assert row["paired_ratio"]["median"] == pytest.approx(row["peft_round_ms"][0] / row["fused_round_ms"][0])
    assert "| 32 | 2 | 2 |" in (tmp_path / "t.md").read_text()


def test_bench_lora_linear_arguments():
    bench = load_benchmark("bench_lora_linear")
    for bad in (["--cells", "64"], ["--cells", "50x1"], ["--rounds", "1"], ["--k", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
