"""A LoRA linear layer as one autograd function: fewer dispatched ops per adapted projection.

peft's ``lora.Linear`` computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` through four
modules and five autograd nodes; here one node and three GEMMs each way (the counts per step:
``benchmarks/results/lora_linear_cpu.md``). Every dispatched op costs host time, which bounds a small
GPU step. ``FusedLoRALinear`` is peft's class with another ``forward``: the same
parameters, state dict, merge and unmerge, and peft's own forward wherever the fused one does not
apply (``FusedLoRALinear.fused_adapter``). ``sdpo_fast.adapters.fuse_lora_layers`` swaps it in.

Shapes: ``x [..., k]``, base weight ``W [n, k]`` (bias ``[n]`` or none), ``A [r, k]``, ``B [n, r]``,
output ``[..., n]``; ``s`` is the adapter's ``scaling``.
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoRALinear
from torch import nn

__all__ = ["FusedLoRALinear", "LoRALinearFunction"]


class LoRALinearFunction(torch.autograd.Function):
    """``x W^T + bias + s (x A^T) B^T`` and its gradients with respect to every input that needs one.

    Forward: ``xa = s (x A^T)`` ``[M, r]`` is kept for ``B``'s gradient (``M`` = rows of ``x``), and
    the adapter's term is added by the GEMM that computes it (``addmm_``). Backward, with ``g``
    ``[M, n]``: ``gb = s (g B)`` ``[M, r]``, ``dx = g W + gb A``, ``dA = gb^T x``, ``dB = g^T xa``
    (``dW = g^T x``, ``dbias = sum(g)`` when the base layer trains too).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        rows = x.reshape(-1, x.shape[-1])
        out = rows.mm(weight.t()) if bias is None else torch.addmm(bias, rows, weight.t())
        xa = rows.mm(lora_a.t())
        if scaling != 1:
            xa.mul_(scaling)
        out.addmm_(xa, lora_b.t())
        ctx.save_for_backward(rows, xa, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        rows, xa, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad.reshape(-1, grad.shape[-1])
        dx = dw = dbias = da = db = None
        if need_x or need_a:
            gb = g.mm(lora_b)
            if ctx.scaling != 1:
                gb.mul_(ctx.scaling)
        if need_x:
            dx = g.mm(weight)
            dx.addmm_(gb, lora_a)
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        if need_w:
            dw = g.t().mm(rows)
        if need_bias:
            dbias = g.sum(0)
        if need_a:
            da = gb.t().mm(rows)
        if need_b:
            db = g.t().mm(xa)
        return dx, dw, dbias, da, db, None


def _plain(module: nn.Module) -> bool:
    """An ``nn.Linear`` that runs its own forward alone: no hooks (DeepSpeed ZeRO-3 gathers its
    partitioned weights in one), no forward replaced on the instance (accelerate's offload)."""
    return (type(module) is nn.Linear and not module._forward_pre_hooks and not module._forward_hooks
            and "forward" not in module.__dict__)


class FusedLoRALinear(PeftLoRALinear):
    """peft's LoRA ``Linear`` whose forward is ``LoRALinearFunction`` when ``fused_adapter(x)`` names
    an adapter, else peft's own (module docstring)."""

    def fused_adapter(self, x: torch.Tensor) -> str | None:
        """The adapter to run fused on ``x``, or None for peft's forward. Fused: one active plain LoRA
        adapter (no DoRA or other variant, no adapter bias), not merged nor disabled, dropout off
        (``p = 0`` or eval mode), ``x`` and all three weights of one dtype, no autocast, and plain
        ``nn.Linear`` modules without hooks (``_plain``) and no global module hooks."""
        if self.disable_adapters or self.merged:
            return None
        active = self.active_adapters
        if len(active) != 1:
            return None
        name = active[0]
        variant = name in getattr(self, "lora_variant", ()) or getattr(self, "use_dora", {}).get(name)
        if name not in self.lora_A or variant:  # (peft before variants marks DoRA in use_dora)
            return None
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        if not (_plain(base) and _plain(a) and _plain(b)) or a.bias is not None or b.bias is not None:
            return None
        drop = self.lora_dropout[name]
        if not (type(drop) is nn.Identity or (type(drop) is nn.Dropout and (drop.p == 0 or not drop.training))):
            return None
        if not (x.dtype == base.weight.dtype == a.weight.dtype == b.weight.dtype):
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        hooks = nn.modules.module
        return None if hooks._global_forward_pre_hooks or hooks._global_forward_hooks else name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self.fused_adapter(x)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return LoRALinearFunction.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                        self.lora_B[name].weight, float(self.scaling[name]))
