"""CUDA graphs of sdpo_fast's micro-batch forward + backward (``--cuda-graphs``), with shape buckets.

A small step is bound by the host (eager dispatch of thousands of ops); replaying a captured graph
removes that. A graph fixes every tensor shape and every host-side size the step uses (the packed row
length, the group count, the tile and chunk counts derived from the batch's layout), so:

- the packed row is padded to a row-length bucket (``row_bucket``: at most 25% of padding) and the
  group count to a power of two with dummy groups (``pad_groups``: one-token prompt, the chosen
  candidate only, reference 0), whose S-DPO loss is exactly 0 (no negatives) and whose gradient is 0;
- the loss is the SUM over groups divided by the step's group count, so dummy groups change nothing
  (``tests/test_bench_step.py`` checks loss and gradients padded vs unpadded, on CPU);
- the reference log-probs are precomputed (the live reference's ``candidate_logprobs`` reads the
  token ids back to check them, which a capture forbids);
- a graph replays for a batch of the same layout (``signature``): the benchmark's micro-batches are
  the same every step; new data of the same layout are copied into the captured batch
  (``GraphedMicroStep.load``). Data of another layout need their own capture.

The gradients accumulate into ``.grad`` tensors allocated before the capture (zeroed in place before
every step); the optimizer step stays eager. CUDA only; unverified on a GPU so far.
"""

from __future__ import annotations

import dataclasses

import torch

import sdpo_fast

ROW_QUANTUM = 256


def row_bucket(n: int, quantum: int = ROW_QUANTUM) -> int:
    """The smallest ``quantum * 2**i * (4 + j) / 4`` (j = 0..3) that holds ``n`` tokens: buckets 25% apart."""
    if n < 1:
        raise ValueError(f"row length must be positive, got {n}")
    size = quantum
    while True:
        for j in range(4):
            b = size * (4 + j) // 4
            if b >= n:
                return b
        size *= 2


def group_bucket(n: int) -> int:
    """The smallest power of two >= ``n``."""
    if n < 1:
        raise ValueError(f"group count must be positive, got {n}")
    return 1 << (n - 1).bit_length()


def pad_groups(groups: list, n: int, pad_id: int = 0) -> list:
    """``groups`` followed by dummy groups up to ``n``: prompt ``[pad_id]``, chosen ``[pad_id]``, no negative."""
    if len(groups) > n:
        raise ValueError(f"{len(groups)} groups do not fit a bucket of {n}")
    return list(groups) + [([pad_id], [[pad_id]])] * (n - len(groups))


def bucketed_pack(groups: list, vocab: int, num_candidates: int, quantum: int = ROW_QUANTUM):
    """``(batch, n_real)``: ``groups`` padded to their group bucket and packed into one row of its length bucket."""
    padded = pad_groups(groups, group_bucket(len(groups)))
    tokens = sum(len(p) + sum(len(c) for c in cs) for p, cs in padded)
    L = row_bucket(tokens, quantum)
    batch = sdpo_fast.pack_groups(padded, vocab_size=vocab, num_candidates=num_candidates, pad_to_multiple_of=L)
    return batch, len(groups)


def signature(batch) -> tuple:
    """What a captured graph fixes: the row shape, the candidate axis and the layout of every group."""
    return batch.shape, batch.num_candidates, batch.group_spans, batch.group_layout


def bucketed_ref(ref: torch.Tensor, groups: int) -> torch.Tensor:
    """``[G, C]`` reference log-probs padded with 0 rows to ``groups`` rows."""
    return torch.cat([ref, ref.new_zeros(groups - ref.shape[0], ref.shape[1])]) if groups > ref.shape[0] else ref


def refuse_unless_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, got {device}")


class GraphedMicroStep:
    """One micro-batch's forward + backward captured as a CUDA graph.

    ``fn(batch)`` runs the forward and backward on ``batch`` (the captured one). Gradients must exist
    before the capture (the warm-up runs create them); replays add into them.
    """

    def __init__(self, fn, batch, pool=None, warmup: int = 2):
        self.batch = batch
        self._sig = signature(batch)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn(batch)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            fn(batch)

    def load(self, batch) -> None:
        """Copy ``batch``'s token ids into the captured batch; its layout must be the captured one."""
        if signature(batch) != self._sig:
            raise ValueError("batch layout differs from the captured one: capture a graph for it")
        for f in dataclasses.fields(batch):
            src = getattr(batch, f.name)
            if isinstance(src, torch.Tensor):
                getattr(self.batch, f.name).copy_(src, non_blocking=True)

    def replay(self) -> None:
        self.graph.replay()


class GraphedSteps:
    """The benchmark's (c) step with every micro-batch replayed from its graph.

    micro_batches: the step's ``MicroBatch`` list; ref: the ``Reference``; n_groups: groups per step.
    Built on CUDA only (``refuse_unless_cuda``).
    """

    def __init__(self, model, opt, micro_batches, ref, n_groups: int, vocab: int):
        params = [p for p in model.parameters() if p.requires_grad]
        self.params = params
        self.steps = []
        pool = torch.cuda.graph_pool_handle()
        for mb in micro_batches:
            groups = _groups_of(mb.batch)
            batch, _ = bucketed_pack(groups, vocab, mb.batch.num_candidates)
            batch = batch.to(mb.batch.device)
            G = batch.num_groups
            if ref.kind != "precomputed":  # candidate_logprobs checks the token ids on the host
                raise ValueError("--cuda-graphs needs --refs precomputed")
            table = bucketed_ref(ref(None, model, mb), G).contiguous()

            def get_ref(b, table=table):
                return table

            def fn(b, get_ref=get_ref):
                loss, _ = sdpo_fast.candidate_sdpo_loss(model, b, get_ref(b), beta=1.0, reduction="sum", backend="auto")
                (loss / n_groups).backward()

            self.steps.append(GraphedMicroStep(fn, batch, pool=pool))
        # the tensors the graphs accumulate into; other methods' zero_grad(set_to_none=True) drops them
        self.grads = [p.grad for p in params]

    def run(self, micro_batches=None) -> None:
        for p, g in zip(self.params, self.grads):
            g.zero_()
            p.grad = g
        for s in self.steps:
            s.replay()


def _groups_of(batch) -> list:
    """The groups ``(prompt, [candidates])`` of a packed batch, as id lists (host copy of input_ids)."""
    ids = batch.input_ids.cpu()
    out = []
    for (row, start, _), (P, lens) in zip(batch.group_spans, batch.group_layout):
        prompt = ids[row, start : start + P].tolist()
        cands, pos = [], start + P
        for n in lens:
            cands.append(ids[row, pos : pos + n].tolist())
            pos += n
        out.append((prompt, cands))
    return out
