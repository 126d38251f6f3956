"""The trainer's batches reach the device asynchronously: the DataLoader's pin-memory step (torch's own
``pin_memory`` function, run here with ``Tensor.pin_memory`` replaced, since pinning needs CUDA) pins
every tensor of a ``StepBatches`` item ``(SDPOBatch, ref)``; a tensor left pageable would make its
``.to(cuda, non_blocking=True)`` wait."""

import dataclasses

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory as loader_pin_memory

from sdpo_fast import pack_groups
from sdpo_fast.buckets import pack_bucketed
from sdpo_fast.data.collate import SDPOBatch

GROUPS = [([1, 2, 3], [[4, 5], [6]]), ([7], [[8], [9, 10], [11]])]


def _tensors(batch: SDPOBatch) -> list[torch.Tensor]:
    packed = [getattr(batch.packed, f.name) for f in dataclasses.fields(batch.packed)]
    return [t for t in packed if isinstance(t, torch.Tensor)] + [batch.candidate_index, batch.idx]


@pytest.fixture
def fake_pinning(monkeypatch):
    pinned = set()

    def pin(self, *args, **kwargs):
        out = self.clone()
        pinned.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    return pinned


@pytest.mark.parametrize("pack", [pack_groups, pack_bucketed], ids=["plain", "bucketed"])
@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "no-ref"])
def test_every_tensor_of_a_step_item_is_pinned(fake_pinning, pack, with_ref):
    packed = pack(GROUPS, vocab_size=16)
    G, C = packed.candidate_mask.shape
    batch = SDPOBatch(packed=packed, candidate_index=torch.arange(G * C).reshape(G, C), idx=torch.arange(G),
                      example_ids=("a", "b"))
    ref = torch.randn(G, C) if with_ref else None
    out_batch, out_ref = loader_pin_memory((batch, ref))
    tensors = _tensors(out_batch)
    assert len(tensors) >= 8 and all(id(t) in fake_pinning for t in tensors)
    for got, want in zip(tensors, _tensors(batch)):
        assert torch.equal(got, want)
    assert out_batch.packed.bucket == packed.bucket and out_batch.example_ids == ("a", "b")
    assert (out_ref is None) if ref is None else (id(out_ref) in fake_pinning and torch.equal(out_ref, ref))
