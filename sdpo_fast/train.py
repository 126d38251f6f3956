"""SFT then S-DPO training of an LM recommender (``python train.py`` / ``deepspeed train.py``).

Stages (``--stage``): ``sft`` (mean token NLL of the target title after the prompt), ``sdpo`` (S-DPO
with K = ``--num_negatives`` negatives), ``dpo`` (S-DPO with K = 1), ``all`` (SFT, then S-DPO from the
SFT weights with the SFT model as reference). Both stages run through the same shared-prefix op,
``candidate_sdpo_loss``: SFT is the case K = 0 with ``sft_weight = 1``.

Reference log-probs (``--reference``): ``precompute`` (default) scores all of every training user's
candidates with the reference model (the model at the start of S-DPO) in one shared-prefix pass
before training, cached in ``<output_dir>/reference_logps.pt``, so any negatives drawn later have
their reference value; ``live`` (LoRA, ``--stage sdpo/dpo``) runs the policy with adapters disabled.

Data order: each epoch is a seeded permutation of the training examples cut into global batches of
``batch_size * world_size`` groups; rank r takes the r-th slice. Every rank runs the same number of
steps and every batch has the same K, so ZeRO-3's collectives stay in step. A checkpoint stores the
stage and step, so resuming continues with exactly the batches that would have come next.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import parse_args
from .model import candidate_logprobs, candidate_sdpo_loss
from .runtime import (
    Runtime, Schedule, all_gather_objects, all_gather_rows, all_mean, barrier, rank, seed_everything, world_size,
)


# ---------------------------------------------------------------------------------------------- setup


def _init_distributed(train_args) -> torch.device:
    if train_args.deepspeed is not None:
        import deepspeed

        deepspeed.init_distributed()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("several processes need --deepspeed configs/zero3.json (or zero2.json)")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", max(train_args.local_rank, 0)))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def load_data(data_args):
    from .data import load_dataset

    if data_args.dataset == "synthetic":
        return load_dataset("synthetic", seed=data_args.data_seed)
    return load_dataset(
        data_args.dataset, path=data_args.data_path, titles=data_args.titles_path, seed=data_args.data_seed
    )


def build_model(model_args, splits, output_dir, bf16):
    """``(tokenizer, model)``: a local HF model, or the tiny default Llama with a tokenizer trained on the data."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = torch.bfloat16 if bf16 else torch.float32
    if model_args.model_name_or_path is not None:
        from .pretrained import load_local_model

        tokenizer, model = load_local_model(model_args.model_name_or_path, gguf_file=model_args.gguf_file, dtype=dtype)
    else:
        from .data import build_tokenizer

        tok_dir = os.path.join(output_dir, "tokenizer")
        if rank() == 0 and not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
            build_tokenizer(splits, vocab_size=model_args.tokenizer_vocab, save_dir=tok_dir)
        barrier()
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=model_args.tiny_hidden,
            intermediate_size=model_args.tiny_hidden * 2,
            num_hidden_layers=model_args.tiny_layers,
            num_attention_heads=model_args.tiny_heads,
            num_key_value_heads=model_args.tiny_kv_heads,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(config).to(dtype)
    if model_args.lora:
        import peft

        targets = [t.strip() for t in model_args.lora_targets.split(",") if t.strip()]
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        missing = [t for t in targets if t not in present]
        if missing:
            raise SystemExit(
                f"--lora_targets {missing} not found in {type(model).__name__}; its linear modules include "
                f"{sorted(n for n in present if 'proj' in n or 'dense' in n or 'fc' in n)}"
            )
        cfg = peft.LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, cfg)
    if model_args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tokenizer, model


class MetricsLog:
    """JSONL metrics on rank 0 (and TensorBoard when installed)."""

    def __init__(self, output_dir: str):
        self.active = rank() == 0
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tb = None
        if self.active:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def write(self, record: dict, step: int | None = None):
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{k}", v, step)


# ---------------------------------------------------------------------------------------------- stages


