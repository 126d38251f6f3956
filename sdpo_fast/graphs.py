"""CUDA graphs of a training micro-step (forward + backward), one per shape bucket.

A small step is bound by the host: eager dispatch of thousands of ops. ``StepGraphs`` captures the
step once per bucket (``sdpo_fast.buckets``: every batch of a bucket has the same tensor shapes and
the kernels plan their launches from shapes alone) and replays it for every later batch of that
bucket, after copying the batch's tensors into the captured ones.

What a replay relies on:
- the step reads nothing back to the host (no ``.item()``, no ``bool(tensor)``; ``tests/test_train_syncs.py``
  and ``tests/test_graphs.py`` check the packed step) and its host-side sizes come from the bucket;
- the gradients accumulate into ``.grad`` tensors that exist before the capture (AccumulateGrad adds
  in place then); ``__call__`` zeroes them first unless told to accumulate (micro-batches of one
  optimizer step), and re-attaches them (an optimizer's ``zero_grad(set_to_none=True)`` drops them);
- the graph captures on its own copy of the first batch's tensors, and the warm-up runs (which
  compile the Triton kernels and set up cuBLAS) use yet another batch object, so that the
  attention's per-batch tile tables are built inside the capture, from the captured tensors, and
  rebuilt by every replay;
- each graph has its own memory pool (replays come in any bucket order), so memory grows with the
  number of graphs: at most ``max_graphs``, later buckets run eagerly, and so does a bucket whose
  capture ran out of memory (a warning says so once);
- each capture (and its warm-ups) runs on a side stream of its own: cuBLAS keeps a workspace per
  stream, baked into the graphs captured on it, and PyTorch frees a stream's workspace when a graph
  captured on it is destroyed (pytorch issue 193402), so no graph may share its stream with one that
  can die before it (a failed capture, another object's graphs). The streams come from PyTorch's pool
  of 32 per device, so this holds while the process captures on fewer than 32.

The optimizer step stays eager (fused AdamW is a few kernels). CUDA only; without ``capture``
(CPU tests) every call runs the step eagerly through the same bookkeeping.
"""

from __future__ import annotations

import dataclasses
import gc
import warnings

import torch

from .packing import PackedBatch

__all__ = ["StepGraphs"]


@dataclasses.dataclass
class _Captured:
    graph: object
    batch: PackedBatch
    ref: torch.Tensor
    out: tuple


class StepGraphs:
    """``step(batch, ref) -> tuple of tensors`` (it runs the backward), captured once per bucket.

    Args:
        step: the micro-step on a bucketed ``PackedBatch`` and its ``ref`` tensor (``[G, C]`` reference
            log-probs, padding groups included); returns the tensors the caller reads (loss, metrics).
        params: the parameters whose ``.grad`` the step's backward writes.
        capture: False runs every call eagerly (what a CPU test exercises).
        max_graphs: graphs kept; a bucket beyond them runs eagerly.
        warmup: eager runs before a capture.
    """

    def __init__(self, step, params, *, capture: bool = True, max_graphs: int = 8, warmup: int = 2):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        if capture and not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device")
        self.step, self.params = step, [p for p in params if p.requires_grad]
        self.capture, self.max_graphs, self.warmup = capture, max_graphs, warmup
        self.graphs: dict[tuple, _Captured] = {}
        self.uncaptured: set[tuple] = set()  # buckets whose capture ran out of memory
        self.grads: list[torch.Tensor] | None = None
        self.eager_steps = 0
        self.replays = 0

    def _attach(self) -> None:
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def __call__(self, batch: PackedBatch, ref: torch.Tensor, accumulate: bool = False) -> tuple:
        """The step's outputs for ``batch`` and ``ref``: the graph's own tensors, overwritten by the next
        replay (read or copy them before). ``accumulate``: add to the gradients instead of zeroing them."""
        if batch.bucket is None:
            raise ValueError("StepGraphs needs bucketed batches (sdpo_fast.buckets.pack_bucketed)")
        if tuple(ref.shape) != tuple(batch.candidate_mask.shape):
            raise ValueError(f"ref must be [G, C] = {tuple(batch.candidate_mask.shape)}, got {tuple(ref.shape)}")
        self._attach()
        if not accumulate:
            torch._foreach_zero_(self.grads)
        key = (batch.bucket, batch.padding_groups, str(batch.device), ref.dtype)
        entry = self.graphs.get(key)
        if entry is None and self.capture and key not in self.uncaptured and len(self.graphs) < self.max_graphs:
            try:
                entry = self.graphs[key] = self._capture(batch, ref, accumulate)
            except torch.OutOfMemoryError:
                self.uncaptured.add(key)
            if entry is None:  # outside the except block, whose traceback holds the failed step's tensors
                gc.collect()
                torch.cuda.empty_cache()
                warnings.warn(f"CUDA graphs: capturing the step of bucket {batch.bucket} ran out of memory; its "
                              f"batches run eagerly ({len(self.graphs)} graphs kept)", stacklevel=2)
        elif entry is not None:
            captured = entry.batch.tensors()
            for name, src in batch.tensors().items():
                captured[name].copy_(src, non_blocking=True)
            entry.ref.copy_(ref, non_blocking=True)
        if entry is None:
            self.eager_steps += 1
            return tuple(self.step(batch, ref))
        entry.graph.replay()
        self.replays += 1
        return entry.out

    def _capture(self, batch: PackedBatch, ref: torch.Tensor, accumulate: bool) -> _Captured:
        # the graph's own inputs: the caller's batch stays the caller's, and no table the attention
        # cached for that object outside the capture can stand in for this batch's
        batch = batch.clone()
        ref = ref.clone()
        # what this call accumulates onto (the warm-ups add to the gradients); zeros when not accumulating
        saved = [g.clone() for g in self.grads] if accumulate else None
        side = torch.cuda.Stream()
        try:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    # a fresh object: the attention caches its tile tables per batch object, and the
                    # captured batch's tables must be built inside the capture
                    self.step(dataclasses.replace(batch), ref)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread may allocate pinned memory meanwhile, which
            # the default "global" mode would turn into a capture error
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                out = tuple(self.step(batch, ref))
        finally:  # the warm-ups added to the gradients, also when one of them failed
            torch.cuda.current_stream().wait_stream(side)  # a failed warm-up's kernels may still run there
            if saved is None:
                torch._foreach_zero_(self.grads)
            else:
                for g, s in zip(self.grads, saved):
                    g.copy_(s)
        return _Captured(graph, batch, ref, out)
