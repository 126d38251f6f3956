"""CUDA graphs of sdpo_fast's micro-batch forward + backward (``--cuda-graphs``): the trainer's
``--cuda_graphs`` machinery (``sdpo_fast.buckets``, ``sdpo_fast.graphs.StepGraphs``) in the benchmark.

(c)'s micro-batches are packed into their shape buckets (``pack_bucketed``: one row, trailing padding
groups); each bucket's step is captured once and every micro-batch of it is replayed after its tensors
are copied into the captured ones, as the trainer does with new data every step. The loss is the SUM
over the real groups divided by the step's group count; padding groups add nothing. The reference
log-probs are precomputed (the benchmark's live reference reads the token ids back to check them).
The optimizer step stays eager. CUDA only (``tests/test_bench_step.py`` runs the same bookkeeping
eagerly on CPU).
"""

from __future__ import annotations

import torch

import sdpo_fast
from sdpo_fast.buckets import padded_reference
from sdpo_fast.graphs import StepGraphs


def refuse_unless_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")


class GraphedSteps:
    """The benchmark's (c) step with every micro-batch replayed from its bucket's graph.

    micro_batches: the step's ``MicroBatch`` list packed with ``bucketed=True`` (``shapes.split``);
    ref: the ``Reference``; n_groups: groups per step; capture: False runs the same calls eagerly.
    """

    def __init__(self, model, micro_batches, ref, n_groups: int, capture: bool = True):
        if ref.kind != "precomputed":  # candidate_logprobs checks the token ids on the host
            raise ValueError("--cuda-graphs needs --refs precomputed")
        self.inputs = []
        for mb in micro_batches:
            if mb.batch.bucket is None:
                raise ValueError("GraphedSteps needs micro-batches packed into buckets (shapes.split(bucketed=True))")
            table = padded_reference(ref(None, model, mb), mb.batch).contiguous()
            self.inputs.append((mb.batch, table))

        def step(batch, table):
            loss, _ = sdpo_fast.candidate_sdpo_loss(model, batch, table, beta=1.0, reduction="sum", backend="auto")
            (loss / n_groups).backward()
            return (loss.detach(),)

        self.graphs = StepGraphs(step, model.parameters(), capture=capture)

    def run(self, micro_batches=None) -> None:
        for i, (batch, table) in enumerate(self.inputs):
            self.graphs(batch, table, accumulate=i > 0)
