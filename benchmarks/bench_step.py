"""The headline benchmark: one full S-DPO training step (forward, backward, AdamW step) of a
Llama-architecture model built from a config (random init), three ways, same process, weights and data.

    a  paper      every candidate carries its own copy of the prompt ([G*(K+1), P+n] rows), SDPA,
                  full-vocabulary logits from ``model(...).logits``, then log_softmax + gather + sum on
                  the candidate positions. (Stronger than the TRL code the paper used, which casts the
                  whole [B, S, V] logits to fp32 and log-softmaxes every position.)
    b  paper+FLCE the same layout, but log-probs from the decoder's final hidden states through a fused
                  linear cross-entropy (Cut Cross-Entropy's ``linear_cross_entropy`` or Liger-Kernel's
                  ``LigerFusedLinearCrossEntropyLoss``, reduction="none"): the best a user gets today.
                  Skipped, with a note, when neither package imports.
    c  sdpo_fast  ``pack_groups`` (one copy of the prompt per group) and ``fused_sdpo_loss`` on the
                  packed hidden states (``--sdpo-op fused``, default) or ``candidate_logprobs`` +
                  ``sdpo_loss`` (``--sdpo-op logprobs``); backend "auto" (the one that ran is recorded).

Modes: ``lora`` (peft on q/k/v/o/gate/up/down; reference log-probs inside the step with the adapters
disabled, no grad) and ``full`` (every parameter trained; reference log-probs precomputed once per
shape, as a frozen reference copy would give them, outside the timed step).

Before timing, each method runs one forward+backward from the same weights; its candidate log-probs,
loss and gradient norm are compared with (a)'s (the "check" column; an fp32 mismatch is an error).
Reported per (mode, prompt length P, K, method): median step time, groups/s, tokens/s (real data
tokens P + (K+1)n per group, the same numerator for every method), tokens the method processes,
memory (GPU: ``max_memory_allocated`` over the timed steps, and its growth over the weights and
optimizer state; CPU: the sampled RSS growth during the check step), and the ratios c vs a and c vs b.
A method that runs out of memory is marked "OOM" and the sweep goes on.

    python benchmarks/bench_step.py                    # quick CPU comparison (tiny Llama, K 1..15)
    python benchmarks/bench_step.py --preset cpu       # tiny configuration of the full sweep, a few minutes
    python benchmarks/bench_step.py --preset gpu       # 1B-class Llama, bf16, on one H100/H200
    python benchmarks/bench_step.py --preset cpu --ks 1 3 --modes lora --repeats 1

Writes ``<out>/<name>.json``, ``.md`` and ``.png`` (name default ``bench_step_<preset>``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import sdpo_fast
from sdpo_fast import backends
from sdpo_fast.loss import sdpo_loss
from sdpo_fast.model import output_weight, unwrap_causal_lm
from sdpo_fast.packing import PackedBatch

from harness import PeakRSS, commit, cpu_name, package_versions, utc_now, write_text  # noqa: E402  (benchmarks/)

REPO = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("a", "b", "c")
LABELS = {"a": "paper: repeated prompt, full logits", "b": "paper + fused linear CE", "c": "sdpo_fast"}

# Settings a preset fixes; every one can be overridden on the command line.
PRESETS = {
    # the default: a quick CPU comparison (full-parameter, prompt 256, K up to 15)
    "quick": dict(
        modes=["full"], prompt_lens=[256], ks=[1, 3, 7, 15], cand_len=12, groups=2,
        layers=4, hidden=256, intermediate=1024, heads=8, kv_heads=2, vocab=4096, tie=False,
        dtype="float32", repeats=3, warmup=1, budget_s=None,
    ),
    # the GPU sweep (prompts, K, candidates, both modes) on a tiny model; the check step is the warm-up
    "cpu": dict(
        modes=["full", "lora"], prompt_lens=[256, 1024], ks=[1, 3, 7, 15, 31, 63], cand_len=16, groups=1,
        layers=2, hidden=64, intermediate=256, heads=4, kv_heads=2, vocab=2048, tie=False,
        dtype="float32", repeats=3, warmup=0, budget_s=10.0,
    ),
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings), bf16; the goal's shape (LoRA, prompt
    # 1024) first, so that a run cut short by a time limit has it in its partial results
    "gpu": dict(
        modes=["lora", "full"], prompt_lens=[1024, 256], ks=[1, 3, 7, 15, 31, 63], cand_len=16, groups=1,
        layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256, tie=True,
        dtype="bfloat16", repeats=3, warmup=1, budget_s=None,
    ),
}


# ------------------------------------------------------------------------------------------- data


@dataclass
class StepData:
    """One shape's data in both layouts.

    ids: ``[G*(K+1), P+n]`` the paper's layout (candidate j of group g in row ``g*(K+1)+j``).
    batch: the same groups packed with a shared prefix.
    """

    groups: int
    k: int
    prompt_len: int
    cand_len: int
    ids: torch.Tensor
    batch: PackedBatch

    @property
    def data_tokens(self) -> int:
        return self.groups * (self.prompt_len + (self.k + 1) * self.cand_len)

    @property
    def naive_tokens(self) -> int:
        return self.ids.numel()


def make_groups(n_groups, prompt_len, cand_len, k, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
            [torch.randint(0, vocab, (cand_len,), generator=gen).tolist() for _ in range(k + 1)],
        )
        for _ in range(n_groups)
    ]


def make_data(args, prompt_len, k, device) -> StepData:
    groups = make_groups(args.groups, prompt_len, args.cand_len, k, args.vocab, seed=1000 * prompt_len + k)
    ids = torch.tensor([p + c for p, cs in groups for c in cs], device=device)
    batch = sdpo_fast.pack_groups(groups, vocab_size=args.vocab).to(device)
    return StepData(args.groups, k, prompt_len, args.cand_len, ids, batch)


# ------------------------------------------------------------------- log-probs and losses per method
# Each returns [G, K+1] float32 sequence log-probs (column 0 = chosen), differentiable when grad is on.


def _sdpa_lm(model):
    """The unwrapped causal LM, on plain SDPA attention (the paper's setting)."""
    lm = unwrap_causal_lm(model)
    if lm.config._attn_implementation != "sdpa":
        lm.set_attn_implementation("sdpa")
    return lm


def naive_logprobs(model, data: StepData) -> torch.Tensor:
    """(a) All candidates have the same length here, so the paper's layout needs no padding."""
    P = data.prompt_len
    logits = _sdpa_lm(model)(input_ids=data.ids, use_cache=False).logits[:, P - 1 : -1].float()
    lp = logits.log_softmax(-1).gather(-1, data.ids[:, P:, None]).squeeze(-1).sum(-1)
    return lp.view(data.groups, data.k + 1)


def flce_logprobs(model, data: StepData, flce: Callable) -> torch.Tensor:
    """(b) The decoder's hidden states of the candidate positions through a fused linear cross-entropy."""
    P = data.prompt_len
    lm = _sdpa_lm(model)
    hidden = lm.get_decoder()(input_ids=data.ids, use_cache=False).last_hidden_state
    h = hidden[:, P - 1 : -1].reshape(-1, hidden.shape[-1])
    nll = flce(h, output_weight(lm), data.ids[:, P:].reshape(-1))
    return -nll.float().view(-1, data.cand_len).sum(-1).view(data.groups, data.k + 1)


def shared_logprobs(model, data: StepData) -> torch.Tensor:
    return sdpo_fast.candidate_logprobs(model, data.batch, backend="auto")


def sdpo_from_logprobs(logprobs: Callable):
    """A method's loss from its log-prob function: ``(model, data, ref [G, C]) -> (loss, logps)``."""

    def loss_fn(model, data, ref):
        logps = logprobs(model, data)
        loss = sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=1.0)
        return loss, logps

    return loss_fn


