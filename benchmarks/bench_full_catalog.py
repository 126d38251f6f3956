"""CPU cost of full-catalog ranking and constrained decoding per user, and how it grows with the catalog.

Model: SmolLM2-135M-Instruct's real weights when ``SDPO_FAST_SMOLLM2_GGUF`` names the GGUF (else a
random Llama of SmolLM2's shape with a tokenizer trained on the data: the same compute). Data: the
RecBole ML-100K folder in ``SDPO_FAST_ML100K_DIR`` (else the synthetic set).

Rows, all in this process:
  sweep      ``score_catalog`` of one test user's prompt (the candidate-free full-catalog prompt) over
             the first N catalog titles, N in ``--sizes``; ``--repeats`` round-robin passes after one
             warm-up at the smallest N (a warm-up per size would double the cost of the largest).
  baseline   at N = ``--baseline_items``: our path against the plain padded recipe (one HF forward
             per item with its own copy of the prompt, ``--baseline_batch`` rows per forward), timed in
             turn in each repeat; same scores (the largest difference is reported).
  real       ``evaluate_full_catalog`` on ``--real_users`` ML-100K test users over the whole catalog
             (earlier interactions left out), and ``evaluate_constrained`` (greedy) beside free
             greedy generation on ``--constrained_users`` users: wall seconds of each call.

``python benchmarks/bench_full_catalog.py`` writes benchmarks/results/bench_full_catalog_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from harness import commit, cpu_name, package_versions, utc_now, write_json, write_text  # noqa: E402  (benchmarks/)

RESULTS = Path(__file__).resolve().parent / "results"


def load(args):
    from sdpo_fast.data import build_tokenizer, load_dataset

    ml = None if args.tiny else os.environ.get("SDPO_FAST_ML100K_DIR")
    splits = load_dataset("recbole", path=ml, seed=0) if ml else load_dataset("synthetic", seed=0)
    gguf = None if args.tiny else os.environ.get("SDPO_FAST_SMOLLM2_GGUF")
    if gguf:
        from sdpo_fast.pretrained import load_local_model

        tok, model = load_local_model(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
        name = "SmolLM2-135M-Instruct (real weights)"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = build_tokenizer(splits, vocab_size=1024)
        shape = (dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2) if args.tiny else
                 dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3))
        cfg = LlamaConfig(**shape, tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        name = "tiny random Llama (smoke test)" if args.tiny else "SmolLM2-shaped random Llama"
    return splits, tok, model.eval(), name, "ml-100k" if ml else "synthetic"


@torch.no_grad()
def padded_baseline(model, prompt, items, batch):
    """``[N]`` log-probs: each item after its own copy of the prompt, right-padded rows of ``batch``."""
    out = []
    for s in range(0, len(items), batch):
        rows = [list(prompt) + list(c) for c in items[s : s + batch]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        for i, c in enumerate(items[s : s + batch]):
            pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
            out.append(logp[i, pos, torch.tensor(c)].sum().item())
    return torch.tensor(out)


def spread(xs):
    return {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "runs": len(xs)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="200,400,800,1660")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk_tokens", type=int, default=4096)
    ap.add_argument("--baseline_items", type=int, default=50)
    ap.add_argument("--baseline_batch", type=int, default=16)
    ap.add_argument("--real_users", type=int, default=5)
    ap.add_argument("--constrained_users", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a 1-layer random model on the synthetic data (smoke test)")
    ap.add_argument("--out", default=str(RESULTS / "bench_full_catalog_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sdpo_fast.data import sample_over_users, tokenize_examples
    from sdpo_fast.eval import (
        catalog_token_ids, evaluate_constrained, evaluate_full_catalog, greedy_generate, score_catalog, titles_before,
    )

    load_before = os.getloadavg()
    splits, tok, model, model_name, data_name = load(args)
    catalog = splits.all_titles()
    test = sample_over_users(splits.test, max(args.real_users, args.constrained_users, 1), seed=0)
    prompt = tokenize_examples(test[:1], tok, list_candidates=False)[0]["prompt_ids"]
    items = catalog_token_ids(tok, catalog)
    sizes = sorted({min(int(s), len(items)) for s in args.sizes.split(",")})
    pad = tok.pad_token_id or 0

    def ours(n):
        return score_catalog(model, [prompt], items[:n], max_chunk_tokens=args.chunk_tokens, backend="auto",
                             pad_token_id=pad, progress=False)[0]

    ours(sizes[0])
    sweep = {n: [] for n in sizes}
    nb = min(args.baseline_items, len(items))
    base_times = {"ours": [], "padded": []}
    diff = None
    for rep in range(args.repeats):
        for n in sizes:
            t0 = time.perf_counter()
            ours(n)
            sweep[n].append(time.perf_counter() - t0)
            print(f"repeat {rep} N={n}: {sweep[n][-1]:.2f} s", flush=True)
        if nb:
            t0 = time.perf_counter()
            a = ours(nb)
            base_times["ours"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b = padded_baseline(model, prompt, items[:nb], args.baseline_batch)
            base_times["padded"].append(time.perf_counter() - t0)
            diff = float((a - b).abs().max())
            print(f"repeat {rep} baseline N={nb}: ours {base_times['ours'][-1]:.2f} s, padded {base_times['padded'][-1]:.2f} s", flush=True)

    real = {}
    if args.real_users:
        users = test[: args.real_users]
        past = titles_before(splits)
        t0 = time.perf_counter()
        res = evaluate_full_catalog(model, tok, users, catalog, exclude=[past[ex.example_id] for ex in users],
                                    max_chunk_tokens=args.chunk_tokens, progress=False)
        real["full_catalog"] = {"users": len(users), "items": len(catalog), "seconds": time.perf_counter() - t0,
                                **{k: v for k, v in res.items() if k.startswith("full_catalog_hr")}}
        print(f"full catalog, {len(users)} users: {real['full_catalog']['seconds']:.1f} s", flush=True)
    if args.constrained_users:
        users = test[: args.constrained_users]
        rows = tokenize_examples(users, tok)
        t0 = time.perf_counter()
        con = evaluate_constrained(model, tok, users, batch_size=16, progress=False)
        t1 = time.perf_counter()
        greedy_generate(model, tok, [r["prompt_ids"] for r in rows],
                        max_new_tokens=max(len(c) for r in rows for c in r["candidate_ids"]) + 4, progress=False)
        t2 = time.perf_counter()
        real["constrained"] = {"users": len(users), "seconds": t1 - t0, "free_greedy_seconds": t2 - t1,
                               "constrained_hit_ratio@1": con["constrained_hit_ratio@1"]}
        print(f"constrained, {len(users)} users: {t1 - t0:.1f} s (free greedy {t2 - t1:.1f} s)", flush=True)

    record = {
        "benchmark": "bench_full_catalog", "date": utc_now(), "commit": commit(), "device": cpu_name(args.threads),
        "versions": package_versions(["torch", "transformers"]), "model": model_name, "data": data_name,
        "catalog_titles": len(catalog), "prompt_tokens": len(prompt), "item_tokens_total": sum(len(c) for c in items),
        "chunk_tokens": args.chunk_tokens, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "sweep": {str(n): {**spread(t), "item_tokens": sum(len(c) for c in items[:n])} for n, t in sweep.items()},
        "baseline": {"items": nb, "batch": args.baseline_batch, "ours": spread(base_times["ours"]) if nb else None,
                     "padded": spread(base_times["padded"]) if nb else None, "max_abs_score_diff": diff},
        "real": real,
    }
    write_json(Path(args.out + ".json"), record)
    lines = [f"# Full-catalog ranking and constrained decoding on CPU ({record['date']}, commit {record['commit']})", "",
             f"{model_name}, {data_name} ({len(catalog)} catalog titles, {record['item_tokens_total']} item tokens, "
             f"prompt {len(prompt)} tokens), {record['device']}, torch {record['versions'].get('torch')}; "
             f"load average {load_before[0]:.1f} before, {record['load_average_after'][0]:.1f} after "
             f"(a shared 2-core machine: absolute times are load-dependent).", "",
             "| catalog items N | item tokens | s per user (median) | min | max | runs |", "|---|---|---|---|---|---|"]
    for n, r in record["sweep"].items():
        lines.append(f"| {n} | {r['item_tokens']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {r['runs']} |")
    if nb:
        b = record["baseline"]
        lines += ["", f"Baseline at N = {nb}: ours {b['ours']['median_s']:.2f} s vs one padded forward per item "
                      f"{b['padded']['median_s']:.2f} s (x{b['padded']['median_s'] / b['ours']['median_s']:.1f}); "
                      f"max |score difference| {diff:.2e}."]
    if "full_catalog" in real:
        r = real["full_catalog"]
        lines += ["", f"`evaluate_full_catalog`, {r['users']} test users x {r['items']} items: {r['seconds']:.1f} s "
                      f"({r['seconds'] / r['users']:.1f} s per user)."]
    if "constrained" in real:
        r = real["constrained"]
        lines += [f"`evaluate_constrained` (greedy), {r['users']} users: {r['seconds']:.1f} s "
                  f"({r['seconds'] / r['users']:.2f} s per user); free greedy generation: {r['free_greedy_seconds']:.1f} s."]
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
