"""The sweep: per cell (model config and mode, shape, K, groups per optimizer step, reference kind)
each method's micro-batch search, a check against (a) from identical weights, then timed optimizer
steps taken in turns (a, b, c, a, b, c, ...) so that a change in the machine's load falls on every
method alike."""

from __future__ import annotations

import copy
import gc
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from harness import commit, cpu_name, package_versions, utc_now  # noqa: E402  (benchmarks/)
from sdpo_fast import backends
from sdpo_fast.attention import enable_shared_prefix
from sdpo_fast.optim import MasterAdamW

from . import graphs, microbatch, shapes
from .methods import build_methods

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHECK_GROUPS = 4  # groups of the check micro-batch (fewer where a method's micro-batch is smaller)
CELL_KEY = ("config", "mode", "shape", "K", "groups_per_step", "ref")


def build_model(cfg: dict, mode: str, args, device):
    """Random weights (seed 0) on the ``"sdpo_fast"`` attention implementation; ``(model, optimizer)``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.to(getattr(torch, args.dtype))
    enable_shared_prefix(model)
    if mode == "lora":  # the trainer's adapters (in the base dtype) for every method: (a) gets the fewer casts too
        from peft import LoraConfig

        from sdpo_fast.adapters import lora_model

        model = lora_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, MasterAdamW(params, lr=1e-5, fused=device.type in ("cuda", "cpu"))  # the trainer's optimizer


def grad_norm(model) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


# ------------------------------------------------------------------------------------------ checks


def tolerances(dtype: str) -> dict:
    """Relative tolerances of (b), (c) against (a): logps (max |diff| / mean |logp_a|), grad norm, loss."""
    if dtype == "float32":
        return dict(logps=1e-4, grad=1e-3, loss=1e-3)
    return dict(logps=3e-2, grad=1e-1, loss=5e-2)


def errors(check: dict, ref: dict) -> dict:
    scale = ref["logps"].abs().mean().clamp_min(1e-6)
    return dict(
        logps_rel_err=((check["logps"] - ref["logps"]).abs().max() / scale).item(),
        grad_rel_err=abs(check["grad_norm"] - ref["grad_norm"]) / max(ref["grad_norm"], 1e-12),
        loss_abs_err=abs(check["loss"] - ref["loss"]),
    )


def compare(check: dict, ref: dict, tol: dict) -> dict:
    err = errors(check, ref)
    ok = (err["logps_rel_err"] <= tol["logps"] and err["grad_rel_err"] <= tol["grad"]
          and err["loss_abs_err"] <= tol["loss"] * max(1.0, abs(ref["loss"])))
    return {**{k: float(f"{v:.3g}") for k, v in err.items()}, "check": "ok" if ok else "MISMATCH"}


# 16-bit runs up to this many naive tokens also run (a) on an fp32 copy of the model: the reference
# that (a), (b) and (c) are all measured against (in 16 bits, (a) itself is off by bf16 rounding).
REF32_MAX_TOKENS = 8704
# Floor of the fp32-reference verdict: a method passes when its log-prob error is within 2x (a)'s plus it.
REF32_FLOOR = dict(logps_rel_err=1e-4)


def check_step(method, model, opt, mb, ref) -> dict:
    """Forward + backward of the check micro-batch from the current weights, no update."""
    opt.zero_grad(set_to_none=True)
    loss, logps = microbatch.micro_step(method, model, mb, ref, mb.groups)
    out = dict(loss=loss.item(), logps=logps.float().cpu(), grad_norm=grad_norm(model))
    opt.zero_grad(set_to_none=True)
    return out


def fp32_reference_check(method, model, mb, ref_kind, lora, table) -> dict:
    model32 = copy.deepcopy(model).float()
    opt32 = torch.optim.SGD([p for p in model32.parameters() if p.requires_grad], lr=0.0)
    ref = microbatch.Reference(ref_kind, model32, lora, table=table)
    try:
        return check_step(method, model32, opt32, mb, ref)
    finally:
        ref.release()
        del model32
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare_fp32(checks: dict, ref32: dict) -> dict:
    """Per method: errors against the fp32 reference, and "ok" when its log-prob error is within 2x
    (a)'s plus a floor. Loss and gradient-norm errors are reported, not judged (bf16 noise of the whole
    forward, amplified by the loss, at step 0)."""
    errs = {key: errors(c, ref32) for key, c in checks.items() if c is not None}
    out = {}
    for key, e in errs.items():
        row = {f"ref32_{k}": float(f"{v:.3g}") for k, v in e.items()}
        if key != "a" and "a" in errs:
            k = "logps_rel_err"
            row["check"] = "ok" if e[k] <= 2 * errs["a"][k] + REF32_FLOOR[k] else "MISMATCH"
        out[key] = row
    return out


def check_methods(methods, rows, model, opt, groups, k, vocab, ref_kind, lora, table, args, device):
    """Every method's check step on the same micro-batch; fills loss, grad norm and the comparison."""
    sizes = [r["micro_batch"] for r in rows.values() if "micro_batch" in r]
    mb = shapes.micro_batch(groups[: min([CHECK_GROUPS] + sizes)], 0, k, vocab, device)
    checks = {}
    for key, m in methods.items():
        if rows[key]["status"] != "ok":
            checks[key] = None
            continue
        ref = microbatch.Reference(ref_kind, model, lora, table=table)
        checks[key], status = microbatch.attempt(lambda: check_step(m, model, opt, mb, ref), opt, device)
        ref.release()
        if status:
            rows[key]["status"] = status
    by32 = {}
    if args.dtype != "float32" and checks.get("a") is not None and mb.naive_tokens <= REF32_MAX_TOKENS:
        ref32, _ = microbatch.attempt(
            lambda: fp32_reference_check(methods["a"], model, mb, ref_kind, lora, table), opt, device)
        if ref32 is not None:
            by32 = compare_fp32(checks, ref32)
    tol = tolerances(args.dtype)
    for key, check in checks.items():
        if check is None:
            continue
        row = rows[key]
        row.update(loss=round(check["loss"], 6), grad_norm=float(f"{check['grad_norm']:.6g}"))
        if key != "a" and checks.get("a") is not None:
            row.update(compare(check, checks["a"], tol))
        row.update(by32.get(key, {}))  # where an fp32 reference ran, its verdict replaces the one against (a)
        if key != "a" and row.get("check", "ok") != "ok" and args.strict:
            raise RuntimeError(f"method {key} disagrees with the reference: {row}")


