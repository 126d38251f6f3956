"""What a CUDA-graph replay of the training micro-step relies on (``sdpo_fast.graphs``), checked on CPU,
and on CUDA the replay itself.

- The replay condition: one forward + backward of ``candidate_sdpo_loss(..., backend="cublas")`` (the
  CUDA code path: Triton attention launcher, cuBLAS-style GEMMs and Triton row kernels) dispatches the
  same aten ops, with the same shapes, dtypes, strides and host-side arguments, for any two batches
  of one shape bucket. The step runs on CPU with every Triton launch replaced by a no-op (as in
  tests/test_step_ops.py), so what is recorded is what the host dispatches around the kernels; a
  tensor built from host data (``torch.tensor(list)``) is recorded with its values. Negative control:
  the same groups packed with ``pack_groups`` give other records.
- The step reads nothing back to the host (a ``TorchFunctionMode`` spy as in tests/test_train_syncs.py,
  and the dispatched ops that wait for the device on CUDA).
- ``StepGraphs`` run eagerly (``capture=False``): its input checks and its gradient bookkeeping.
- On CUDA (``gpu`` marker): a graph captured on one batch replays another layout of its bucket with
  the eager loss and gradients.
"""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from conftest import tiny_llama as conftest_llama

import sdpo_fast
import sdpo_fast.kernels
import sdpo_fast.model as sm
from sdpo_fast import pack_groups
from sdpo_fast.buckets import pack_bucketed
from sdpo_fast.graphs import StepGraphs

pytestmark = pytest.mark.usefixtures("one_thread")

V = 61
Q = dict(row_quantum=24, rows_quantum=12)

# Two group sets of one bucket (same G, C and number of negatives; other lengths and spreads).
GROUPS_A = [([1, 2, 3], [[4, 5], [6], [7, 8, 9]]), ([10], [[11], [12, 13]]), ([14, 15], [[16]])]
GROUPS_B = [([5], [[6], [7, 8], [9]]), ([1, 2, 3, 4], [[5, 6, 7, 8]]), ([8, 9], [[10, 11], [12]])]
# A third layout of the same bucket, for two consecutive calls plus a warm-up.
GROUPS_C = [([7, 7], [[1], [2], [3, 4]]), ([9, 8, 7], [[6, 5]]), ([4], [[3, 2, 1], [5]])]


def _batches(device=None):
    out = [pack_bucketed(g, vocab_size=V, device=device, **Q) for g in (GROUPS_A, GROUPS_B, GROUPS_C)]
    assert len({b.bucket for b in out}) == 1 and len({b.group_layout for b in out}) == 3
    assert len({b.padding_groups for b in out}) == 1
    return out


def tiny_llama(lora: bool = False, layers: int = 2):
    model = conftest_llama(V, hidden=32, intermediate=48, layers=layers, max_positions=128)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj", "down_proj"],
                                                            init_lora_weights=False))
    return model


def _ref(batch, seed=0):
    """``[G, C]`` reference log-probs: random on the real groups' candidates, 0 on the padding groups."""
    gen = torch.Generator().manual_seed(seed)
    mask = batch.candidate_mask.cpu().clone()
    mask[batch.num_real_groups:] = False
    return (-torch.rand(mask.shape, generator=gen) * 8).masked_fill(~mask, 0.0).to(batch.device)


# ---- the CUDA code path on CPU, kernel launches stubbed (conftest.stubbed_kernels) ------------------


def _arg(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.dtype, a.stride(), a.device.type)
    if isinstance(a, float):
        return ("f", a.hex())  # exact
    return a if isinstance(a, (int, bool, str, type(None))) else repr(a)


def _waits_for_device(func, args, kwargs) -> bool:
    """Ops that on CUDA make the host wait for the device: a tensor value read on the host, or an
    output size that depends on tensor values."""
    name = str(func.overloadpacket).split(".")[-1]
    if name in ("_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "unique_dim",
                "_unique", "_unique2", "unique_consecutive", "item"):
        return True
    if func is torch.ops.aten.repeat_interleave.Tensor:  # repeats given as a tensor: the output size
        return kwargs.get("output_size") is None
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean-mask indexing
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    return False


