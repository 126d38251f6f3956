"""Microbenchmark of the fused log-prob / S-DPO loss ops against baselines measured in the same run.

GPU (default when CUDA is present): ``triton.testing.do_bench`` medians of forward and forward+backward,
peak memory, TFLOP/s and the ratio to the bare cuBLAS matmuls of the same shapes (logits
``[Nr, D] x [D, V]``, dHidden ``[Nr, V] x [V, D]``, dW ``[V, Nr] x [Nr, D]``), for:
    cublas            sdpo_fast.sequence_logprobs / fused_sdpo_loss with backend="cublas" (cuBLAS GEMMs on
                      bounded row chunks + Triton row kernels); cublas_loss_1g: the loss with 1 GiB chunks
    triton            sdpo_fast.sequence_logprobs(backend="triton") and fused_sdpo_loss(backend="triton")
    torch             the repo's chunked torch reference backend
    eager             materialised ``[Nr, V]`` logits, log_softmax, gather, segment sum (autograd)
    compile_chunked   torch.compile'd per-chunk logsumexp + target logit, checkpointed per chunk
    liger / cce       Liger-Kernel's and Cut Cross-Entropy's per-token linear cross-entropy over the N
                      target rows (when importable); they cannot share the prompt's last row
Shapes: N target tokens (Nr = logit rows, slightly fewer: the prompt's last row is shared by the
group's 16 candidates), D = 4096, V = 32000 and 128256, bf16.

CPU (``--cpu`` or no CUDA): wall-clock medians and peak RSS (one subprocess per method) of the torch
reference (chunked) against eager materialised logits at a small shape; if
``benchmarks/bench_logprob_cpu.py`` exists (native C++ backend rows) it is run too and its output
attached.

Writes ``<out>/bench_logprob_<device>[-<tag>].json`` and ``.md`` (device, versions, date, commit).
``--aot`` compiles the kernels for sm_90 without a GPU and reports registers, shared memory and the
PTX's load / wgmma instructions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch

import sdpo_fast
from sdpo_fast.loss import fused_sdpo_loss

from harness import commit, package_versions, utc_now  # noqa: E402  (benchmarks/)

REPO = Path(__file__).resolve().parents[1]
CANDIDATES, CAND_LEN, PROMPT = 16, 8, 32  # one group: 16 candidates of 8 tokens = 128 targets


def synthetic_batch(n_targets: int, vocab: int, device, seed: int = 0):
    """``PackedBatch`` with ``n_targets`` candidate tokens: groups of 16 candidates x 8 tokens."""
    gen = torch.Generator().manual_seed(seed)
    per_group = CANDIDATES * CAND_LEN
    groups = []
    for _ in range(max(1, n_targets // per_group)):
        ids = torch.randint(0, vocab, (PROMPT + per_group,), generator=gen).tolist()
        cands = [ids[PROMPT + j * CAND_LEN : PROMPT + (j + 1) * CAND_LEN] for j in range(CANDIDATES)]
        groups.append((ids[:PROMPT], cands))
    return sdpo_fast.pack_groups(groups, vocab_size=vocab).to(device)


def make_inputs(n_targets, D, V, dtype, device, seed=0):
    batch = synthetic_batch(n_targets, V, device, seed)
    T = batch.shape[0] * batch.shape[1]
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(T, D, generator=g, device=device, dtype=torch.float32).to(dtype)
    weight = (torch.randn(V, D, generator=g, device=device, dtype=torch.float32) / D**0.5).to(dtype)
    G, C = batch.candidate_mask.shape
    ref = torch.randn(G, C, generator=g, device=device) - 40.0
    return batch, hidden, weight, ref


# ------------------------------------------------------------------------------------------------
# baselines
# ------------------------------------------------------------------------------------------------


def eager_logps(hidden, weight, batch):
    """Materialised ``[Nr, V]`` logits (what a plain HF forward + log_softmax does)."""
    logits = hidden.index_select(0, batch.logit_rows) @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp[batch.target_rows, batch.target_ids]
    G, C = batch.candidate_mask.shape
    return torch.zeros(G * C, device=hidden.device).index_add(0, batch.target_candidates, tok).view(G, C)


_compiled = {}


def _chunk_fn(h, w, tids):
    logits = (h @ w.T).float()
    return logits.gather(1, tids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def compile_chunked_logps(hidden, weight, batch, chunk=1024):
    """torch.compile'd chunk function, recomputed in backward (checkpoint): bounded memory. Rows are
    expanded per target (N rows) so the compiled chunk is a plain per-token cross-entropy."""
    from torch.utils.checkpoint import checkpoint

    fn = _compiled.setdefault("f", torch.compile(_chunk_fn, dynamic=False))
    rows = batch.logit_rows.index_select(0, batch.target_rows)
    tids = batch.target_ids
    N = rows.shape[0]
    pad = (-N) % chunk  # equal chunk shapes: no recompiles
    h = hidden.index_select(0, torch.cat([rows, rows[:1].expand(pad)]))
    t = torch.cat([tids, tids[:1].expand(pad)])
    parts = [checkpoint(fn, h[a : a + chunk], weight, t[a : a + chunk], use_reentrant=False) for a in range(0, N + pad, chunk)]
    tok = torch.cat(parts)[:N]
    G, C = batch.candidate_mask.shape
    return torch.zeros(G * C, device=hidden.device).index_add(0, batch.target_candidates, tok).view(G, C)


def optional_baselines():
    out = {}
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        out["liger"] = lambda x, w, t: liger_fused_linear_cross_entropy(x, w, t, reduction="sum")
    except Exception as exc:  # noqa: BLE001 - any import failure just drops the baseline
        print(f"liger-kernel unavailable: {exc!r}", file=sys.stderr)
    try:
        from cut_cross_entropy import linear_cross_entropy

        out["cce"] = lambda x, w, t: linear_cross_entropy(x, w, t, reduction="sum")
    except Exception as exc:  # noqa: BLE001
        print(f"cut-cross-entropy unavailable: {exc!r}", file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


class _Cuda:
    """The CUDA calls of the GPU benchmark; ``_DryRun`` stands in on CPU to exercise the code paths."""

    device = torch.device("cuda")

    @staticmethod
    def bench(fn, rep_ms):
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median")

    sync = staticmethod(lambda: torch.cuda.synchronize())
    reset = staticmethod(lambda: (torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()))
    peak = staticmethod(lambda: torch.cuda.max_memory_allocated())


class _DryRun(_Cuda):
    device = torch.device("cpu")

    @staticmethod
    def bench(fn, rep_ms):
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    sync = staticmethod(lambda: None)
    reset = staticmethod(lambda: None)
    peak = staticmethod(lambda: 0)


def gpu_rows(n_targets, D, V, dtype, methods, rep_ms, ops=_Cuda):
    dev = ops.device
    batch, hidden, weight, ref = make_inputs(n_targets, D, V, dtype, dev)
    Nr, N = batch.logit_rows.shape[0], batch.num_targets
    T = hidden.shape[0]
    elt = hidden.element_size()
    flops1 = 2.0 * Nr * D * V
    shape = dict(N=N, Nr=Nr, T=T, D=D, V=V, dtype=str(dtype).replace("torch.", ""))
    bench = lambda fn: ops.bench(fn, rep_ms)

    # Bare cuBLAS matmuls of the same shapes (random operands: zeros run faster).
    h_rows = hidden.index_select(0, batch.logit_rows)
    dl = torch.randn(Nr, V, device=dev, dtype=dtype)
    t_logits = bench(lambda: h_rows @ weight.T)
    t_dh = bench(lambda: dl @ weight)
    t_dw = bench(lambda: dl.T @ h_rows)
    del dl
    cublas = dict(logits=t_logits, dh=t_dh, dw=t_dw, fwd=t_logits, fwdbwd=t_logits + t_dh + t_dw)
    rows = [dict(shape, method="cublas", pass_="fwd", ms=t_logits, tflops=flops1 / t_logits / 1e9, ratio=1.0),
            dict(shape, method="cublas", pass_="fwd+bwd (3 matmuls)", ms=cublas["fwdbwd"],
                 tflops=3 * flops1 / cublas["fwdbwd"] / 1e9, ratio=1.0)]
    minimum = (hidden.numel() + 2 * weight.numel() + hidden.numel()) * elt  # inputs + dW + dHidden

    del h_rows
    extra = optional_baselines()

    def seq(backend, **kw):
        return lambda h, w: sdpo_fast.sequence_logprobs(h, w, batch, backend=backend, **kw)

    fns = {
        "cublas": seq("cublas"),
        "triton": seq("triton"),
        "torch": seq("torch"),
        "eager": lambda h, w: eager_logps(h, w, batch),
        "compile_chunked": lambda h, w: compile_chunked_logps(h, w, batch),
    }

    def run_case(method, pass_, fn):
        try:
            fn()  # warm-up / compile
            ops.sync()
            ops.reset()
            fn()
            ops.sync()
            peak = ops.peak()
            ms = bench(fn)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append(dict(shape, method=method, pass_=pass_, ms=None, error="OOM"))
            return
        except Exception as exc:  # noqa: BLE001 - a failing baseline is reported, not fatal
            rows.append(dict(shape, method=method, pass_=pass_, ms=None, error=repr(exc)[:200]))
            return
        n_mm = 1 if pass_ == "fwd" else 3
        rows.append(dict(shape, method=method, pass_=pass_, ms=ms, tflops=n_mm * flops1 / ms / 1e9,
                         ratio=ms / (cublas["fwd"] if pass_ == "fwd" else cublas["fwdbwd"]),
                         peak_gb=peak / 1e9, peak_vs_min=peak / minimum))

    h_req = hidden.detach().requires_grad_(True)
    w_req = weight.detach().requires_grad_(True)

    def loss_step(backend, **kw):
        def step():
            loss, _ = fused_sdpo_loss(h_req, w_req, batch, ref, backend=backend, **kw)
            return torch.autograd.grad(loss, (h_req, w_req))
        return step

    # Sanity: the kernels' forward agrees with the torch reference on these inputs.
    for name in ("cublas", "triton"):
        if name in methods:
            with torch.no_grad():
                a = fns[name](hidden, weight)
                b = fns["torch"](hidden, weight)
            rows.append(dict(shape, method=f"check {name} vs torch logps", pass_="fwd", ms=None,
                             error=f"rel err {((a - b).norm() / b.norm()).item():.2e}"))
    x_tok = None
    for method in methods:
        if method == "cublas_loss_1g":
            run_case("cublas fused_sdpo_loss (1 GiB chunks)", "fwd+bwd", loss_step("cublas", chunk_bytes=1 << 30))
        elif method in ("cublas_loss", "triton_loss", "torch_loss"):
            backend = method.split("_")[0]
            run_case(f"{backend} fused_sdpo_loss", "fwd+bwd", loss_step(backend))
        elif method == "triton_loss_recompute":  # the 4-GEMM path even where the logits would fit
            run_case("triton fused_sdpo_loss (recompute)", "fwd+bwd", loss_step("triton", reuse_logits_bytes=0))
        elif method in fns:
            fn = fns[method]
            with torch.no_grad():
                run_case(method, "fwd", lambda: fn(hidden, weight))
            run_case(method, "fwd+bwd", lambda: torch.autograd.grad(fn(h_req, w_req).sum(), (h_req, w_req)))
        elif method in extra:
            if x_tok is None:  # one row per target token: these libraries cannot share the prompt's last row
                x_tok = hidden.index_select(0, batch.logit_rows.index_select(0, batch.target_rows))
                x_req = x_tok.detach().requires_grad_(True)
            f, tids = extra[method], batch.target_ids
            with torch.no_grad():
                run_case(method, "fwd", lambda: f(x_tok, weight, tids))
            run_case(method, "fwd+bwd", lambda: torch.autograd.grad(f(x_req, w_req, tids), (x_req, w_req)))
    return rows


# ------------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------------

CPU_SHAPE = dict(n_targets=2048, D=128, V=32000)


def cpu_child(method: str, reps: int) -> dict:
    """One method in this process: median wall time and the peak RSS above the inputs' high-water mark."""
    batch, hidden, weight, ref = make_inputs(CPU_SHAPE["n_targets"], CPU_SHAPE["D"], CPU_SHAPE["V"], torch.float32, "cpu")
    h = hidden.requires_grad_(True)
    w = weight.requires_grad_(True)
    fns = {
        "torch fwd": lambda: sdpo_fast.sequence_logprobs(hidden.detach(), weight.detach(), batch, backend="torch"),
        "torch fwd+bwd": lambda: torch.autograd.grad(sdpo_fast.sequence_logprobs(h, w, batch, backend="torch").sum(), (h, w)),
        "torch fused_sdpo_loss fwd+bwd": lambda: torch.autograd.grad(fused_sdpo_loss(h, w, batch, ref, backend="torch")[0], (h, w)),
        "eager fwd": lambda: eager_logps(hidden.detach(), weight.detach(), batch),
        "eager fwd+bwd": lambda: torch.autograd.grad(eager_logps(h, w, batch).sum(), (h, w)),
    }
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fns[method]()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(method=method, ms=1e3 * statistics.median(times[1:]), peak_extra_mb=(peak - base) / 1024,
                Nr=batch.logit_rows.shape[0], N=batch.num_targets, **{k: v for k, v in CPU_SHAPE.items() if k != "n_targets"})


