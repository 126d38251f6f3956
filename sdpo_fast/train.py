"""SFT then S-DPO training of an LM recommender (``python train.py`` / ``deepspeed train.py``).

Stages (``--stage``): ``sft`` (mean token NLL of the target title after the prompt), ``sdpo`` (S-DPO
with K = ``--num_negatives`` negatives), ``dpo`` (S-DPO with K = 1), ``all`` (SFT, then S-DPO from the
SFT weights with the SFT model as reference). Both stages run through the same shared-prefix op,
``candidate_sdpo_loss``: SFT is the case K = 0 with ``sft_weight = 1``.

Reference log-probs (``--reference``): ``precompute`` (default) scores all of every training user's
candidates with the reference model (the model at the start of S-DPO) in one shared-prefix pass
before training, cached in ``<output_dir>/reference_logps.pt`` with a fingerprint of the reference
weights and the tokenized training data (a mismatch recomputes it and says so), so any negatives
drawn later have their reference value; ``live`` (LoRA, ``--stage sdpo/dpo``) runs the policy with
adapters disabled.

Data order: each epoch is a seeded permutation of the training examples cut into global batches of
``batch_size * world_size`` groups; rank r takes the r-th slice. Every rank runs the same number of
steps and every batch has the same K, so ZeRO-3's collectives stay in step. A checkpoint stores the
stage and step, so resuming continues with exactly the batches that would have come next.

Safety (``sdpo_fast.checkpoint``, ``outputs``, ``stopping``, ``errors``): checkpoints are written
atomically and record the settings a resumed run must share (refused otherwise, naming the flag);
a non-empty ``--output_dir`` needs ``--overwrite_output_dir`` or ``--resume_from_checkpoint``;
SIGINT/SIGTERM finish the step, write a checkpoint and exit with 128 + the signal number; a
non-finite loss or gradient norm stops the run before the step is applied; user errors are one line
of stderr with exit status 2.
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

from . import checkpoint, fingerprint
from .config import eval_protocols, parse_args
from .buckets import padded_reference
from .errors import UserError, cli
from .model import candidate_logprobs, candidate_sdpo_loss, enable_activation_checkpointing, unwrap_causal_lm
from .outputs import MetricsLog, prepare_output_dir, write_json_atomic
from .runtime import (
    NonFiniteError, Runtime, Schedule, all_gather_objects, all_gather_rows, all_mean_tensor, barrier, cpu_threads,
    rank, seed_everything, world_size,
)
from .stopping import GracefulStop, Stopped, ignore_in_worker


# ---------------------------------------------------------------------------------------------- setup


def _init_distributed(train_args) -> torch.device:
    if train_args.deepspeed is not None:
        import deepspeed

        deepspeed.init_distributed()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("several processes need --deepspeed configs/zero3.json (or zero2.json)")
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
        if rank() == 0:
            _cached_tokenizer(tok_dir, splits, model_args.tokenizer_vocab, build_tokenizer)
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
            raise UserError(
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
        from .adapters import lora_model

        model = lora_model(model, cfg)  # adapters in the base dtype (bf16 base: bf16 adapters)
    if model_args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return tokenizer, model


TOKENIZER_FINGERPRINT = "sdpo_fast_fingerprint.json"


def _cached_tokenizer(tok_dir, splits, vocab_size, build_tokenizer) -> None:
    """The tiny model's tokenizer in ``tok_dir``, trained again when the data or vocabulary size it
    was trained for differ from this run's (said in one line)."""
    key = {"data": fingerprint.examples(ex for _, split in splits.items() for ex in split), "vocab_size": vocab_size}
    marker = os.path.join(tok_dir, TOKENIZER_FINGERPRINT)
    if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
        try:
            with open(marker) as f:
                stored = json.load(f)
        except (OSError, ValueError):
            stored = {}
        differ = fingerprint.mismatch(stored, key)
        if not differ:
            return
        print(f"tokenizer cache {tok_dir} was trained for another {' and '.join(differ)}: training it again", flush=True)
    build_tokenizer(splits, vocab_size=vocab_size, save_dir=tok_dir)
    write_json_atomic(marker, key)


# ---------------------------------------------------------------------------------------------- stages