# ------------------------------------------------------------------------------------------ timing


def timed_step(method, model, opt, mbs, ref, n_groups, device, graphed=None) -> dict:
    """One optimizer step: milliseconds (GPU: CUDA events; CPU: wall clock) and, on GPU, its memory."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        microbatch.optimizer_step(method, model, opt, mbs, ref, n_groups, graphed)
        return dict(ms=(time.perf_counter() - t0) * 1e3)
    if graphed is None:
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    microbatch.optimizer_step(method, model, opt, mbs, ref, n_groups, graphed)
    end.record()
    end.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    return dict(ms=start.elapsed_time(end), mem_mib=peak / 2**20, step_mib=(peak - base) / 2**20)


def time_methods(methods, rows, model, opt, groups, k, vocab, ref_kind, lora, table, args, device):
    """Warm-up steps, then up to ``args.repeats`` timed optimizer steps per method in turns; a method
    whose timed steps already took ``args.budget_s`` seconds stops early (at least one step)."""
    alive = [key for key in methods if rows[key]["status"] == "ok"]
    state = {}
    for key in alive:
        graphed = args.cuda_graphs and key == "c"
        mbs = shapes.split(groups, rows[key]["micro_batch"], k, vocab, device, bucketed=graphed)
        ref = microbatch.Reference(ref_kind, model, lora, table=table)
        if graphed:
            graphed = graphs.GraphedSteps(model, mbs, ref, len(groups))
        else:
            graphed = None
        state[key] = (mbs, ref, graphed)
    steps = {key: [] for key in alive}

    def run(key):
        mbs, ref, graphed = state[key]
        return timed_step(methods[key], model, opt, mbs, ref, len(groups), device, graphed)

    def drop(key, status):
        rows[key]["status"] = status
        alive.remove(key)

    capture_mib = {}
    for key in list(alive):
        warm, status = microbatch.attempt(lambda: [run(key) for _ in range(args.warmup)], opt, device)
        if status:
            drop(key, status)
        elif state[key][2] is not None and warm and "mem_mib" in warm[0]:
            # a replay allocates nothing: the activations' peak is that of the first warm-up step, which captured
            capture_mib[key] = max(w["mem_mib"] for w in warm)

    def wants_more(key):
        spent = sum(s["ms"] for s in steps[key]) / 1e3
        return len(steps[key]) < args.repeats and (args.budget_s is None or not steps[key] or spent < args.budget_s)

    while any(wants_more(key) for key in alive):
        for key in [key for key in alive if wants_more(key)]:
            step, status = microbatch.attempt(lambda: run(key), opt, device)
            if status:
                drop(key, status)
            else:
                steps[key].append(step)
    for key in alive:
        if state[key][2] is not None:  # a replay against an eager step of the same micro-batch
            check, status = microbatch.attempt(state[key][2].check, opt, device)
            rows[key].update(check or dict(graph_check=status))
    for key in state:
        state[key][1].release()
    data_tokens = sum(len(p) + sum(len(c) for c in cs) for p, cs in groups)
    for key in alive:
        row, ms = rows[key], [s["ms"] for s in steps[key]]
        row.update(ms=round(statistics.median(ms), 2), ms_all=[round(t, 2) for t in ms],
                   ms_spread=round((max(ms) - min(ms)) / statistics.median(ms), 3))
        for field in ("mem_mib", "step_mib"):  # GPU: the largest over the timed steps
            if field in steps[key][0]:
                row[field] = round(max(s[field] for s in steps[key]), 1)
        if key in capture_mib:  # graphed: the capture's peak counts too (step_mib stays the replays' own)
            row["capture_mib"] = round(capture_mib[key], 1)
            row["mem_mib"] = max(row["mem_mib"], row["capture_mib"])
        row["groups_per_s"] = float(f"{len(groups) / (row['ms'] / 1e3):.4g}")
        row["tokens_per_s"] = float(f"{data_tokens / (row['ms'] / 1e3):.4g}")
        row["epoch_h"] = float(f"{shapes.ML100K_GROUPS / row['groups_per_s'] / 3600:.4g}")


# ------------------------------------------------------------------------------------------- cells


def run_cell(methods, model, opt, run_name, mode, shape, k, n_groups, ref_kind, cfg, args, device) -> list[dict]:
    vocab = cfg["vocab_size"]
    lora = mode == "lora"
    seed = 1000 * shape.prompt[0] + 100 * k + n_groups
    groups = shapes.make_groups(n_groups, shape, k, vocab, seed)
    data_tokens = sum(len(p) + sum(len(c) for c in cs) for p, cs in groups)
    base = dict(config=run_name, mode=mode, shape=shape.name, K=k, groups_per_step=n_groups, ref=ref_kind,
                data_tokens=data_tokens)
    rows = {key: dict(base, method=key, status="ok") for key in methods}
    for key, m in methods.items():
        size, tried = microbatch.find_micro_batch(m, model, opt, groups, k, vocab, device, ref_kind, lora,
                                                  cap=args.micro_batch or args.max_micro_batch,
                                                  cpu_mem_cap_mib=args.cpu_mem_cap_mib)
        rows[key]["search"] = " ".join(f"{mb}:{st}" for mb, st, _ in tried)
        if size is None:
            rows[key]["status"] = "OOM"
            continue
        mbs = shapes.split(groups, size, k, vocab, device)
        rows[key].update(micro_batch=size, accumulation=len(mbs),
                         tokens_processed=sum(mb.batch.num_tokens if key == "c" else mb.naive_tokens for mb in mbs))
        if tried[-1][2] is not None:  # CPU: the RSS growth of one micro-batch's forward + backward (the probe's)
            rows[key]["mem_mib"] = round(tried[-1][2], 1)
    table = None
    if ref_kind == "precomputed":
        first = methods.get("c") or next(iter(methods.values()))
        size = min([r["micro_batch"] for r in rows.values() if "micro_batch" in r] or [1])
        table = microbatch.precomputed_table(first, model, shapes.split(groups, size, k, vocab, device), lora)
    check_methods(methods, rows, model, opt, groups, k, vocab, ref_kind, lora, table, args, device)
    time_methods(methods, rows, model, opt, groups, k, vocab, ref_kind, lora, table, args, device)
    return list(rows.values())


def environment(args, device, methods, notes) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(torch.get_num_threads())
    versions = package_versions(("torch", "transformers", "peft", "triton", "sdpo_fast", "cut-cross-entropy",
                                 "liger-kernel"))
    return dict(
        benchmark="bench_step",
        preset=args.preset,
        date=utc_now(),
        device=name,
        commit=commit(),
        python=platform.python_version(),
        versions=versions,
        dtype=args.dtype,
        models={r: shapes.model_config(r.split(":")[0], args.overrides) for r in args.runs},
        runs=args.runs,
        shapes=args.shapes,
        ks=args.ks,
        groups_per_step=args.groups_per_step,
        refs=args.refs,
        lora=f"r={args.lora_rank} alpha={2 * args.lora_rank} on {','.join(LORA_TARGETS)}, adapters in the base dtype "
        "(sdpo_fast.adapters.lora_model, as the trainer; peft's default is fp32 adapters) for every method",
        optimizer="AdamW lr=1e-5" + (" fused" if device.type == "cuda" else "")
        + " on fp32 masters of the half-precision weights (sdpo_fast.optim.MasterAdamW, as the trainer)",
        methods={k: m.label for k, m in methods.items()},
        sdpo_fast_backends={op: backends.resolve(op, "auto", device) for op in ("attention", "logprobs", "sdpo_loss")},
        micro_batch=("fixed at most " + str(args.micro_batch) if args.micro_batch else "largest that fits")
        + (f" (from at most {args.max_micro_batch})" if args.max_micro_batch else "")
        + (f", CPU cap {args.cpu_mem_cap_mib} MiB of RSS growth per micro-batch" if args.cpu_mem_cap_mib else ""),
        cuda_graphs=bool(args.cuda_graphs),
        timing=f"median of {args.repeats} optimizer steps after {args.warmup} warm-up step(s), methods in turns"
        + (f", fewer once a method's timed steps took {args.budget_s} s" if args.budget_s else "")
        + (" (CUDA events)" if device.type == "cuda" else " (wall clock)"),
        memory=(
            "mem = torch.cuda.max_memory_allocated over the timed steps (weights, optimizer, activations); "
            "step = its growth over the weights and optimizer state; with CUDA graphs, mem also covers the "
            "warm-up steps that capture (capture = that peak: a replay allocates nothing, its graph's pool stays "
            "reserved)"
            if device.type == "cuda"
            else "mem = growth of the process RSS during one micro-batch's forward+backward (sampled every ms; approximate)"
        ),
        epoch=f"epoch_h = {shapes.ML100K_GROUPS} groups (one ML-100K-sized epoch) / groups_per_s",
        notes=notes,
    )


def run(args, on_cell: Callable | None = None):
    """The sweep: ``(meta, rows)``; ``on_cell(meta, rows)`` is called after every cell (partial results)."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    methods, notes = build_methods(args.methods, device, args.flce_provider, args.sdpo_op)
    if not methods:
        raise ValueError("no method to run (see --methods)")
    meta = environment(args, device, methods, notes)
    meta["load_average_start"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    meta["complete"] = False
    rows = []
    cells = [(s, k, n, r) for s in args.shapes for k in args.ks for n in args.groups_per_step for r in args.refs]
    with tqdm(total=len(args.runs) * len(cells), desc="bench_step", file=sys.stderr) as bar:
        for run_name in args.runs:
            cfg_name, mode = run_name.split(":")
            cfg = shapes.model_config(cfg_name, args.overrides)
            cfg["max_position_embeddings"] = max(cfg["max_position_embeddings"],
                                                 max(shapes.parse_shape(s).max_span for s in args.shapes) + 8)
            model, opt = build_model(cfg, mode, args, device)
            for s, k, n, r in cells:
                bar.set_postfix_str(f"{run_name} {s} K={k} N={n} {r}")
                new = run_cell(methods, model, opt, run_name, mode, shapes.parse_shape(s), k, n, r, cfg, args, device)
                rows += new
                bar.write(format_line(new))
                bar.update()
                if on_cell is not None:
                    on_cell(meta, rows)
            del model, opt
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    meta["sweep_seconds"] = round(time.perf_counter() - t0, 1)
    meta["complete"] = True
    return meta, rows


def format_line(rows: list[dict]) -> str:
    r0 = rows[0]
    parts = [f"{r0['config']} {r0['shape']} K={r0['K']:<3d} N={r0['groups_per_step']:<4d} {r0['ref'][:4]}"]
    for r in rows:
        parts.append(f"{r['method']}: " + (f"{r['ms']:9.1f} ms (mb {r['micro_batch']})" if "ms" in r
                                           else f"{r['status']:>12s}"))
    times = {r["method"]: r["ms"] for r in rows if "ms" in r}
    if "a" in times and "c" in times:
        parts.append(f"c vs a {times['a'] / times['c']:5.2f}x")
    return "  ".join(parts)


def summarize(rows: list[dict]) -> list[dict]:
    """Per cell: c's speed-up over a and b (groups/s ratio = step-time ratio, same run) and memory ratio c/a."""
    out = {}
    for r in rows:
        s = out.setdefault(tuple(r[k] for k in CELL_KEY), {})
        s[r["method"]] = r
    summary = []
    for key, s in out.items():
        row = dict(zip(CELL_KEY, key))
        c = s.get("c")
        for other in ("a", "b"):
            o = s.get(other)
            if c and o and "ms" in c and "ms" in o:
                row[f"speedup_c_vs_{other}"] = round(o["ms"] / c["ms"], 2)
            if c and o and c.get("mem_mib") and o.get("mem_mib"):
                row[f"mem_c_over_{other}"] = round(c["mem_mib"] / o["mem_mib"], 3)
        summary.append(row)
    return summary


def largest_fitting_k(rows: list[dict]) -> dict:
    """``{"config shape N ref": {method: largest K that ran}}``."""
    out = {}
    for r in rows:
        key = f"{r['config']} {r['shape']} N={r['groups_per_step']} {r['ref']}"
        best = out.setdefault(key, {}).setdefault(r["method"], None)
        if r["status"] == "ok" and "ms" in r and (best is None or r["K"] > best):
            out[key][r["method"]] = r["K"]
    return out
