"""Smoke test of benchmarks/bench_full_catalog.py on a tiny random model: every row runs, the padded
baseline gives our scores, and the JSON / markdown are written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_full_catalog_tiny(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_full_catalog.py"), "--tiny", "--sizes", "10,30",
           "--repeats", "2", "--baseline_items", "8", "--real_users", "2", "--constrained_users", "2", "--threads", "1",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.with_suffix(".json").read_text())
    assert set(rec["sweep"]) == {"10", "30"} and all(r["runs"] == 2 for r in rec["sweep"].values())
    assert rec["baseline"]["max_abs_score_diff"] < 1e-3
    assert rec["real"]["full_catalog"]["users"] == 2 and rec["real"]["constrained"]["users"] == 2
    assert "s per user" in out.with_suffix(".md").read_text()