class OpRecorder(TorchDispatchMode):
    """Every dispatched aten op as ``(name, args, kwargs)`` with tensors as (shape, dtype, stride,
    device); a tensor made from host data (``lift_fresh``) also with its values. ``waits``: the ops
    that would wait for the device (``_waits_for_device``)."""

    def __init__(self):
        super().__init__()
        self.ops, self.waits = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = (str(func), tree_map(_arg, tuple(args)), tuple(sorted((k, tree_map(_arg, v)) for k, v in kwargs.items())))
        if func.overloadpacket in (torch.ops.aten.lift_fresh, torch.ops.aten.lift_fresh_copy):
            rec += (tuple(args[0].flatten().tolist()),)
        self.ops.append(rec)
        if _waits_for_device(func, args, kwargs):
            self.waits.append(str(func))
        return func(*args, **kwargs)


def _step(model, batch, ref, options=None):
    loss, metrics = sdpo_fast.candidate_sdpo_loss(model, batch, ref, beta=0.7, sft_weight=0.5, backend="cublas",
                                                  options=options)
    loss.backward()
    return loss, metrics


def _record(model, batch, options):
    ref = _ref(batch)
    with OpRecorder() as rec:
        _step(model, batch, ref, options)
    return rec


def _first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    return min(len(a), len(b)), f"{len(a)} ops", f"{len(b)} ops"