def shared_fused_loss(model, data: StepData, ref):
    """(c) with ``candidate_sdpo_loss``: packed forward, then log-probs, loss and the lm_head
    gradients in one op (``fused_sdpo_loss``)."""
    loss, metrics = sdpo_fast.candidate_sdpo_loss(model, data.batch, ref, beta=1.0, backend="auto")
    return loss, metrics["logps"]


def fused_linear_ce(device: torch.device):
    """``(name, fn)`` with ``fn(hidden [N, D], weight [V, D], targets [N]) -> per-token NLL [N]``, or
    ``(None, reason)`` when neither Cut Cross-Entropy nor Liger-Kernel imports (Liger: CUDA only)."""
    reasons = []
    try:
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"  # CCE's kernels are CUDA-only
        name = f"cut-cross-entropy {metadata.version('cut-cross-entropy')} ({impl})"
        return name, lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none", impl=impl)
    except Exception as exc:  # noqa: BLE001 - any import failure only drops the method
        reasons.append(f"cut_cross_entropy: {exc}")
    try:
        if device.type != "cuda":
            raise ImportError("its kernels need CUDA")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # Liger before PR #1298 (2026-07) scales reduction="none" gradients by grad_output[0] only;
        # the gradient check below flags that as a mismatch.
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        name = f"liger-kernel {metadata.version('liger-kernel')}"
        return name, lambda h, w, t: loss(w, h, t)
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"liger_kernel: {exc}")
    return None, "; ".join(reasons)


