"""The three ways of computing one micro-batch's S-DPO loss, on the same model and data.

    a  paper      every candidate carries its own copy of the prompt (``[G*(K+1), S]`` right-padded rows
                  with an attention mask), the full ``[rows, S, V]`` logits from ``model(...).logits``
                  cast to fp32, log_softmax over every position, gather, masked sum over the candidate
                  tokens: the computation of the TRL DPO trainer the paper's code derives from.
    b  paper+FLCE the same layout, log-probs of the candidate positions from the decoder's hidden states
                  through a fused linear cross-entropy (Cut Cross-Entropy or Liger-Kernel,
                  reduction="none"): the best a user gets today. Skipped, with a note, when neither imports.
    c  sdpo_fast  ``pack_groups`` (one prompt copy per group) and ``candidate_sdpo_loss`` (``--sdpo-op
                  fused``, default) or ``candidate_logprobs`` + ``sdpo_loss`` (``--sdpo-op logprobs``).

Every model runs on the ``"sdpo_fast"`` attention implementation, which is transformers' own SDPA
(``sdpa_attention_forward`` with its SDPA mask) for (a) and (b)'s ordinary calls: no switching per call.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Callable

import torch

import sdpo_fast
from sdpo_fast.loss import sdpo_loss
from sdpo_fast.model import output_weight, unwrap_causal_lm

from .shapes import MicroBatch

METHODS = ("a", "b", "c")
LABELS = {"a": "paper: prompt copy per candidate, full fp32 logits", "b": "paper + fused linear CE",
          "c": "sdpo_fast"}

# Each log-prob function returns [G, K+1] float32 sequence log-probs (column 0 = chosen).


def naive_logprobs(model, mb: MicroBatch) -> torch.Tensor:
    """(a) Full logits of every position, as the TRL DPO trainer computes them."""
    logits = unwrap_causal_lm(model)(input_ids=mb.ids, attention_mask=mb.attention_mask, use_cache=False).logits
    logits = logits.float()[:, :-1]
    labels = mb.ids[:, 1:]
    mask = mb.target_mask[:, 1:]
    per_token = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    return (per_token * mask).sum(-1).view(mb.groups, mb.k + 1)


def flce_logprobs(model, mb: MicroBatch, flce: Callable) -> torch.Tensor:
    """(b) The hidden states of the candidate positions through a fused linear cross-entropy."""
    lm = unwrap_causal_lm(model)
    hidden = lm.get_decoder()(input_ids=mb.ids, attention_mask=mb.attention_mask, use_cache=False).last_hidden_state
    mask = mb.target_mask[:, 1:]
    h = hidden[:, :-1][mask]
    nll = flce(h, output_weight(lm), mb.ids[:, 1:][mask])
    row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
    sums = torch.zeros(mask.shape[0], device=nll.device, dtype=torch.float32).index_add_(0, row, -nll.float())
    return sums.view(mb.groups, mb.k + 1)


def shared_logprobs(model, mb: MicroBatch) -> torch.Tensor:
    return sdpo_fast.candidate_logprobs(model, mb.batch, backend="auto")


def sdpo_from_logprobs(logprobs: Callable):
    """A method's loss from its log-prob function: ``(model, mb, ref [G, C]) -> (loss, logps)``, mean
    over the micro-batch's groups."""

    def loss_fn(model, mb, ref):
        logps = logprobs(model, mb)
        return sdpo_loss(logps[:, 0], logps[:, 1:], ref[:, 0], ref[:, 1:], beta=1.0), logps

    return loss_fn


def shared_fused_loss(model, mb: MicroBatch, ref):
    """(c) ``candidate_sdpo_loss``: packed forward, then log-probs, loss and lm_head gradients in one op."""
    loss, metrics = sdpo_fast.candidate_sdpo_loss(model, mb.batch, ref, beta=1.0, backend="auto")
    return loss, metrics["logps"]


def fused_linear_ce(device: torch.device):
    """``(name, fn)`` with ``fn(hidden [N, D], weight [V, D], targets [N]) -> per-token NLL [N]``, or
    ``(None, reason)`` when neither Cut Cross-Entropy nor Liger-Kernel imports (Liger: CUDA only)."""
    reasons = []
    try:
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if device.type == "cuda" else "torch_compile"  # CCE's kernels are CUDA-only
        name = f"cut-cross-entropy {metadata.version('cut-cross-entropy')} ({impl})"
        return name, lambda h, w, t: linear_cross_entropy(h, w, t, reduction="none", impl=impl)
    except Exception as exc:  # noqa: BLE001 - any import failure only drops the method
        reasons.append(f"cut_cross_entropy: {exc}")
    try:
        if device.type != "cuda":
            raise ImportError("its kernels need CUDA")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # Liger before PR #1298 (2026-07) scales reduction="none" gradients by grad_output[0] only;
        # the gradient check flags that as a mismatch.
        loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
        name = f"liger-kernel {metadata.version('liger-kernel')}"
        return name, lambda h, w, t: loss(w, h, t)
    except Exception as exc:  # noqa: BLE001
        reasons.append(f"liger_kernel: {exc}")
    return None, "; ".join(reasons)


@dataclass
class Method:
    key: str
    label: str
    logprobs: Callable  # (model, mb) -> [G, C]: the live reference uses it too
    loss: Callable  # (model, mb, ref) -> (loss, logps)


def build_methods(keys, device, flce_provider, sdpo_op: str) -> tuple[dict, list[str]]:
    """The methods to run and notes about the ones skipped. Looks the log-prob functions up in this
    module at call time (tests replace them)."""
    import sys

    mod = sys.modules[__name__]
    notes, methods = [], {}
    if "a" in keys:
        methods["a"] = Method("a", LABELS["a"], mod.naive_logprobs, sdpo_from_logprobs(mod.naive_logprobs))
    if "b" in keys:
        name, flce = flce_provider(torch.device(device))
        if name is None:
            notes.append(f"(b) skipped: no fused linear cross-entropy package imports ({flce})")
        else:
            fn = lambda model, mb: flce_logprobs(model, mb, flce)  # noqa: E731
            methods["b"] = Method("b", f"{LABELS['b']} ({name})", fn, sdpo_from_logprobs(fn))
    if "c" in keys:
        loss = mod.shared_fused_loss if sdpo_op == "fused" else sdpo_from_logprobs(mod.shared_logprobs)
        methods["c"] = Method("c", f"{LABELS['c']} ({sdpo_op})", mod.shared_logprobs, loss)
    return methods, notes
