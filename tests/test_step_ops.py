"""The benchmark's sdpo_fast step dispatches a fixed number of aten ops, whatever the number of groups
in a micro-batch, and its packed forward reads nothing back to the host.

The step runs the CUDA code path on CPU: the Triton attention launcher and the "cublas" loss (library
GEMMs + Triton row kernels) with every Triton kernel launch replaced by a no-op, so what is counted is
exactly what the host dispatches around the kernels (the values are meaningless and not looked at).
A per-group Python loop that dispatches ops makes the count grow with the groups: the negative
control runs the torch reference attention, which loops over groups, and must see the count grow.
"""

import pytest
import torch
from conftest import load_benchmark
from torch.utils._python_dispatch import TorchDispatchMode


OpCounter = load_benchmark("harness").op_counter  # counts per aten op and their total

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_step")


def _step_ops(bench, n_groups: int, attention: str, mode: str = "lora", peft_layers: bool = False) :
    """aten ops of one optimizer step of (c) on ``n_groups`` groups in one micro-batch (precomputed ref);
    ``peft_layers``: the LoRA layers put back to peft's own class (not fused)."""
    import sdpo_fast
    import sdpo_fast.model as sm

    args = bench.parse_args(["--preset", "cpu", "--device", "cpu", "--layers", "2", "--hidden", "32",
                             "--intermediate", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "301",
                             "--lora-rank", "4"])
    dev = torch.device("cpu")
    cfg = bench.shapes.model_config("tiny-1b", args.overrides)
    torch.manual_seed(0)
    model, opt = bench.sweep.build_model(cfg, mode, args, dev)
    if peft_layers:
        from sdpo_fast.adapters import unfuse_lora_layers

        unfuse_lora_layers(model)
    groups = bench.shapes.make_groups(n_groups, bench.shapes.parse_shape("paper"), 3, 301, seed=n_groups)
    (mb,) = bench.shapes.split(groups, n_groups, 3, 301, dev)
    ref = bench.microbatch.Reference("precomputed", model, mode == "lora", table=torch.zeros(n_groups, 4))

    class Method:
        logprobs = None

        @staticmethod
        def loss(model, mb, ref):
            loss, metrics = sdpo_fast.candidate_sdpo_loss(model, mb.batch, ref, backend="cublas")
            return loss, metrics["logps"]

    orig = sm._attention_backend_for
    sm._attention_backend_for = lambda backend: attention
    try:
        bench.microbatch.optimizer_step(Method, model, opt, [mb], ref, n_groups)  # warm-up (optimizer state)
        with OpCounter() as ops:
            bench.microbatch.optimizer_step(Method, model, opt, [mb], ref, n_groups)
    finally:
        sm._attention_backend_for = orig
    return ops


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_step_op_count_does_not_grow_with_groups(bench, stubbed_kernels, mode):
    counts = {g: _step_ops(bench, g, "triton", mode) for g in (2, 8)}
    assert counts[2].total > 100  # the whole step was counted (model, loss, backward, optimizer)
    assert counts[8].counts == counts[2].counts, {
        k: (counts[2].counts.get(k), counts[8].counts.get(k))
        for k in set(counts[2].counts) | set(counts[8].counts) if counts[2].counts.get(k) != counts[8].counts.get(k)
    }


def test_fused_lora_layers_dispatch_fewer_ops(bench, stubbed_kernels):
    """sdpo_fast.lora_linear: one autograd function per adapted projection instead of peft's modules."""
    fused, plain = _step_ops(bench, 2, "triton"), _step_ops(bench, 2, "triton", peft_layers=True)
    # 2 layers x 7 projections; peft's layer dispatches about 20 more ops each, forward and backward
    assert fused.total < plain.total - 14 * 12, (fused.total, plain.total)
    assert fused.counts.get("aten.addmm_", 0) >= 14 and "aten.addmm_" not in plain.counts


def test_op_count_sees_a_per_group_loop(bench, stubbed_kernels):
    """Negative control: the torch reference attention loops over groups, and the count grows."""
    assert _step_ops(bench, 8, "torch").total > _step_ops(bench, 2, "torch").total


class SyncCounter(TorchDispatchMode):
    """Counts reads of a tensor's value on the host (``.item()``, ``bool(t)``, ``.tolist()``: all
    dispatch ``aten._local_scalar_dense``) and copies to the CPU."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._local_scalar_dense:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def test_packed_forward_reads_nothing_back(bench, stubbed_kernels):
    """transformers' packed-sequence detection (``bool`` of a device tensor) is skipped in the packed
    call: the sdpo_fast training step's forward + backward read no tensor value on the host."""
    import sdpo_fast
    import sdpo_fast.model as sm

    args = bench.parse_args(["--preset", "cpu", "--device", "cpu", "--layers", "2", "--hidden", "32",
                             "--intermediate", "64", "--heads", "4", "--kv-heads", "2", "--vocab", "301"])
    cfg = bench.shapes.model_config("tiny-1b", args.overrides)
    model, _ = bench.sweep.build_model(cfg, "full", args, torch.device("cpu"))
    groups = bench.shapes.make_groups(3, bench.shapes.parse_shape("paper"), 3, 301, seed=0)
    batch = sdpo_fast.pack_groups(groups)
    orig = sm._attention_backend_for
    sm._attention_backend_for = lambda backend: "triton"
    try:
        with SyncCounter() as spy:
            loss, _ = sdpo_fast.candidate_sdpo_loss(model, batch, torch.zeros(3, 4), backend="cublas")
            loss.backward()
    finally:
        sm._attention_backend_for = orig
    assert spy.syncs == 0
    # and the spy does see one: the same decoder call without the placeholder mask syncs in transformers
    with SyncCounter() as spy, sdpo_fast.attention.packed_forward():
        model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                            sdpo_batch=batch, sdpo_attention_backend="torch")
    assert spy.syncs >= 1
