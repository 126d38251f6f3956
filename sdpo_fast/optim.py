"""AdamW whose updates land on fp32 master copies of half-precision parameters (one process).

A bf16 weight holds 8 significant bits: an AdamW update (about the learning rate in size) smaller than
half a unit in the last place of the weight rounds away. LoRA adapters kept in bf16 (``adapters.py``)
and a bf16 full fine-tuning both hit this at the learning rates of the literature: at 1e-5, one step
changed 18% of the entries of a bf16 ``lora_A`` [8, 2048]. ``MasterAdamW`` keeps an fp32 copy of
every half-precision trainable parameter; the forward and backward run on the half weights, the
gradients are copied into the masters' fp32 gradients, AdamW updates the masters, and the masters are
rounded back into the weights. fp32 parameters are their own masters. DeepSpeed's bf16 mode does the
same inside its engine (``Runtime`` uses this class only without DeepSpeed).

Costs per step: one gradient copy and one weight copy of the half parameters (two ``_foreach_copy_``
launches per device); memory: fp32 weights beside the half ones, made at the first step (an
evaluation-only run makes none), and during the optimizer step only, fp32 gradients in one buffer.
"""

from __future__ import annotations

import torch

__all__ = ["MasterAdamW"]

HALF = (torch.bfloat16, torch.float16)


class MasterAdamW:
    """``torch.optim.AdamW`` over fp32 masters of ``params`` (half ones copied, fp32 ones shared).

    Used like an optimizer: ``param_groups`` (set ``lr`` there), ``state``, ``step()``,
    ``zero_grad()``, ``state_dict()``, ``load_state_dict()``. ``master_grads()`` copies the weights'
    gradients into the masters and returns the masters that have one (clip those: the norm is then
    computed in fp32); ``step()`` does it first when it was not done since the last step.
    """

    def __init__(self, params, *, lr: float = 1e-3, weight_decay: float = 0.01, fused: bool = False):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("MasterAdamW: no parameters")
        self._half = [i for i, p in enumerate(self.params) if p.dtype in HALF]
        self._options = dict(lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
        self._inner, self._masters = None, None
        self._gathered = False

    @property
    def inner(self) -> torch.optim.AdamW:
        """The AdamW over the masters, made (with the masters) at first use."""
        if self._inner is None:
            self._masters = [p.detach().float().clone() if p.dtype in HALF else p for p in self.params]
            self._inner = torch.optim.AdamW(self._masters, **self._options)
        return self._inner

    @property
    def masters(self) -> list[torch.Tensor]:
        """fp32 master of each parameter (the parameter itself when it is fp32)."""
        self.inner
        return self._masters

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def master_grads(self) -> list[torch.Tensor]:
        """The masters holding a gradient this step, after copying the half weights' gradients in
        (one fp32 buffer per device, dropped after the step)."""
        masters, params = self.masters, self.params
        if not self._gathered:
            by_device: dict[torch.device, list[int]] = {}
            for i in self._half:
                masters[i].grad = None  # a weight that took no gradient this step is not updated
                if params[i].grad is not None:
                    by_device.setdefault(params[i].device, []).append(i)
            for device, idx in by_device.items():
                flat = torch.empty(sum(params[i].numel() for i in idx), dtype=torch.float32, device=device)
                views, start = [], 0
                for i in idx:
                    n = params[i].numel()
                    views.append(flat[start:start + n].view(params[i].shape))
                    start += n
                torch._foreach_copy_(views, [params[i].grad.detach() for i in idx])
                for i, v in zip(idx, views):
                    masters[i].grad = v
            self._gathered = True
        return [m for m in masters if m.grad is not None]

    @torch.no_grad()
    def step(self) -> None:
        self.master_grads()
        self.inner.step()
        masters = self.masters
        if self._half:
            torch._foreach_copy_([self.params[i] for i in self._half], [masters[i] for i in self._half])
            for i in self._half:
                masters[i].grad = None
        self._gathered = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The weights' gradients (the masters' fp32 gradients exist only inside a step)."""
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self._gathered = False

    def state_dict(self) -> dict:
        inner = self.inner
        return {"adamw": inner.state_dict(), "masters": [self.masters[i].detach().clone() for i in self._half]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """This class's ``state_dict`` (masters restored, weights rounded from them), or a plain AdamW
        state dict of the same parameters (masters taken from the current weights)."""
        inner = self.inner
        if "adamw" not in state:
            inner.load_state_dict(state)
            for i in self._half:
                self.masters[i].copy_(self.params[i])
            return
        masters = state["masters"]
        if len(masters) != len(self._half) or any(
                tuple(t.shape) != tuple(self.masters[i].shape) for t, i in zip(masters, self._half)):
            raise ValueError("MasterAdamW.load_state_dict: the master weights do not match these parameters")
        inner.load_state_dict(state["adamw"])
        for t, i in zip(masters, self._half):
            self.masters[i].copy_(t)
            self.params[i].copy_(self.masters[i])
        self._gathered = False