@dataclass
class Method:
    key: str
    label: str
    logprobs: Callable  # (model, data) -> [G, C]: the reference log-probs (LoRA) use it too
    loss: Callable  # (model, data, ref) -> (loss, logps)


def build_methods(args) -> tuple[dict, list[str]]:
    """The methods to run and notes about the ones skipped."""
    notes, methods = [], {}
    if "a" in args.methods:
        methods["a"] = Method("a", LABELS["a"], naive_logprobs, sdpo_from_logprobs(naive_logprobs))
    if "b" in args.methods:
        name, flce = args.flce_provider(torch.device(args.device))
        if name is None:
            notes.append(f"(b) skipped: no fused linear cross-entropy package imports ({flce})")
        else:
            fn = lambda model, data: flce_logprobs(model, data, flce)  # noqa: E731
            methods["b"] = Method("b", f"{LABELS['b']} ({name})", fn, sdpo_from_logprobs(fn))
    if "c" in args.methods:
        loss = shared_fused_loss if args.sdpo_op == "fused" else sdpo_from_logprobs(shared_logprobs)
        methods["c"] = Method("c", f"{LABELS['c']} ({args.sdpo_op})", shared_logprobs, loss)
    return methods, notes


# ------------------------------------------------------------------------------------ model, steps


def build_model(args, mode: str, device):
    """The same random weights for every mode (seed 0); ``(model, optimizer)``."""
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.prompt_lens) + args.cand_len + 8,
        tie_word_embeddings=args.tie,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(getattr(torch, args.dtype))
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    return model, opt


def forward_backward(method: Method, model, data: StepData, ref_fixed, lora: bool):
    """Loss and backward of one step; LoRA computes its reference log-probs here, adapters disabled."""
    ref = ref_fixed
    if lora:
        with torch.no_grad(), model.disable_adapter():
            ref = method.logprobs(model, data)
    loss, logps = method.loss(model, data, ref)
    loss.backward()
    return loss.detach(), logps.detach()


def train_step(method, model, opt, data, ref_fixed, lora):
    """Zero the gradients, forward + backward, AdamW step."""
    opt.zero_grad(set_to_none=True)
    forward_backward(method, model, data, ref_fixed, lora)
    opt.step()


def grad_norm(model) -> float:
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def check_step(method, model, opt, data, ref_fixed, lora, device) -> dict:
    """Forward + backward from the current weights, no update: log-probs, loss and gradient norm for
    the comparison with (a); on CPU also the memory growth."""
    opt.zero_grad(set_to_none=True)
    with PeakRSS() if device.type == "cpu" else contextlib.nullcontext() as rss:
        loss, logps = forward_backward(method, model, data, ref_fixed, lora)
    out = dict(loss=loss.item(), logps=logps.float().cpu(), grad_norm=grad_norm(model))
    if device.type == "cpu":
        out["mem_mib"] = rss.mib
    opt.zero_grad(set_to_none=True)
    return out


