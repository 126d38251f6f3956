"""Shared-prefix attention: the Triton kernel against the alternatives, same data, same process.

Methods (forward, and forward + backward):
  triton  : ``sdpo_fast.kernels.attention.launch`` on the packed layout (groups back to back in one row)
  flex    : FlexAttention with the same shared-prefix mask (BlockMask built once per shape, outside the
            timing; ``flex_attention`` compiled), native GQA
  sdpa    : ``F.scaled_dot_product_attention`` with the dense boolean mask ``[1, 1, L, L]``; KV heads
            repeated to H before timing (its GQA path with a mask falls back to the math kernel)
  naive   : the paper's layout, every candidate with its own copy of the prompt (``[G*(K+1), P+n]``,
            right-padded), causal SDPA (flash where available)
  torch   : the repository's torch reference (per group: one causal SDPA call, two with several
            candidates), CPU runs only

TFLOP/s count only the work the shared-prefix mask leaves: forward ``4 * Dh * H * sum_q |visible keys|``,
forward + backward 3.5x that (FlashAttention's convention); every method is credited with the same
count, so the column compares useful work per second. Each row also records the largest relative
difference of each method's forward output from the Triton kernel's on real tokens.

    python benchmarks/bench_attention.py              # GPU: default sweep (~90 s on an H100)
    python benchmarks/bench_attention.py --full       # prompt 256..4096 x K in {1, 3, 15, 63}
    python benchmarks/bench_attention.py --prompts 2048 --ks 15
    python benchmarks/bench_attention.py              # CPU: a tiny run under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sdpo_fast  # noqa: E402
from sdpo_fast.kernels.attention.reference import torch_shared_prefix_attention  # noqa: E402
from sdpo_fast.kernels.attention.launch import triton_shared_prefix_attention  # noqa: E402

from harness import commit, utc_now  # noqa: E402  (benchmarks/)

# Covers every K and the prompt range in five shapes; flex recompiles per shape, which dominates.
REPEATS = 5  # CPU wall-clock repeats (--repeats)
DEFAULT_SWEEP = [(256, 15), (1024, 3), (2048, 15), (2048, 63), (4096, 1)]
FULL_PROMPTS = [256, 512, 1024, 2048, 4096]
FULL_KS = [1, 3, 15, 63]


def make_batch(prompt_len, k, cand_range, tokens, seed, device, pad):
    """Groups of one prompt and K+1 candidates (lengths uniform in cand_range) until ``tokens``."""
    gen = torch.Generator().manual_seed(seed)
    groups, total = [], 0
    while not groups or total < tokens:
        lens = torch.randint(cand_range[0], cand_range[1] + 1, (k + 1,), generator=gen).tolist()
        n = prompt_len + sum(lens)
        if groups and total + n > tokens:
            break
        groups.append(([1] * prompt_len, [[2] * c for c in lens]))
        total += n
    return sdpo_fast.pack_groups(groups, pad_to_multiple_of=pad).to(device), groups


def visible_pairs(batch) -> int:
    """Sum over real queries of the number of keys they see (the unmasked work)."""
    P = batch.prompt_lens.double()
    lens = batch.candidate_lens.double()
    prompt = (P * (P + 1) / 2).sum()
    cands = (lens * P[:, None] + lens * (lens + 1) / 2).sum()
    return int((prompt + cands).item())


def bench(fn, device, grad_to_none=None):
    """Median milliseconds: do_bench on CUDA, a wall-clock median of ``REPEATS`` runs on CPU."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _no_math(device):
    """On CUDA, forbid SDPA's math fallback (it would materialise [B, H, S, S] scores)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def flex_method(batch, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    gid, cid = batch.group_ids, batch.candidate_ids
    R, L = batch.shape

    def mask_mod(b, h, q, k):
        return (gid[b, q] == gid[b, k]) & (k <= q) & ((cid[b, k] == -1) | (cid[b, k] == cid[b, q]))

    block_mask = create_block_mask(mask_mod, B=R, H=None, Q_LEN=L, KV_LEN=L, device=device)
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, scale):
        return flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True).transpose(1, 2)

    return run


def naive_index(batch, groups):
    """``[G*(K+1), P+nmax]`` flat packed index of each token of the paper's layout (prompt copy +
    candidate, right-padded by repeating the last token; causal attention leaves real tokens exact)
    and a bool mask of its candidate tokens."""
    rows = []
    for (row, start, _), (prompt, cands) in zip(batch.group_spans, groups):
        base = row * batch.shape[1] + start
        prompt_idx = list(range(base, base + len(prompt)))
        pos = base + len(prompt)
        for c in cands:
            rows.append((prompt_idx + list(range(pos, pos + len(c))), len(prompt)))
            pos += len(c)
    S = max(len(r) for r, _ in rows)
    idx = torch.tensor([r + [r[-1]] * (S - len(r)) for r, _ in rows], device=batch.device)
    is_cand = torch.tensor([[P <= t < len(r) for t in range(S)] for r, P in rows], device=batch.device)
    return idx, is_cand


def to_naive(x, idx):
    """Packed ``[R, Hx, L, Dh]`` -> naive ``[B, Hx, S, Dh]`` (a gather: the prompt is copied per candidate)."""
    R, Hx, L, Dh = x.shape
    return x.transpose(1, 2).reshape(R * L, Hx, Dh)[idx].transpose(1, 2).contiguous()


def run_config(prompt_len, k, args, device, dtype, methods):
    batch, groups = make_batch(prompt_len, k, args.cand, args.tokens, args.seed, device, args.pad)
    R, L = batch.shape
    H, Hkv, Dh = args.heads, args.kv_heads, args.head_dim
    scale = Dh ** -0.5
    g = torch.Generator(device=device).manual_seed(args.seed)
    # transformers' layout: [R, L, H, Dh] viewed as [R, H, L, Dh]
    q = torch.randn(R, L, H, Dh, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    kk = torch.randn(R, L, Hkv, Dh, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    vv = torch.randn(R, L, Hkv, Dh, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
    dout = torch.randn(R, L, H, Dh, device=device, dtype=dtype, generator=g)
    real = batch.group_ids >= 0
    flops_fwd = 4.0 * Dh * H * visible_pairs(batch)
    row = dict(prompt=prompt_len, K=k, groups=batch.num_groups, tokens=batch.num_tokens, L=L,
               naive_tokens=sum(len(p) + len(c) for p, cs in groups for c in cs),
               flops_fwd=flops_fwd, methods={})

    impls = {
        "triton": lambda q, k, v: triton_shared_prefix_attention(q, k, v, batch, scale),
        "torch": lambda q, k, v: torch_shared_prefix_attention(q, k, v, batch, scale),
    }
    if "flex" in methods:
        flex = flex_method(batch, device)
        impls["flex"] = lambda q, k, v: flex(q, k, v, scale)
    if "sdpa" in methods and L <= args.max_dense:
        mask = batch.attention_mask()

        def dense(q, k, v, _mask=mask):
            with _no_math(device):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=_mask, scale=scale).transpose(1, 2)

        impls["sdpa"] = dense
    with torch.no_grad():
        ref = impls["triton"](q, kk, vv).float()[real]
    for name in methods:
        if name not in impls and name != "naive":
            continue
        res = {}
        try:
            if name == "naive":
                if row["naive_tokens"] > args.max_naive_tokens:
                    continue
                idx, is_cand = naive_index(batch, groups)
                args_ = [to_naive(t.detach(), idx).requires_grad_() for t in (q, kk, vv)]
                ndout = to_naive(dout.transpose(1, 2), idx).transpose(1, 2)

                def fn(q, k, v):
                    with _no_math(device):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                              enable_gqa=True).transpose(1, 2)
                try:
                    with torch.no_grad():
                        fn(*args_)
                except RuntimeError:  # no fused kernel with GQA here: give it repeated KV heads instead
                    args_ = [args_[0]] + [t.detach().repeat_interleave(H // Hkv, 1).requires_grad_()
                                          for t in args_[1:]]
                grad_out = ndout
            elif name == "sdpa":
                rep = H // Hkv
                args_ = [q.detach().requires_grad_(),
                         kk.detach().repeat_interleave(rep, 1).requires_grad_(),
                         vv.detach().repeat_interleave(rep, 1).requires_grad_()]
                fn, grad_out = impls[name], dout
            else:
                args_, fn, grad_out = [q, kk, vv], impls[name], dout
            with torch.no_grad():
                out = fn(*args_)
                if name == "naive":  # candidate tokens vs the same tokens of the packed run
                    want = impls["triton"](q, kk, vv).flatten(0, 1)[idx[is_cand]].float()
                    got = out[is_cand].float()
                else:
                    want, got = ref, out.float()[real]
                res["max_rel_diff"] = ((got - want).abs().max() / want.abs().max()).item()
                del out
                res["fwd_ms"] = bench(lambda: fn(*args_), device)
            res["fwd_tflops"] = flops_fwd / res["fwd_ms"] * 1e-9
            res["fwd_bwd_ms"] = bench(lambda: fn(*args_).backward(grad_out), device, grad_to_none=args_)
            res["fwd_bwd_tflops"] = 3.5 * flops_fwd / res["fwd_bwd_ms"] * 1e-9
        except Exception as exc:  # a baseline that cannot run this shape (memory, missing kernel) is reported
            res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row["methods"][name] = res
    return row


def write(meta, rows, out_dir: Path, name: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        f"# Shared-prefix attention ({meta['device']}, {meta['dtype']}, H={meta['heads']}/{meta['kv_heads']} KV, "
        f"Dh={meta['head_dim']}, candidates {meta['cand'][0]}..{meta['cand'][1]} tokens)",
        "",
        f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}. Median ms; TFLOP/s on the unmasked "
        "shared-prefix work; x = fwd+bwd time / triton's in the same row; diff = max |out - triton| / max |triton|.",
        "",
        "| prompt | K | tokens | naive tokens | method | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | x | diff | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = r["methods"].get("triton", {}).get("fwd_bwd_ms")
        head = f"| {r['prompt']} | {r['K']} | {r['tokens']} | {r['naive_tokens']} |"
        for m, res in r["methods"].items():
            def cell(key, fmt):
                return format(res[key], fmt) if key in res else "-"

            ratio = f"{res['fwd_bwd_ms'] / base:.2f}" if base and "fwd_bwd_ms" in res else "-"
            lines.append(f"{head} {m} | {cell('fwd_ms', '.3f')} | {cell('fwd_bwd_ms', '.3f')} | "
                         f"{cell('fwd_tflops', '.3g')} | {cell('fwd_bwd_tflops', '.3g')} | {ratio} | "
                         f"{cell('max_rel_diff', '.1e')} | {res.get('error', '')[:80]} |")
    text = "\n".join(lines) + "\n"
    (out_dir / f"{name}.md").write_text(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="prompt 256..4096 x K in {1, 3, 15, 63}")
    p.add_argument("--prompts", type=int, nargs="*")
    p.add_argument("--ks", type=int, nargs="*")
    p.add_argument("--cand", type=int, nargs=2, default=None, help="candidate length range (inclusive)")
    p.add_argument("--tokens", type=int, default=None, help="packed tokens per batch (one row)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--pad", type=int, default=128, help="row length rounded up to this")
    p.add_argument("--max-dense", type=int, default=32768, help="skip dense-mask SDPA beyond this row length")
    p.add_argument("--max-naive-tokens", type=int, default=1 << 20, help="skip the naive layout beyond this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5, help="CPU: timed runs per measurement (median)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    global REPEATS
    REPEATS = max(1, args.repeats)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:  # the issue's shapes
        d = dict(cand=(8, 64), tokens=16384, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16",
                 methods=["triton", "flex", "sdpa", "naive"])
        sweep = [(P, K) for P in FULL_PROMPTS for K in FULL_KS] if args.full else DEFAULT_SWEEP
    else:  # exercise the script: tiny shapes through the interpreter
        d = dict(cand=(1, 6), tokens=96, heads=4, kv_heads=2, head_dim=16, dtype="float32",
                 methods=["triton", "torch", "sdpa", "naive"])
        sweep = [(24, 3), (8, 1)]
        args.pad = min(args.pad, 16)
    for key, val in d.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.prompts or args.ks:
        sweep = [(P, K) for P in (args.prompts or sorted({s[0] for s in sweep}))
                 for K in (args.ks or sorted({s[1] for s in sweep}))]
    dtype = getattr(torch, args.dtype)

    meta = dict(
        device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}), "
        "Triton interpreter",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        date=utc_now(), commit=commit(),
        dtype=args.dtype, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, cand=list(args.cand),
        tokens=args.tokens, methods=args.methods,
    )
    rows = []
    name = args.name or f"bench_attention_{device.type}"
    for P, K in tqdm(sweep, desc="attention configs", file=sys.stderr):
        rows.append(run_config(P, K, args, device, dtype, args.methods))
        text = write(meta, rows, args.out, name)  # after every shape: a timeout keeps what was measured
    print(text)
    print(f"wrote {args.out}/", file=sys.stderr)


if __name__ == "__main__":
    main()
