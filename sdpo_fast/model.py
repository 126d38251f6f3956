"""Candidate log-probs of a HF causal LM through the shared-prefix path."""

from __future__ import annotations

import contextlib

import torch

from . import backends
from .attention import enable_shared_prefix, packed_forward
from .logprobs import sequence_logprobs
from .loss import fused_sdpo_loss
from .packing import PackedBatch

__all__ = ["candidate_logprobs", "candidate_sdpo_loss", "unwrap_causal_lm", "output_weight"]

# Configs whose logits are not a plain ``hidden @ lm_head.weight.T``.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def unwrap_causal_lm(model):
    """The HF ``PreTrainedModel`` inside a PEFT wrapper or a DeepSpeed engine (LoRA layers stay in place)."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DeepSpeed / DDP
            model = model.module
        else:
            return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in the backward (non-reentrant checkpoints), under the
    method's name in the installed transformers (``activation_checkpointing_enable`` from 5.25 on; the
    older ``gradient_checkpointing_enable`` warns there and goes in v6). ``model``: HF or PEFT model."""
    lm = unwrap_causal_lm(model)
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def output_weight(lm) -> torch.Tensor:
    """The ``lm_head`` weight ``[V, D]`` of an unwrapped causal LM, after checking it is a plain linear map."""
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings (lm_head)")
    if not isinstance(head, torch.nn.Linear):
        raise NotImplementedError(
            f"lm_head is a {type(head).__module__}.{type(head).__name__}; the fused log-probs need a plain "
            "nn.Linear (do not put LoRA on lm_head)"
        )
    if head.bias is not None:
        raise NotImplementedError("lm_head with a bias is not supported")
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        if getattr(lm.config, name, None) not in (None, 1.0):
            raise NotImplementedError(f"models with config.{name} (a logit transform) are not supported")
    return head.weight


_NO_MASK: dict = {}


def _no_mask(device: torch.device) -> torch.Tensor:
    """A 4-D ``[0, 1, 1, 1]`` placeholder given as ``attention_mask`` to the packed call.

    transformers returns a 4-D mask as it is, before its packed-sequence detection from the
    restarting ``position_ids``, which reads a device tensor on the host (``bool(tensor)``: one sync
    per forward, and no CUDA-graph capture). The shared-prefix attention never reads the mask; it
    derives the rule from the batch metadata. Cached per device: no allocation per call.
    """
    key = str(device)
    if key not in _NO_MASK:
        _NO_MASK[key] = torch.empty((0, 1, 1, 1), dtype=torch.bool, device=device)
    return _NO_MASK[key]


def _final_hidden(lm, batch: PackedBatch, backend: str) -> torch.Tensor:
    """``[R, L, D]`` final hidden states of the packed batch through shared-prefix attention."""
    enable_shared_prefix(lm)
    with packed_forward():
        out = lm.get_decoder()(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=_no_mask(batch.device),
            use_cache=False,
            sdpo_batch=batch,
            sdpo_attention_backend=_attention_backend_for(backend),
        )
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


@contextlib.contextmanager
def _forward_replaced(module, fn):
    """Within the context, calling ``module`` runs ``fn`` (with the module's hooks) instead of its forward."""
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield module
    finally:
        if previous is None:
            del module.forward
        else:
            module.forward = previous


def _through_lm_head(lm, fn, hidden):
    """Call ``fn(hidden, lm_head.weight)`` as the ``lm_head`` module's forward.

    Reading ``lm_head.weight`` directly under DeepSpeed ZeRO-3 gives an empty shard, and a plain
    ``GatheredParameters`` block drops the gradient when it re-partitions. Running the op as the
    module's own forward lets ZeRO-3's module hooks gather the weight for the forward and again for
    the backward, and reduce-scatter its gradient into the partitioned parameter as for any Linear.
    """
    head = lm.get_output_embeddings()
    with _forward_replaced(head, lambda h: fn(h, head.weight)):
        return head(hidden)