def timed_step(method, model, opt, data, ref_fixed, lora, device) -> dict:
    """One full step: milliseconds (GPU: CUDA events; CPU: wall clock) and, on GPU, its peak memory."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        train_step(method, model, opt, data, ref_fixed, lora)
        return dict(ms=(time.perf_counter() - t0) * 1e3)
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    train_step(method, model, opt, data, ref_fixed, lora)
    end.record()
    end.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    return dict(ms=start.elapsed_time(end), mem_mib=peak / 2**20, step_mib=(peak - base) / 2**20)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def attempt(fn, model, opt, device):
    """``(result, None)``, or ``(None, "OOM")`` after releasing what the failed step held."""
    try:
        return fn(), None
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
    # outside the except block: the traceback (and the tensors its frames hold) is gone
    opt.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None, "OOM"


# ------------------------------------------------------------------------------------------ sweep


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
    ok = err["logps_rel_err"] <= tol["logps"] and err["grad_rel_err"] <= tol["grad"] and err["loss_abs_err"] <= tol["loss"] * max(1.0, abs(ref["loss"]))
    return {**{k: float(f"{v:.3g}") for k, v in err.items()}, "check": "ok" if ok else "MISMATCH"}


# 16-bit runs up to this many naive tokens also run (a) on an fp32 copy of the model: the reference
# that (a), (b) and (c) are all measured against (in 16 bits, (a) itself is off by bf16 rounding).
REF32_MAX_TOKENS = 8704
# Floor of the fp32-reference verdict: a method passes when its log-prob error is within 2x (a)'s plus it.
REF32_FLOOR = dict(logps_rel_err=1e-4)


def fp32_reference_check(method, run) -> dict:
    """``method``'s forward + backward on an fp32 copy of the model (same weights, same data)."""
    model32 = copy.deepcopy(run["model"]).float()
    try:
        loss, logps = forward_backward(method, model32, run["data"], run["ref_fixed"], run["lora"])
        return dict(loss=loss.item(), logps=logps.float().cpu(), grad_norm=grad_norm(model32))
    finally:
        del model32
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare_fp32(checks: dict, ref32: dict) -> dict:
    """Per method: errors against the fp32 reference, and "ok" when its log-prob error is within 2x
    (a)'s plus a floor. The loss and gradient-norm errors are reported, not judged: at step 0 they are
    bf16 noise of the whole forward amplified by the loss (measured on an H200, Llama-3.2-1B shape:
    (a)'s own loss error against fp32 ranged 0.007-0.10 across K), so one sample cannot rank methods."""
    errs = {key: errors(c, ref32) for key, c in checks.items() if c is not None}
    out = {}
    for key, e in errs.items():
        row = {f"ref32_{k}": float(f"{v:.3g}") for k, v in e.items()}
        if key != "a" and "a" in errs:
            k = "logps_rel_err"
            ok = e[k] <= 2 * errs["a"][k] + REF32_FLOOR[k]
            row["check"] = "ok" if ok else "MISMATCH"
        out[key] = row
    return out


def run_shape(methods, model, opt, mode, prompt_len, k, args, device) -> list[dict]:
    """All methods on one (mode, P, K): the checks from identical weights first, then the timed steps."""
    data = make_data(args, prompt_len, k, device)
    lora = mode == "lora"
    ref_fixed = None
    if not lora:  # a frozen reference's log-probs, computed once outside the timed steps
        with torch.no_grad():
            ref_fixed = (methods.get("c") or next(iter(methods.values()))).logprobs(model, data).float()
    run = dict(model=model, opt=opt, data=data, ref_fixed=ref_fixed, lora=lora)
    base = dict(mode=mode, prompt_len=prompt_len, K=k, groups=data.groups, data_tokens=data.data_tokens)
    rows = {
        key: dict(base, method=key, status="ok", tokens_processed=data.batch.num_tokens if key == "c" else data.naive_tokens)
        for key in methods
    }
    alive = check_methods(methods, rows, run, args, device)
    time_methods(methods, rows, alive, run, args, device)
    return list(rows.values())


