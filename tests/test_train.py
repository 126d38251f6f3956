"""train.py end to end: config errors, exact resume, DeepSpeed ZeRO-3 (2 CPU ranks) vs one process, export.

Each run is a subprocess on a tiny model and a small slice of the synthetic data.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400"]


def run_train(args, out, launcher=None, timeout=900):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), "--output_dir", str(out)] + TINY + args
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "ppo"], "--stage must be"),
        (["--num_negatives", "0"], "--num_negatives must be >= 1"),
        (["--reference", "live"], "--reference live needs --lora"),
        (["--dataset", "movielens"], "data not found"),
        (["--deepspeed", "nope.json"], "no such file nope.json"),
        (["--lora", "--lora_targets", "q_proj,w_gate"], r"--lora_targets \['w_gate'\] not found"),
        (["--num_negatives", "20"], "--num_negatives 20 is above the 19 non-target candidates"),
    ],
)
def test_config_errors_before_any_work(tmp_path, args, message):
    import re

    cmd = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(tmp_path / "o")] + TINY + args
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr + proc.stdout), proc.stderr[-2000:]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_resume_reproduces_the_following_losses(tmp_path):
    common = ["--stage", "all", "--max_train_examples", "48", "--batch_size", "8", "--sft_epochs", "1",
              "--sdpo_epochs", "1", "--save_steps", "2", "--eval", "none", "--num_negatives", "3"]
    run_train(common, tmp_path / "a")
    full = metrics(tmp_path / "a")
    assert [m["step"] for m in full if m["stage"] == "sdpo"] == [1, 2, 3, 4, 5, 6]

    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "tokenizer", b / "tokenizer")
    shutil.copy(tmp_path / "a" / "reference_logps.pt", b / "reference_logps.pt")
    run_train(common + ["--resume_from_checkpoint", str(tmp_path / "a" / "checkpoint-sdpo-2")], b)
    resumed = metrics(b)
    assert [(m["stage"], m["step"]) for m in resumed] == [("sdpo", s) for s in (3, 4, 5, 6)]
    for got, want in zip(resumed, [m for m in full if m["stage"] == "sdpo"][2:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
        assert got["reward_accuracy"] == want["reward_accuracy"]


def test_lora_live_reference_equals_precomputed_at_the_start(tmp_path):
    """LoRA B starts at 0, so at step 1 the live reference (adapters off) and the precomputed one
    (the starting model) are the same model: identical first losses, then training proceeds."""
    common = ["--stage", "sdpo", "--lora", "--max_train_examples", "16", "--batch_size", "8", "--max_steps", "2",
              "--eval", "none", "--sdpo_learning_rate", "1e-2", "--num_negatives", "3"]
    run_train(common + ["--reference", "live"], tmp_path / "live")
    shutil.copytree(tmp_path / "live" / "tokenizer", tmp_path / "pre" / "tokenizer")
    run_train(common, tmp_path / "pre")
    live, pre = metrics(tmp_path / "live"), metrics(tmp_path / "pre")
    assert live[0]["loss"] == pytest.approx(pre[0]["loss"], rel=1e-5)
    assert live[0]["loss"] == pytest.approx(torch.log(torch.tensor(4.0)).item(), rel=1e-5)  # log(1 + K), K = 3
    assert live[1]["loss"] == pytest.approx(pre[1]["loss"], rel=1e-4)


def _final_weights(out, lora):
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(out / "final-base")
        return dict(PeftModel.from_pretrained(base, out / "final").named_parameters())
    return dict(AutoModelForCausalLM.from_pretrained(out / "final").named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_deepspeed_zero3_two_ranks_match_one_process(tmp_path, lora):
    pytest.importorskip("deepspeed")
    extra = ["--lora", "--sdpo_learning_rate", "5e-3", "--gradient_checkpointing"] if lora else []
    common = ["--stage", "sdpo", "--max_train_examples", "32", "--max_steps", "2", "--num_negatives", "3",
              "--eval", "both", "--eval_untrained", "false", "--max_eval_examples", "5"] + extra  # odd: a padded shard
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_train(common + ["--batch_size", "8"], single)
    shutil.copytree(single / "tokenizer", multi / "tokenizer")  # same tokenizer file, not a retrained one
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", "29517"]
    run_train(common + ["--batch_size", "4", "--deepspeed", str(ROOT / "configs" / "zero3.json")], multi, launcher)

    m1, m2 = metrics(single), metrics(multi)
    assert len(m1) == len(m2) == 2
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert m2[1]["loss"] == pytest.approx(m1[1]["loss"], rel=1e-4)

    w1, w2 = _final_weights(single, lora), _final_weights(multi, lora)
    assert w1.keys() == w2.keys()
    moved = 0
    for name, p in w1.items():
        q = w2[name]
        assert q.shape == p.shape and q.numel() > 0, name  # real weights, not empty ZeRO-3 shards
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
        moved += int(lora and "lora_B" in name and p.abs().max() > 0)
    assert moved or not lora  # LoRA B starts at 0: the updates reached the exported adapter

    # Each rank evaluated its shard (ZeRO-3 keeps them in step: synced generation); the gathered
    # metrics are those of the one-process run.
    r1, r2 = (json.loads((d / "results.json").read_text())["S-DPO"] for d in (single, multi))
    for k in ("hr@1", "ndcg@5", "mrr", "hit_ratio@1", "valid_ratio"):
        assert r2[k] == pytest.approx(r1[k], abs=1e-6), k

    # The exported model reproduces the logged evaluation.
    from sdpo_fast.eval import evaluate_ranking
    from transformers import AutoTokenizer

    logged = json.loads((multi / "results.json").read_text())["S-DPO"]
    tok = AutoTokenizer.from_pretrained(multi / "final")
    model = _reload(multi, lora)
    from sdpo_fast.data import load_dataset, sample_over_users

    test = sample_over_users(load_dataset("synthetic", seed=0).test, 5, seed=0)  # what --max_eval_examples 5 takes
    again = evaluate_ranking(model, tok, test, max_prompt_tokens=512, seed=0, progress=False)
    for k in ("hr@1", "ndcg@5", "mrr"):
        assert again[k] == pytest.approx(logged[k], abs=1e-6), k


def _reload(out, lora):
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "final-base"), out / "final")
    return AutoModelForCausalLM.from_pretrained(out / "final")
