"""CPU benchmark of the fused log-probs and S-DPO loss: native vs torch eager vs chunked torch.

Shape (the issue's): G groups of C candidates of n tokens (default 8 x 16 x 16 = N = 2048 target rows),
D = 512, V = 32000, fp32, forward + backward of an S-DPO step (sft_weight 0), on the CPU.

Rows, all in this process, same inputs:
  eager          logits [N, V] materialised (one row per target), log_softmax, gather, segment sum,
                 sdpo_loss, autograd backward: the plain PyTorch baseline
  torch_chunked  the package's torch reference backend (``fused_sdpo_loss(backend="torch")``:
                 logits in 128 MiB chunks, recomputed in the backward)
  native_logprobs  ``sequence_logprobs(backend="native")`` + ``sdpo_loss`` + autograd backward
                 (its backward recomputes the logits: four GEMMs)
  native_fused   ``fused_sdpo_loss(backend="native")`` (whole groups per tile, three GEMMs)
  native_*_blas  the same two with the native GEMMs on torch's BLAS instead of oneDNN
                 (``torch.backends.mkldnn.enabled = False``; only when oneDNN is the default engine)
and the bare GEMMs of eager's shapes (logits [N, D] x [D, V], dHidden [N, V] x [V, D], dW [V, N] x [N, D]).

Time: wall-clock median over ``--repeats`` after one warm-up; the rows and the GEMMs are timed in
turn within each repeat (round robin), so load from other processes on a shared machine falls on all
of them alike and the ratios stay meaningful when the absolute times do not. Peak extra memory: each row runs once
more in a fresh subprocess, which builds its inputs, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs one step, and reports VmHWM minus the RSS before the step.
tracemalloc would see none of torch's allocations (they bypass Python's allocator), and torch's CPU
allocator returns large blocks to the OS at once, so the kernel's resident-set peak is the honest
figure. Gradients of hidden and weight (the same in every row) are part of it; the table also gives
the figure without them (the working memory of the op).

``python benchmarks/bench_logprob_cpu.py`` writes benchmarks/results/logprob_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from harness import commit, interleaved_times, rss_kb, utc_now, write_json, write_text  # noqa: E402  (benchmarks/)

ROWS = ("eager", "torch_chunked", "native_logprobs", "native_fused", "native_logprobs_blas", "native_fused_blas")
RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(groups=8, cands=16, cand_len=16, prompt_len=32, dim=512, vocab=32000, dtype=torch.float32, seed=0):
    """Packed batch, hidden ``[T, D]``, weight ``[V, D]`` and reference log-probs ``[G, C]``."""
    import sdpo_fast

    gen = torch.Generator().manual_seed(seed)
    spec = [
        (torch.randint(0, vocab, (prompt_len,), generator=gen),
         [torch.randint(0, vocab, (cand_len,), generator=gen) for _ in range(cands)])
        for _ in range(groups)
    ]
    batch = sdpo_fast.pack_groups(spec)
    T = batch.shape[0] * batch.shape[1]
    hidden = (torch.randn(T, dim, generator=gen) * 0.5).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * 0.05).to(dtype)
    ref = torch.randn(groups, cands, generator=gen) - 40.0
    return batch, hidden, weight, ref


def _eager_step(batch, hidden, weight, ref):
    from sdpo_fast.loss import sdpo_loss

    rows = batch.logit_rows.index_select(0, batch.target_rows)  # one logits row per target
    logits = hidden[rows] @ weight.t()
    tok = torch.log_softmax(logits.float(), dim=-1).gather(1, batch.target_ids[:, None])[:, 0]
    G, C = batch.candidate_mask.shape
    logps = torch.zeros(G * C).index_add(0, batch.target_candidates, tok).view(G, C)
    return sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], rejected_mask=batch.candidate_mask[:, 1:])


def _logprobs_step(backend):
    def step(batch, hidden, weight, ref):
        import sdpo_fast
        from sdpo_fast.loss import sdpo_loss

        logps = sdpo_fast.sequence_logprobs(hidden, weight, batch, backend=backend)
        return sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], rejected_mask=batch.candidate_mask[:, 1:])

    return step


def _fused_step(backend):
    def step(batch, hidden, weight, ref):
        from sdpo_fast.loss import fused_sdpo_loss

        return fused_sdpo_loss(hidden, weight, batch, ref, backend=backend)[0]

    return step


STEPS = {
    "eager": _eager_step,
    "torch_chunked": _fused_step("torch"),
    "native_logprobs": _logprobs_step("native"),
    "native_fused": _fused_step("native"),
    "native_logprobs_blas": _logprobs_step("native"),
    "native_fused_blas": _fused_step("native"),
}


@contextlib.contextmanager
def _gemm_library(name):
    """The ``*_blas`` rows run with oneDNN switched off, so the native GEMMs take torch's BLAS."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = enabled and not name.endswith("_blas")
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def run_step(name, batch, hidden, weight, ref):
    """One forward + backward; returns the loss (gradients land in hidden.grad / weight.grad)."""
    hidden.grad = weight.grad = None
    with _gemm_library(name):
        loss = STEPS[name](batch, hidden, weight, ref)
        loss.backward()
    return loss.detach()


