"""train.py end to end: config errors, exact resume (also after SIGINT/SIGTERM), DeepSpeed ZeRO-3
(2 CPU ranks) vs one process, export.

Runs call ``sdpo_fast.train.main(argv)`` in this process (the DeepSpeed test starts its ranks as
subprocesses), on a tiny model and a small slice of the synthetic data.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdpo_fast import train as train_mod

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400"]


@pytest.fixture(autouse=True)
def _quiet_threads(one_thread, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def train_in_process(args, out):
    """``main(argv)``; returns its status (0) or raises AssertionError with the error line."""
    try:
        return train_mod.main(["--output_dir", str(out)] + TINY + args)
    except SystemExit as exc:
        raise AssertionError(f"train.main exited with {exc.code}") from exc


def _train_env():
    return dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def run_train(args, out, launcher=None, timeout=900):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train.py"), "--output_dir", str(out)] + TINY + args
    proc = subprocess.run(cmd, cwd=ROOT, env=_train_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_train(cmd, stderr):
    """A training process in a session of its own (so a test can signal its whole group)."""
    return subprocess.Popen(cmd, cwd=ROOT, env=_train_env(), stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)


def wait_for_rows(proc, out, n: int, timeout: float) -> None:
    """Wait until ``out/metrics.jsonl`` has ``n`` rows, failing with the output if ``proc`` ends first."""
    import time

    log, deadline = Path(out) / "metrics.jsonl", time.monotonic() + timeout
    while not (log.exists() and len(log.read_text().splitlines()) >= n):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("".join(part or "" for part in proc.communicate())[-5000:])
        time.sleep(0.05)


def _free_port() -> int:
    """A TCP port nothing listens on now (the DeepSpeed launcher's rendezvous; a fixed one collides
    with a concurrent run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def user_error(capsys, argv):
    """The exit status and the stderr lines of ``main(argv)`` failing with a user error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train_mod.main(argv)
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars redraw with \r
    return info.value.code, [line for line in err.splitlines() if line.strip() and "%|" not in line]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "ppo"], "--stage must be"),
        (["--num_negatives", "0"], "--num_negatives must be >= 1"),
        (["--reference", "live"], "--reference live needs --lora"),
        (["--dataset", "movielens"], "data not found"),
        (["--deepspeed", "nope.json"], "no such file nope.json"),
        (["--beta", "0"], r"--beta must be > 0, got 0.0"),
        (["--beta", "-1"], r"--beta must be > 0, got -1.0"),
        (["--beta", "nan"], r"--beta must be > 0, got nan"),
        (["--max_steps", "0"], r"--max_steps must be >= 1, got 0"),
        (["--save_steps", "-1"], r"--save_steps must be >= 0"),
        (["--sft_epochs", "-1"], r"--sft_epochs must be > 0, got -1.0"),
        (["--sdpo_learning_rate", "inf"], r"--sdpo_learning_rate must be > 0, got inf"),
        (["--batch_size", "0"], r"--batch_size must be >= 1, got 0"),
        (["--tiny_heads", "3", "--tiny_kv_heads", "1"], r"--tiny_hidden 64 must be a multiple of --tiny_heads 3"),
        (["--no_such_flag", "1"], r"unrecognized arguments: --no_such_flag 1"),
        (["--batch_size", "many"], r"argument --batch_size/--batch-size: invalid int value: 'many'"),
        (["--resume_from_checkpoint", "nowhere"], r"--resume_from_checkpoint: no such folder nowhere"),
        (["--lora", "--lora_targets", "q_proj,w_gate"], r"--lora_targets \['w_gate'\] not found"),
        (["--num_negatives", "20"], "--num_negatives 20 is above the 19 non-target candidates"),
        (["--eval", "ranking,full-catalog"], r"--eval must be none or a comma-separated set of ranking, generation, "
                                              r"constrained, full_catalog \(or both\), got 'ranking,full-catalog'"),
        (["--eval", "ranking,"], r"--eval must be none or a comma-separated set"),
        (["--full_catalog_users", "0"], r"--full_catalog_users must be >= 1, got 0"),
        (["--full_catalog_prompt", "listed_only"], r"--full_catalog_prompt must be history or listed"),
        (["--constrained_num_beams", "0"], r"--constrained_num_beams must be >= 1, got 0"),
        (["--cpu_threads", "0"], r"--cpu_threads must be >= 1, got 0"),
    ],
)
def test_config_errors_before_any_work(tmp_path, capsys, args, message):
    """Every user error: one line of stderr, exit status 2, no traceback, nothing trained."""
    code, lines = user_error(capsys, ["--output_dir", str(tmp_path / "o")] + TINY + args)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.search(message, lines[0]), lines
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_cpu_threads_hold_for_the_run_only(tmp_path, monkeypatch):
    """On the CPU a model of hidden size below SMALL_HIDDEN trains on one intra-op thread, --cpu_threads
    overrides that, and the caller's thread count is back when main returns."""
    from sdpo_fast.runtime import SMALL_HIDDEN, cpu_threads

    assert cpu_threads(None, SMALL_HIDDEN - 1, 8) == 1 and cpu_threads(None, SMALL_HIDDEN, 8) == 8
    assert cpu_threads(3, 64, 8) == 3 and cpu_threads(None, None, 8) == 8
    seen, real = [], train_mod.run_stage

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "run_stage", spy)
    torch.set_num_threads(2)  # the one_thread fixture restores the session's count afterwards
    base = ["--stage", "sft", "--max_train_examples", "8", "--batch_size", "4", "--max_steps", "1", "--eval", "none"]
    assert train_in_process(base, tmp_path / "a") == 0
    assert seen == [1] and torch.get_num_threads() == 2
    assert train_in_process(base + ["--cpu_threads", "2"], tmp_path / "b") == 0
    assert seen == [1, 2] and torch.get_num_threads() == 2