@pytest.mark.parametrize("options", [None, {"chunk_rows": 7}], ids=["one-chunk", "device-chunks"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_one_bucket_dispatches_one_op_sequence(stubbed_kernels, lora, options):
    model = tiny_llama(lora)
    a, b, c = _batches()
    _step(model, c, _ref(c), options)  # first-call work (backend loading, caches) outside the records
    rec_a, rec_b = _record(model, a, options), _record(model, b, options)
    assert len(rec_a.ops) > 300  # forward and backward were recorded (tens of ops per layer)
    assert sum(op[0].startswith("aten.mm") for op in rec_a.ops) >= 10
    assert rec_a.ops == rec_b.ops, _first_difference(rec_a.ops, rec_b.ops)
    assert rec_a.waits == rec_b.waits == []  # no op waits for the device either

    # negative control: the same groups unbucketed give layout-dependent records
    pa, pb = pack_groups(GROUPS_A, vocab_size=V), pack_groups(GROUPS_B, vocab_size=V)
    assert _record(model, pa, options).ops != _record(model, pb, options).ops


def test_the_recorder_sees_host_data_and_waits():
    """The recorder's own negative controls: same shapes, other host values or host ints differ."""
    def run(values, n):
        with OpRecorder() as rec:
            t = torch.tensor(values)
            x = torch.arange(6.0)
            x[: n].sum()
        return rec

    assert run([1, 2], 3).ops == run([1, 2], 3).ops
    assert run([1, 2], 3).ops != run([1, 3], 3).ops  # a tensor from other host data
    assert run([1, 2], 3).ops != run([1, 2], 4).ops  # a host int (a slice bound)
    with OpRecorder() as rec:
        x = torch.arange(5)
        x[x > 2], x.nonzero(), torch.repeat_interleave(x, x), torch.repeat_interleave(x, x, output_size=10)
        x[1].item()
    assert [w.split(".")[1] for w in rec.waits] == ["index", "nonzero", "repeat_interleave", "_local_scalar_dense"]


T = torch.Tensor
READS = {T.item, T.tolist, T.cpu, T.numpy, T.nonzero, torch.nonzero, T.__bool__, T.__int__, T.__float__, T.__index__}
COPIES = {T.to, T.cuda, T.copy_}


PROJECT_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (sdpo_fast, sdpo_fast.kernels))


class HostSyncs(TorchFunctionMode):
    """Records ``(what, file:line)`` of every call that makes the host wait for the device on CUDA: a
    read of a tensor's value (by anyone), or a blocking copy to a device made by this project (a cast
    is none; transformers' ``.to(x.device)`` of its rotary buffers is a no-op on one device). On CPU
    every tensor is a host tensor, so the calls themselves are recorded."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = sys._getframe(1)
        counted = func in READS
        if func in COPIES and not kwargs.get("non_blocking", False):
            counted = frame.f_code.co_filename.startswith(PROJECT_DIRS) and (
                "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:]) or func is T.cuda)
        if counted:
            self.calls.append((func.__name__, f"{frame.f_code.co_filename}:{frame.f_lineno}"))
        return func(*args, **kwargs)


@pytest.mark.parametrize("options", [None, {"chunk_rows": 7}], ids=["one-chunk", "device-chunks"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_step_reads_nothing_back(stubbed_kernels, lora, options):
    model = tiny_llama(lora)
    a, _, c = _batches()
    _step(model, c, _ref(c), options)
    ref = _ref(a)
    with HostSyncs() as spy:
        _step(model, a, ref, options)
    assert spy.calls == [], spy.calls


def test_the_sync_spy_sees_every_kind():
    x = torch.ones(3)
    packed = _batches()[0]
    n_tensors = sum(isinstance(v, torch.Tensor) for v in vars(packed).values())
    with HostSyncs() as spy:
        x[0].item(), x.tolist(), x.cpu(), x.nonzero(), x.numpy(), bool(x[0]), int(x[0]), float(x[0])
        x.to(torch.float64), packed.to("cpu", non_blocking=True)  # a cast and asynchronous copies: no syncs
        x.to("cpu")  # a copy made here, outside the project: not counted
        packed.to("cpu")  # blocking copies made by the project's code
    assert [name for name, _ in spy.calls] == ["item", "tolist", "cpu", "nonzero", "numpy", "__bool__", "__int__",
                                               "__float__"] + ["to"] * n_tensors


# ---- StepGraphs, eagerly ---------------------------------------------------------------------------


def _graph_step(model, backend="torch"):
    def step(batch, ref):
        loss, metrics = sdpo_fast.candidate_sdpo_loss(model, batch, ref, beta=0.7, sft_weight=0.5, backend=backend)
        loss.backward()
        return loss.detach(), metrics["logps"]

    return step


def _eager(model, batch, ref, backend="torch"):
    """Loss, logps and the trained parameters' gradients of one plain backward (``.grad`` untouched)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss, metrics = sdpo_fast.candidate_sdpo_loss(model, batch, ref, beta=0.7, sft_weight=0.5, backend=backend)
    return loss.detach(), metrics["logps"], torch.autograd.grad(loss, params)


def test_step_graphs_checks_its_inputs():
    model = tiny_llama()
    graphs = StepGraphs(_graph_step(model), model.parameters(), capture=False)
    a = _batches()[0]
    plain = pack_groups(GROUPS_A, vocab_size=V)
    with pytest.raises(ValueError, match="bucketed"):
        graphs(plain, torch.zeros(plain.candidate_mask.shape))
    real = a.candidate_mask[: a.num_real_groups].shape  # the padding groups' rows left out
    with pytest.raises(ValueError, match=r"ref must be \[G, C\] = \(4, 3\)"):
        graphs(a, torch.zeros(real))
    with pytest.raises(ValueError, match="ref must be"):
        graphs(a, torch.zeros(a.candidate_mask.shape).t())
    assert graphs.eager_steps == 0 and all(p.grad is None for p in model.parameters())  # nothing ran
    with pytest.raises(ValueError, match="max_graphs"):
        StepGraphs(_graph_step(model), model.parameters(), capture=False, max_graphs=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_capture_needs_cuda():
    model = tiny_llama()
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(_graph_step(model), model.parameters(), capture=True)
    with pytest.raises(ValueError, match="CUDA"):
        StepGraphs(_graph_step(model), model.parameters())  # capture is the default


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_each_call_gives_its_own_batch_gradients(lora):
    """Two consecutive calls with different batches: after each, ``.grad`` is that batch's eager gradient
    (the buffers are zeroed per call, not accumulated), in the same buffers; ``accumulate=True`` adds."""
    model = tiny_llama(lora)
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert bool(frozen) == lora
    a, b, c = _batches()
    graphs = StepGraphs(_graph_step(model), model.parameters(), capture=False)
    buffers = None
    for i, batch in enumerate((a, b, c)):
        ref = _ref(batch, seed=i)
        want_loss, want_logps, want = _eager(model, batch, ref)
        loss, logps = graphs(batch, ref)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(logps, want_logps, rtol=1e-6, atol=1e-6)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        assert any(g.abs().max() > 0 for g in want)
        if buffers is None:
            buffers = [p.grad for p in params]
        assert all(p.grad is buf for p, buf in zip(params, buffers))  # accumulated in place
        assert all(p.grad is None for p in frozen)
        if i == 1:  # an optimizer's zero_grad(set_to_none=True): the next call re-attaches the buffers
            for p in params:
                p.grad = None
    assert graphs.eager_steps == 3 and graphs.replays == 0 and graphs.graphs == {}

    # accumulate: micro-batches of one optimizer step add up
    ref_a, ref_b = _ref(a, seed=0), _ref(b, seed=1)
    want = [ga + gb for ga, gb in zip(_eager(model, a, ref_a)[2], _eager(model, b, ref_b)[2])]
    graphs(a, ref_a)
    graphs(b, ref_b, accumulate=True)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_a_capture_out_of_memory_leaves_that_bucket_eager(monkeypatch):
    """A bucket whose capture runs out of memory runs eagerly from then on, with the eager gradients, and
    is not captured again (the capture itself is CUDA's; here it fails at once)."""
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    a, b, _ = _batches()
    graphs = StepGraphs(_graph_step(model), model.parameters(), capture=False)
    graphs.capture = True  # as on CUDA, with a capture that fails
    tries = []

    def out_of_memory(batch, ref, accumulate):
        tries.append(batch.bucket)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(graphs, "_capture", out_of_memory)
    for i, batch in enumerate((a, b)):
        ref = _ref(batch, seed=i)
        want_loss, _, want = _eager(model, batch, ref)
        if i == 0:
            with pytest.warns(UserWarning, match="ran out of memory; its batches run eagerly"):
                loss, _ = graphs(batch, ref)
        else:
            loss, _ = graphs(batch, ref)
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert tries == [a.bucket] and graphs.uncaptured == {(a.bucket, a.padding_groups, "cpu", torch.float32)}
    assert graphs.eager_steps == 2 and graphs.graphs == {}


class _FakeStream:
    def wait_stream(self, other):
        pass


class _OutOfMemoryAtCaptureEnd:
    """Stands in for ``torch.cuda.graph``: the body runs (eagerly, so the step adds to the gradients as a
    capture's warm-ups do) and the capture then fails as an allocation inside it would."""

    def __init__(self, graph, stream=None, capture_error_mode=None):
        self.captured = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, inside the capture)")
        return False


@pytest.mark.parametrize("accumulate", [False, True], ids=["zeroed", "accumulating"])
def test_a_failed_capture_restores_the_gradients(monkeypatch, accumulate):
    """``_capture``'s own bookkeeping when the capture fails after its warm-ups and its body ran (both
    added to ``.grad``): the gradients are restored, so the eager step that follows gives this batch's
    gradient (plus, when accumulating, what was there before). CUDA's stream and graph are faked."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", _OutOfMemoryAtCaptureEnd)
    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    a, b, _ = _batches()
    ref_a, ref_b = _ref(a, seed=0), _ref(b, seed=1)
    graphs = StepGraphs(_graph_step(model), model.parameters(), capture=False)
    if accumulate:
        graphs(a, ref_a)  # eager (capture off for this call): the gradients to accumulate onto
    want = _eager(model, b, ref_b)[2]
    if accumulate:
        want = [w + g for w, g in zip(want, _eager(model, a, ref_a)[2])]
    graphs.capture = True
    with pytest.warns(UserWarning, match="ran out of memory"):
        graphs(b, ref_b, accumulate=accumulate)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert graphs.graphs == {} and len(graphs.uncaptured) == 1


# ---- the replay itself (CUDA) ----------------------------------------------------------------------


def _clone(batch):
    return batch.clone()


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_captured_graph_replays_another_layout(lora):
    """Capture on batch A, replay B and C (other layouts of A's bucket), then A again: each replay gives
    the eager loss, log-probs and gradients of its batch (eager runs on copies: the graph reads the
    captured batch's tensors, which every replay overwrites)."""
    dev = torch.device("cuda")
    model = tiny_llama(lora).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _batches(dev)
    copies = [_clone(b) for b in batches]
    refs = [_ref(b, seed=i) for i, b in enumerate(batches)]
    wants = [_eager(model, c, r, backend="cublas") for c, r in zip(copies, refs)]
    graphs = StepGraphs(_graph_step(model, backend="cublas"), model.parameters(), capture=True)
    order = [0, 1, 2, 0]
    for n, i in enumerate(order):
        loss, logps = graphs(batches[i] if n == 0 else _clone(copies[i]), refs[i])
        torch.cuda.synchronize()
        want_loss, want_logps, want = wants[i]
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-5)
        for p, g in zip(params, want):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert len(graphs.graphs) == 1 and graphs.replays == len(order) and graphs.eager_steps == 0
    # the negative control: the layouts' gradients differ, so a stale replay would have been seen
    assert any((ga - gb).abs().max() > 1e-4 for ga, gb in zip(wants[0][2], wants[1][2]))


@pytest.mark.gpu
def test_full_fine_tuning_replays_a_row_of_over_4096_tokens():
    """Full fine-tuning trains the embedding, whose CUDA backward takes another path (sort and unique)
    above 4096 indices; the captured step of a ~5,000-token row replays with the eager gradients."""
    dev = torch.device("cuda")
    model = tiny_llama().to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)

    def groups(seed):
        g.manual_seed(seed)
        rand = lambda n: torch.randint(1, V, (n,), generator=g).tolist()
        return [(rand(100), [rand(3), rand(2), rand(4)]) for _ in range(48)]

    batches = [pack_bucketed(groups(s), vocab_size=V, device=dev) for s in (1, 2)]
    assert batches[0].bucket == batches[1].bucket and batches[0].shape[1] > 4096
    refs = [_ref(b, seed=i) for i, b in enumerate(batches)]
    wants = [_eager(model, _clone(b), r, backend="cublas") for b, r in zip(batches, refs)]
    graphs = StepGraphs(_graph_step(model, backend="cublas"), model.parameters(), capture=True)
    for i in (0, 1):
        loss, _ = graphs(_clone(batches[i]), refs[i])
        torch.cuda.synchronize()
        torch.testing.assert_close(loss, wants[i][0], rtol=1e-5, atol=1e-6)
        for p, want in zip(params, wants[i][2]):
            torch.testing.assert_close(p.grad, want, rtol=1e-4, atol=1e-6)
    assert graphs.replays == 2 and graphs.eager_steps == 0


@pytest.mark.gpu
def test_graphs_replay_after_another_objects_graphs_are_gone():
    """Two ``StepGraphs`` (the benchmark's and the trainer's in bench_trainer.py): the first one's graphs
    freed, the second's still replay with the eager gradients (each capture has its own stream, so no
    graph holds a cuBLAS workspace that a destroyed graph's stream owned)."""
    dev = torch.device("cuda")
    model = tiny_llama(lora=True).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _batches(dev)
    refs = [_ref(b, seed=i) for i, b in enumerate(batches)]
    first = StepGraphs(_graph_step(model, backend="cublas"), model.parameters(), capture=True)
    first(_clone(batches[0]), refs[0])
    second = StepGraphs(_graph_step(model, backend="cublas"), model.parameters(), capture=True)
    second(_clone(batches[0]), refs[0])
    del first
    import gc

    gc.collect()
    torch.cuda.synchronize()
    want_loss, _, want = _eager(model, _clone(batches[1]), refs[1], backend="cublas")
    loss, _ = second(_clone(batches[1]), refs[1])
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
