"""CUDA graphs of sdpo_fast's micro-batch forward + backward (``--cuda-graphs``): the trainer's
``--cuda_graphs`` machinery (``sdpo_fast.buckets``, ``sdpo_fast.graphs.StepGraphs``) in the benchmark.

(c)'s micro-batches are packed into their shape buckets (``pack_bucketed``: one row, trailing padding
groups); each bucket's step is captured once and every micro-batch of it is replayed after its tensors
are copied into the captured ones, as the trainer does with new data every step. The loss is the SUM
over the real groups divided by the step's group count; padding groups add nothing. The reference
log-probs are precomputed (the benchmark's live reference reads the token ids back to check them).
The optimizer step stays eager; ``check`` compares a replay with an eager step. CUDA only
(``tests/test_bench_step.py`` runs the same bookkeeping eagerly on CPU).
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

        self.model, self.n_groups = model, n_groups
        self.graphs = StepGraphs(step, model.parameters(), capture=capture)

    def run(self, micro_batches=None) -> None:
        for i, (batch, table) in enumerate(self.inputs):
            self.graphs(batch, table, accumulate=i > 0)

    def check(self) -> dict:
        """The first micro-batch replayed against an eager step on a copy of it: relative errors of the
        loss and the gradients, and ``graph_check`` ok within bf16 rounding. Overwrites ``.grad``."""
        batch, table = self.inputs[0]
        (loss,) = self.graphs(batch, table)
        got_loss, got = loss.float().clone(), [g.float().clone() for g in self.graphs.grads]
        want_loss, _ = sdpo_fast.candidate_sdpo_loss(self.model, batch.clone(), table, beta=1.0, reduction="sum", backend="auto")
        want = torch.autograd.grad(want_loss / self.n_groups, self.graphs.params)
        loss_err = ((got_loss - want_loss.float()).abs() / want_loss.float().abs().clamp_min(1e-12)).item()
        diff = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g - w.float()) for g, w in zip(got, want)]))
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w.float()) for w in want]))
        grad_err = (diff / norm.clamp_min(1e-30)).item()
        ok = loss_err <= 1e-2 and grad_err <= 1e-2
        return dict(graph_loss_rel_err=float(f"{loss_err:.3g}"), graph_grad_rel_err=float(f"{grad_err:.3g}"),
                    graph_check="ok" if ok else "MISMATCH")