def gemm_fns(n, dim, vocab, dtype):
    """The three GEMMs of eager's shapes: logits [n, D] x [D, V], dHidden [n, V] x [V, D], dW [V, n] x [n, D]."""
    a = torch.randn(n, dim, dtype=dtype)
    w = torch.randn(vocab, dim, dtype=dtype)
    g = torch.randn(n, vocab, dtype=dtype)
    return {
        "gemm_logits": lambda: a @ w.t(),
        "gemm_dhidden": lambda: g @ w,
        "gemm_dweight": lambda: g.t() @ a,
    }


def peak_extra_mb(name, shape_args):
    """Peak resident memory a single step adds, measured in a fresh subprocess (MiB): ``{"total": ...,
    "working": total minus the gradients hidden.grad and weight.grad that every row must produce}``."""
    cmd = [sys.executable, __file__, "--_memory-child", name, "--_shape", json.dumps(shape_args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_child(name, shape_args):
    batch, hidden, weight, ref = make_inputs(**_shape_kwargs(shape_args))
    hidden.requires_grad_(True)
    weight.requires_grad_(not shape_args.get("frozen_weight", False))
    import sdpo_fast.backends as backends

    backends.available("logprobs")  # load optional backends (and the extension) before measuring
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM)
    before, _ = rss_kb()
    run_step(name, batch, hidden, weight, ref)
    _, peak = rss_kb()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (hidden, weight) if t.grad is not None) / 2**20
    total = (peak - before) / 1024
    print(json.dumps({"total": total, "working": total - grads}))


def _shape_kwargs(shape_args):
    kw = dict(shape_args)
    kw.pop("frozen_weight", None)
    kw["dtype"] = {"fp32": torch.float32, "bf16": torch.bfloat16}[kw["dtype"]]
    return kw


