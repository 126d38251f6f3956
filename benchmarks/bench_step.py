"""End-to-end S-DPO step: the paper's layout vs sdpo_fast's shared prefix, same model, data and process.

(a) naive  : every candidate carries its own copy of the prompt ([G*(K+1), P+n] batch), full-vocabulary
             logits from ``model(...).logits``, log_softmax, gather, sum (what the paper's TRL fork does)
(c) shared : ``pack_groups`` + ``candidate_logprobs`` (one forward over [prompt | c_0 | ... | c_K])

Both then apply ``sdpo_loss`` against fixed reference log-probs and run backward; the step timed is
forward + loss + backward (the optimizer update is identical for both and excluded here). Reported:
median milliseconds, the ratio naive/shared, tokens per step and peak memory where measurable.

    python benchmarks/bench_step.py                  # CPU default: tiny Llama, K in {1, 3, 7, 15}
    python benchmarks/bench_step.py --ks 15 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import sdpo_fast
from sdpo_fast import backends
from sdpo_fast.loss import sdpo_loss


def make_groups(n_groups, prompt_len, cand_len, k, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(),
            [torch.randint(0, vocab, (cand_len,), generator=gen).tolist() for _ in range(k + 1)],
        )
        for _ in range(n_groups)
    ]


def naive_logprobs(model, groups):
    """[G, K+1]: the paper's layout. All candidates have the same length here, so no padding is needed."""
    P = len(groups[0][0])
    ids = torch.tensor([p + c for p, cs in groups for c in cs])
    logits = model(ids).logits[:, P - 1 : -1].float()
    targets = ids[:, P:]
    lp = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1).sum(-1)
    return lp.view(len(groups), -1)


def step(logps, ref):
    loss = sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=1.0)
    loss.backward()
    return loss.detach()


def timed(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def run(args):
    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.cand_len + 8,
    )
    model = LlamaForCausalLM(cfg).to(device)
    naive_model = LlamaForCausalLM(cfg).to(device)
    naive_model.load_state_dict(model.state_dict())
    naive_model.set_attn_implementation("sdpa")
    logprob_backend = backends.resolve("logprobs", args.backend, device)
    rows = []
    for k in args.ks:
        groups = make_groups(args.groups, args.prompt_len, args.cand_len, k, args.vocab, seed=k)
        batch = sdpo_fast.pack_groups(groups).to(device)
        ref = torch.zeros(args.groups, k + 1, device=device)

        def naive_step():
            naive_model.zero_grad(set_to_none=True)
            return step(naive_logprobs(naive_model, groups), ref)

        def shared_step():
            model.zero_grad(set_to_none=True)
            return step(sdpo_fast.candidate_logprobs(model, batch, backend=args.backend), ref)

        # Same loss from both layouts: the comparison is between equal computations.
        l_naive, l_shared = naive_step(), shared_step()
        if not torch.allclose(l_naive, l_shared, rtol=1e-3, atol=1e-4):
            raise RuntimeError(f"K={k}: naive loss {l_naive.item()} != shared loss {l_shared.item()}")
        t_naive, _ = timed(naive_step, args.repeats)
        t_shared, _ = timed(shared_step, args.repeats)
        naive_tokens = args.groups * (k + 1) * (args.prompt_len + args.cand_len)
        row = {
            "K": k,
            "naive_ms": round(t_naive, 2),
            "shared_ms": round(t_shared, 2),
            "speedup": round(t_naive / t_shared, 2),
            "naive_tokens": naive_tokens,
            "shared_tokens": batch.num_tokens,
            "token_ratio": round(naive_tokens / batch.num_tokens, 2),
        }
        rows.append(row)
        print(
            f"K={k:3d}  naive {t_naive:9.1f} ms  shared {t_shared:8.1f} ms  speedup {row['speedup']:5.2f}x  "
            f"tokens {naive_tokens} vs {batch.num_tokens} ({row['token_ratio']}x)",
            flush=True,
        )
    meta = {
        "benchmark": "bench_step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "logprob_backend": logprob_backend,
        "model": f"llama layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} vocab={args.vocab}",
        "shape": f"groups={args.groups} prompt={args.prompt_len} candidate={args.cand_len}",
        "repeats": args.repeats,
    }
    return meta, rows


def write(meta, rows, out_dir: Path, name: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# {meta['benchmark']}", ""] + [f"- {k}: {v}" for k, v in meta.items() if k != "benchmark"] + [""]
    cols = list(rows[0])
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 7, 15])
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--cand-len", type=int, default=12)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--backend", default="auto", help="sdpo_fast backend for the shared path")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default=None, help="result file stem (default bench_step_<device type>)")
    args = p.parse_args(argv)
    meta, rows = run(args)
    write(meta, rows, args.out, args.name or f"bench_step_{torch.device(args.device).type}")
    print(f"wrote {args.out}/", file=sys.stderr)


if __name__ == "__main__":
    main()
