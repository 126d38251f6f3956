"""benchmarks/bench_trainer.py runs the trainer and the benchmark's step in turns and writes its figures."""

import json
import statistics

import pytest
import torch
from conftest import load_benchmark

TINY = ["--device", "cpu", "--run", "tiny-1b:lora", "--shape", "7x3", "--k", "2", "--groups", "2", "--steps", "2",
        "--warmup", "1", "--rounds", "2", "--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "4",
        "--kv-heads", "2", "--vocab", "257", "--threads", "1", "--lora-rank", "4"]


@pytest.mark.slow  # two training rounds of a tiny model
def test_bench_trainer_writes_both_sides(tmp_path):
    bench = load_benchmark("bench_trainer")
    result = bench.main(TINY + ["--out", str(tmp_path), "--name", "t"])
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["meta"]["run"] == "tiny-1b:lora" and saved["meta"]["groups"] == 2
    assert len(saved["rounds"]) == 2
    for r in saved["rounds"]:  # --steps timed steps on each side, after the warm-up
        assert len(r["trainer_s"]) == 2 and len(r["bench_s"]) == 2
        assert all(t > 0 for t in r["trainer_s"] + r["bench_s"])
    # the figures follow from the recorded step times: groups / median step, per round, then medians
    gps = {side: [2 / statistics.median(r[f"{side}_s"]) for r in saved["rounds"]] for side in ("trainer", "bench")}
    t, b = statistics.median(gps["trainer"]), statistics.median(gps["bench"])
    assert saved["trainer_groups_per_s"]["median"] == pytest.approx(t)
    assert saved["bench_groups_per_s"]["median"] == pytest.approx(b)
    ratios = [x / y for x, y in zip(gps["trainer"], gps["bench"])]
    assert saved["ratio"] == pytest.approx(dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios)))
    assert result["ratio"] == saved["ratio"]
    md = (tmp_path / "t.md").read_text()
    assert "| ratio trainer / benchmark |" in md and f"{t:.3f}" in md


def test_bench_trainer_arguments():
    bench = load_benchmark("bench_trainer")
    for bad in (["--run", "tiny-1b"], ["--k", "0"], ["--warmup", "0"], ["--shape", "7y3"]):
        with pytest.raises(ValueError):
            bench.parse_args(TINY + bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            bench.parse_args(TINY + ["--cuda-graphs"])