def check_methods(methods, rows, run, args, device) -> list[str]:
    """One forward+backward per method from the same weights; fills loss, grad norm, (CPU) memory and
    the comparison with (a) into ``rows``. Returns the methods that did not run out of memory."""
    checks = {}
    for key, m in methods.items():
        checks[key], status = attempt(lambda: check_step(m, device=device, **run), run["model"], run["opt"], device)
        if status:
            rows[key]["status"] = status
    tol = tolerances(args.dtype)
    by32 = {}
    if args.dtype != "float32" and checks.get("a") is not None and run["data"].naive_tokens <= REF32_MAX_TOKENS:
        ref32, status = attempt(lambda: fp32_reference_check(methods["a"], run), run["model"], run["opt"], device)
        if ref32 is not None:
            by32 = compare_fp32(checks, ref32)
    for key, check in checks.items():
        if check is None:
            continue
        row = rows[key]
        row.update(loss=round(check["loss"], 6), grad_norm=float(f"{check['grad_norm']:.6g}"))
        if check.get("mem_mib") is not None:
            row["mem_mib"] = round(check["mem_mib"], 1)
        if key != "a" and checks.get("a") is not None:
            row.update(compare(check, checks["a"], tol))
        row.update(by32.get(key, {}))  # where an fp32 reference ran, its verdict replaces the one against (a)
        if key != "a" and row.get("check", "ok") != "ok" and args.strict:
            raise RuntimeError(f"method {key} disagrees with the reference: {row}")
    return [key for key, check in checks.items() if check is not None]


def time_methods(methods, rows, alive, run, args, device) -> None:
    """Warm-up steps, then up to ``args.repeats`` timed steps per method taken in turns (a, b, c, a, b,
    c, ...) so that a change in the machine's load (shared CPUs) falls on every method alike. A method
    whose timed steps already took ``args.budget_s`` seconds stops early (at least one step)."""
    model, opt = run["model"], run["opt"]

    def drop(key, status):
        rows[key]["status"] = status
        alive.remove(key)

    for key in list(alive):
        _, status = attempt(lambda: [train_step(methods[key], **run) for _ in range(args.warmup)], model, opt, device)
        if status:
            drop(key, status)
    steps = {key: [] for key in alive}

    def wants_more(key):  # up to args.repeats steps, fewer once a method has spent its time budget
        spent = sum(s["ms"] for s in steps[key]) / 1e3
        return len(steps[key]) < args.repeats and (args.budget_s is None or not steps[key] or spent < args.budget_s)

    while any(wants_more(key) for key in alive):
        for key in [key for key in alive if wants_more(key)]:
            step, status = attempt(lambda: timed_step(methods[key], device=device, **run), model, opt, device)
            if status:
                drop(key, status)
            else:
                steps[key].append(step)
    data = run["data"]
    for key in alive:
        row, ms = rows[key], [s["ms"] for s in steps[key]]
        row.update(ms=round(statistics.median(ms), 2), ms_all=[round(t, 2) for t in ms])
        for field in ("mem_mib", "step_mib"):  # GPU: the largest over the timed steps
            if field in steps[key][0]:
                row[field] = round(max(s[field] for s in steps[key]), 1)
        row["groups_per_s"] = float(f"{data.groups / (row['ms'] / 1e3):.4g}")
        row["tokens_per_s"] = float(f"{data.data_tokens / (row['ms'] / 1e3):.4g}")


