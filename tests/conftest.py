import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from native_cases import LOSS_PATHS

# Triton kernels run on CPU through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread for a module. On a shared 2-core machine torch's default
    threads spin against other processes (tests/test_eval.py: 127 s vs 19 s measured under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_llama(vocab_size: int, *, hidden: int = 48, intermediate: int = 96, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, max_positions: int = 512, tokenizer=None, seed: int = 0):
    """A randomly initialised fp32 ``LlamaForCausalLM`` (``torch.manual_seed(seed)`` first), with the
    tokenizer's eos / pad / bos ids when one is given: the tests' tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {} if tokenizer is None else dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      **ids)
    return LlamaForCausalLM(cfg).float()


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.fixture
def stubbed_kernels(monkeypatch):
    """The CUDA code path on CPU: the Triton attention launcher and the "cublas" loss (library GEMMs +
    Triton row kernels) with every Triton kernel launch a no-op, so a test sees exactly what the host
    dispatches around the kernels (the values are meaningless)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backends.resolve accept "triton"/"cublas" on CPU
    import sdpo_fast.kernels.attention.launch as attn
    import sdpo_fast.kernels.logprobs.cublas as cub
    import sdpo_fast.model as sm

    stubbed = 0
    for mod in (attn, cub):
        for name in dir(mod):
            if name.endswith("_kernel") and hasattr(getattr(mod, name), "__getitem__"):
                monkeypatch.setattr(mod, name, _NoLaunch())
                stubbed += 1
    assert stubbed >= 5  # three attention kernels, two row kernels
    assert sm._attention_backend_for("cublas") == "triton"


def load_benchmark(name: str):
    """Imports ``benchmarks/<name>.py`` (not a package) as module ``name``, with the folder on sys.path
    as when the script runs (it imports the shared ``harness`` from there)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    path = folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ---- fixtures of the native backend's tests (tests/test_native_*.py) ----------------------------


@pytest.fixture(params=list(LOSS_PATHS))
def loss_opts(request):
    """The native loss options selecting one path of LOSS_PATHS."""
    return LOSS_PATHS[request.param]


@pytest.fixture
def spy(monkeypatch):
    """watch(kernel, record): from then on every call of the extension's `kernel` appends
    record(args, outputs) to the list watch returns (one list for all watched kernels)."""
    import sdpo_fast.kernels.logprobs.native as nat

    real, records, seen = nat.extension, {}, []

    class Spy:
        def __getattr__(self, name):
            kernel = getattr(real, name)
            if name not in records:
                return kernel

            def watched(*args):
                out = kernel(*args)
                seen.append(records[name](args, out))
                return out

            return watched

    monkeypatch.setattr(nat, "extension", Spy())

    def watch(kernel, record):
        records[kernel] = record
        return seen

    return watch


@pytest.fixture(params=["onednn", "blas"])
def gemm_engine(request, monkeypatch):
    """Runs a test on each library the native GEMMs can use (gemm.cpp): oneDNN's matmul where torch
    has it, and torch's BLAS, which torch.backends.mkldnn.enabled = False selects."""
    import sdpo_fast.kernels.logprobs.native as nat

    monkeypatch.setattr(torch.backends.mkldnn, "enabled", request.param == "onednn")
    if nat.gemm_engine() != request.param:
        pytest.skip(f"{request.param} GEMMs are not available with this torch / CPU")
    return request.param