def epoch_order(n: int, seed: int, stage: str, epoch: int) -> np.ndarray:
    """The deterministic permutation of ``n`` training examples for ``(stage, epoch)``."""
    salt = {"sft": 1, "sdpo": 2}[stage]
    return np.random.default_rng([seed, salt, epoch]).permutation(n)


def reference_logps(runtime, tokenizer, features, train_args, cache_path):
    """``[N, C]`` reference log-probs of every candidate of every training example (one pass, cached)."""
    from .eval import score_candidates

    if os.path.isfile(cache_path):
        cached = torch.load(cache_path, weights_only=True)
        if cached["n"] == len(features):
            return cached["logps"]
    n = len(features)
    scores = score_candidates(
        runtime.model,
        [features[i] for i in _my_shard(n)],
        batch_size=train_args.batch_size,
        backend=train_args.backend,
        pad_token_id=tokenizer.pad_token_id or 0,
        progress=rank() == 0,
        desc="reference log-probs",
    )
    logps = all_gather_rows(scores.to(runtime.device), n).cpu()
    if rank() == 0:
        torch.save({"n": n, "logps": logps}, cache_path)
    barrier()
    return logps


def run_stage(stage, runtime, tokenizer, train_ds, data_args, train_args, log, start_step=0, on_save=None):
    """Train one stage; returns the number of steps it ran in total."""
    from .data import SDPOCollator

    sdpo = stage == "sdpo"
    lm_config = runtime.module.config
    collator = SDPOCollator(
        tokenizer,
        num_negatives=data_args.num_negatives if sdpo else 0,
        negatives=data_args.negatives if sdpo else "random",
        seed=data_args.data_seed,
        vocab_size=lm_config.vocab_size,
        max_positions=getattr(lm_config, "max_position_embeddings", None),
        backend=train_args.backend,
    )
    if sdpo and data_args.negatives == "hard":
        collator.set_policy(runtime.model)
    B, W, r = train_args.batch_size, world_size(), rank()
    n = len(train_ds)
    per_epoch = n // (B * W)
    if per_epoch == 0:
        raise SystemExit(f"{n} training examples cannot fill one global batch of {B * W} groups")
    epochs = train_args.sdpo_epochs if sdpo else train_args.sft_epochs
    total = max(1, math.ceil(epochs * per_epoch))
    if train_args.max_steps is not None:
        total = min(total, train_args.max_steps)
    lr = train_args.sdpo_learning_rate if sdpo else train_args.sft_learning_rate
    schedule = Schedule(lr, total, train_args.warmup_ratio)

    ref_all = None
    if sdpo and train_args.reference == "precompute":
        ref_all = reference_logps(
            runtime, tokenizer, train_ds, train_args, os.path.join(train_args.output_dir, "reference_logps.pt")
        )
    runtime.train()
    bar = tqdm(total=total, initial=start_step, desc=stage, disable=r != 0, dynamic_ncols=True)
    for step in range(start_step, total):
        t0 = time.perf_counter()
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(n, train_args.seed, stage, epoch)
        idx = order[(pos * W + r) * B : (pos * W + r + 1) * B].tolist()
        collator.set_epoch(epoch)
        batch = collator([train_ds[i] for i in idx]).to(runtime.device)
        packed = batch.packed
        if not sdpo:
            ref = torch.zeros(packed.candidate_mask.shape, device=runtime.device)
            beta, sft_weight = 1.0, 1.0
        elif ref_all is not None:
            cols = batch.candidate_index.clamp(min=0).cpu()
            ref = ref_all[batch.idx.cpu()].gather(1, cols).masked_fill(~packed.candidate_mask.cpu(), 0.0)
            ref = ref.to(runtime.device)
            beta, sft_weight = train_args.beta, train_args.sft_weight
        else:
            with torch.no_grad(), runtime.module.disable_adapter():
                ref = candidate_logprobs(runtime.model, packed, backend=train_args.backend)
            beta, sft_weight = train_args.beta, train_args.sft_weight
        loss, metrics = candidate_sdpo_loss(
            runtime.model, packed, ref, beta=beta, sft_weight=sft_weight, backend=train_args.backend
        )
        lr_now = schedule(step)
        grad_norm = runtime.backward_and_step(loss, lr_now)
        values = {"loss": loss.item()}
        if sdpo:
            values["reward_accuracy"] = metrics["accuracy"].mean().item()
            values["reward_margin"] = metrics["reward_margins"].mean().item()
        values["chosen_logp"] = metrics["logps"][:, 0].mean().item()
        values = all_mean(values)
        dt = time.perf_counter() - t0
        tokens_per_s = packed.num_tokens * W / dt
        record = {"stage": stage, "step": step + 1, "epoch": epoch, "lr": lr_now, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s, **values}
        if (step + 1) % train_args.log_every == 0 or step + 1 == total:
            log.write(record, step=step + 1)
        shown = {"loss": f"{values['loss']:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if sdpo:
            shown["acc"] = f"{values['reward_accuracy']:.2f}"
        bar.set_postfix(shown)
        bar.update(1)
        if on_save is not None and train_args.save_steps and (step + 1) % train_args.save_steps == 0 and step + 1 < total:
            on_save(stage, step + 1)
    bar.close()
    return total


# ---------------------------------------------------------------------------------------------- eval


def _my_shard(n: int) -> list[int]:
    """This rank's indices of ``n`` examples: equal, contiguous shards (the last padded with repeats of
    the last example), since under ZeRO-3 every rank must run the same forwards."""
    per = math.ceil(n / world_size())
    return [min(i, n - 1) for i in range(rank() * per, (rank() + 1) * per)]


def evaluate(runtime, tokenizer, features, train_args, name):
    """Ranking and/or generation metrics on ``features``, each rank scoring its shard (``_my_shard``);
    every rank returns the metrics of all of them."""
    from .eval import generation_metrics, greedy_generate, ranking_metrics, score_candidates

    n = len(features)
    mine = [features[i] for i in _my_shard(n)]
    result = {}
    if train_args.eval in ("ranking", "both"):
        scores = score_candidates(runtime.model, mine, batch_size=train_args.batch_size, backend=train_args.backend,
                                  pad_token_id=tokenizer.pad_token_id or 0, progress=rank() == 0)
        width = max(len(f["candidate_ids"]) for f in features)  # same shape on every rank for the gather
        scores = torch.nn.functional.pad(scores, (0, width - scores.shape[1]), value=float("-inf"))
        scores = all_gather_rows(scores.to(runtime.device), n).cpu()
        result.update(ranking_metrics(scores, [int(f["target_index"]) for f in features]))
    if train_args.eval in ("generation", "both"):
        answers = greedy_generate(
            runtime.module, tokenizer, [f["prompt_ids"] for f in mine],
            max_new_tokens=max(len(c) for f in features for c in f["candidate_ids"]) + 4,
            batch_size=train_args.batch_size, progress=rank() == 0,
            **({"synced_gpus": True} if runtime.stage3 else {}),
        )
        answers = all_gather_objects(answers)[:n]
        gen = generation_metrics(answers, [f["candidates"] for f in features], [int(f["target_index"]) for f in features])
        result.update({k: v for k, v in gen.items() if k != "num_examples"}, match="exact")
    if rank() == 0 and result:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        print(f"[eval] {name}: {shown}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    model_args, data_args, train_args = parse_args(argv)
    device = _init_distributed(train_args)
    bf16 = train_args.bf16 if train_args.bf16 is not None else device.type == "cuda"
    seed_everything(train_args.seed)
    out = train_args.output_dir
    if rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "args.json"), "w") as f:
            json.dump({"model": vars(model_args), "data": vars(data_args), "train": vars(train_args)}, f, indent=2)
    barrier()
    from .data import sample_over_users, tokenize_dataset
    from .eval import format_table, save_results

    splits = load_data(data_args)
    if not splits.train and train_args.stage != "eval":
        raise SystemExit(f"--dataset {data_args.dataset}: no training examples (only --stage eval works without them)")
    fewest = min((len(ex.candidates) for ex in splits.train), default=0) - 1
    if train_args.stage not in ("sft", "eval") and data_args.num_negatives > fewest:
        raise SystemExit(
            f"--num_negatives {data_args.num_negatives} is above the {fewest} non-target candidates some "
            "training users have"
        )
    tokenizer, model = build_model(model_args, splits, out, bf16)
    cache_dir = data_args.cache_dir or os.path.join(out, "cache")
    train_examples = sample_over_users(splits.train, data_args.max_train_examples, seed=data_args.data_seed)
    eval_examples = sample_over_users(splits.test, data_args.max_eval_examples, seed=data_args.data_seed)
    tok_kwargs = dict(max_prompt_tokens=data_args.max_prompt_tokens, seed=data_args.data_seed)
    train_ds = tokenize_dataset(train_examples, tokenizer, cache_dir=cache_dir, desc="tokenizing train", **tok_kwargs)
    eval_ds = tokenize_dataset(eval_examples, tokenizer, cache_dir=cache_dir, desc="tokenizing test", **tok_kwargs)
    eval_features = [dict(eval_ds[i], candidates=list(eval_examples[i].candidates)) for i in range(len(eval_ds))]

    runtime = Runtime(model, deepspeed_config=train_args.deepspeed, batch_size=train_args.batch_size,
                      max_grad_norm=train_args.max_grad_norm, weight_decay=train_args.weight_decay, bf16=bf16,
                      device=device)
    log = MetricsLog(out)
    stages = {"sft": ["sft"], "sdpo": ["sdpo"], "dpo": ["sdpo"], "all": ["sft", "sdpo"], "eval": []}[train_args.stage]
    results, done, resume_step, resume_stage = {}, [], 0, None
    if train_args.resume_from_checkpoint is not None:
        state = runtime.load_checkpoint(train_args.resume_from_checkpoint)
        results, done = state["results"], state["done"]
        resume_stage, resume_step = state["stage"], state["step"]
        if rank() == 0:
            print(f"resumed {resume_stage} at step {resume_step} from {train_args.resume_from_checkpoint}")

    def save(stage, step):
        path = os.path.join(out, f"checkpoint-{stage}-{step}")
        runtime.save_checkpoint(path, {"stage": stage, "step": step, "results": results, "done": done})

    if train_args.eval != "none" and train_args.eval_untrained and "untrained" not in results:
        results["untrained"] = evaluate(runtime, tokenizer, eval_features, train_args, "untrained")
    for stage in stages:
        if stage in done:
            continue
        start = resume_step if stage == resume_stage else 0
        if start == 0:
            runtime.reset_optimizer_state()
        run_stage(stage, runtime, tokenizer, train_ds, data_args, train_args, log, start_step=start, on_save=save)
        done.append(stage)
        name = "S-DPO" if stage == "sdpo" and train_args.stage != "dpo" else ("DPO" if stage == "sdpo" else "SFT")
        if train_args.eval != "none":
            results[name] = evaluate(runtime, tokenizer, eval_features, train_args, name)
        save(stage, "end")

    # LoRA adapters need their base on disk: the tiny default and a GGUF base exist in no HF folder.
    base_elsewhere = model_args.model_name_or_path is None or model_args.gguf_file is not None
    base = os.path.join(out, "final-base") if (model_args.lora and base_elsewhere) else None
    runtime.export(os.path.join(out, "final"), tokenizer, base_path=base)
    if rank() == 0:
        save_results(os.path.join(out, "results.json"), results)
        if results:
            print("\n" + format_table(results))
        print(f"\nexported to {os.path.join(out, 'final')}" + (f" (base model: {base})" if base else ""))
    barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
