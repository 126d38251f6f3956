"""Nothing lost, nothing silent (issue 17): caches keyed by content, output folders, atomic and
checked checkpoints, a full disk, non-finite training, evaluation and library edge cases.

Training runs call ``sdpo_fast.train.main(argv)`` in this process on the tiny default model and a
slice of the synthetic data; a full disk is a write that raises ``OSError(errno.ENOSPC)``.
"""

import errno
import json
import math
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sdpo_fast
from sdpo_fast import checkpoint, train as train_mod
from sdpo_fast.errors import UserError
from sdpo_fast.outputs import MetricsLog
from sdpo_fast.runtime import NonFiniteError, Runtime

TINY = ["--tiny_layers", "1", "--tiny_hidden", "64", "--tokenizer_vocab", "400"]
SDPO = ["--stage", "sdpo", "--max_train_examples", "16", "--batch_size", "8", "--max_steps", "2", "--eval", "none",
        "--num_negatives", "3"]
ALL = ["--stage", "all", "--max_train_examples", "16", "--batch_size", "8", "--sft_epochs", "1", "--sdpo_epochs", "1",
       "--eval", "none", "--num_negatives", "3"]


@pytest.fixture(autouse=True)
def _threads(one_thread, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def run(out, args):
    return train_mod.main(["--output_dir", str(out)] + TINY + args)


def fails(capsys, out, args):
    """``(exit status, stderr lines without progress bars)`` of a run that must fail."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(out, args)
    err = capsys.readouterr().err.replace("\r", "\n")  # progress bars redraw with \r
    return info.value.code, [line for line in err.splitlines() if line.strip() and "%|" not in line]


def rows(out):
    def refuse(name):
        raise ValueError(f"metrics.jsonl holds {name}: not strict JSON")

    return [json.loads(line, parse_constant=refuse) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- 1. caches keyed by content


def test_reference_cache_recomputed_for_another_model_and_reused_for_the_same(tmp_path, capsys):
    """A second run into the same folder with other starting weights (--seed 1) must not reuse the
    reference log-probs: it says so and recomputes, so S-DPO starts at ln(1 + K) (policy = reference);
    the same run again reuses the cache silently and gets the same loss."""
    out = tmp_path / "o"
    run(out, SDPO)
    first = rows(out)[0]["loss"]
    assert first == pytest.approx(math.log(4.0), rel=1e-5)
    capsys.readouterr()
    run(out, SDPO + ["--seed", "1", "--overwrite_output_dir"])
    said = capsys.readouterr().out
    assert "reference log-probs cache" in said and "another reference model weights: recomputing" in said
    second = rows(out)
    assert second[0]["loss"] == pytest.approx(math.log(4.0), rel=1e-5)  # not a stale reference's
    assert len(second) == 2  # overwritten, not appended
    run(out, SDPO + ["--seed", "1", "--overwrite_output_dir"])
    assert "recomputing" not in capsys.readouterr().out
    assert [r["loss"] for r in rows(out)] == [r["loss"] for r in second]


def test_tokenizer_cache_retrained_for_other_data_or_vocabulary(tmp_path, capsys):
    from sdpo_fast.data import build_tokenizer, load_dataset, make_synthetic

    splits = load_dataset("synthetic", seed=0)
    tok_dir = str(tmp_path / "tokenizer")
    train_mod._cached_tokenizer(tok_dir, splits, 400, build_tokenizer)
    stamp = os.path.getmtime(os.path.join(tok_dir, "tokenizer.json"))
    capsys.readouterr()
    train_mod._cached_tokenizer(tok_dir, splits, 400, build_tokenizer)  # same inputs: reused
    assert capsys.readouterr().out == "" and os.path.getmtime(os.path.join(tok_dir, "tokenizer.json")) == stamp
    train_mod._cached_tokenizer(tok_dir, splits, 500, build_tokenizer)
    assert "trained for another vocab_size: training it again" in capsys.readouterr().out
    other = make_synthetic(num_users=80, seed=3)
    train_mod._cached_tokenizer(tok_dir, other, 500, build_tokenizer)
    assert "trained for another data: training it again" in capsys.readouterr().out


def test_tokenized_cache_key_follows_its_inputs(tmp_path):
    """The tokenized-data cache is content-addressed: other examples or settings get another file."""
    from sdpo_fast.data import build_tokenizer, load_dataset, tokenize_dataset

    splits = load_dataset("synthetic", seed=0)
    tok = build_tokenizer(splits, vocab_size=400)
    a = tokenize_dataset(splits.train[:4], tok, cache_dir=tmp_path, max_prompt_tokens=512)
    b = tokenize_dataset(splits.train[:4], tok, cache_dir=tmp_path, max_prompt_tokens=512, seed=1)
    c = tokenize_dataset(splits.train[1:5], tok, cache_dir=tmp_path, max_prompt_tokens=512)
    again = tokenize_dataset(splits.train[:4], tok, cache_dir=tmp_path, max_prompt_tokens=512)
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 3
    assert b["prompt_ids"] != a["prompt_ids"]  # the seed shuffles the prompt's candidate list
    assert c["prompt_ids"][0] == a["prompt_ids"][1] and again["prompt_ids"] == a["prompt_ids"]


# ------------------------------------------------------------------------------- 2. output folders


def test_non_empty_output_dir_refused_then_overwritten(tmp_path, capsys):
    out = tmp_path / "o"
    run(out, SDPO)
    (out / "notes.txt").write_text("mine")
    code, lines = fails(capsys, out, SDPO)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"error: --output_dir {out} is not empty") and "--overwrite_output_dir" in lines[0]
    run(out, SDPO + ["--overwrite_output_dir", "--max_steps", "1"])
    assert [r["step"] for r in rows(out)] == [1]  # one run's rows only
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-sdpo-end"]
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: left alone


# ------------------------------------------------------------------------------- 3. checkpoints


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    """The second checkpoint's write hits a full disk half-way: a one-line "disk is full" error, no
    half-written checkpoint folder, and resuming from the newest complete one works."""
    out = tmp_path / "o"
    real_save, calls = torch.save, []

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        if hasattr(f, "name") and str(f.name).endswith("state.pt"):
            calls.append(f.name)
            if len(calls) == 2:
                f.write(b"\0" * 1000)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    code, lines = fails(capsys, out, ALL + ["--save_steps", "1"])
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: the disk is full (no space left on device) while writing checkpoint {out}")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-sft-1"]
    assert checkpoint.latest(str(out)) == str(out / "checkpoint-sft-1")
    run(out, ALL + ["--save_steps", "1", "--resume_from_checkpoint", "latest"])
    assert [(r["stage"], r["step"]) for r in rows(out)] == [("sft", 1), ("sft", 2), ("sdpo", 1), ("sdpo", 2)]


def _fake_checkpoint(folder, progress, payload=b"x" * 10, complete=True):
    tmp = checkpoint.start_folder(str(folder))
    Path(tmp, "state.pt").write_bytes(payload)
    if complete:
        checkpoint.finish_folder(tmp, str(folder), {"progress": progress})
    else:
        os.replace(tmp, folder)  # a folder left by a crash before the manifest


def test_latest_is_the_furthest_complete_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-sft-end", [0, 1 << 62])
    _fake_checkpoint(tmp_path / "checkpoint-sdpo-2", [1, 2])
    _fake_checkpoint(tmp_path / "checkpoint-sdpo-10", [1, 10])
    _fake_checkpoint(tmp_path / "checkpoint-sdpo-12", [1, 12], complete=False)
    _fake_checkpoint(tmp_path / "checkpoint-sdpo-11", [1, 11])
    (tmp_path / "checkpoint-sdpo-11" / "state.pt").write_bytes(b"x" * 3)  # truncated afterwards
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "checkpoint-sdpo-10")
    assert checkpoint.latest(str(tmp_path / "none")) is None


def test_partial_or_corrupt_checkpoints_are_one_line_errors_naming_the_file(tmp_path):
    _fake_checkpoint(tmp_path / "partial", [0, 1], complete=False)
    with pytest.raises(UserError, match=r"checkpoint .*partial is incomplete: it has no checkpoint.json"):
        checkpoint.read_manifest(str(tmp_path / "partial"))
    _fake_checkpoint(tmp_path / "cut", [0, 1])
    (tmp_path / "cut" / "state.pt").write_bytes(b"")
    with pytest.raises(UserError, match=r"checkpoint file .*cut/state.pt is truncated or corrupt \(0 bytes, written as 10\)"):
        checkpoint.read_manifest(str(tmp_path / "cut"))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"checkpoint file .*empty.pt is empty \(0 bytes\)"):
        checkpoint.load_file(str(empty))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"checkpoint file .*junk.pt cannot be read"):
        checkpoint.load_file(str(junk), weights_only=False)
    assert issubclass(UserError, ValueError)  # library callers catch ValueError


def test_resume_refuses_other_settings_and_broken_files(tmp_path, capsys):
    out = tmp_path / "o"
    run(out, SDPO + ["--save_steps", "1"])
    ckpt = out / "checkpoint-sdpo-1"
    code, lines = fails(capsys, out, SDPO + ["--resume_from_checkpoint", str(ckpt), "--batch_size", "4"])
    assert code == 2 and len(lines) == 1
    assert "--batch_size: the checkpoint has 8, this run 4" in lines[0]
    code, lines = fails(capsys, out, SDPO + ["--resume_from_checkpoint", str(ckpt), "--tiny_hidden", "32"])
    assert code == 2 and "--tiny_hidden: the checkpoint has 64, this run 32" in lines[0]
    (ckpt / "state.pt").write_bytes(b"")  # a 0-byte state file
    code, lines = fails(capsys, out, SDPO + ["--resume_from_checkpoint", str(ckpt)])
    assert code == 2 and lines == [f"error: checkpoint file {ckpt}/state.pt is truncated or corrupt (0 bytes, "
                                   f"written as {json.loads((ckpt / 'checkpoint.json').read_text())['files']['state.pt']})"]


def _tiny_runtime(hidden):
    cfg = LlamaConfig(vocab_size=50, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    return Runtime(LlamaForCausalLM(cfg), deepspeed_config=None, batch_size=2, max_grad_norm=1.0, weight_decay=0.0,
                   bf16=False, device=torch.device("cpu"))


def test_checkpoint_of_another_model_size_names_the_parameter(tmp_path):
    small, big = _tiny_runtime(16), _tiny_runtime(32)
    small.save_checkpoint(str(tmp_path / "c"), {"step": 1}, {"progress": [0, 1]})
    with pytest.raises(UserError, match=r"saved from another model size: model.embed_tokens.weight has shape "
                                        r"\(50, 16\) there, \(50, 32\) in this model"):
        big.load_checkpoint(str(tmp_path / "c"))
    state, meta = _tiny_runtime(16).load_checkpoint(str(tmp_path / "c"))
    assert state == {"step": 1} and meta == {"progress": [0, 1]}


def test_checkpoint_write_failure_leaves_nothing(tmp_path):
    _fake_checkpoint(tmp_path / "checkpoint-a", [0, 1])

    def write(folder):
        Path(folder, "state.pt").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="the disk is full"):
        checkpoint.write_folder(str(tmp_path / "checkpoint-a"), write, {"progress": [0, 2]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-a"]  # no .tmp-, the old one intact
    assert checkpoint.read_manifest(str(tmp_path / "checkpoint-a"))["meta"] == {"progress": [0, 1]}


# ------------------------------------------------------------------------------- 4. arguments / inputs


def test_too_long_for_the_model_is_caught_at_tokenization_naming_the_example(tmp_path):
    from sdpo_fast.data import RecExample, build_tokenizer, load_dataset, tokenize_dataset

    splits = load_dataset("synthetic", seed=0)
    tok = build_tokenizer(splits, vocab_size=400)
    long = RecExample(user_id="u7", history=("A",), candidates=("B", "C " * 400), target="B", example_id="u7:12")
    fine = tokenize_dataset(splits.train[:2], tok, max_positions=2048)
    limit = max(p + max(c) for p, c in zip(fine["prompt_len"], fine["candidate_lens"]))
    assert len(tokenize_dataset(splits.train[:2], tok, max_positions=limit)) == 2  # exactly fits
    with pytest.raises(ValueError, match=r"example u7:12 \(user u7\): its prompt \(\d+ tokens\) and longest "
                                         r"candidate \(\d+ tokens, 'C C C"):
        tokenize_dataset(list(splits.train[:2]) + [long], tok, max_positions=limit)
    with pytest.raises(ValueError, match=r"example u152:2 \(user u152\)"):  # the first row past the limit
        tokenize_dataset(splits.train[:2], tok, max_positions=limit - 1)
    with pytest.raises(UserError, match=r"^tokenizing train: example u7:12"):
        train_mod._tokenize([long], tok, None, "tokenizing train", limit)


def test_token_ids_checked_in_candidate_logprobs_without_vocab_size():
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    ok = sdpo_fast.pack_groups([([1, 2, 3], [[4, 5], [6]])])
    assert sdpo_fast.candidate_logprobs(model, ok, backend="torch").shape == (1, 2)
    bad = sdpo_fast.pack_groups([([1, 2, 3], [[4, 45], [6]])])  # no vocab_size given: not checked there
    with pytest.raises(ValueError, match=r"token id 45 is outside the model's vocabulary \[0, 40\)"):
        sdpo_fast.candidate_logprobs(model, bad, backend="torch")


# ------------------------------------------------------------------------------- 5. training health


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    real = train_mod.candidate_sdpo_loss
    calls = []

    def nan_at_step_3(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    monkeypatch.setattr(train_mod, "candidate_sdpo_loss", nan_at_step_3)
    out = tmp_path / "o"
    code, lines = fails(capsys, out, ALL + ["--save_steps", "1"])
    assert code == 2 and len(lines) == 1
    assert lines[0] == (f"error: training stopped: the loss is nan at sdpo step 1 (the step was not saved; the last "
                        f"good checkpoint is {out}/checkpoint-sft-end); lower the learning rate or check the data")
    assert [(r["stage"], r["step"]) for r in rows(out)] == [("sft", 1), ("sft", 2)]  # strict JSON, no NaN row
    assert checkpoint.latest(str(out)) == str(out / "checkpoint-sft-end")


def test_non_finite_gradient_skips_the_step():
    rt = _tiny_runtime(16)
    before = {n: p.detach().clone() for n, p in rt.model.named_parameters()}
    w = rt.model.lm_head.weight
    with pytest.raises(NonFiniteError, match="gradient norm inf"):
        rt.backward_and_step((w * float("inf")).sum(), lr=1e-3)
    for n, p in rt.model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None


def test_metrics_log_is_strict_json(tmp_path):
    log = MetricsLog(str(tmp_path), rows=['{"step": 1}'])
    log.write({"step": 2, "loss": float("nan"), "margin": float("inf"), "ok": 1.5})
    assert rows(tmp_path) == [{"step": 1}, {"step": 2, "loss": None, "margin": None, "ok": 1.5}]


# ------------------------------------------------------------------------------- 6. evaluation


def test_sdpo_metrics_group_without_negatives_is_not_perfect():
    from sdpo_fast.loss import sdpo_metrics

    chosen, ref_c = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    rej, ref_r = torch.tensor([[-3.0, -4.0], [-1.0, -1.0]]), torch.tensor([[-3.0, -3.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [False, False]])
    m = sdpo_metrics(chosen, rej, ref_c, ref_r, 1.0, mask)
    assert m["accuracy"][0] == 1.0 and m["reward_margins"][0] == pytest.approx(0.5)
    assert math.isnan(m["accuracy"][1]) and math.isnan(m["reward_margins"][1])
    assert m["accuracy"].nanmean() == 1.0


def test_evaluation_refuses_fewer_than_two_candidates(capsys):
    from sdpo_fast.data import RecExample
    from sdpo_fast.eval import generation_metrics, ranking_metrics
    from sdpo_fast.eval.scoring import _features

    with pytest.raises(ValueError, match="example 1 has fewer than 2 scored candidates"):
        ranking_metrics(torch.tensor([[0.0, -1.0], [0.5, float("-inf")]]), [0, 0])
    with pytest.raises(ValueError, match="example 0 has fewer than 2 candidates"):
        generation_metrics(["a"], [["a"]], [0])
    one = RecExample(user_id="u", history=("h",), candidates=("a",), target="a")
    with pytest.raises(ValueError, match="example 0 has fewer than 2 candidates"):
        _features([one], None, {})
    two = RecExample(user_id="v", history=("h",), candidates=("a", "b"), target="a")
    assert train_mod._usable_eval_examples([one, two, one]) == [two]
    assert capsys.readouterr().out == "evaluation leaves out 2 test example(s) with fewer than 2 candidates\n"


# ------------------------------------------------------------------------------- 9. library consistency


def test_native_rejects_the_mixed_dtypes_torch_rejects():
    from sdpo_fast import backends

    batch = sdpo_fast.pack_groups([([1, 2, 3], [[4, 5], [6]])])
    h = torch.randn(batch.shape[0] * batch.shape[1], 8)
    w = torch.randn(10, 8, dtype=torch.bfloat16)
    names = ["torch"] + (["native"] if "native" in backends.available("logprobs") else [])
    for name in names:
        with pytest.raises(ValueError, match=r"weight dtype torch.bfloat16 differs from hidden dtype torch.float32"):
            sdpo_fast.sequence_logprobs(h, w, batch, backend=name)
    if "native" in names:
        from sdpo_fast.kernels.logprobs import native

        with pytest.raises(ValueError, match="native backend: weight dtype torch.bfloat16 differs"):
            native.forward(h, w, batch, native.Options(), need_h=False, need_w=False)


def test_empty_batch_is_refused():
    from sdpo_fast.loss import sdpo_loss, sdpo_metrics

    e, e2 = torch.zeros(0), torch.zeros(0, 3)
    with pytest.raises(ValueError, match="empty batch"):
        sdpo_loss(e, e2, e, e2)
    with pytest.raises(ValueError, match="empty batch"):
        sdpo_metrics(e, e2, e, e2)
    with pytest.raises(ValueError, match="no groups"):
        sdpo_fast.pack_groups([])