def summarize(rows: list[dict]) -> list[dict]:
    """Per (mode, P, K): c's speed-up over a and b (time ratio, same run) and memory ratio c/a."""
    out = {}
    for r in rows:
        s = out.setdefault((r["mode"], r["prompt_len"], r["K"]), dict(mode=r["mode"], prompt_len=r["prompt_len"], K=r["K"]))
        s[r["method"]] = r
    summary = []
    for s in out.values():
        row = {k: s[k] for k in ("mode", "prompt_len", "K")}
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
    """``{"mode P=...": {method: largest K that ran}}``."""
    out = {}
    for r in rows:
        key = f"{r['mode']} P={r['prompt_len']}"
        best = out.setdefault(key, {}).setdefault(r["method"], None)
        if r["status"] == "ok" and "ms" in r and (best is None or r["K"] > best):
            out[key][r["method"]] = r["K"]
    return out


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
        model=(
            f"llama layers={args.layers} hidden={args.hidden} intermediate={args.intermediate} heads={args.heads}/"
            f"{args.kv_heads} vocab={args.vocab} tied={args.tie}"
        ),
        shape=f"groups={args.groups} prompt_lens={args.prompt_lens} candidate={args.cand_len} K={args.ks}",
        modes=args.modes,
        lora=f"r={args.lora_rank} alpha={2 * args.lora_rank} on {','.join(LORA_TARGETS)}",
        optimizer="AdamW lr=1e-5" + (" fused" if device.type == "cuda" else ""),
        methods={k: m.label for k, m in methods.items()},
        sdpo_fast_backends={op: backends.resolve(op, "auto", device) for op in ("attention", "logprobs", "sdpo_loss")},
        timing=f"median of {args.repeats} steps after {args.warmup} warm-up step(s)"
        + (f", fewer once a method's timed steps took {args.budget_s} s" if args.budget_s else "")
        + (" (CUDA events)" if device.type == "cuda" else " (wall clock)"),
        memory=(
            "mem = torch.cuda.max_memory_allocated over the timed steps (weights, optimizer, activations); "
            "step = its growth over the weights and optimizer state"
            if device.type == "cuda"
            else "mem = growth of the process RSS during one forward+backward (sampled every ms; approximate)"
        ),
        notes=notes,
    )