def main(argv=None):
    """Run the benchmark, print the table, write JSON + markdown; returns the result dict."""
    from tqdm import tqdm

    import sdpo_fast
    from sdpo_fast import backends

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--cands", type=int, default=16)
    p.add_argument("--cand-len", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    p.add_argument("--frozen-weight", action="store_true",
                   help="weight without gradient (LoRA's frozen lm_head): only dHidden is computed")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--_memory-child", dest="memory_child", help=argparse.SUPPRESS)
    p.add_argument("--_shape", dest="shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return _memory_child(args.memory_child, json.loads(args.shape))

    shape_args = dict(groups=args.groups, cands=args.cands, cand_len=args.cand_len, prompt_len=args.prompt_len,
                      dim=args.dim, vocab=args.vocab, dtype=args.dtype, frozen_weight=args.frozen_weight)
    batch, hidden, weight, ref = make_inputs(**_shape_kwargs(shape_args))
    hidden.requires_grad_(True)
    weight.requires_grad_(not args.frozen_weight)
    native = "native" in backends.available("sdpo_loss")
    engine = None
    if native:
        from sdpo_fast.kernels.extension import gemm_engine

        engine = gemm_engine(int(batch.logit_rows.numel()) * args.vocab * args.dim)
    rows = [r for r in ROWS if not r.startswith("native") or (native and (engine == "onednn" or "_blas" not in r))]
    N, dtype = batch.num_targets, hidden.dtype

    losses = {name: run_step(name, batch, hidden, weight, ref).item() for name in rows}
    fns = {name: (lambda name=name: run_step(name, batch, hidden, weight, ref)) for name in rows}
    gemms = gemm_fns(N, args.dim, args.vocab, dtype)
    if args.frozen_weight:
        del gemms["gemm_dweight"]  # no dW to compute
    fns.update(gemms)
    rounds = interleaved_times(fns, args.repeats, desc="time (fwd+bwd, round robin)")
    medians = {k: statistics.median(v) for k, v in rounds.items()}
    # eager's time over each row's in the same round: the spread shows how much the machine's load moved
    paired = {k: sorted(e / t for e, t in zip(rounds["eager"], rounds[k])) for k in rows}
    times = {name: medians[name] for name in rows}
    gemm = {k.removeprefix("gemm_"): v for k, v in medians.items() if k.startswith("gemm_")}
    gemm_total = sum(gemm.values())
    mem = {}
    if not args.no_memory:
        for name in tqdm(rows, desc="peak memory (subprocess per row)"):
            mem[name] = peak_extra_mb(name, shape_args)

    result = {
        "benchmark": "logprob_cpu",
        "date": utc_now(),
        "commit": commit(),
        "device": f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "native_gemm_engine": engine,
        "load_avg_1m": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "sdpo_fast": sdpo_fast.__version__, "python": platform.python_version()},
        "shape": {**shape_args, "N_targets": N, "logit_rows": int(batch.logit_rows.numel())},
        "seconds": times,
        "loss": losses,
        "peak_extra_mb": mem,
        "bare_gemm_seconds": {**gemm, "total": gemm_total},
        "speedup_vs_eager": {k: times["eager"] / v for k, v in times.items()},
        "speedup_vs_eager_per_round": {k: {"min": v[0], "median": statistics.median(v), "max": v[-1]}
                                       for k, v in paired.items()},
        "rounds_seconds": rounds,
        "speedup_vs_torch_chunked": {k: times["torch_chunked"] / v for k, v in times.items()},
        "time_over_bare_gemms": {k: v / gemm_total for k, v in times.items()},
        "memory_fraction_of_eager": {k: v["total"] / mem["eager"]["total"] for k, v in mem.items()},
        "working_memory_fraction_of_eager": {k: v["working"] / mem["eager"]["working"] for k, v in mem.items()},
    }
    md = _markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "logprob_cpu" + ("" if args.dtype == "fp32" else f"_{args.dtype}")
    stem += "" if args.threads is None else f"_t{args.threads}"
    stem += "" if (args.vocab, args.groups) == (32000, 8) else f"_v{args.vocab}_g{args.groups}"
    stem += "_frozen_weight" if args.frozen_weight else ""
    write_json(args.out / f"{stem}.json", result)
    write_text(args.out / f"{stem}.md", md + "\n")
    return result


def _markdown(r):
    s = r["shape"]
    lines = [
        f"## Fused log-probs / S-DPO loss on CPU ({r['date']})",
        "",
        f"{r['device']}, torch {r['versions']['torch']}, native GEMMs on {r.get('native_gemm_engine')}, "
        f"1-min load average {r['load_avg_1m']:.2f}; "
        f"{s['groups']} groups x {s['cands']} candidates x {s['cand_len']} tokens = N {s['N_targets']} targets "
        f"({s['logit_rows']} distinct logit rows), D {s['dim']}, V {s['vocab']}, {s['dtype']}, forward + backward"
        + (" (weight frozen: dHidden only)." if s.get("frozen_weight") else "."),
        "",
        "| row | median s | vs eager | vs eager per round (min-max) | vs torch chunked | / bare GEMMs "
        "| peak extra MiB (/ eager) | excl. grads MiB (/ eager) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, t in r["seconds"].items():
        mem = r["peak_extra_mb"].get(k)
        if mem is None:
            total = working = "-"
        else:
            total = f"{mem['total']:.0f} ({r['memory_fraction_of_eager'][k]:.3f})"
            working = f"{mem['working']:.0f} ({r['working_memory_fraction_of_eager'][k]:.3f})"
        pr = r["speedup_vs_eager_per_round"][k]
        lines.append(
            f"| {k} | {t:.3f} | {r['speedup_vs_eager'][k]:.2f}x | {pr['min']:.2f}-{pr['max']:.2f}x | "
            f"{r['speedup_vs_torch_chunked'][k]:.2f}x | "
            f"{r['time_over_bare_gemms'][k]:.2f} | {total} | {working} |"
        )
    g = r["bare_gemm_seconds"]
    lines += [
        "",
        "Bare GEMMs of eager's shapes: "
        + ", ".join(f"{name} {g[key]:.3f} s" for key, name in (("logits", "logits"), ("dhidden", "dHidden"),
                                                              ("dweight", "dW")) if key in g)
        + f", total {g['total']:.3f} s (timed in the same round robin).",
        f"'vs eager': ratio of the medians; 'per round': eager's time over the row's within each of the "
        f"{len(r['rounds_seconds']['eager'])} rounds.",
        "Peak extra memory: resident-set peak of one step in a fresh process minus the RSS before it; "
        "'excl. grads' subtracts hidden.grad and weight.grad, the outputs every row produces.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