def test_several_config_errors_one_line_each(tmp_path, capsys):
    code, lines = user_error(capsys, ["--output_dir", str(tmp_path / "o"), "--beta", "nan", "--max_steps", "0"])
    assert code == 2
    assert lines == ["error: --beta must be > 0, got nan", "error: --max_steps must be >= 1, got 0"]


@pytest.mark.slow  # end to end: every --eval protocol through train.py
def test_eval_protocols_match_the_api(tmp_path):
    """``--eval ranking,generation,constrained,full_catalog`` on an untrained tiny model: every result key
    is there, and the constrained and full-catalog figures are those of the API on the exported model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sdpo_fast.data import load_dataset, sample_over_users
    from sdpo_fast.eval import evaluate_constrained, evaluate_full_catalog, titles_before

    out = tmp_path / "o"
    train_in_process(["--stage", "eval", "--eval", "ranking,generation,constrained,full_catalog",
                      "--max_eval_examples", "4", "--full_catalog_users", "3", "--full_catalog_chunk_tokens", "300"], out)
    res = json.loads((out / "results.json").read_text())["untrained"]
    keys = ["hr@1", "ndcg@5", "mrr", "hit_ratio@1", "valid_ratio", "paper_hit_ratio@1", "paper_valid_ratio",
            "llara_hit_ratio@1", "llara_valid_ratio", "constrained_hit_ratio@1", "constrained_valid_ratio",
            "full_catalog_hr@1", "full_catalog_hr@5", "full_catalog_hr@10", "full_catalog_hr@20",
            "full_catalog_ndcg@5", "full_catalog_ndcg@10", "full_catalog_ndcg@20", "full_catalog_users"]
    assert set(keys) <= set(res), set(keys) - set(res)
    assert res["constrained_valid_ratio"] == 1.0 and res["full_catalog_users"] == 3
    splits = load_dataset("synthetic", seed=0)
    test = sample_over_users(splits.test, 4, seed=0)
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    con = evaluate_constrained(model, tok, test, max_prompt_tokens=512, seed=0, progress=False)
    assert res["constrained_hit_ratio@1"] == con["constrained_hit_ratio@1"]
    users = sample_over_users(test, 3, seed=0)
    past = titles_before(splits)
    full = evaluate_full_catalog(model, tok, users, splits.all_titles(), exclude=[past[ex.example_id] for ex in users],
                                 max_prompt_tokens=512, seed=0, progress=False)
    for k in keys[-8:]:
        assert res[k] == pytest.approx(full[k], abs=1e-12), k


RESUME = ["--stage", "all", "--max_train_examples", "48", "--batch_size", "8", "--sft_epochs", "1",
          "--sdpo_epochs", "1", "--eval", "none", "--num_negatives", "3"]


def _same_losses(got, want):
    assert [(m["stage"], m["step"]) for m in got] == [(m["stage"], m["step"]) for m in want]
    for g, w in zip(got, want):
        assert g["loss"] == w["loss"], (g, w)  # bit-identical: same batches, weights, RNG, optimizer
        assert g.get("reward_accuracy") == w.get("reward_accuracy")


@pytest.mark.slow  # end-to-end training
def test_resume_reproduces_the_following_losses(tmp_path):
    """Resuming from a periodic checkpoint into a new folder reproduces the run exactly, and its
    metrics.jsonl is the whole run's (the rows up to the checkpoint come from the checkpoint) with no
    duplicates. Nothing is copied: the tokenizer is retrained identically, the reference log-probs
    come from the checkpoint."""
    train_in_process(RESUME + ["--save_steps", "2"], tmp_path / "a")
    full = metrics(tmp_path / "a")
    assert [m["step"] for m in full if m["stage"] == "sdpo"] == [1, 2, 3, 4, 5, 6]
    train_in_process(RESUME + ["--save_steps", "2", "--resume_from_checkpoint",
                               str(tmp_path / "a" / "checkpoint-sdpo-2")], tmp_path / "b")
    _same_losses(metrics(tmp_path / "b"), full)


@pytest.mark.slow  # end-to-end training
def test_dataloader_workers_give_the_same_run(tmp_path):
    """Batches collated in two DataLoader worker processes are those of the training thread: the
    losses are bit-identical, and resuming from a checkpoint of the worker run continues it exactly."""
    train_in_process(RESUME + ["--dataloader_num_workers", "0"], tmp_path / "a")
    train_in_process(RESUME + ["--dataloader_num_workers", "2", "--save_steps", "2"], tmp_path / "b")
    _same_losses(metrics(tmp_path / "b"), metrics(tmp_path / "a"))
    train_in_process(RESUME + ["--dataloader_num_workers", "0", "--resume_from_checkpoint",
                               str(tmp_path / "b" / "checkpoint-sdpo-4")], tmp_path / "c")
    _same_losses(metrics(tmp_path / "c"), metrics(tmp_path / "a"))


@pytest.mark.slow  # end-to-end training
@pytest.mark.parametrize("sig, stage, step", [(signal.SIGTERM, "sdpo", 2), (signal.SIGINT, "sft", 3)],
                         ids=["sigterm", "sigint"])
def test_signal_stops_with_a_checkpoint_and_resume_is_exact(tmp_path, capsys, monkeypatch, sig, stage, step):
    """SIGTERM / SIGINT during a step: the step finishes, a checkpoint is written, the exit status is
    128 + the signal and one line says how to resume; resuming with ``latest`` in the same folder
    reproduces the uninterrupted run's losses exactly, without duplicated rows."""
    train_in_process(RESUME, tmp_path / "a")  # no periodic checkpoints
    full = metrics(tmp_path / "a")

    write, at = train_mod.MetricsLog.write, (stage, step)

    def write_then_signal(self, record, step=None):  # the signal arrives while the step is being logged
        write(self, record, step=step)
        if (record["stage"], record["step"]) == at:
            os.kill(os.getpid(), sig)

    handler_before = signal.getsignal(sig)
    monkeypatch.setattr(train_mod.MetricsLog, "write", write_then_signal)
    out = tmp_path / "b"
    code, lines = user_error(capsys, ["--output_dir", str(out)] + TINY + RESUME)
    monkeypatch.setattr(train_mod.MetricsLog, "write", write)
    assert code == 128 + sig
    ckpt = out / f"checkpoint-{stage}-{step}"
    assert lines[-1] == (f"stopped by {signal.Signals(sig).name} after {stage} step {step}: checkpoint {ckpt} "
                         f"written; resume with the same flags and --resume_from_checkpoint {ckpt} (or latest)")
    assert (ckpt / "checkpoint.json").is_file()
    assert signal.getsignal(sig) == handler_before  # the run's handlers are gone
    stopped = metrics(out)
    assert (stopped[-1]["stage"], stopped[-1]["step"]) == (stage, step)

    train_in_process(RESUME + ["--resume_from_checkpoint", "latest"], out)
    _same_losses(metrics(out), full)