def run(args, on_shape: Callable | None = None):
    """The sweep: ``(meta, rows)``; ``on_shape(meta, rows)`` is called after every shape (partial results)."""
    device = torch.device(args.device)
    t0 = time.perf_counter()
    methods, notes = build_methods(args)
    if not methods:
        raise ValueError("no method to run (see --methods)")
    meta = environment(args, device, methods, notes)
    meta["load_average_start"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    meta["complete"] = False
    rows = []
    shapes = [(p, k) for p in args.prompt_lens for k in args.ks]
    with tqdm(total=len(args.modes) * len(shapes), desc="bench_step", file=sys.stderr) as bar:
        for mode in args.modes:
            model, opt = build_model(args, mode, device)
            for p, k in shapes:
                bar.set_postfix_str(f"{mode} P={p} K={k}")
                new = run_shape(methods, model, opt, mode, p, k, args, device)
                rows += new
                bar.write(format_line(new))
                bar.update()
                if on_shape is not None:
                    on_shape(meta, rows)
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
    parts = [f"{r0['mode']:4s} P={r0['prompt_len']:<5d} K={r0['K']:<3d}"]
    for r in rows:
        parts.append(f"{r['method']}: " + (f"{r['ms']:9.1f} ms" if "ms" in r else f"{r['status']:>12s}"))
    times = {r["method"]: r["ms"] for r in rows if "ms" in r}
    if "a" in times and "c" in times:
        parts.append(f"c vs a {times['a'] / times['c']:5.2f}x")
    return "  ".join(parts)


# ----------------------------------------------------------------------------------------- output


def _fmt(v, spec="{:.1f}"):
    return "-" if v is None else spec.format(v)


def headline(meta, summary) -> list[str]:
    """Markdown lines: c's speed-up over a (and b) per K (rows) and (mode, P) (columns)."""
    panels = [(m, p) for m in meta["modes"] for p in sorted({s["prompt_len"] for s in summary})]
    others = [m for m in ("a", "b") if m in meta["methods"]] if "c" in meta["methods"] else []
    if not others:
        return []
    lines = [
        "Speed-up of (c) sdpo_fast: step time of " + " / ".join(f"({m})" for m in others) + " over (c)'s, same run.",
        "",
        "| K | " + " | ".join(f"{m} P={p}" for m, p in panels) + " |",
        "|" + "---|" * (len(panels) + 1),
    ]
    by = {(s["mode"], s["prompt_len"], s["K"]): s for s in summary}
    for k in sorted({s["K"] for s in summary}):
        cells = []
        for m, p in panels:
            s = by.get((m, p, k), {})
            cells.append(" / ".join(_fmt(s.get(f"speedup_c_vs_{o}"), "{:.2f}x") for o in others))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(meta, rows, summary) -> str:
    lines = [f"# S-DPO training step: {meta['device']}", ""]
    lines += headline(meta, summary)
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("benchmark", "methods", "notes")]
    lines += [f"- method {k}: {v}" for k, v in meta["methods"].items()]
    lines += [f"- note: {n}" for n in meta["notes"]]
    lines.append("")
    by_key = {(r["mode"], r["prompt_len"], r["K"], r["method"]): r for r in rows}
    fits = largest_fitting_k(rows)
    methods = list(meta["methods"])
    for mode in meta["modes"]:
        for p in sorted({r["prompt_len"] for r in rows}):
            lines += [f"## {mode}, prompt {p} tokens", ""]
            head = ["K"] + [f"{m} ms" for m in methods] + [f"c vs {m}" for m in methods if m != "c"]
            head += [f"{m} mem MiB" for m in methods] + (["mem c/a"] if "a" in methods and "c" in methods else [])
            head += [f"{m} check" for m in methods if m != "a"]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for s in summary:
                if (s["mode"], s["prompt_len"]) != (mode, p):
                    continue
                cells = [str(s["K"])]
                rs = {m: by_key.get((mode, p, s["K"], m), {}) for m in methods}
                cells += [_fmt(rs[m].get("ms")) if "ms" in rs[m] else rs[m].get("status", "-") for m in methods]
                cells += [_fmt(s.get(f"speedup_c_vs_{m}"), "{:.2f}x") for m in methods if m != "c"]
                cells += [_fmt(rs[m].get("mem_mib")) for m in methods]
                if "a" in methods and "c" in methods:
                    cells.append(_fmt(s.get("mem_c_over_a"), "{:.3f}"))
                cells += [rs[m].get("check", "-") for m in methods if m != "a"]
                lines.append("| " + " | ".join(cells) + " |")
            fit = fits.get(f"{mode} P={p}", {})
            lines += ["", "Largest K that ran: " + ", ".join(f"{m} {fit.get(m)}" for m in methods), ""]
    lines += ["## All rows", ""]
    cols = ["mode", "prompt_len", "K", "method", "status", "ms", "groups_per_s", "tokens_per_s", "tokens_processed",
            "mem_mib", "step_mib", "loss", "grad_norm", "logps_rel_err", "grad_rel_err", "ref32_loss_abs_err",
            "ref32_logps_rel_err", "ref32_grad_rel_err", "check"]
    cols = [c for c in cols if any(c in r for r in rows)]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(meta, rows, summary, path: Path) -> bool:
    """Step time, memory and c's speed-up against K, one row of panels per (mode, P). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return False
    panels = [(m, p) for m in meta["modes"] for p in sorted({r["prompt_len"] for r in rows})]
    fig, axes = plt.subplots(len(panels), 3, figsize=(15, 3.6 * len(panels)), squeeze=False)
    colors = {"a": "tab:red", "b": "tab:orange", "c": "tab:blue"}
    ks = sorted({r["K"] for r in rows})
    mem_label = "peak GPU memory (MiB)" if "max_memory_allocated" in meta["memory"] else "RSS growth, fwd+bwd (MiB)"
    for (mode, p), (ax_t, ax_m, ax_s) in zip(panels, axes):
        for m, label in meta["methods"].items():
            rs = [r for r in rows if (r["mode"], r["prompt_len"], r["method"]) == (mode, p, m)]
            for ax, field in ((ax_t, "ms"), (ax_m, "mem_mib")):
                pts = [(r["K"], r[field]) for r in rs if r.get(field) is not None]
                if pts:
                    ax.plot(*zip(*pts), "o-", color=colors[m], label=f"({m}) {label}")
                oom = [r["K"] for r in rs if r["status"] == "OOM"]
                if oom:  # OOM marks sit on the bottom edge of the panel
                    ax.plot(oom, [0.02] * len(oom), "x", color=colors[m], ms=10, mew=2,
                            transform=ax.get_xaxis_transform(), label=f"({m}) OOM")
        for other, style in (("a", "o-"), ("b", "s--")):
            pts = [(s["K"], s[f"speedup_c_vs_{other}"]) for s in summary
                   if (s["mode"], s["prompt_len"]) == (mode, p) and f"speedup_c_vs_{other}" in s]
            if pts:
                ax_s.plot(*zip(*pts), style, color=colors[other], label=f"c vs {other}")
        ax_s.axhline(1.0, color="grey", lw=0.8)
        for ax, ylabel in ((ax_t, "step time (ms)"), (ax_m, mem_label), (ax_s, "speed-up of (c), time ratio")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.minorticks_off()
            ax.set_xlabel("K (negatives per group)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{mode}, prompt {p}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        ax_t.set_yscale("log")
        ax_m.set_yscale("log")
    fig.suptitle(f"S-DPO step, {meta['model']}, {meta['dtype']} on {meta['device']} ({meta['date'][:10]})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def write(meta, rows, out_dir: Path, name: str, make_plot: bool = True) -> dict:
    """Write ``name``.json / .md / .png into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    result = {"meta": meta, "summary": summary, "largest_k": largest_fitting_k(rows), "rows": rows}
    write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    text = markdown(meta, rows, summary)
    if make_plot and plot(meta, rows, summary, out_dir / f"{name}.png"):
        paths["png"] = out_dir / f"{name}.png"
        text = text.replace("\n## All rows", f"\n![step time and memory vs K]({name}.png)\n\n## All rows", 1)
    write_text(paths["md"], text)
    return paths