def epoch_order(n: int, seed: int, stage: str, epoch: int) -> np.ndarray:
    """The deterministic permutation of ``n`` training examples for ``(stage, epoch)``."""
    salt = {"sft": 1, "sdpo": 2}[stage]
    return np.random.default_rng([seed, salt, epoch]).permutation(n)


def reference_logps(runtime, tokenizer, features, train_args, cache_path, key: dict):
    """``[N, C]`` reference log-probs of every candidate of every training example (one pass).

    Cached in ``cache_path`` with ``key`` (fingerprints of the reference weights, the tokenized
    data and the dtype); a cache with another key is recomputed, saying which part differs.
    """
    from .eval import score_candidates

    if os.path.isfile(cache_path):
        try:
            cached = torch.load(cache_path, weights_only=True)
            differ = fingerprint.mismatch(cached.get("key", {}), key)
        except Exception as exc:  # noqa: BLE001  (a damaged cache file is recomputed)
            cached, differ = None, [f"(unreadable: {type(exc).__name__})"]
        if not differ:
            return cached["logps"]
        if rank() == 0:
            print(f"reference log-probs cache {cache_path} was computed for another {' and '.join(differ)}: "
                  "recomputing", flush=True)
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
        import io

        buf = io.BytesIO()
        torch.save({"key": key, "n": n, "logps": logps}, buf)
        checkpoint.write_bytes_atomic(cache_path, buf.getvalue())
    barrier()
    return logps


class StepBatches(torch.utils.data.Dataset):
    """Item ``step`` of a stage: that step's collated batch for this rank, with its reference log-probs
    gathered on the host. A ``torch.utils.data.DataLoader`` (``batch_size=None``) runs it in worker
    processes; the batches are those of ``epoch_order`` whatever the number of workers, so a resumed
    run continues with exactly the batches that would have come next.

    Item: ``(SDPOBatch, ref)`` with ``ref`` ``[G, C]`` float32 (zeros where ``candidate_mask`` is
    False) or None when there is no precomputed reference.
    """

    def __init__(self, collator, train_ds, *, batch_size, world_size, rank, seed, stage, ref_all=None):
        self.collator, self.train_ds, self.ref_all = collator, train_ds, ref_all
        self.B, self.W, self.r, self.seed, self.stage = batch_size, world_size, rank, seed, stage
        self.n = len(train_ds)
        self.per_epoch = self.n // (batch_size * world_size)

    def indices(self, step: int) -> tuple[int, list[int]]:
        """``(epoch, example rows)`` of this rank's slice of global batch ``step``."""
        epoch, pos = divmod(step, self.per_epoch)
        order = epoch_order(self.n, self.seed, self.stage, epoch)
        B, W, r = self.B, self.W, self.r
        return epoch, order[(pos * W + r) * B : (pos * W + r + 1) * B].tolist()

    def __getitem__(self, step: int):
        epoch, idx = self.indices(step)
        self.collator.set_epoch(epoch)
        batch = self.collator([self.train_ds[i] for i in idx])
        ref = None
        if self.ref_all is not None:
            cols = batch.candidate_index.clamp(min=0)
            real = batch.packed.candidate_mask[: batch.packed.num_real_groups]
            ref = padded_reference(self.ref_all[batch.idx].gather(1, cols).masked_fill(~real, 0.0), batch.packed)
        return batch, ref  # the DataLoader pins both: a tensor, and SDPOBatch.pin_memory


def _as_is(item):
    return item