@pytest.mark.slow
def test_sigterm_from_another_process_then_resume(tmp_path):
    """A real ``python train.py`` process with two DataLoader workers receives SIGTERM from outside
    while training, sent to its whole process group as a terminal, Slurm and the ``deepspeed``
    launcher send it: it prints the notice once (the workers leave the signal to it) and exits with
    143 after writing a checkpoint; a second process, collating on its own thread, resumes with
    ``latest`` and the run's metrics.jsonl has each step once, with the uninterrupted run's losses."""
    train_in_process(RESUME, tmp_path / "a")
    full = metrics(tmp_path / "a")
    out = tmp_path / "b"
    cmd = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(out)] + TINY + RESUME + ["--dataloader_num_workers", "2"]
    proc = start_train(cmd, stderr=subprocess.PIPE)
    wait_for_rows(proc, out, 2, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    lines = err.replace("\r", "\n").strip().splitlines()
    assert re.fullmatch(r"stopped by SIGTERM after (sft|sdpo) step \d+: checkpoint \S+ written; resume with the same "
                        r"flags and --resume_from_checkpoint \S+ \(or latest\)", lines[-1]), lines[-1]
    assert sum(line.startswith("received SIGTERM") for line in lines) == 1, err[-3000:]
    run_train(RESUME + ["--resume_from_checkpoint", "latest"], out)
    resumed = metrics(out)
    assert [(m["stage"], m["step"]) for m in resumed] == [(m["stage"], m["step"]) for m in full]
    for got, want in zip(resumed, full):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)


