"""Candidate log-probs of a HF causal LM through the shared-prefix path."""

from __future__ import annotations

import torch

from .attention import enable_shared_prefix, packed_forward
from .logprobs import sequence_logprobs
from .packing import PackedBatch

__all__ = ["candidate_logprobs", "unwrap_causal_lm", "output_weight"]

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


def candidate_logprobs(model, batch: PackedBatch, backend: str = "auto") -> torch.Tensor:
    """Sequence log-probs of every candidate of every group, in one forward over the packed rows.

    Args:
        model: a HF causal LM (Llama, Mistral, Qwen2, GPT-NeoX, ...), optionally PEFT-wrapped or
            inside a DeepSpeed engine. Its attention implementation is switched to ``"sdpo_fast"``
            on first use (ordinary calls keep SDPA behaviour).
        batch: from ``pack_groups``, on the model's device.
        backend: ``"auto"``, ``"triton"``, ``"native"`` or ``"torch"`` for the log-prob op; attention
            uses the same backend where one is registered, else the torch reference.

    Returns:
        ``[G, C]`` float32, 0 where ``batch.candidate_mask`` is False; differentiable when grad is on.
    """
    lm = unwrap_causal_lm(model)
    weight = output_weight(lm)
    enable_shared_prefix(lm)
    attention_backend = backend if backend in ("auto", "torch") else _attention_backend_for(backend)
    with packed_forward():
        out = lm.get_decoder()(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            use_cache=False,
            sdpo_batch=batch,
            sdpo_attention_backend=attention_backend,
        )
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    return sequence_logprobs(hidden, weight, batch, backend=backend)


def _attention_backend_for(backend: str) -> str:
    from . import backends

    return backend if backend in backends.available("attention") else "torch"