def _is_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def _run(model, lm, fn):
    """``fn()``; for a DeepSpeed engine, run as the engine's forward (``engine()`` -> ... -> ``lm.forward``)
    so ZeRO's per-forward bookkeeping and backward prologue (loss scaling, gradient accumulation) run."""
    if not _is_engine(model):
        return fn()
    with _forward_replaced(lm, lambda *args, **kwargs: fn()):
        return model()


def candidate_logprobs(model, batch: PackedBatch, backend: str = "auto", options: dict | None = None, *,
                       check_ids: bool = True) -> torch.Tensor:
    """Sequence log-probs of every candidate of every group, in one forward over the packed rows.

    Args:
        model: a HF causal LM (Llama, Mistral, Qwen2, GPT-NeoX, ...), optionally PEFT-wrapped or
            inside a DeepSpeed engine (ZeRO-3 included). Its attention implementation is switched
            to ``"sdpo_fast"`` on first use (ordinary calls keep SDPA behaviour).
        batch: from ``pack_groups``, on the model's device.
        backend: ``"auto"``, ``"cublas"``, ``"triton"``, ``"native"`` or ``"torch"`` for the log-prob
            op; attention uses the same backend where one is registered (``"triton"`` for
            ``"cublas"``), else the torch reference.
        options: the log-prob backend's tuning knobs (``sequence_logprobs``'s options), or None.
        check_ids: check the token ids against the vocabulary here (one host sync); False when
            ``pack_groups`` was given ``vocab_size`` and checked them on the host already.

    Returns:
        ``[G, C]`` float32, 0 where ``batch.candidate_mask`` is False; differentiable when grad is on.

    Raises ``ValueError`` when a token id lies outside the model's vocabulary (checked here too, as
    ``pack_groups`` checks only when given ``vocab_size``; one host sync per call, ``check_ids``).
    """
    lm = unwrap_causal_lm(model)
    output_weight(lm)
    if check_ids:
        _check_vocabulary(lm, batch)

    def run():
        hidden = _final_hidden(lm, batch, backend)
        return _through_lm_head(lm, lambda h, w: sequence_logprobs(h, w, batch, backend=backend, **(options or {})),
                                 hidden)

    return _run(model, lm, run)


def _check_vocabulary(lm, batch: PackedBatch) -> None:
    vocab = lm.get_input_embeddings().num_embeddings
    ids = batch.input_ids
    bad = (ids < 0) | (ids >= vocab)
    if ids.numel() and bool(bad.any()):
        first = int(ids[bad][0])
        raise ValueError(f"token id {first} is outside the model's vocabulary [0, {vocab}) (pack_groups(..., "
                         "vocab_size=...) reports the group)")


def candidate_sdpo_loss(
    model,
    batch: PackedBatch,
    ref_logps: torch.Tensor,
    *,
    beta: float = 1.0,
    sft_weight: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    options: dict | None = None,
    loss_type: str = "sdpo",
):
    """``fused_sdpo_loss`` on the model's packed forward: the training loss of one S-DPO step.

    Args:
        model, batch, backend: as for ``candidate_logprobs``; options: the loss backend's tuning knobs
            (``fused_sdpo_loss``'s options), or None.
        ref_logps: ``[G, C]`` reference log-probs (``candidate_logprobs`` of the reference model).
        beta, sft_weight, reduction, loss_type: as for ``sdpo_fast.loss.fused_sdpo_loss`` (``loss_type``:
            ``"sdpo"``, ``"dmpo"``, ``"dpo_pairs"`` or ``"dynamic"``).

    Returns:
        ``(loss, metrics)`` as ``fused_sdpo_loss``.
    """
    lm = unwrap_causal_lm(model)
    output_weight(lm)

    def loss_of(h, w):
        return fused_sdpo_loss(h, w, batch, ref_logps, beta=beta, sft_weight=sft_weight, reduction=reduction,
                               backend=backend, loss_type=loss_type, **(options or {}))

    return _run(model, lm, lambda: _through_lm_head(lm, loss_of, _final_hidden(lm, batch, backend)))


def _attention_backend_for(backend: str) -> str:
    if backend in ("auto", "torch"):
        return backend
    if backend == "cublas":  # a log-prob backend only; its attention counterpart is the Triton kernel
        backend = "triton"
    return backend if backend in backends.available("attention") else "torch"