@pytest.mark.slow  # end-to-end training
def test_lora_live_reference_equals_precomputed_at_the_start(tmp_path):
    """LoRA B starts at 0, so at step 1 the live reference (adapters off) and the precomputed one
    (the starting model) are the same model: identical first losses, then training proceeds."""
    common = ["--stage", "sdpo", "--lora", "--max_train_examples", "16", "--batch_size", "8", "--max_steps", "2",
              "--eval", "none", "--sdpo_learning_rate", "1e-2", "--num_negatives", "3"]
    train_in_process(common + ["--reference", "live"], tmp_path / "live")
    train_in_process(common, tmp_path / "pre")
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
              "--eval", "ranking,generation,constrained,full_catalog", "--full_catalog_users", "3",
              "--eval_untrained", "false", "--max_eval_examples", "5"] + extra  # odd: padded shards
    single, multi = tmp_path / "single", tmp_path / "multi"
    run_train(common + ["--batch_size", "8"], single)
    shutil.copytree(single / "tokenizer", multi / "tokenizer")  # same tokenizer file, not a retrained one
    common = common + ["--overwrite_output_dir"]  # multi/ holds that tokenizer
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())]
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
    for k in ("hr@1", "ndcg@5", "mrr", "hit_ratio@1", "valid_ratio", "paper_hit_ratio@1", "llara_valid_ratio",
              "constrained_hit_ratio@1", "constrained_valid_ratio", "full_catalog_hr@10", "full_catalog_ndcg@10",
              "full_catalog_users"):
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


def _rank_pid(launcher_pid: int, local_rank: int) -> int:
    """The pid of the ``deepspeed`` launcher's rank ``local_rank`` (its command line names it)."""
    import psutil

    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if f"--local_rank={local_rank}" in child.cmdline() and "train.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {local_rank} under the launcher {launcher_pid}")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "rank1"])
def test_deepspeed_sigterm_stops_both_ranks_at_one_step(tmp_path, target):
    """Two ZeRO-3 ranks under the ``deepspeed`` launcher get SIGTERM while training. ``group``: to the
    launcher's whole process group, as Ctrl-C and Slurm send it; the launcher then terminates each rank
    again, and that forwarded copy must not turn the stop into an immediate one. ``rank1``: to rank 1
    only; rank 0 learns it on the step's all-reduce. Either way both ranks finish the same step and
    write its checkpoint together (a collective: ranks stopping at different steps would hang there
    until a SIGKILL, leaving no checkpoint). ``group`` then resumes with the launcher and ``latest``:
    each step once, with the losses of an uninterrupted one-process run."""
    pytest.importorskip("deepspeed")
    from sdpo_fast import checkpoint

    common = ["--stage", "sdpo", "--max_train_examples", "64", "--sdpo_epochs", "10", "--max_steps", "16",
              "--num_negatives", "3", "--eval", "none"]
    out = tmp_path / "multi"
    if target == "group":
        run_train(common + ["--batch_size", "8"], tmp_path / "single")
        shutil.copytree(tmp_path / "single" / "tokenizer", out / "tokenizer")
    common += ["--batch_size", "4", "--deepspeed", str(ROOT / "configs" / "zero3.json")]
    launcher = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())]
    cmd = launcher + [str(ROOT / "train.py"), "--output_dir", str(out), "--overwrite_output_dir"] + TINY + common
    proc = start_train(cmd, stderr=subprocess.STDOUT)
    try:
        wait_for_rows(proc, out, 2, timeout=600)
        if target == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            os.kill(_rank_pid(proc.pid, 1), signal.SIGTERM)
        text = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = re.findall(r"stopped by SIGTERM after sdpo step (\d+): checkpoint (\S+) written", text)
    assert len(stopped) == 1, text[-5000:]  # rank 0 prints it
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-5000:]
    step = int(stopped[0][0])
    assert 2 <= step < 16
    assert stopped[0][1] == str(out / f"checkpoint-sdpo-{step}")
    assert checkpoint.latest(str(out)) == stopped[0][1]  # complete: manifest, files and sizes
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 1))
    if target == "group":
        run_train(common + ["--resume_from_checkpoint", "latest"], out, launcher)
        resumed, full = metrics(out), metrics(tmp_path / "single")
        assert [m["step"] for m in resumed] == [m["step"] for m in full]
        for got, want in zip(resumed, full):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4), (got["step"], got["loss"], want["loss"])


def _reload(out, lora):
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "final-base"), out / "final")
    return AutoModelForCausalLM.from_pretrained(out / "final")
