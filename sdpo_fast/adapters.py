"""LoRA adapters of a peft model: kept in the base dtype, each adapted projection one autograd
function, and switched off for the live reference without walking the module tree each step.

``peft.get_peft_model`` keeps adapters in fp32 on a bf16 base by default (``autocast_adapter_dtype``),
so every adapter matmul casts its input and output: on the Llama-3.2-1B LoRA step about 1,350 of
~4,700 kernels were such casts (issue 16). ``lora_model`` builds the adapters in the base dtype
instead. On bf16 weights alone an AdamW update much smaller than the weight would round away, so the
optimizer keeps fp32 masters of them (``sdpo_fast.optim.MasterAdamW``; DeepSpeed's bf16 mode does the
same in its engine). ``fuse_lora_layers`` gives each LoRA ``Linear`` the one-function forward of
``sdpo_fast.lora_linear`` (fewer dispatched ops per step, same parameters and results).
"""

from __future__ import annotations

import contextlib


def lora_model(model, config):
    """``peft.get_peft_model(model, config)`` with the adapters in the base model's dtype when it is a
    half type (bf16/fp16; an fp32 base gets fp32 adapters as before), its LoRA ``Linear`` layers fused
    (``fuse_lora_layers``)."""
    import peft
    import torch

    base_dtype = next(model.parameters()).dtype
    half = base_dtype in (torch.bfloat16, torch.float16)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=not half)
    if half:  # peft versions that ignore the flag for some layer types
        for name, p in model.named_parameters():
            if "lora_" in name and p.dtype != base_dtype:
                p.data = p.data.to(base_dtype)
    fuse_lora_layers(model)
    return model


def fuse_lora_layers(model) -> int:
    """Turns every peft LoRA ``Linear`` of ``model`` (exactly that class, not a subclass) into
    ``sdpo_fast.lora_linear.FusedLoRALinear`` in place; returns how many. The layers keep their
    parameters and state dict; ``merge_and_unload`` and ``save_pretrained`` work as before."""
    from peft.tuners.lora.layer import Linear

    from .lora_linear import FusedLoRALinear

    layers = [m for m in model.modules() if type(m) is Linear]
    for layer in layers:
        layer.__class__ = FusedLoRALinear
    return len(layers)


def unfuse_lora_layers(model) -> int:
    """The inverse of ``fuse_lora_layers``: every ``FusedLoRALinear`` back to peft's ``Linear`` (peft's
    own forward, the benchmarks' baseline); returns how many."""
    from peft.tuners.lora.layer import Linear

    from .lora_linear import FusedLoRALinear

    layers = [m for m in model.modules() if type(m) is FusedLoRALinear]
    for layer in layers:
        layer.__class__ = Linear
    return len(layers)


class AdapterSwitch:
    """Turns every LoRA layer of ``model`` off and on again through a list collected once.

    ``model.disable_adapter()`` walks all modules twice per call (1,337 of them on Llama-3.2-1B) and
    flips ``requires_grad``; here only the layers' ``_disable_adapters`` flags change, which is what
    the LoRA forward reads, so the reference log-probs are those of ``disable_adapter()`` exactly.
    A model without LoRA layers gives a switch that does nothing (``active`` is False).
    """

    def __init__(self, model):
        try:
            from peft.tuners.tuners_utils import BaseTunerLayer
        except ImportError:  # no peft: nothing to switch
            self.layers = []
        else:
            self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]

    @property
    def active(self) -> bool:
        return bool(self.layers)

    @contextlib.contextmanager
    def off(self):
        """Adapters disabled inside the block; each layer's previous state restored after it."""
        before = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, was in zip(self.layers, before):
                layer._disable_adapters = was