def cpu_rows(reps: int):
    rows = []
    methods = ["torch fwd", "eager fwd", "torch fwd+bwd", "eager fwd+bwd", "torch fused_sdpo_loss fwd+bwd"]
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    for m in tqdm(methods, desc="cpu methods"):
        out = subprocess.run([sys.executable, __file__, "--cpu-child", m, "--reps", str(reps)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for prefix in ("torch fwd", "torch fwd+bwd"):
        eager = next(r for r in rows if r["method"] == prefix.replace("torch", "eager"))
        r = next(r for r in rows if r["method"] == prefix)
        r["time_vs_eager"] = r["ms"] / eager["ms"]
        r["peak_vs_eager"] = r["peak_extra_mb"] / max(eager["peak_extra_mb"], 1e-9)
    return rows


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import triton

    env = dict(date=utc_now(), device=device, torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), commit=commit(), cpu=platform.processor() or platform.machine(),
               threads=torch.get_num_threads())
    env.update({k.replace("-", "_"): v for k, v in package_versions(("liger-kernel", "cut-cross-entropy")).items()})
    return env


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(env, rows, gpu: bool, extra_text: str = "") -> str:
    head = f"# bench_logprob ({env['device']})\n\n" + ", ".join(f"{k} {v}" for k, v in env.items()) + "\n\n"
    if gpu:
        head += ("Times are `triton.testing.do_bench` medians. `ratio`: time over the bare cuBLAS time of the same "
                 "shapes in the same run (fwd: the logits matmul; fwd+bwd: logits + dHidden + dW). TFLOP/s counts "
                 "1 (fwd) or 3 (fwd+bwd) matmuls of 2*Nr*D*V. `peak/min`: peak allocated over inputs + dW + dHidden. "
                 "liger/cce run per-token CE over the N target rows (no shared row).\n\n")
        lines = ["| N | Nr | D | V | method | pass | ms | TFLOP/s | ratio to cuBLAS | peak GB | peak/min |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['N']} | {r['Nr']} | {r['D']} | {r['V']} | {r['method']} | {r['pass_']} | "
                         f"{fmt(r.get('ms'), '.2f') or r.get('error', '')} | {fmt(r.get('tflops'), '.0f')} | "
                         f"{fmt(r.get('ratio'), '.2f')} | {fmt(r.get('peak_gb'), '.2f')} | {fmt(r.get('peak_vs_min'), '.2f')} |")
    else:
        head += ("Wall-clock medians, one process per method; `peak MB`: max RSS above the inputs' high-water mark. "
                 "fp32, chunked torch reference vs eager materialised logits.\n\n")
        lines = ["| Nr | N | D | V | method | ms | peak MB | time vs eager | peak vs eager |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['Nr']} | {r['N']} | {r['D']} | {r['V']} | {r['method']} | {r['ms']:.1f} | "
                         f"{r['peak_extra_mb']:.0f} | {fmt(r.get('time_vs_eager'), '.2f')} | {fmt(r.get('peak_vs_eager'), '.2f')} |")
    return head + "\n".join(lines) + "\n" + extra_text


def parse_shapes(text):
    out = []
    for s in text.split(","):
        n, d, v = (int(x) for x in s.lower().split("x"))
        out.append((n, d, v))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for the JSON + markdown")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even when CUDA is present")
    ap.add_argument("--shapes", default="4096x4096x32000,16384x4096x32000,4096x4096x128256,16384x4096x128256",
                    help="comma-separated NxDxV (N target tokens)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--methods", default="cublas,cublas_loss,cublas_loss_1g,triton,triton_loss,triton_loss_recompute,torch,torch_loss,eager,"
                    "compile_chunked,liger,cce")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench rep (ms) per case")
    ap.add_argument("--reps", type=int, default=5, help="CPU repetitions per method")
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--no-native", action="store_true", help="CPU: skip benchmarks/bench_logprob_cpu.py")
    ap.add_argument("--aot", action="store_true", help="compile the kernels for sm_90 (no GPU needed) and report")
    ap.add_argument("--cpu-child", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true",
                    help="run the GPU code paths on CPU (Triton interpreter, wall clock, no memory figures)")
    args = ap.parse_args(argv)

    if args.cpu_child:
        print(json.dumps(cpu_child(args.cpu_child, args.reps)))
        return
    if args.aot:
        os.environ.pop("TRITON_INTERPRET", None)
        from sdpo_fast.kernels.logprobs.aot import aot_report

        print(aot_report())
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = (torch.cuda.is_available() or args.dry_run) and not args.cpu
    device = ("dry-run-cpu" if args.dry_run else torch.cuda.get_device_name()) if gpu else "cpu"
    tag = ("gpu-" + device.replace(" ", "_").replace("/", "_")) if gpu else "cpu"
    tag += f"-{args.tag}" if args.tag else ""
    env = environment(device)

    def write(rows, extra_text=""):
        # Rewritten after every shape: a run stopped by a timeout still leaves what it measured.
        (out / f"bench_logprob_{tag}.json").write_text(json.dumps(dict(env=env, rows=rows), indent=1))
        md = markdown(env, rows, gpu, extra_text)
        (out / f"bench_logprob_{tag}.md").write_text(md)
        return md

    if gpu:
        rows = []
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = lambda x, **k: x  # noqa: E731
        for n, d, v in tqdm(parse_shapes(args.shapes), desc="shapes"):
            rows += gpu_rows(n, d, v, getattr(torch, args.dtype), args.methods.split(","), args.rep_ms,
                             _DryRun if args.dry_run else _Cuda)
            md = write(rows)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    else:
        rows = cpu_rows(args.reps)
        extra_text = ""
        native = REPO / "benchmarks" / "bench_logprob_cpu.py"
        if native.exists() and not args.no_native:
            res = subprocess.run([sys.executable, str(native), "--out", str(out)], capture_output=True, text=True, cwd=REPO)
            extra_text = "\n## Native C++ backend (benchmarks/bench_logprob_cpu.py)\n\n" + res.stdout[-6000:]
            if res.returncode:
                extra_text += f"\n(exit code {res.returncode}: {res.stderr[-500:]})\n"
        md = write(rows, extra_text)
    print(md)

if __name__ == "__main__":
    main()
