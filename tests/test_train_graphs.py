"""``--cuda_graphs`` in the trainer: refused where it cannot run, and on CPU its whole data path
(bucketed collation, padded reference, padding groups, the graph bookkeeping run eagerly, the
optimizer step after a backward that already ran) trains exactly as the plain path does.

The capture itself needs a GPU (``benchmarks/gpu_check.sh``); what a replay relies on is checked in
``tests/test_graphs.py``.
"""

import json
from pathlib import Path

import pytest

from sdpo_fast import train as train_mod
from sdpo_fast.errors import UserError

TINY = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400"]


@pytest.fixture(autouse=True)
def _quiet(one_thread, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, name, extra, monkeypatch=None):
    out = tmp_path / name
    args = ["--output_dir", str(out), *TINY, "--max_train_examples", "12", "--batch_size", "4", "--max_steps", "3",
            "--eval", "none", "--num_negatives", "3", *extra]
    assert train_mod.main(args) == 0
    return [r for r in _rows(out) if "loss" in r and "stage" in r]


def test_cuda_graphs_are_refused_off_cuda(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_mod.main(["--output_dir", str(tmp_path / "o"), *TINY, "--cuda_graphs", "--max_steps", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--cuda_graphs needs a CUDA device, got cpu"), err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.mark.parametrize("bad, message", [
    (["--deepspeed", "configs/zero3.json"], "--cuda_graphs does not run under --deepspeed"),
    (["--backend", "native"], "--cuda_graphs needs --backend auto, cublas or triton"),
    (["--gradient_checkpointing"], "--cuda_graphs with --gradient_checkpointing is not supported"),
])
def test_cuda_graphs_bad_combinations(bad, message):
    from sdpo_fast.config import parse_args

    with pytest.raises(UserError, match=message):
        parse_args(["--cuda_graphs", *bad])


@pytest.mark.slow  # six train.py runs (the everyday run has the graph path in tests/test_train_syncs.py)
@pytest.mark.parametrize("extra", [
    ["--stage", "sdpo"],
    ["--stage", "sdpo", "--lora", "--reference", "live", "--loss_type", "dmpo", "--sft_weight", "0.5"],
    ["--stage", "sft"],
], ids=["sdpo-precomputed", "lora-live-dmpo-sft-term", "sft"])
def test_graph_path_trains_like_the_plain_path(tmp_path, monkeypatch, extra):
    plain = _run(tmp_path, "plain", extra)
    # the CPU stand-in of a graphed run: bucketed batches through StepGraphs(capture=False)
    monkeypatch.setattr(train_mod, "_check_cuda_graphs", lambda train_args, device: None)
    seen = []
    real = train_mod.StepGraphs if hasattr(train_mod, "StepGraphs") else None
    from sdpo_fast import graphs

    class Spy(graphs.StepGraphs):
        def __call__(self, batch, ref):
            seen.append((batch.bucket, batch.padding_groups))
            return super().__call__(batch, ref)

    monkeypatch.setattr(graphs, "StepGraphs", Spy)
    graphed = _run(tmp_path, "graphed", [*extra, "--cuda_graphs"])
    assert real is None  # the trainer imports StepGraphs from sdpo_fast.graphs when it needs it
    assert len(seen) == len(plain) == 3 and all(bucket is not None and pad >= 1 for bucket, pad in seen)
    keys = [k for k in plain[0] if k not in ("tokens_per_s", "time", "elapsed_s")]
    for a, b in zip(plain, graphed):
        for k in keys:
            if isinstance(a[k], float):
                assert b[k] == pytest.approx(a[k], rel=2e-5, abs=1e-6), (k, a, b)
            else:
                assert b[k] == a[k], (k, a, b)


# ---- on CUDA (``gpu`` marker): the trainer's own first GPU runs ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("extra", [["--stage", "sdpo"], ["--stage", "sdpo", "--lora", "--reference", "live"]],
                         ids=["full-precomputed", "lora-live"])
def test_on_cuda_graphed_training_follows_the_eager_run(tmp_path, extra):
    """bf16 on CUDA (the default there), DataLoader workers, pinned batches, fp32 masters: the graphed
    run's losses follow the eager run's (no dropout in the tiny model; bf16 rounding of padded rows)."""
    plain = _run(tmp_path, "plain", extra)
    graphed = _run(tmp_path, "graphed", [*extra, "--cuda_graphs"])
    assert len(plain) == len(graphed) == 3
    for a, b in zip(plain, graphed):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2), (a, b)


@pytest.mark.gpu
def test_on_cuda_resume_continues_the_run(tmp_path):
    """A checkpoint written on CUDA resumes on CUDA (RNG states, reference log-probs, masters on the
    right devices) with the following losses of the uninterrupted run."""
    common = ["--stage", "sdpo", "--lora", "--save_steps", "1"]
    whole = _run(tmp_path, "a", common)
    resumed = _run(tmp_path, "b", [*common, "--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-sdpo-1")])
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [1, 2, 3]
    for a, b in zip(whole[1:], resumed[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), (a, b)
