"""sdpo_fast: Softmax-DPO for LM recommenders with a shared prompt prefix and fused log-probs.

Public API (see the README and DESIGN.md):
    pack_groups, PackedBatch        shared-prefix packing of (prompt, [chosen, negatives...]) groups
    candidate_logprobs              [G, K+1] sequence log-probs from a HF causal LM, one forward
    candidate_sdpo_loss             the S-DPO training loss of a HF causal LM, backward fused
    sequence_logprobs               fused lm_head + log-softmax + gather + per-candidate sum
    sdpo_fast.loss.sdpo_loss        the S-DPO loss on sequence log-probs
"""

from . import loss
from .attention import enable_shared_prefix
from .logprobs import sequence_logprobs
from .model import candidate_logprobs, candidate_sdpo_loss
from .packing import PackedBatch, pack_groups

__version__ = "0.1.0"

__all__ = [
    "PackedBatch",
    "candidate_logprobs",
    "candidate_sdpo_loss",
    "enable_shared_prefix",
    "loss",
    "pack_groups",
    "sequence_logprobs",
]