# ------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--modes", nargs="+", choices=("full", "lora"))
    p.add_argument("--prompt-lens", type=int, nargs="+")
    p.add_argument("--ks", type=int, nargs="+")
    p.add_argument("--cand-len", type=int)
    p.add_argument("--groups", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie lm_head to the embeddings")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--budget-s", type=float, help="stop timing a method after this many seconds of timed steps (>= 1 step)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--sdpo-op", choices=("fused", "logprobs"), default="fused",
                   help="(c): fused_sdpo_loss on the hidden states, or candidate_logprobs + sdpo_loss")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="stop when (b) or (c) disagrees with (a) (default: on in float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", type=Path, default=None, help="only rewrite the markdown and PNG of this result JSON")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default=None, help="result file stem (default bench_step_<preset>)")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.strict is None:
        args.strict = args.dtype == "float32"
    for name in ("ks", "prompt_lens"):
        if any(v < 1 for v in getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if min(args.cand_len, args.groups, args.repeats) < 1 or args.warmup < 0:
        raise ValueError(
            f"--cand-len, --groups and --repeats must be >= 1 and --warmup >= 0, got {args.cand_len}, "
            f"{args.groups}, {args.repeats} and {args.warmup}"
        )
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.hidden % args.heads or args.heads % args.kv_heads:
        raise ValueError(f"hidden ({args.hidden}) must divide by heads ({args.heads}), heads by kv heads ({args.kv_heads})")
    args.modes = list(dict.fromkeys(args.modes))
    args.flce_provider = fused_linear_ce
    return args


def main(argv=None, flce_provider=None):
    """Run the sweep and write the results; ``flce_provider`` replaces :func:`fused_linear_ce` (tests)."""
    args = parse_args(argv)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        return result["meta"], result["rows"], write(result["meta"], result["rows"], args.replot.parent, args.replot.stem)
    if flce_provider is not None:
        args.flce_provider = flce_provider
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.name or f"bench_step_{args.preset}"
    try:
        # partial JSON + markdown after every shape: a run stopped by a time limit still leaves its rows
        meta, rows = run(args, on_shape=lambda meta, rows: write(meta, rows, args.out, name, make_plot=False))
    finally:
        torch.set_num_threads(threads)
    paths = write(meta, rows, args.out, name, make_plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return meta, rows, paths


if __name__ == "__main__":
    main()
