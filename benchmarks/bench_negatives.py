"""Extra cost per S-DPO step of the negative strategies (``SDPOCollator(negatives=...)``): a step is
the collator (choosing K negatives) plus the training loss forward and backward through the model;
random costs nothing extra, hard and boundary one no-grad shared-prefix scoring pass over all C
candidates of the batch's examples. Interleaved timing in one process; ratios against random.

    python benchmarks/bench_negatives.py [--groups 8] [--ks 3 15] [--repeats 5]
    python benchmarks/bench_negatives.py --real --out benchmarks/results/bench_negatives_smollm2_cpu

Default model: train.py's tiny Llama (2 layers, hidden 128) on the synthetic data. ``--real``:
SmolLM2-135M-Instruct on RecBole's ML-100K, from $SDPO_FAST_SMOLLM2_GGUF and $SDPO_FAST_ML100K_DIR
(README, "Real data and a real model"). Writes ``--out``.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from sdpo_fast import candidate_sdpo_loss  # noqa: E402
from sdpo_fast.data import SDPOCollator, build_tokenizer, make_synthetic, tokenize_dataset  # noqa: E402

STRATEGIES = ("random", "hard", "boundary")


def tiny_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=8, help="examples (groups) per step")
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 15], help="K negatives")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M on ML-100K instead of the tiny model")
    ap.add_argument("--out", default=str(harness.REPO / "benchmarks" / "results" / "bench_negatives_cpu"))
    args = ap.parse_args(argv)

    if args.real:
        from sdpo_fast.data import load_dataset, sample_over_users
        from sdpo_fast.pretrained import load_local_model

        gguf = Path(os.environ["SDPO_FAST_SMOLLM2_GGUF"])
        splits = load_dataset("recbole", path=os.environ["SDPO_FAST_ML100K_DIR"])
        tok, model = load_local_model(str(gguf.parent), gguf_file=gguf.name)
        train = sample_over_users(splits.train, args.groups, seed=0)
        name = "SmolLM2-135M-Instruct (fp32 from the Q4_1 GGUF), ML-100K"
    else:
        splits = make_synthetic(num_users=60, seed=0)
        tok = build_tokenizer(splits, vocab_size=1024)
        model = tiny_model(len(tok))
        train = splits.train[: args.groups]
    ds = tokenize_dataset(train, tok)
    feats = [ds[i] for i in range(len(ds))]
    model.train()
    if not args.real:
        name = "tiny Llama: 2 layers, hidden 128, vocab %d" % len(tok)

    rows = []
    for k in args.ks:
        fns = {}
        for name in STRATEGIES:
            col = SDPOCollator(tok, num_negatives=k, negatives=name, policy=model, backend=args.backend, seed=0)

            def step(col=col):
                packed = col(feats).packed
                ref = torch.zeros(packed.candidate_mask.shape)
                loss, _ = candidate_sdpo_loss(model, packed, ref, backend=args.backend)
                loss.backward()
                model.zero_grad(set_to_none=True)

            fns[name] = step
        times = harness.interleaved_times(fns, args.repeats, desc=f"K={k}")
        base = statistics.median(times["random"])
        for name in STRATEGIES:
            t = times[name]
            rows.append({"K": k, "negatives": name, "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                         "ratio_vs_random": statistics.median(t) / base})
    env = {"commit": harness.commit(), "date": harness.utc_now(), "device": harness.cpu_name(torch.get_num_threads()),
           "versions": harness.package_versions(["torch", "transformers"]), "groups": args.groups,
           "candidates_per_example": len(feats[0]["candidate_ids"]), "repeats": args.repeats,
           "model": name, "backend": args.backend, "load_average": os.getloadavg()}
    harness.write_json(Path(args.out + ".json"), {"environment": env, "rows": rows})
    lines = [f"# Negative strategies: step time (collator + loss forward/backward), {env['model']}",
             "", f"{env['device']}, commit {env['commit']}, {env['date']}, {args.groups} groups of "
             f"{env['candidates_per_example']} candidates, {args.repeats} interleaved repeats (median, min-max), "
             "load average %.1f / %.1f / %.1f at the end" % env["load_average"], "",
             "| K | negatives | median s | min-max s | vs random |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['negatives']} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
                     f"{r['ratio_vs_random']:.2f}x |")
    harness.write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
