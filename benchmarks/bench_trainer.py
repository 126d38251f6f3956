"""The trainer's step against the benchmark's sdpo_fast step at one shape: same model, same process.

Issue 16 asks for the trainer's groups/s within 10% of ``bench_step.py``'s (c) step at the same shape.
Both run here in turns (``--rounds``), on one model built as ``bench_step`` builds it (random weights;
LoRA adapters through the trainer's ``lora_model``) and one batch size:

- trainer: ``sdpo_fast.train.run_stage`` (S-DPO, precomputed reference, new random groups every step
  from a DataLoader, clipping, AdamW, the metrics log written every step as ``--log_every 1`` does);
  per-step time = the spacing of the log writes after ``--warmup`` steps;
- benchmark: ``bench_step``'s (c) optimizer step on one fixed batch (``timed_step``: CUDA events on a
  GPU, wall clock on CPU), ``--steps`` after ``--warmup``.

``--cuda-graphs`` turns on the trainer's ``--cuda_graphs`` and the benchmark's ``--cuda-graphs``
(CUDA only). Writes ``<out>/<name>.json`` and ``.md`` with the medians, the spread over rounds and
the ratio trainer / benchmark.

    python benchmarks/bench_trainer.py --device cuda --run llama3.2-1b:lora --shape 1024x16 --k 15 --groups 8
    python benchmarks/bench_trainer.py --device cpu --run tiny-1b:lora --shape paper --k 3 --groups 4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from step import graphs, methods, microbatch, shapes, sweep  # noqa: E402
from step.cli import OVERRIDES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--run", default="tiny-1b:lora", metavar="CONFIG:MODE")
    p.add_argument("--shape", default="paper")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--groups", type=int, default=8, help="groups per optimizer step (one micro-batch)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per round and side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="trainer DataLoader workers (default: the trainer's)")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="bench_trainer")
    args = p.parse_args(argv)
    for name in ("k", "groups", "steps", "rounds", "lora_rank"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 1:
        raise ValueError(f"--warmup must be >= 1 (the first step compiles and captures), got {args.warmup}")
    cfg, sep, args.mode = args.run.partition(":")
    if not sep or args.mode not in ("lora", "full"):
        raise ValueError(f"--run is CONFIG:MODE with MODE lora or full, got {args.run!r}")
    args.overrides = {OVERRIDES[k]: getattr(args, k) for k in OVERRIDES if k != "tie"}
    args.config = shapes.model_config(cfg, args.overrides)
    args.parsed_shape = shapes.parse_shape(args.shape)
    if args.cuda_graphs:
        graphs.refuse_unless_cuda(torch.device(args.device))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def build(args, device):
    """The model (bench_step's: random init, LoRA through the trainer's ``lora_model``) and its Runtime."""
    from sdpo_fast.runtime import Runtime

    base = types.SimpleNamespace(dtype=args.dtype, lora_rank=args.lora_rank)
    model, _ = sweep.build_model(args.config, args.mode, base, device)
    runtime = Runtime(model, deepspeed_config=None, batch_size=args.groups, max_grad_norm=1.0, weight_decay=0.0,
                      bf16=args.dtype == "bfloat16", device=device)
    return model, runtime


def features(args, n: int, seed: int) -> list[dict]:
    """``n`` tokenised examples of the shape: the chosen item first, exactly K other candidates."""
    vocab = args.config["vocab_size"]
    groups = shapes.make_groups(n, args.parsed_shape, args.k, vocab, seed)
    return [dict(prompt_ids=p, candidate_ids=c, target_index=0, example_id=f"e{i}", idx=i)
            for i, (p, c) in enumerate(groups)]


def trainer_round(args, runtime, train_ds, ref_all) -> list[float]:
    """Seconds per step of ``run_stage`` after ``--warmup`` steps (spacing of the per-step log writes)."""
    from sdpo_fast import train as train_mod
    from sdpo_fast.outputs import MetricsLog

    stamps = []

    class StampedLog(MetricsLog):
        def write(self, record, step=None):
            stamps.append(time.perf_counter())
            super().write(record, step)

    train_args = types.SimpleNamespace(
        batch_size=args.groups, sdpo_epochs=1e6, sft_epochs=1.0, max_steps=args.warmup + args.steps,
        sdpo_learning_rate=1e-5, sft_learning_rate=1e-5, warmup_ratio=0.0, reference="precompute", seed=0,
        loss_type="sdpo", beta=1.0, sft_weight=0.0, backend="auto", backend_options=None, log_every=1,
        save_steps=0, dataloader_num_workers=args.workers, cuda_graphs=args.cuda_graphs, cuda_graph_buckets=8,
    )
    data_args = types.SimpleNamespace(num_negatives=args.k, negatives="random", data_seed=0)
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=0)
    with tempfile.TemporaryDirectory() as out:
        train_mod.run_stage("sdpo", runtime, tokenizer, train_ds, data_args, train_args, StampedLog(out),
                            ref_all=ref_all)
    timed = stamps[args.warmup - 1 :]
    return [b - a for a, b in zip(timed, timed[1:])]


def bench_round(args, model, runtime, device, mbs, ref, graphed) -> list[float]:
    """Seconds per step of ``bench_step``'s (c) optimizer step on one fixed batch."""
    (method,) = methods.build_methods(["c"], device, None, "fused")[0].values()
    out = []
    for i in range(args.warmup + args.steps):
        ms = sweep.timed_step(method, model, runtime.optimizer, mbs, ref, args.groups, device, graphed)["ms"]
        if i >= args.warmup:
            out.append(ms / 1e3)
    return out


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, runtime = build(args, device)
    n = args.groups * (args.warmup + args.steps) * 2  # every trainer step sees new groups
    train_ds = features(args, n, seed=1)
    ref_all = torch.zeros(n, args.k + 1)
    fixed = shapes.make_groups(args.groups, args.parsed_shape, args.k, args.config["vocab_size"], seed=2)
    mbs = shapes.split(fixed, args.groups, args.k, args.config["vocab_size"], device, bucketed=args.cuda_graphs)
    ref = microbatch.Reference("precomputed", model, args.mode == "lora", table=torch.zeros(args.groups, args.k + 1,
                                                                                            device=device))
    graphed = graphs.GraphedSteps(model, mbs, ref, args.groups) if args.cuda_graphs else None
    rounds = []
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        t = trainer_round(args, runtime, train_ds, ref_all)
        b = bench_round(args, model, runtime, device, mbs, ref, graphed)
        rounds.append(dict(round=r, trainer_s=t, bench_s=b, load1=load))
        print(f"round {r}: trainer {statistics.median(t) * 1e3:.1f} ms/step, benchmark "
              f"{statistics.median(b) * 1e3:.1f} ms/step", file=sys.stderr)
    result = summarise(args, device, rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    harness.write_json(args.out / f"{args.name}.json", result)
    harness.write_text(args.out / f"{args.name}.md", markdown(result))
    print(markdown(result))
    return result


def summarise(args, device, rounds) -> dict:
    def gps(times):  # groups per second of each round's median step
        return [args.groups / statistics.median(t) for t in times]

    trainer = gps([r["trainer_s"] for r in rounds])
    bench = gps([r["bench_s"] for r in rounds])
    ratios = [t / b for t, b in zip(trainer, bench)]
    threads = torch.get_num_threads()
    return dict(
        meta=dict(commit=harness.commit(), date=harness.utc_now(), device=str(device),
                  machine=torch.cuda.get_device_name(device) if device.type == "cuda" else harness.cpu_name(threads),
                  versions=harness.package_versions(["torch", "triton", "transformers", "peft"]),
                  run=args.run, shape=args.shape, k=args.k, groups=args.groups, steps=args.steps,
                  warmup=args.warmup, dtype=args.dtype, cuda_graphs=args.cuda_graphs, workers=args.workers,
                  config=args.config),
        rounds=rounds,
        trainer_groups_per_s=dict(median=statistics.median(trainer), min=min(trainer), max=max(trainer)),
        bench_groups_per_s=dict(median=statistics.median(bench), min=min(bench), max=max(bench)),
        ratio=dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios)),
    )


