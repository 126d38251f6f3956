"""How AdamW updates reach bf16 weights: memory, time and precision of ``train.py --weight_update``.

Four optimizers over the same bf16 parameters and gradients, in one script:
- ``bf16 AdamW``: ``torch.optim.AdamW`` on the bf16 weights (moments in bf16; the negative control),
- ``fp32 masters``: ``sdpo_fast.optim.MasterAdamW`` (the default), torch's fused AdamW inside (the
  trainer's choice on CUDA and on the CPU),
- ``fp32 masters, loop``: the same with torch's for-loop AdamW (the trainer's CPU optimizer before
  it took the fused one there),
- ``stochastic rounding``: ``sdpo_fast.optim.StochasticRoundingAdamW``.

Memory and time: a model's parameter shapes (``--shapes smollm2``: SmolLM2-135M, 134.5M parameters;
``llama-1b``: Llama-3.2-1B, 1.24B; ``smollm2-lora``: its rank-8 LoRA adapters, 420 tensors), bf16 weights with random bf16 gradients, a few optimizer steps.
Each optimizer runs in a fresh subprocess, all in turns for ``--rounds`` rounds. Memory: the
growth over the weights and gradients (resident set on CPU, ``max_memory_allocated`` on CUDA), as
bytes per parameter; time: the median step (the first, which allocates the state, left out).

Precision: a noisy quadratic at a LoRA-like bf16 weight w [64, 2048] (uniform init of scale
1/sqrt(2048)): the target t lies about 50 AdamW steps of lr 1e-5 away per entry, the gradient is
(w - t) / (50 lr) + N(0, 0.25), the same noise for every optimizer and for an fp64 AdamW run beside
them. After ``--precision_steps`` steps: ``remaining`` = |w_T - t| / |w_0 - t| (how far from the target
it still is; bf16 AdamW stalls where its updates round away) and ``off fp64`` = |w_T - ref_T| / |w_0 - t|
(Frobenius norms).

    python benchmarks/bench_optim.py --out benchmarks/results/bench_optim_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import harness

MODES = ("bf16 AdamW", "fp32 masters", "fp32 masters, loop", "stochastic rounding")

# (vocab, hidden, intermediate, layers, q heads, kv heads): Llama-architecture shapes, tied embeddings
SHAPES = {"smollm2": (49152, 576, 1536, 30, 9, 3), "llama-1b": (128256, 2048, 8192, 16, 32, 8),
          "tiny": (512, 64, 128, 2, 4, 2)}  # tiny: the script's test


def param_shapes(name: str) -> list[tuple[int, ...]]:
    """The trainable parameters' shapes: the whole model, or with ``-lora`` LoRA adapters of rank 8 on
    its seven projections (A ``[8, in]``, B ``[out, 8]``: many small tensors)."""
    lora = name.endswith("-lora")
    vocab, hidden, inter, layers, heads, kv = SHAPES[name[: -len("-lora")] if lora else name]
    kv_dim = hidden // heads * kv
    projections = [(hidden, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, hidden),
                   (inter, hidden), (inter, hidden), (hidden, inter)]  # (out, in)
    if lora:
        return [s for o, i in projections for s in ((8, i), (o, 8))] * layers
    return [(vocab, hidden)] + (projections + [(hidden,), (hidden,)]) * layers + [(hidden,)]


def make_optimizer(mode: str, params, weight_decay: float = 0.01):
    import torch

    from sdpo_fast.optim import MasterAdamW, StochasticRoundingAdamW

    if mode == "bf16 AdamW":
        return torch.optim.AdamW(params, lr=1e-5, weight_decay=weight_decay, fused=True)
    if mode in ("fp32 masters", "fp32 masters, loop"):
        return MasterAdamW(params, lr=1e-5, weight_decay=weight_decay, fused=mode == "fp32 masters")
    return StochasticRoundingAdamW(params, lr=1e-5, weight_decay=weight_decay, seed=0)


def child(mode: str, shapes: str, device: str, steps: int) -> dict:
    """One optimizer on one parameter set (run in its own process): memory growth and step times."""
    import torch

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    params = []
    for shape in param_shapes(shapes):
        p = torch.nn.Parameter(torch.randn(shape, device=dev, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16))
        p.grad = torch.randn(shape, device=dev, generator=g, dtype=torch.float32).to(torch.bfloat16)
        params.append(p)
    n = sum(p.numel() for p in params)
    opt = make_optimizer(mode, params)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    times = []
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.step()
            sync()
            times.append(time.perf_counter() - t0)
        growth = torch.cuda.max_memory_allocated() - base
    else:
        with harness.PeakRSS() as peak:
            for _ in range(steps):
                t0 = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t0)
        growth = peak.mib * 2**20 if peak.mib is not None else float("nan")
    return {"params": n, "growth_bytes_per_param": growth / n, "step_s": times[1:]}


def run_child(mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--shapes", args.shapes, "--device", args.device,
           "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {mode} run failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def precision(steps: int, seed: int = 0, lr: float = 1e-5, shape=(64, 2048)) -> dict:
    """Each mode's ``remaining`` and ``off_fp64`` on a noisy quadratic (module docstring); the fp64
    AdamW's own ``remaining`` under ``"fp64 AdamW"``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w0 = ((torch.rand(shape, generator=g) - 0.5) * 2 / shape[-1]**0.5).to(torch.bfloat16)
    far = 50 * lr  # the target is about 50 AdamW steps away per entry
    target = w0.double() + far * torch.randn(w0.shape, generator=g, dtype=torch.float64)
    noise = torch.Generator().manual_seed(seed + 1)
    ref = torch.nn.Parameter(w0.double().clone())
    opt_ref = torch.optim.AdamW([ref], lr=lr, weight_decay=0.0)
    runs = {m: torch.nn.Parameter(w0.clone()) for m in MODES}
    opts = {m: make_optimizer(m, [p], weight_decay=0.0) for m, p in runs.items()}
    for _ in range(steps):
        eps = 0.5 * torch.randn(w0.shape, generator=noise, dtype=torch.float64)
        ref.grad = (ref.detach() - target) / far + eps
        opt_ref.step()
        for m, p in runs.items():
            p.grad = ((p.detach().double() - target) / far + eps).to(torch.bfloat16)
            opts[m].step()
    start = (w0.double() - target).norm().item()
    out = {"fp64 AdamW": {"remaining": (ref.detach() - target).norm().item() / start, "off_fp64": 0.0}}
    for m, p in runs.items():
        w = p.detach().double()
        out[m] = {"remaining": (w - target).norm().item() / start, "off_fp64": (w - ref.detach()).norm().item() / start}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=sorted(SHAPES) + sorted(f"{k}-lora" for k in SHAPES), default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per memory/time run (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each optimizer, in turns")
    ap.add_argument("--precision_steps", type=int, default=200)
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.precision_steps < 1:
        ap.error("--steps must be >= 2, --rounds and --precision_steps >= 1")
    if args.child:
        print(json.dumps(child(args.child, args.shapes, args.device, args.steps)))
        return 0
    import torch
    from tqdm import tqdm

    load = [os.getloadavg()[0]]
    runs = {m: [] for m in MODES}
    for _ in tqdm(range(args.rounds), desc="rounds"):
        for m in MODES:
            runs[m].append(run_child(m, args))
    prec = precision(args.precision_steps)
    load.append(os.getloadavg()[0])
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else harness.cpu_name(torch.get_num_threads())
    rows = []
    for m in MODES:
        growth = [r["growth_bytes_per_param"] for r in runs[m]]
        step = [s for r in runs[m] for s in r["step_s"]]
        rows.append({"mode": m, "params": runs[m][0]["params"],
                     "bytes_per_param": 4 + statistics.median(growth),  # + bf16 weight and gradient
                     "growth_range": [min(growth), max(growth)],
                     "step_ms_median": 1e3 * statistics.median(step), "step_ms_range": [1e3 * min(step), 1e3 * max(step)],
                     **prec[m]})
    base = next(r for r in rows if r["mode"] == "fp32 masters")
    for r in rows:
        r["memory_vs_masters"] = r["bytes_per_param"] / base["bytes_per_param"]
        r["time_vs_masters"] = r["step_ms_median"] / base["step_ms_median"]
    result = {"commit": harness.commit(), "date": harness.utc_now(), "device": device, "shapes": args.shapes,
              "steps": args.steps, "rounds": args.rounds, "load_1min": load, "precision_steps": args.precision_steps,
              "versions": harness.package_versions(["torch"]), "rows": rows, "fp64_remaining": prec["fp64 AdamW"]["remaining"]}
    lines = [f"# AdamW on bf16 weights: `--weight_update` ({args.shapes} shapes, {rows[0]['params'] / 1e6:.1f}M parameters)",
             "", f"{device}; commit {result['commit']}, {result['date']}; 1-minute load {load[0]:.1f} before, {load[1]:.1f} after; {args.rounds} rounds x {args.steps} steps "
             f"per optimizer (the first step of each run untimed); precision: {args.precision_steps} steps at lr 1e-5 "
             f"on the noisy quadratic, where fp64 AdamW has {prec['fp64 AdamW']['remaining']:.3f} remaining.", "",
             "| update | bytes / param (median, range) | vs masters | step ms (median, range) | vs masters "
             "| remaining | off fp64 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = (4 + x for x in r["growth_range"])
        slo, shi = r["step_ms_range"]
        lines.append(f"| {r['mode']} | {r['bytes_per_param']:.1f} ({lo:.1f}-{hi:.1f}) | {r['memory_vs_masters']:.2f}x "
                     f"| {r['step_ms_median']:.0f} ({slo:.0f}-{shi:.0f}) | {r['time_vs_masters']:.2f}x "
                     f"| {r['remaining']:.3f} | {r['off_fp64']:.3f} |")
    lines += ["", "bytes / param: 2 (bf16 weight) + 2 (bf16 gradient) + the optimizer's growth during the steps "
              "(state and temporaries; on CPU the resident set, approximate). remaining: |w_T - t| / |w_0 - t|; "
              "off fp64: |w_T - ref_T| / |w_0 - t| (the module docstring)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        harness.write_json(Path(args.out + ".json"), result)
        harness.write_text(Path(args.out + ".md"), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
