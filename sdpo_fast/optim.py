"""AdamW for half-precision weights in one process: on fp32 master copies (``MasterAdamW``, the
default) or rounded stochastically into bf16 weights without copies (``StochasticRoundingAdamW``).

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
Per bf16 parameter that is 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) = 16 bytes, 20 during
the step.

``StochasticRoundingAdamW`` drops the masters: each step computes AdamW's update in fp32 from the
bf16 weight, then rounds the result to one of its two neighbouring bf16 values with probabilities
that make the rounding exact in expectation (a small update survives as a proportional chance of a
one-unit move, instead of rounding away). 12 bytes per bf16 parameter, plus fp32 temporaries for at
most ``chunk`` elements at a time. The cost is variance: a single weight's trajectory is noisier than
the master's, by up to one bf16 unit per step in the worst case, but unbiased.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MasterAdamW", "StochasticRoundingAdamW", "round_stochastic_", "WEIGHT_UPDATES", "make_optimizer"]

HALF = (torch.bfloat16, torch.float16)


def _zero_grads(params, set_to_none: bool) -> None:
    for p in params:
        if p.grad is not None:
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()


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
                sizes = [params[i].numel() for i in idx]
                flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
                # one split and a view each: a LoRA step has hundreds of adapter weights, and every op
                # dispatched here is host time on a GPU step
                views = [v.view(params[i].shape) for v, i in zip(flat.split(sizes), idx)]
                with torch.no_grad():
                    torch._foreach_copy_(views, [params[i].grad for i in idx])
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
        _zero_grads(self.params, set_to_none)
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


def round_stochastic_(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round the float32 tensor ``x`` in place to bf16-representable values, stochastically: a value
    between two neighbouring bf16 numbers lands on the farther one with probability proportional to
    its distance from the nearer one, so ``E[result] = x``. Returns ``x``; ``x.to(torch.bfloat16)``
    is then exact.

    bf16 is the top 16 bits of float32: adding uniform random bits to the low 16 and clearing them
    carries into the kept bits with exactly that probability (in sign-magnitude, so also for
    negative values). ``generator``: a generator on ``x``'s device (None: torch's default one).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"round_stochastic_: x must be float32, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    bits.add_(noise).bitwise_and_(-65536)  # -65536: 0xFFFF0000, keep the top 16 bits
    return x


CHUNK = 1 << 24  # elements per batch of foreach ops: bounds the fp32 temporaries (4 of 4 B each: 256 MiB)


class StochasticRoundingAdamW:
    """``torch.optim.AdamW``'s update (decoupled weight decay, bias correction) for bf16 and fp32
    parameters, with no fp32 copy of the bf16 ones: the update is computed in fp32 from the bf16
    weight and rounded into it by ``round_stochastic_``. fp32 parameters are updated in place
    exactly as ``torch.optim.AdamW`` does. Moments are fp32 tensors of each parameter's shape.

    Used like ``MasterAdamW`` (``param_groups``, ``state``, ``step()``, ``zero_grad()``,
    ``master_grads()``, ``state_dict()``, ``load_state_dict()``). The random bits come from one
    generator per device seeded with ``seed``; its state is in ``state_dict()``, so a resumed run
    draws the same bits as an uninterrupted one. ``chunk``: the most elements updated by one batch of
    foreach ops (larger parameters are split), which bounds the temporaries.
    """

    def __init__(self, params, *, lr: float = 1e-3, weight_decay: float = 0.01, betas=(0.9, 0.999),
                 eps: float = 1e-8, seed: int = 0, chunk: int = CHUNK):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("StochasticRoundingAdamW: no parameters")
        bad = sorted({str(p.dtype) for p in self.params if p.dtype not in (torch.bfloat16, torch.float32)})
        if bad:
            raise ValueError(f"StochasticRoundingAdamW: parameters must be bfloat16 or float32, got {', '.join(bad)}")
        if chunk < 1:
            raise ValueError(f"StochasticRoundingAdamW: chunk must be >= 1, got {chunk}")
        self.param_groups = [dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)]
        self.state: dict[torch.Tensor, dict] = {}
        self.seed, self.chunk = int(seed), int(chunk)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def master_grads(self) -> list[torch.Tensor]:
        """The parameters holding a gradient this step (they are their own masters: clip these)."""
        return [p for p in self.params if p.grad is not None]

    def _pieces(self):
        """``(device, [(weight, grad, exp_avg, exp_avg_sq, step), ...])`` batches of at most ``chunk``
        elements (flat views of one parameter's slice each), the step counts already advanced."""
        by_device: dict[torch.device, list] = {}
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state.get(p)
            if st is None:
                st = self.state[p] = {"step": 0,
                                      "exp_avg": torch.zeros(p.shape, dtype=torch.float32, device=p.device),
                                      "exp_avg_sq": torch.zeros(p.shape, dtype=torch.float32, device=p.device)}
            st["step"] += 1
            views = (p, p.grad, st["exp_avg"], st["exp_avg_sq"])
            if p.is_contiguous() and p.numel() > self.chunk:
                flat = [t.reshape(-1) for t in views]  # the grad may be copied; the others are views
                for start in range(0, p.numel(), self.chunk):
                    by_device.setdefault(p.device, []).append(
                        (*(t[start:start + self.chunk] for t in flat), st["step"]))
            else:
                by_device.setdefault(p.device, []).append((*views, st["step"]))
        for device, pieces in by_device.items():
            batch, size = [], 0
            for piece in pieces:
                if batch and size + piece[0].numel() > self.chunk:
                    yield device, batch
                    batch, size = [], 0
                batch.append(piece)
                size += piece[0].numel()
            if batch:
                yield device, batch

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for device, batch in self._pieces():
            weights = [w.float() for w, *_ in batch]  # fp32 copies of bf16 slices, the fp32 ones themselves
            grads = [g.float() for _, g, *_ in batch]
            exp_avg = [piece[2] for piece in batch]
            exp_avg_sq = [piece[3] for piece in batch]
            steps = [piece[4] for piece in batch]
            if wd:
                torch._foreach_mul_(weights, 1 - lr * wd)
            torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
            del grads
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s) for s in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(weights, exp_avg, denom, [-lr / (1 - beta1 ** s) for s in steps])
            del denom
            half = [(w, piece[0]) for w, piece in zip(weights, batch) if piece[0].dtype == torch.bfloat16]
            if half:
                generator = self._generator(device)
                for w32, w in half:
                    w.copy_(round_stochastic_(w32, generator))

    def zero_grad(self, set_to_none: bool = True) -> None:
        _zero_grads(self.params, set_to_none)

    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self.params)}
        return {
            "sr_adamw": {
                "state": {index[id(p)]: {"step": st["step"], "exp_avg": st["exp_avg"].detach().clone(),
                                         "exp_avg_sq": st["exp_avg_sq"].detach().clone()}
                          for p, st in self.state.items()},
                "param_groups": [dict(g) for g in self.param_groups],
                "seed": self.seed,
                "generators": {str(d): g.get_state() for d, g in self._generators.items()},
            }
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """This class's ``state_dict`` for the same parameters (moments, steps and generator states
        restored); ``ValueError`` for any other state (a ``MasterAdamW``'s holds masters instead)."""
        if "sr_adamw" not in state:
            raise ValueError("StochasticRoundingAdamW.load_state_dict: not a StochasticRoundingAdamW state "
                             "(written with the fp32 masters, MasterAdamW?)")
        saved = state["sr_adamw"]
        restored = {}
        for i, st in saved["state"].items():
            i = int(i)
            if i >= len(self.params) or tuple(st["exp_avg"].shape) != tuple(self.params[i].shape):
                raise ValueError("StochasticRoundingAdamW.load_state_dict: the moments do not match these parameters")
            p = self.params[i]
            restored[p] = {"step": int(st["step"]),
                           "exp_avg": st["exp_avg"].to(device=p.device, dtype=torch.float32).clone(),
                           "exp_avg_sq": st["exp_avg_sq"].to(device=p.device, dtype=torch.float32).clone()}
        self.state = restored
        lr = self.param_groups[0]["lr"]
        self.param_groups = [dict(g) for g in saved["param_groups"]]
        self.param_groups[0].setdefault("lr", lr)
        self.seed = int(saved["seed"])
        self._generators = {}
        for name, gen_state in saved["generators"].items():
            self._generator(torch.device(name)).set_state(gen_state.cpu())


WEIGHT_UPDATES = ("fp32_masters", "stochastic_rounding")  # train.py --weight_update


def make_optimizer(params, weight_update: str, *, weight_decay: float, fused: bool, seed: int):
    """The one-process optimizer of ``train.py --weight_update``: ``MasterAdamW`` (``fused``: torch's
    fused AdamW kernel over the masters) or ``StochasticRoundingAdamW`` (seeded with ``seed``); lr 0,
    the trainer sets it every step."""
    if weight_update == "fp32_masters":
        return MasterAdamW(params, lr=0.0, weight_decay=weight_decay, fused=fused)
    if weight_update == "stochastic_rounding":
        return StochasticRoundingAdamW(params, lr=0.0, weight_decay=weight_decay, seed=seed)
    raise ValueError(f"weight_update must be one of {', '.join(WEIGHT_UPDATES)}, got {weight_update!r}")