def markdown(result) -> str:
    m = result["meta"]
    t, b, r = result["trainer_groups_per_s"], result["bench_groups_per_s"], result["ratio"]
    lines = [
        f"# Trainer vs benchmark step: {m['run']}, shape {m['shape']}, K = {m['k']}, {m['groups']} groups per step",
        "",
        f"{m['machine']} ({m['device']}), {m['dtype']}, CUDA graphs {'on' if m['cuda_graphs'] else 'off'}, "
        f"commit {m['commit']}, {m['date']}; {len(result['rounds'])} rounds in turns of {m['steps']} timed steps "
        f"after {m['warmup']} warm-up steps each; 1-minute load before the rounds: "
        + ", ".join(f"{x['load1']:.1f}" for x in result["rounds"]),
        "",
        "| side | groups/s (median of rounds) | range over rounds |",
        "|---|---:|---:|",
        f"| trainer (`run_stage`, new data each step) | {t['median']:.3f} | {t['min']:.3f} - {t['max']:.3f} |",
        f"| benchmark (bench_step (c), one fixed batch) | {b['median']:.3f} | {b['min']:.3f} - {b['max']:.3f} |",
        f"| ratio trainer / benchmark | {r['median']:.3f} | {r['min']:.3f} - {r['max']:.3f} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
