"""The "native" backend as a whole: its GEMM libraries, agreement with the torch and Triton backends,
"auto", option errors, the fallback without the extension, the wheel's sources for a first-use build."""

import os
import subprocess
import sys

import pytest
import torch

import sdpo_fast
from sdpo_fast import backends
from sdpo_fast.loss import fused_sdpo_loss

if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
    pytest.skip("SDPO_FAST_NO_EXT is set: the native extension is deliberately absent", allow_module_level=True)

# Without the flag the extension must load (a broken build fails here instead of skipping).
import sdpo_fast.kernels.logprobs.native as nat  # noqa: E402
from native_cases import (  # noqa: E402
    fp64_copies, leaves, num_tokens, random_groups,
)
from references import naive_loss, reference_logps as naive_logps  # noqa: E402


def test_gemm_engine_follows_the_mkldnn_switch_and_the_size(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert nat.gemm_engine() == "blas"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    assert nat.gemm_engine() in ("onednn", "blas")
    assert nat.gemm_engine(work=(1 << 28) - 1) == "blas"  # small calls: no per-shape JIT


@pytest.mark.parametrize("tile", [None, 1])
def test_vocabulary_split_into_blocks(tile, gemm_engine):
    """V = 2053: the GEMMs run as several vocabulary blocks (5 of up to 411 columns, the last one
    short; the loss's tile is stored block by block); dH sums the blocks' partials in a fixed order,
    so a rerun is bitwise equal. On both GEMM libraries: the batch is large enough (rows x V x D over
    2**28) for oneDNN, and D = 257 is odd."""
    vocab, dim = 2053, 257
    groups = random_groups(8, n_groups=40, vocab=vocab, max_k=8, max_len=6)
    batch = sdpo_fast.pack_groups(groups)
    assert nat.gemm_engine(batch.logit_rows.numel() * vocab * dim) == gemm_engine
    gen = torch.Generator().manual_seed(8)
    h = (torch.randn(num_tokens(batch), dim, generator=gen) * 0.25).requires_grad_(True)
    w = (torch.randn(vocab, dim, generator=gen) * 0.25).requires_grad_(True)
    ref = torch.randn(batch.candidate_mask.shape) - 9.0
    loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.3, backend="native", tile_elements=tile)
    loss.backward()
    h64, w64 = fp64_copies(h, w)
    logps64 = naive_logps(h64, w64, groups, batch)
    naive_loss(logps64, ref.double(), batch, 1.0, 0.3).backward()
    torch.testing.assert_close(metrics["logps"].double(), logps64.detach(), rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    first = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    fused_sdpo_loss(h, w, batch, ref, sft_weight=0.3, backend="native", tile_elements=tile)[0].backward()
    assert torch.equal(h.grad, first[0]) and torch.equal(w.grad, first[1])

    h.grad = w.grad = h64.grad = w64.grad = None
    upstream = torch.randn(batch.candidate_mask.shape)
    # the plain op: default blocks of 512 columns (the last one 5 wide), or narrow blocks and small chunks
    seq = {} if tile is None else dict(keep_elements=0, keep_in_grad=False, block=100, chunk_rows=2)
    lp = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **seq)
    (lp * upstream).sum().backward()
    (naive_logps(h64, w64, groups, batch) * upstream.double()).sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)
    first = (lp.detach(), h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    lp = sdpo_fast.sequence_logprobs(h, w, batch, backend="native", **seq)
    (lp * upstream).sum().backward()
    assert torch.equal(lp.detach(), first[0]) and torch.equal(h.grad, first[1]) and torch.equal(w.grad, first[2])


def test_agrees_with_torch_and_triton_and_is_deterministic():
    groups = random_groups(6, n_groups=3)
    batch = sdpo_fast.pack_groups(groups)
    h, w = leaves(num_tokens(batch), seed=6)
    ref = torch.randn(batch.candidate_mask.shape) - 6.0
    names = ["native", "torch"] + (["triton"] if "triton" in backends.available("logprobs") else [])
    results = {}
    for name in names + ["native"]:  # native twice: bitwise rerun check
        h.grad = w.grad = None
        lp = sdpo_fast.sequence_logprobs(h, w, batch, backend=name)
        (lp * torch.linspace(-1, 1, lp.numel()).view(lp.shape)).sum().backward()
        out = [lp.detach(), h.grad.clone(), w.grad.clone()]
        h.grad = w.grad = None
        loss, metrics = fused_sdpo_loss(h, w, batch, ref, sft_weight=0.2, backend=name)
        loss.backward()
        out += [loss.detach(), metrics["logps"], h.grad.clone(), w.grad.clone()]
        if name in results:
            assert all(torch.equal(a, b) for a, b in zip(out, results[name])), "native is not deterministic"
        results[name] = out
    for name in names[1:]:
        for a, b in zip(results["native"], results[name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=f"native vs {name}")


def test_auto_prefers_native_on_cpu():
    assert backends.resolve("logprobs", "auto", "cpu") == "native"
    assert backends.resolve("sdpo_loss", "auto", "cpu") == "native"


def test_bad_options_raise():
    batch = sdpo_fast.pack_groups([([1, 2], [[3], [4]])])
    h, w = leaves(num_tokens(batch))
    with pytest.raises(ValueError, match="keep_elements"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", keep_elements=-1)
    with pytest.raises(ValueError, match="block"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", block=0)
    with pytest.raises(ValueError, match="chunk_rows"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", chunk_rows=2.5)
    with pytest.raises(TypeError, match="tile_elements"):
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", tile_elements=10)
    with pytest.raises(ValueError, match="tile_elements"):
        fused_sdpo_loss(h, w, batch, torch.zeros(batch.candidate_mask.shape), backend="native", tile_elements=0)
    with pytest.raises(TypeError, match="path"):  # an option of the loss only
        sdpo_fast.sequence_logprobs(h, w, batch, backend="native", path="tiled")


@pytest.mark.slow  # a fresh interpreter imports the package
def test_skipped_extension_falls_back_with_one_warning():
    code = (
        "import warnings, torch, sdpo_fast\n"
        "from sdpo_fast import backends\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    b = sdpo_fast.pack_groups([([1, 2], [[3], [4, 5]])])\n"
        "    h, w = torch.randn(b.shape[1], 8), torch.randn(16, 8)\n"
        "    out = sdpo_fast.sequence_logprobs(h, w, b)\n"
        "    out = sdpo_fast.sequence_logprobs(h, w, b)\n"
        "    assert backends.resolve('logprobs', 'auto', 'cpu') == 'torch'\n"
        "    assert 'native' not in backends.available('sdpo_loss')\n"
        "msgs = [str(c.message) for c in caught if 'native' in str(c.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert 'torch backend' in msgs[0] and 'SDPO_FAST_NO_EXT' in msgs[0], msgs[0]\n"
        "assert torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, SDPO_FAST_NO_EXT="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


@pytest.mark.slow  # builds a wheel
def test_wheel_ships_the_sources_for_a_first_use_build(tmp_path):
    """A wheel built without the extension (what an install that cannot see torch produces) carries
    csrc/ as sdpo_fast/_csrc, and, installed away from any checkout, sdpo_fast/kernels/extension.py
    compiles from there."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SDPO_FAST_NO_EXT="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(root)], env=env, check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("sdpo_fast-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    assert {f"sdpo_fast/_csrc/{n}" for n in ("common.h", "logprobs.cpp", "sdpo_loss.cpp", "bindings.cpp", "rowops.cpp",
                                                   "rowops.h", "gemm.cpp", "gemm.h")} <= names
    assert not any(n.endswith(".so") for n in names)
    # The compiler is stubbed: only which sources it would be given matters here (a real build takes a minute).
    code = (
        "import sys\n"
        # this environment's editable install would hand out the checkout's prebuilt extension
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        "import torch.utils.cpp_extension as ce\n"
        "seen = []\n"
        "def load(name, sources, **kw):\n"
        "    seen.extend(sources)\n"
        "    raise RuntimeError('stub compiler')\n"
        "ce.load = load\n"
        "try:\n"
        "    import sdpo_fast.kernels.extension\n"
        "except ImportError as exc:\n"
        "    assert 'stub compiler' in str(exc), exc\n"
        "print('\\n'.join(seen))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SDPO_FAST_NO_EXT"}
    env["PYTHONPATH"] = str(site)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    sources = [Path(s) for s in res.stdout.split()]
    assert [s.name for s in sources] == ["gemm.cpp", "rowops.cpp", "logprobs.cpp", "sdpo_loss.cpp", "bindings.cpp"]
    assert all(s.parent == site / "sdpo_fast" / "_csrc" and s.is_file() for s in sources), sources
