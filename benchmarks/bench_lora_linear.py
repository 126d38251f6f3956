"""LoRA layers fused (``sdpo_fast.lora_linear``) against peft's own: dispatched ops and step time.

Two models built as ``bench_step`` builds them (random weights, seed 0; LoRA on all seven projections
through the trainer's ``lora_model``); in the second the LoRA layers are put back to peft's class.
Per cell (``--cells HIDDENxGROUPS``: hidden size, intermediate 4x, ``--layers`` layers; groups of the
paper's shape with K negatives in one micro-batch; heads of 64 from hidden 256 on, else of 16):

- ops: the aten ops one optimizer step dispatches (forward + backward + AdamW), counted by a
  ``TorchDispatchMode``, by phase. On the CPU the step takes the CPU path (the attention reference,
  the native loss); the LoRA layers' ops are those of a GPU step, the rest differs;
- time: ``bench_step``'s (c) optimizer step, the two sides in turns for ``--rounds`` rounds of
  ``--steps`` steps (the first round a warm-up): the median step, the range of the rounds' medians,
  peft / fused of the medians, and the median and range of each round's own peft / fused;
- check: the two sides' first losses and gradient norms (same weights, the reference their initial
  log-probs: equal up to rounding).

    python benchmarks/bench_lora_linear.py --threads 1 --out benchmarks/results --name lora_linear_cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from step import methods, microbatch, shapes, sweep  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cells", nargs="+", default=["64x1", "64x8", "256x8"], metavar="HIDDENxGROUPS")
    p.add_argument("--layers", type=int, default=16, help="decoder layers (16: Llama-3.2-1B's)")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--shape", default="paper")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rounds", type=int, default=6, help="rounds of both sides in turns (the first a warm-up)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per side and round")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--name", default="bench_lora_linear")
    args = p.parse_args(argv)
    for name in ("layers", "k", "lora_rank", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (the first is a warm-up)")
    args.parsed_cells = []
    for cell in args.cells:
        hidden, sep, groups = cell.partition("x")
        if not (sep and hidden.isdigit() and groups.isdigit() and int(hidden) % 16 == 0 and int(groups) >= 1):
            p.error(f"--cells takes HIDDENxGROUPS with HIDDEN a multiple of 16, got {cell!r}")
        args.parsed_cells.append((int(hidden), int(groups)))
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def run_cell(args, hidden: int, n_groups: int, device) -> dict:
    heads = hidden // (64 if hidden >= 256 else 16)  # Llama-3.2-1B: 32 heads of 64, 8 KV heads
    cfg = shapes.model_config("tiny-1b", dict(hidden_size=hidden, intermediate_size=4 * hidden,
                                              num_hidden_layers=args.layers, num_attention_heads=heads,
                                              num_key_value_heads=heads // 4 if heads >= 8 else max(1, heads // 2)))
    base = types.SimpleNamespace(dtype=args.dtype, lora_rank=args.lora_rank)
    from sdpo_fast.adapters import unfuse_lora_layers

    sides = {}
    for side in ("fused", "peft"):
        torch.manual_seed(0)
        model, opt = sweep.build_model(cfg, "lora", base, device)
        sides[side] = dict(model=model, opt=opt)
    lora_layers = unfuse_lora_layers(sides["peft"]["model"])
    groups = shapes.make_groups(n_groups, shapes.parse_shape(args.shape), args.k, cfg["vocab_size"], seed=0)
    mbs = shapes.split(groups, n_groups, args.k, cfg["vocab_size"], device)
    (method,) = methods.build_methods(["c"], device, None, "fused")[0].values()
    table = microbatch.precomputed_table(method, sides["fused"]["model"], mbs, lora=True)  # the initial policy's
    ref = microbatch.Reference("precomputed", None, True, table=table)

    row = dict(hidden=hidden, intermediate=4 * hidden, layers=args.layers, groups=n_groups, k=args.k,
               tokens=sum(mb.batch.num_tokens for mb in mbs), lora_layers=lora_layers)
    for side, s in sides.items():  # first step: the check, and the optimizer's state exists before counting
        model, opt = s["model"], s["opt"]
        opt.zero_grad(set_to_none=True)
        loss, _ = method.loss(model, mbs[0], ref(method, model, mbs[0]))
        loss.backward()
        row[f"{side}_loss"] = loss.item()
        row[f"{side}_grad_norm"] = sweep.grad_norm(model)
        opt.step()
        phases = {}
        opt.zero_grad(set_to_none=True)
        with harness.op_counter() as ops:
            loss, _ = method.loss(model, mbs[0], ref(method, model, mbs[0]))
        phases["forward"] = ops.total
        with harness.op_counter() as ops:
            loss.backward()
        phases["backward"] = ops.total
        with harness.op_counter() as ops:
            opt.step()
        phases["optimizer"] = ops.total
        row[f"{side}_ops"] = phases
        row[f"{side}_ops_total"] = sum(phases.values())

    times = {side: [] for side in sides}
    for r in range(args.rounds):
        for side, s in sides.items():
            ms = [sweep.timed_step(method, s["model"], s["opt"], mbs, ref, n_groups, device)["ms"]
                  for _ in range(args.steps)]
            if r:
                times[side].append(statistics.median(ms))
    for side in sides:
        row[f"{side}_ms"] = statistics.median(times[side])
        row[f"{side}_ms_range"] = [min(times[side]), max(times[side])]
        row[f"{side}_round_ms"] = times[side]
    row["peft_over_fused_time"] = row["peft_ms"] / row["fused_ms"]
    paired = [p / f for p, f in zip(times["peft"], times["fused"])]  # one round's pair ran back to back
    row["paired_ratio"] = dict(median=statistics.median(paired), min=min(paired), max=max(paired))
    row["peft_over_fused_ops"] = row["peft_ops_total"] / row["fused_ops_total"]
    return row


def markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# LoRA layers: fused (sdpo_fast.lora_linear) against peft's ({env['date']})", "",
             f"{env['device']}, {env['dtype']}, torch {env['versions'].get('torch')}, peft "
             f"{env['versions'].get('peft')}, commit {env['commit']}. LoRA rank {env['lora_rank']} on all seven "
             f"projections; the paper's shape, K = {env['k']}, every group in one micro-batch; "
             f"{env['rounds'] - 1} timed rounds of {env['steps']} steps, the sides in turns.", "",
             "| hidden | layers | groups | tokens | ops/step peft | ops/step fused | peft/fused ops | "
             "ms/step peft (range) | ms/step fused (range) | peft/fused time | per round (range) | "
             "loss, grad norm: peft / fused |",
             "|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['hidden']} | {r['layers']} | {r['groups']} | {r['tokens']} | {r['peft_ops_total']} | "
            f"{r['fused_ops_total']} | {r['peft_over_fused_ops']:.2f} | {r['peft_ms']:.1f} "
            f"({r['peft_ms_range'][0]:.1f}-{r['peft_ms_range'][1]:.1f}) | {r['fused_ms']:.1f} "
            f"({r['fused_ms_range'][0]:.1f}-{r['fused_ms_range'][1]:.1f}) | {r['peft_over_fused_time']:.2f} | "
            f"{r['paired_ratio']['median']:.2f} ({r['paired_ratio']['min']:.2f}-{r['paired_ratio']['max']:.2f}) | "
            f"{r['peft_loss']:.6f}, {r['peft_grad_norm']:.5g} / {r['fused_loss']:.6f}, {r['fused_grad_norm']:.5g} |")
    lines += ["", "Ops by phase (forward / backward / optimizer), and the ops saved per LoRA projection:", ""]
    for r in rows:
        p, f = r["peft_ops"], r["fused_ops"]
        saved = (r["peft_ops_total"] - r["fused_ops_total"]) / r["lora_layers"]
        lines.append(f"- hidden {r['hidden']}, {r['groups']} groups: peft {p['forward']} / {p['backward']} / "
                     f"{p['optimizer']}, fused {f['forward']} / {f['backward']} / {f['optimizer']}; "
                     f"{saved:.1f} per projection ({r['lora_layers']} projections)")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = dict(date=harness.utc_now(), commit=harness.commit(), dtype=args.dtype, k=args.k, lora_rank=args.lora_rank,
               rounds=args.rounds, steps=args.steps, versions=harness.package_versions(["torch", "peft", "transformers"]),
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else harness.cpu_name(threads))
    rows = []
    for hidden, n_groups in args.parsed_cells:
        rows.append(run_cell(args, hidden, n_groups, device))
        r = rows[-1]
        print(f"hidden {hidden} groups {n_groups}: ops {r['peft_ops_total']} -> {r['fused_ops_total']}, "
              f"ms {r['peft_ms']:.1f} -> {r['fused_ms']:.1f} (peft/fused {r['peft_over_fused_time']:.2f})", flush=True)
        harness.write_json(args.out / f"{args.name}.json", dict(environment=env, rows=rows))
        harness.write_text(args.out / f"{args.name}.md", markdown(rows, env))


if __name__ == "__main__":
    main()
