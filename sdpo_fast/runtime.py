"""The training runtime: one process or a DeepSpeed engine behind the same few calls.

``Runtime`` owns the model (wrapped in a DeepSpeed engine when ``--deepspeed`` is given), the
optimizer, the learning-rate schedule, checkpoints and the final export, so the training loop in
``sdpo_fast.train`` reads the same with and without DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from . import checkpoint
from .errors import UserError
from .model import unwrap_causal_lm
from .optim import make_optimizer


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def _all_reduced(t: torch.Tensor, op) -> torch.Tensor:
    """``t`` reduced over ranks with ``op`` into a new tensor on its device (no host sync on CUDA)."""
    t = t.clone()
    torch.distributed.all_reduce(t, op=op)
    return t


def all_mean_tensor(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, on its device (identity in one process; no host sync on CUDA)."""
    return _all_reduced(t, torch.distributed.ReduceOp.SUM) / world_size() if is_distributed() else t


def all_max_tensor(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum of ``t`` over ranks, on its device (identity in one process)."""
    return _all_reduced(t, torch.distributed.ReduceOp.MAX) if is_distributed() else t


def all_gather_rows(t: torch.Tensor, n_total: int) -> torch.Tensor:
    """Concatenate rank-major shards of equal size ``[n, ...]`` and keep the first ``n_total`` rows."""
    if not is_distributed():
        return t[:n_total]
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)[:n_total]


def all_gather_objects(items: list) -> list:
    """Concatenate every rank's list, rank-major (picklable items)."""
    if not is_distributed():
        return list(items)
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():
    if is_distributed():
        torch.distributed.barrier()


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


SMALL_HIDDEN = 256  # below it one thread trains faster on a quiet CPU, and as fast beside a competitor


def cpu_threads(requested: int | None, hidden_size: int | None, default: int) -> int:
    """Intra-op threads for training on the CPU: ``requested`` (``--cpu_threads``) when given, else 1 for
    a model whose hidden size is below ``SMALL_HIDDEN``, else ``default`` (torch's count).

    Why: with passive OpenMP waits (``train.py``), every parallel region wakes its sleeping threads,
    tens of microseconds each, and a small model's forward and backward run hundreds of regions per
    step that each hold less work than that; spinning instead of sleeping wins on a quiet machine and
    loses several-fold beside another busy process (``benchmarks/results/cpu_threads.md``)."""
    if requested is not None:
        return requested
    if hidden_size is not None and hidden_size < SMALL_HIDDEN:
        return 1
    return default


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class Schedule:
    """Linear warm-up then linear decay to 0 over ``total`` steps, peaking at ``peak``."""

    peak: float
    total: int
    warmup_ratio: float

    def __call__(self, step: int) -> float:
        warmup = max(1, int(round(self.total * self.warmup_ratio)))
        if step < warmup:
            return self.peak * (step + 1) / warmup
        return self.peak * max(0.0, (self.total - step) / max(1, self.total - warmup))


class NonFiniteError(ArithmeticError):
    """A non-finite loss or gradient norm; the step was not applied."""


class StepResult(NamedTuple):
    """What ``Runtime.backward_and_step`` read from the device for one optimizer step."""

    loss: float  # nan under DeepSpeed unless watch_loss or stop_signal asked for the read
    grad_norm: float
    stop_signal: int | None  # the largest signal number any rank had received; None or 0: none


def _fused_adamw_ok(params, device) -> bool:
    """``AdamW(fused=True)``: one kernel per step instead of a loop over the parameters, when every
    parameter is a floating tensor on ``device``, a CUDA device or the CPU (torch's fused AdamW has
    both; on the CPU the loop also reads each step counter back, ``benchmarks/results/bench_optim_cpu.md``)."""
    return (device.type in ("cuda", "cpu") and bool(params)
            and all(p.device.type == device.type and p.is_floating_point() for p in params))


def _clip_fp32(params, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` with the norm accumulated and returned in fp32 whatever the gradients'
    dtype (``clip_grad_norm_`` returns a bf16 norm for bf16 gradients: 3 significant digits in the
    log and the non-finite check); the same result as it for fp32 gradients."""
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)  # one device: this one-process runtime
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


class Runtime:
    """Model + optimizer, plain PyTorch or DeepSpeed.

    Args:
        model: the HF model (PEFT-wrapped for LoRA).
        deepspeed_config: path to a DeepSpeed JSON (its "auto" fields are filled here) or None.
        batch_size: groups per rank per step (DeepSpeed's micro batch).
        max_grad_norm, weight_decay, bf16: optimizer settings.
        weight_update, seed: without DeepSpeed, ``sdpo_fast.optim.make_optimizer``'s choice (fp32
            masters or stochastic rounding) and the rounding's seed.
    """

    def __init__(self, model, *, deepspeed_config, batch_size, max_grad_norm, weight_decay, bf16, device,
                 weight_update: str = "fp32_masters", seed: int = 0):
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.engine = None
        if deepspeed_config is not None:
            import deepspeed

            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=weight_decay)
            with open(deepspeed_config) as f:
                cfg = json.load(f)
            cfg["train_micro_batch_size_per_gpu"] = batch_size
            cfg["gradient_accumulation_steps"] = 1
            cfg["train_batch_size"] = batch_size * world_size()
            cfg["gradient_clipping"] = max_grad_norm
            cfg.setdefault("bf16", {})["enabled"] = bool(bf16)
            cfg.pop("fp16", None)
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
            self.model = self.engine
        else:
            self.model = model.to(device)
            params = [p for p in model.parameters() if p.requires_grad]
            # fp32 masters of half-precision weights (bf16 LoRA adapters, bf16 full fine-tuning), or
            # none: stochastic rounding into the bf16 weights
            self.optimizer = make_optimizer(params, weight_update, weight_decay=weight_decay,
                                            fused=_fused_adamw_ok(params, device), seed=seed)
        self.stage3 = self.engine is not None and self.engine.zero_optimization_stage() == 3

    @property
    def module(self):
        """The HF model (PEFT wrapper included), without the engine."""
        return self.engine.module if self.engine is not None else self.model

    def train(self, mode: bool = True):
        self.model.train(mode)

    def backward_and_step(self, loss: torch.Tensor, lr: float, watch_loss: bool = False,
                          grads_ready: bool = False, stop_signal: int | None = None) -> "StepResult":
        """Backward, clip, optimizer step at learning rate ``lr``; returns the loss and gradient norm as
        floats, read from the device in ONE host transfer (the step's only sync outside logging).
        ``grads_ready``: the ``.grad`` tensors hold the step's gradients already (a replayed CUDA graph
        ran the backward; not with a DeepSpeed engine), so no backward runs here.

        ``watch_loss``: a non-finite loss (on any rank) raises ``NonFiniteError("loss is ...")``
        before the step is applied. In one process a non-finite gradient norm skips the optimizer step
        too (the weights stay those of the last good step) and raises ``NonFiniteError``; the DeepSpeed
        engine steps first, so the caller checks the returned norm there.

        ``stop_signal``: the signal this rank has received (``GracefulStop.signum or 0``; every rank
        passes an int, or every rank None). Under DeepSpeed it rides on the loss flag's all-reduce (a
        maximum over ranks) and comes back as ``StepResult.stop_signal``, so a graceful stop costs no
        collective or read of its own; in one process it is returned as given.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        value = loss.detach().float().reshape(())
        if grads_ready and self.engine is not None:
            raise ValueError("backward_and_step: grads_ready is for one process without DeepSpeed")
        if self.engine is not None:
            self.engine.backward(loss)
            loss_value = float("nan")
            if watch_loss or stop_signal is not None:  # every rank learns both before the engine steps
                flags = torch.stack([(~torch.isfinite(value)).to(torch.float32),
                                     torch.full((), float(stop_signal or 0), device=value.device)])
                loss_value, bad, signum = torch.cat([value.reshape(1), all_max_tensor(flags)]).tolist()
                if watch_loss and bad > 0:
                    raise NonFiniteError(f"loss is {loss_value if not np.isfinite(loss_value) else 'non-finite on another rank'}")
                stop_signal = int(signum) or None
            self.engine.step()
            norm = self.engine.get_global_grad_norm()
            norm = float("nan") if norm is None else (norm if isinstance(norm, float) else float(norm))
            return StepResult(loss_value, norm, stop_signal)
        if not grads_ready:
            loss.backward()
        norm_t = _clip_fp32(self.optimizer.master_grads(), self.max_grad_norm)
        loss_value, norm = torch.stack([value, norm_t.detach().float().reshape(())]).tolist()
        if watch_loss and not np.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"loss is {loss_value}")
        if not np.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"gradient norm {norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm, stop_signal)

    def reset_optimizer_state(self) -> None:
        """Fresh Adam moments for a new stage (as if S-DPO were a new run from the SFT weights)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        inner.state.clear()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path: str, client_state: dict, meta: dict) -> None:
        """Model, optimizer, RNG and ``client_state`` (data position, stage, step, ...) under ``path``,
        written atomically (``sdpo_fast.checkpoint``); ``meta`` goes into the manifest. A failed write
        (a full disk) leaves no folder at ``path`` and raises ``UserError``."""
        client_state = dict(client_state, rng=rng_state())
        if self.engine is None:
            if rank() == 0:
                checkpoint.write_folder(path, lambda tmp: self._save_state(tmp, client_state), meta)
            barrier()
            return
        tmp = checkpoint.start_folder(path) if rank() == 0 else None
        barrier()
        tmp = all_gather_objects([tmp])[0]
        try:
            self.engine.save_checkpoint(tmp, tag="state", client_state=client_state)
            barrier()
            if rank() == 0:
                checkpoint.finish_folder(tmp, path, meta)
        except (OSError, RuntimeError) as exc:
            if rank() == 0:
                checkpoint.abandon_folder(tmp)
            raise checkpoint.save_error(path, exc) from exc
        barrier()

    def _save_state(self, folder: str, client_state: dict) -> None:
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        state = {"trainable": trainable, "optimizer": self.optimizer.state_dict(), "client_state": client_state}
        with open(os.path.join(folder, "state.pt"), "wb") as f:
            torch.save(state, f)

    def load_checkpoint(self, path: str) -> tuple[dict, dict]:
        """``(client_state, meta)`` of the complete checkpoint at ``path``, after loading the model,
        optimizer and RNG state from it; ``UserError`` naming the file when it is partial or corrupt
        or was written for another model."""
        meta = checkpoint.read_manifest(path)["meta"]
        if self.engine is not None:
            try:
                _, client_state = self.engine.load_checkpoint(path, tag="state")
            except Exception as exc:  # noqa: BLE001  (shape mismatches, damaged shards)
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise UserError(f"checkpoint {path} cannot be loaded into this model ({type(exc).__name__}: {first})")
            if client_state is None:
                raise UserError(f"checkpoint {path} holds no training state (DeepSpeed found no 'state' tag)")
        else:
            file = os.path.join(path, "state.pt")
            # on the host: the RNG states must be CPU tensors; copy_ and the optimizer move the rest over
            state = checkpoint.load_file(file, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or not {"trainable", "optimizer", "client_state"} <= set(state):
                raise UserError(f"checkpoint file {file} is not a training state saved by sdpo_fast")
            named = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            extra = sorted(set(state["trainable"]) - set(named))
            missing = sorted(set(named) - set(state["trainable"]))
            if extra or missing:
                name = (extra or missing)[0]
                raise UserError(
                    f"checkpoint file {file} was saved from another model: parameter {name} is "
                    f"{'in the checkpoint but not this model' if extra else 'trained here but not in the checkpoint'}"
                )
            for n, t in state["trainable"].items():
                if tuple(t.shape) != tuple(named[n].shape):
                    raise UserError(
                        f"checkpoint file {file} was saved from another model size: {n} has shape {tuple(t.shape)} "
                        f"there, {tuple(named[n].shape)} in this model"
                    )
            with torch.no_grad():
                for n, t in state["trainable"].items():
                    named[n].copy_(t)
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise UserError(f"checkpoint file {file} holds an optimizer state for other parameters ({exc})") from None
            client_state = state["client_state"]
        set_rng_state(client_state.pop("rng"))
        return client_state, meta

    # ------------------------------------------------------------------ export

    def export(self, path: str, tokenizer, base_path: str | None = None) -> None:
        """Write a reloadable model (HF ``save_pretrained``) or LoRA adapter under ``path``.

        Under ZeRO-3 the parameters are gathered first, so the files hold real weights. For a LoRA
        model whose base weights exist nowhere on disk (the tiny default), the base model is written
        to ``base_path`` so ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)``
        works.
        """
        module = self.module
        gathered = _gathered(module) if self.stage3 else contextlib.nullcontext()
        with gathered:
            if rank() == 0:
                os.makedirs(path, exist_ok=True)
                if hasattr(module, "peft_config"):
                    module.save_pretrained(path)
                    if base_path is not None:
                        lm = unwrap_causal_lm(module)
                        with module.disable_adapter():
                            base_state = {
                                k.replace(".base_layer", ""): v
                                for k, v in lm.state_dict().items()
                                if "lora_" not in k
                            }
                        lm.save_pretrained(base_path, state_dict=base_state)
                        tokenizer.save_pretrained(base_path)
                else:
                    module.save_pretrained(path)
                tokenizer.save_pretrained(path)
        barrier()


def _gathered(module):
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