def step_loader(dataset: StepBatches, start_step: int, total: int, num_workers: int, device) -> torch.utils.data.DataLoader:
    """Batches of steps ``start_step .. total - 1`` in order, collated in ``num_workers`` processes
    (0: on this thread), pinned on CUDA so the copies to the device are asynchronous."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_step, total), num_workers=num_workers,
        collate_fn=_as_is, pin_memory=device.type == "cuda", prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(0),  # the loader's seed draw leaves the global RNG alone
        worker_init_fn=ignore_in_worker,
    )


def dataloader_workers(train_args, data_args, sdpo: bool, device) -> int:
    """``--dataloader_num_workers`` (default: 2 on CUDA, 0 on CPU, where a worker would take a core
    from the compute threads); 0 for hard and boundary negatives, which score with the policy on this
    thread."""
    if sdpo and data_args.negatives in ("hard", "boundary"):
        return 0
    n = getattr(train_args, "dataloader_num_workers", None)
    return (2 if device.type == "cuda" else 0) if n is None else n


def _read_logged(sums: torch.Tensor, count: int, keys: list[str]) -> dict[str, float]:
    """The device-side metric sums ``[len(keys)]`` of a logging interval, averaged over its steps and
    ranks: the one host read of a logging step (tests spy on it as the logging seam)."""
    return dict(zip(keys, (all_mean_tensor(sums) / count).tolist()))


def run_stage(stage, runtime, tokenizer, train_ds, data_args, train_args, log, start_step=0, on_save=None,
              ref_all=None, stop=None):
    """Train one stage; returns the number of steps it ran in total.

    ``ref_all``: ``[N, C]`` precomputed reference log-probs on the host (S-DPO with ``--reference precompute``;
    DataLoader workers gather from it).
    ``stop``: a ``GracefulStop``; when it reports a signal after a step, that step's checkpoint is
    written (``on_save``) and ``Stopped`` raised.

    Host syncs: one per optimizer step (the loss and gradient norm, read together, which also stops
    the run at a non-finite value before the step is applied; under DeepSpeed the ranks' stop signal
    rides on the same all-reduce) plus one per logging step (the metrics, summed on the device over
    the interval). The batch arrives pinned and is copied asynchronously.
    """
    from .adapters import AdapterSwitch
    from .data import SDPOCollator

    sdpo = stage == "sdpo"
    lm_config = runtime.module.config
    graphed = bool(getattr(train_args, "cuda_graphs", False))  # off CUDA (tests): bucketed, run eagerly
    collator = SDPOCollator(
        tokenizer,
        num_negatives=data_args.num_negatives if sdpo else 0,
        negatives=data_args.negatives if sdpo else "random",
        seed=data_args.data_seed,
        vocab_size=lm_config.vocab_size,
        max_positions=getattr(lm_config, "max_position_embeddings", None),
        backend=train_args.backend,
        bucketed=graphed,
    )
    if sdpo and data_args.negatives in ("hard", "boundary"):
        collator.set_policy(runtime.model)
    B, W, r = train_args.batch_size, world_size(), rank()
    n = len(train_ds)
    per_epoch = n // (B * W)
    if per_epoch == 0:
        raise UserError(f"{n} training examples cannot fill one global batch of {B * W} groups")
    epochs = train_args.sdpo_epochs if sdpo else train_args.sft_epochs
    total = max(1, math.ceil(epochs * per_epoch))
    if train_args.max_steps is not None:
        total = min(total, train_args.max_steps)
    lr = train_args.sdpo_learning_rate if sdpo else train_args.sft_learning_rate
    schedule = Schedule(lr, total, train_args.warmup_ratio)

    if sdpo and train_args.reference == "precompute" and ref_all is None:
        raise ValueError("run_stage: S-DPO with a precomputed reference needs ref_all")
    live = sdpo and ref_all is None
    switch = AdapterSwitch(runtime.module) if live else None
    device = runtime.device
    dataset = StepBatches(collator, train_ds, batch_size=B, world_size=W, rank=r, seed=train_args.seed, stage=stage,
                          ref_all=ref_all.float() if (sdpo and ref_all is not None) else None)
    loader = step_loader(dataset, start_step, total, dataloader_workers(train_args, data_args, sdpo, device), device)
    keys = ["loss", "reward_accuracy", "reward_margin", "chosen_logp"] if sdpo else ["loss", "chosen_logp"]
    sums, count, tokens, t_log = None, 0, 0, time.perf_counter()
    beta, sft_weight = (train_args.beta, train_args.sft_weight) if sdpo else (1.0, 1.0)
    options = train_args.backend_options or {}

    def forward(packed, ref):
        """The step's loss and its logged values ``[len(keys)]`` (the live reference computed here)."""
        if ref is None:
            with torch.no_grad(), switch.off():
                ref = candidate_logprobs(runtime.model, packed, backend=train_args.backend,
                                         options=options.get("logprobs"),
                                         check_ids=False)  # the collator's pack_groups checked them
        loss, metrics = candidate_sdpo_loss(
            runtime.model, packed, ref, beta=beta, sft_weight=sft_weight, backend=train_args.backend,
            options=options.get("sdpo_loss"), loss_type=train_args.loss_type if sdpo else "sdpo",
        )
        with torch.no_grad():
            parts = [loss.detach()]
            if sdpo:
                parts += [metrics["accuracy"].nanmean(), metrics["reward_margins"].nanmean()]
            parts.append(metrics["logps"][:, 0].mean())
            now = torch.stack([p.float() for p in parts])
        return loss, now

    graphs = None
    if graphed:
        from .graphs import StepGraphs

        def graphed_step(packed, ref):
            loss, now = forward(packed, None if live else ref)
            loss.backward()
            return loss.detach(), now

        graphs = StepGraphs(graphed_step, runtime.module.parameters(), capture=device.type == "cuda",
                            max_graphs=train_args.cuda_graph_buckets)
        window = getattr(lm_config, "sliding_window", None) if getattr(lm_config, "use_sliding_window", True) else None
    runtime.train()
    bar = tqdm(total=total, initial=start_step, desc=stage, disable=r != 0, dynamic_ncols=True)
    try:
        for step, (batch, ref) in zip(range(start_step, total), loader):
            epoch = step // per_epoch
            batch = batch.to(device, non_blocking=True)
            packed = batch.packed
            if not sdpo:
                ref = torch.zeros(packed.candidate_mask.shape, device=device)
            elif ref is not None:
                ref = ref.to(device, non_blocking=True)
            lr_now = schedule(step)
            where = f"{stage} step {step + 1}"
            pending = (stop.signum or 0) if stop is not None else None
            try:
                if graphs is not None:
                    if window is not None and packed.max_span > window:  # a replay skips the packed call's check
                        raise NotImplementedError(f"a group spans {packed.max_span} positions, beyond the model's "
                                                  f"sliding window of {window}")
                    loss, now = graphs(packed, ref if ref is not None else torch.zeros(packed.candidate_mask.shape,
                                                                                         device=device))
                    stepped = runtime.backward_and_step(loss, lr_now, watch_loss=True, grads_ready=True,
                                                     stop_signal=pending)
                else:
                    loss, now = forward(packed, ref)
                    stepped = runtime.backward_and_step(loss, lr_now, watch_loss=True, stop_signal=pending)
            except NonFiniteError as exc:  # every rank stops together: the loss flag was all-reduced
                raise NonFiniteError(f"the {exc} at {where}") from None
            grad_norm = stepped.grad_norm
            if not math.isfinite(grad_norm):  # the DeepSpeed engine has stepped already
                raise NonFiniteError(f"the gradient norm is {grad_norm} at {where}")
            sums = now.clone() if sums is None else sums + now  # a replayed graph's `now` is overwritten next step
            count += 1
            tokens += packed.num_tokens * W
            if (step + 1) % train_args.log_every == 0 or step + 1 == total:
                values = _read_logged(sums, count, keys)
                dt = time.perf_counter() - t_log
                tokens_per_s = tokens / dt
                record = {"stage": stage, "step": step + 1, "epoch": epoch, "lr": lr_now, "grad_norm": grad_norm,
                          "tokens_per_s": tokens_per_s, **values}
                log.write(record, step=step + 1)
                shown = {"loss": f"{values['loss']:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
                if sdpo:
                    shown["acc"] = f"{values['reward_accuracy']:.2f}"
                bar.set_postfix(shown, refresh=False)
                sums, count, tokens, t_log = None, 0, 0, time.perf_counter()
            bar.update(1)
            signum = stop.requested(agreed=stepped.stop_signal) if stop is not None else None
            periodic = train_args.save_steps and (step + 1) % train_args.save_steps == 0 and step + 1 < total
            if on_save is not None and (periodic or signum):
                path = on_save(stage, step + 1)
                if signum:
                    raise Stopped(signum, path, where)
    finally:
        bar.close()  # an error line then starts on a line of its own
    return total


# ---------------------------------------------------------------------------------------------- eval


def _my_shard(n: int) -> list[int]:
    """This rank's indices of ``n`` examples: equal, contiguous shards (the last padded with repeats of
    the last example), since under ZeRO-3 every rank must run the same forwards."""
    per = math.ceil(n / world_size())
    return [min(i, n - 1) for i in range(rank() * per, (rank() + 1) * per)]


def evaluate(runtime, tokenizer, features, train_args, name, full_catalog=None):
    """The ``--eval`` protocols on ``features``, each rank scoring its shard (``_my_shard``); every rank
    returns the metrics of all of them. ``full_catalog``: ``full_catalog_inputs``'s dict (``--eval
    full_catalog``)."""
    from .eval import Sharding, evaluate_features, evaluate_full_catalog

    protocols = eval_protocols(train_args.eval)
    device = runtime.device
    sharding = Sharding(
        indices=_my_shard,
        gather_rows=lambda t, n: all_gather_rows(t.to(device), n).cpu(),
        gather_objects=all_gather_objects,
        progress=rank() == 0,
    )
    result = evaluate_features(
        runtime.model, tokenizer, features, ranking="ranking" in protocols, generation="generation" in protocols,
        constrained="constrained" in protocols, num_beams=train_args.constrained_num_beams,
        batch_size=train_args.batch_size, backend=train_args.backend, sharding=sharding, generation_model=runtime.module,
        generate_kwargs={"synced_gpus": True} if runtime.stage3 else None,
    )
    if "full_catalog" in protocols:
        result.update(evaluate_full_catalog(
            runtime.model, tokenizer, full_catalog["examples"], full_catalog["catalog"], exclude=full_catalog["exclude"],
            prompt=train_args.full_catalog_prompt, max_chunk_tokens=train_args.full_catalog_chunk_tokens,
            backend=train_args.backend, sharding=sharding, **full_catalog["tokenize_kwargs"],
        ))
    if rank() == 0 and result:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        print(f"[eval] {name}: {shown}", flush=True)
    return result


def full_catalog_inputs(splits, eval_examples, train_args, data_args) -> dict:
    """What ``--eval full_catalog`` ranks: ``--full_catalog_users`` of the evaluated examples (a seeded
    subset spread over users, ``--data_seed``), the catalog (every title of the dataset) and, per
    example, the titles left out: every earlier interaction of the user when the splits were built
    from interaction sequences (``titles_before``), else the example's history."""
    from .data import sample_over_users
    from .eval import titles_before

    subset = sample_over_users(eval_examples, train_args.full_catalog_users, seed=data_args.data_seed)
    past = titles_before(splits) if "max_history" in splits.info else {}
    return {
        "examples": subset,
        "catalog": splits.all_titles(),
        "exclude": [past.get(ex.example_id, frozenset(ex.history)) for ex in subset],
        "tokenize_kwargs": dict(max_prompt_tokens=data_args.max_prompt_tokens, seed=data_args.data_seed),
    }


# ---------------------------------------------------------------------------------------------- main

STAGE_INDEX = {"sft": 0, "sdpo": 1}
def _usable_eval_examples(examples):
    """Test examples with at least two candidates (ranking one candidate measures nothing); the
    others are left out, said once."""
    kept = [ex for ex in examples if len(ex.candidates) >= 2]
    if len(kept) < len(examples) and rank() == 0:
        print(f"evaluation leaves out {len(examples) - len(kept)} test example(s) with fewer than 2 candidates",
              flush=True)
    if not kept:
        raise UserError("no test example has 2 or more candidates: nothing to evaluate (or give --eval none)")
    return kept


def _tokenize(examples, tokenizer, cache_dir, desc, max_positions, **kwargs):
    from .data import tokenize_dataset

    try:
        return tokenize_dataset(examples, tokenizer, cache_dir=cache_dir, desc=desc, max_positions=max_positions, **kwargs)
    except ValueError as exc:  # a data problem named by example (too long for the model, untokenizable)
        raise UserError(f"{desc}: {exc}") from None


def main(argv=None) -> int:
    """``train.py``: user errors are one line of stderr with exit status 2 (``sdpo_fast.errors.cli``)."""
    threads = torch.get_num_threads()
    try:
        return cli(_main, argv)
    finally:
        torch.set_num_threads(threads)  # --cpu_threads (or its default) holds for the run only


def _check_cuda_graphs(train_args, device) -> None:
    if train_args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda_graphs needs a CUDA device, got {device.type}")


def _main(argv=None) -> int:
    model_args, data_args, train_args = parse_args(argv)
    device = _init_distributed(train_args)
    _check_cuda_graphs(train_args, device)
    bf16 = train_args.bf16 if train_args.bf16 is not None else device.type == "cuda"
    seed_everything(train_args.seed)
    out = train_args.output_dir
    if rank() == 0:
        prepare_output_dir(out, resume=train_args.resume_from_checkpoint, overwrite=train_args.overwrite_output_dir)
    barrier()
    resume_path = checkpoint.resolve(train_args.resume_from_checkpoint, out)
    resume_meta = checkpoint.read_manifest(resume_path)["meta"] if resume_path else None
    from .data import sample_over_users
    from .eval import format_table

    splits = load_data(data_args)
    if not splits.train and train_args.stage != "eval":
        raise UserError(f"--dataset {data_args.dataset}: no training examples (only --stage eval works without them)")
    fewest = min((len(ex.candidates) for ex in splits.train), default=0) - 1
    if train_args.stage not in ("sft", "eval") and data_args.num_negatives > fewest:
        raise UserError(
            f"--num_negatives {data_args.num_negatives} is above the {fewest} non-target candidates some "
            "training users have"
        )
    tokenizer, model = build_model(model_args, splits, out, bf16)
    if device.type == "cpu":
        hidden = getattr(unwrap_causal_lm(model).config, "hidden_size", None)
        threads = cpu_threads(train_args.cpu_threads, hidden, torch.get_num_threads())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            if rank() == 0:
                print(f"CPU: {threads} intra-op thread{'s' if threads > 1 else ''}"
                      + ("" if train_args.cpu_threads else f" (hidden size {hidden}; --cpu_threads sets the count)"))
    cache_dir = data_args.cache_dir or os.path.join(out, "cache")
    train_examples = sample_over_users(splits.train, data_args.max_train_examples, seed=data_args.data_seed)
    eval_examples = sample_over_users(splits.test, data_args.max_eval_examples, seed=data_args.data_seed)
    if train_args.eval != "none":
        eval_examples = _usable_eval_examples(eval_examples)
    max_positions = getattr(unwrap_causal_lm(model).config, "max_position_embeddings", None)
    tok_kwargs = dict(max_prompt_tokens=data_args.max_prompt_tokens, seed=data_args.data_seed)
    train_ds = _tokenize(train_examples, tokenizer, cache_dir, "tokenizing train", max_positions, **tok_kwargs)
    eval_features = []
    if train_args.eval != "none":
        eval_ds = _tokenize(eval_examples, tokenizer, cache_dir, "tokenizing test", max_positions, **tok_kwargs)
        eval_features = [dict(eval_ds[i], candidates=list(eval_examples[i].candidates)) for i in range(len(eval_ds))]
    full_catalog = None
    if "full_catalog" in eval_protocols(train_args.eval):
        full_catalog = full_catalog_inputs(splits, eval_examples, train_args, data_args)

    signature = checkpoint.run_signature(model_args, data_args, train_args, bf16=bf16, world_size=world_size(),
                                         train_ds=train_ds, base_weights=fingerprint.model_weights(model))
    if resume_meta is not None:
        differ = checkpoint.resume_mismatches(resume_meta.get("run", {}), signature)
        if differ:
            raise UserError(f"--resume_from_checkpoint {resume_path} was written by a run with other settings: "
                            + "; ".join(differ) + " (resume with the same flags, or start a new run)")

    runtime = Runtime(model, deepspeed_config=train_args.deepspeed, batch_size=train_args.batch_size,
                      max_grad_norm=train_args.max_grad_norm, weight_decay=train_args.weight_decay, bf16=bf16,
                      device=device, weight_update=train_args.weight_update, seed=train_args.seed)
    stages = {"sft": ["sft"], "sdpo": ["sdpo"], "dpo": ["sdpo"], "all": ["sft", "sdpo"], "eval": []}[train_args.stage]
    results, done, resume_step, resume_stage, rows, ref_state = {}, [], 0, None, [], {}
    if resume_path is not None:
        state, _ = runtime.load_checkpoint(resume_path)
        results, done = state["results"], state["done"]
        resume_stage, resume_step = state["stage"], state["step"]
        rows, ref_state = state.get("metrics", []), state.get("reference", {})
        if "logps" in ref_state:  # DeepSpeed may map a checkpoint to the GPU; the DataLoader workers read it
            ref_state["logps"] = ref_state["logps"].to("cpu")
        if rank() == 0:
            print(f"resumed {resume_stage} at step {resume_step} from {resume_path}")
    if rank() == 0:
        write_json_atomic(os.path.join(out, "args.json"),
                          {"model": vars(model_args), "data": vars(data_args), "train": vars(train_args)})
    log = MetricsLog(out, rows=rows, active=rank() == 0)
    last_saved = [resume_path]

    def save(stage, step):
        path = os.path.join(out, f"checkpoint-{stage}-{step}")
        steps_done = step if step != "end" else 1 << 62
        client = {"stage": stage, "step": step, "results": results, "done": done, "metrics": log.rows,
                  "reference": ref_state}
        meta = {"progress": [STAGE_INDEX[stage], steps_done], "stage": stage, "step": step, "run": signature}
        runtime.save_checkpoint(path, client, meta)
        last_saved[0] = path
        return path

    try:
        with GracefulStop() as stop:
            if train_args.eval != "none" and train_args.eval_untrained and "untrained" not in results:
                results["untrained"] = evaluate(runtime, tokenizer, eval_features, train_args, "untrained", full_catalog)
            for stage in stages:
                if stage in done:
                    continue
                start = resume_step if stage == resume_stage else 0
                if start == 0:
                    runtime.reset_optimizer_state()
                ref_all = None
                if stage == "sdpo" and train_args.reference == "precompute":
                    if start == 0:  # at the start of S-DPO its model is the reference; a resumed run has its copy
                        key = {"reference model weights": fingerprint.model_weights(runtime.module, runtime.stage3),
                               "tokenized training data": signature["tokenized training data"]}
                        ref_all = reference_logps(runtime, tokenizer, train_ds, train_args,
                                                  os.path.join(out, "reference_logps.pt"), key)
                        ref_state = {"key": key, "logps": ref_all}
                    ref_all = ref_state["logps"]
                run_stage(stage, runtime, tokenizer, train_ds, data_args, train_args, log, start_step=start,
                          on_save=save, ref_all=ref_all, stop=stop)
                done.append(stage)
                name = "S-DPO" if stage == "sdpo" and train_args.stage != "dpo" else ("DPO" if stage == "sdpo" else "SFT")
                if train_args.eval != "none":
                    results[name] = evaluate(runtime, tokenizer, eval_features, train_args, name, full_catalog)
                path = save(stage, "end")
                signum = stop.requested()
                if signum and stage != stages[-1]:
                    raise Stopped(signum, path, f"the end of {stage}")
    except Stopped as exc:
        if rank() == 0:
            print(f"{exc}: checkpoint {exc.checkpoint} written; resume with the same flags and "
                  f"--resume_from_checkpoint {exc.checkpoint} (or latest)", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except NonFiniteError as exc:
        kept = f"the last good checkpoint is {last_saved[0]}" if last_saved[0] else "no checkpoint was written yet"
        raise UserError(f"training stopped: {exc} (the step was not saved; {kept}); lower the learning rate or "
                        "check the data") from None

    # LoRA adapters need their base on disk: the tiny default and a GGUF base exist in no HF folder.
    final = os.path.join(out, "final")
    base_elsewhere = model_args.model_name_or_path is None or model_args.gguf_file is not None
    base = os.path.join(out, "final-base") if (model_args.lora and base_elsewhere) else None
    _export_atomic(runtime, tokenizer, final, base)
    if rank() == 0:
        write_json_atomic(os.path.join(out, "results.json"), results)
        if results:
            print("\n" + format_table(results))
        print(f"\nexported to {final}" + (f" (base model: {base})" if base else ""))
    barrier()
    return 0


def _export_atomic(runtime, tokenizer, final, base):
    """``runtime.export`` into temporary folders, renamed over ``final`` (and ``base``) when complete."""
    import shutil

    tmp_final = os.path.join(os.path.dirname(final), ".tmp-final")
    tmp_base = os.path.join(os.path.dirname(final), ".tmp-final-base") if base else None
    if rank() == 0:
        for t in (tmp_final, tmp_base):
            if t:
                shutil.rmtree(t, ignore_errors=True)
    barrier()
    try:
        runtime.export(tmp_final, tokenizer, base_path=tmp_base)
    except OSError:
        if rank() == 0:
            for t in (tmp_final, tmp_base):
                if t:
                    shutil.rmtree(t, ignore_errors=True)
        raise
    if rank() == 0:
        for tmp, dst in ((tmp_final, final), (tmp_base, base)):
            if tmp:
                shutil.rmtree(dst, ignore_errors=True)
                os.replace(tmp, dst)
    barrier()


if __name__ == "__main__":
    sys.exit(main())
