"""The ``"native"`` backend: C++ CPU kernels (csrc/) for the fused log-probs and the S-DPO loss.

The extension ``sdpo_fast._native`` is compiled by ``setup.py`` when torch is importable at install
time (``pip install --no-build-isolation -e .``, what ``.ci/run`` does). Otherwise (a plain
``pip install -e .`` builds in an isolated environment without torch) it is compiled on first use with
``torch.utils.cpp_extension.load`` from the checkout's ``csrc/`` and cached in torch's extension
directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``); that takes about a minute
once. A prebuilt ``sdpo_fast._native`` wins over the JIT build: after editing csrc/ rebuild it
(``python setup.py build_ext --inplace`` or reinstall). ``SDPO_FAST_NO_EXT=1`` skips both. When no
extension can be had, importing this module raises ImportError with the reason, ``backends`` turns it
into one warning, and ``"auto"`` uses ``"torch"``.

Both ops take ``tile_elements`` (fp32 logits held at once): the S-DPO loss (default ``2**23``, 32 MiB)
keeps every group whose logit rows fit it in one tile and reuses the tile for the gradients (three
GEMMs); larger groups recompute their logits. ``sequence_logprobs`` (same default) always recomputes
in its backward, since its upstream gradient arrives later. (A 64 MiB tile for it measured no faster
at the benchmark shape and put its working memory over 1/8 of eager's.)
bf16/fp16 inputs are computed in fp32 (``weight`` is converted once per call: ``V * D * 4`` bytes).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import torch

from . import backends
from .packing import PackedBatch

__all__ = ["DEFAULT_LOGPROBS_TILE_ELEMENTS", "DEFAULT_TILE_ELEMENTS", "extension", "native_sdpo_loss", "native_sequence_logprobs"]

DEFAULT_TILE_ELEMENTS = 1 << 23  # sdpo_loss
DEFAULT_LOGPROBS_TILE_ELEMENTS = 1 << 23  # sequence_logprobs
SOURCES = ("sdpo_native.cpp", "rowops.cpp")
# The checkout's csrc/ (editable installs), else the copy installed as sdpo_fast/_csrc (setup.py).
_HERE = Path(__file__).resolve().parent
_CSRC = next((d for d in (_HERE.parent / "csrc", _HERE / "_csrc") if (d / SOURCES[0]).is_file()), _HERE.parent / "csrc")
CXX_FLAGS = ["-O3", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]


def _jit_build():
    """Compile csrc/ with torch's JIT extension builder (cached; rebuilt when a source changes)."""
    if not all((_CSRC / s).is_file() for s in SOURCES):
        raise ImportError(f"no prebuilt extension and no C++ sources at {_CSRC} to compile")
    from torch.utils import cpp_extension

    # ninja from the environment's scripts folder, also when the venv is not activated
    scripts = sysconfig.get_path("scripts")
    if scripts and scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    name = "sdpo_fast_native"
    try:  # private helper, only for the progress note
        build_dir = cpp_extension._get_build_directory(name, verbose=False)
        fresh = not os.path.exists(os.path.join(build_dir, f"{name}.so"))
    except Exception:  # noqa: BLE001
        build_dir, fresh = "torch's extension directory", True
    if fresh:
        print(f"sdpo_fast: compiling the native CPU extension into {build_dir} (once, about a minute)", file=sys.stderr)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(_CSRC / s) for s in SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            verbose=False,
        )
    except Exception as exc:  # compiler missing or failing: report, do not crash the package
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportError(f"compiling csrc/ failed: {first}") from exc


def _load():
    if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
        raise ImportError("native CPU extension skipped (SDPO_FAST_NO_EXT is set); using the torch backend")
    try:
        from . import _native  # built at install time by setup.py

        return _native
    except ImportError:
        pass
    try:
        return _jit_build()
    except ImportError as exc:
        raise ImportError(f"native CPU extension not built ({exc}); using the torch backend") from exc


extension = _load()


def _tile(tile_elements: int | None, chunk_rows: int | None, vocab: int, default: int) -> int:
    if tile_elements is not None and chunk_rows is not None:
        raise ValueError("give tile_elements or chunk_rows, not both")
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return chunk_rows * vocab
    if tile_elements is None:
        return default
    if tile_elements < 1:
        raise ValueError(f"tile_elements must be >= 1, got {tile_elements}")
    return int(tile_elements)


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch):
    """fp32 contiguous logit rows ``h [Nr, D]`` and weight ``[V, D]`` (no copy when already so)."""
    if hidden.device.type != "cpu":
        raise ValueError(f"the native backend runs on CPU tensors, got {hidden.device}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    h = hidden.detach().index_select(0, batch.logit_rows).float().contiguous()
    w = weight.detach().float().contiguous()
    return h, w


def _scatter_dhidden(hidden: torch.Tensor, batch: PackedBatch, dh: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(hidden).index_copy_(0, batch.logit_rows, dh.to(hidden.dtype))


class _NativeSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, batch, tile):
        h, w = _prepare(hidden, weight, batch)
        G, C = batch.candidate_mask.shape
        lse, logps, buf = extension.logprobs_forward(
            h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, G * C, tile
        )
        # the fp32 weight is rebuilt in backward rather than kept alive when weight is bf16/fp16; the
        # logits buffer is kept: it holds the last chunk's logits, which the backward then skips
        # recomputing, and it is the buffer the backward needs anyway (no extra peak memory)
        ctx.save_for_backward(hidden, weight, h, lse)
        ctx.batch, ctx.tile, ctx.buf = batch, tile, buf
        return logps.view(G, C)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, h, lse = ctx.saved_tensors
        batch = ctx.batch
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.detach().float().contiguous()
        buf, ctx.buf = ctx.buf, None  # overwritten below: a second backward would find no stored logits
        dh, dw = extension.logprobs_backward(
            h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, lse,
            grad_logps.reshape(-1), need_h, need_w, ctx.tile, buf,
        )
        dhidden = _scatter_dhidden(hidden, batch, dh) if need_h else None
        dweight = dw.to(weight.dtype) if need_w else None
        return dhidden, dweight, None, None


def native_sequence_logprobs(hidden, weight, batch: PackedBatch, tile_elements=None, chunk_rows=None):
    """``"logprobs"`` op: ``[G, C]`` fp32 log-probs, differentiable w.r.t. hidden ``[T, D]`` and weight ``[V, D]``."""
    tile = _tile(tile_elements, chunk_rows, weight.shape[0], DEFAULT_LOGPROBS_TILE_ELEMENTS)
    return _NativeSequenceLogprobs.apply(hidden, weight, batch, tile)


def native_sdpo_loss(hidden, weight, batch: PackedBatch, ref_logps, beta, sft_weight, need_h, need_w,
                     tile_elements=None, chunk_rows=None):
    """``"sdpo_loss"`` op (fused_loss.py): ``(loss_g [G], logps [G, C], dhidden [T, D] | None,
    dweight [V, D] | None)``, gradients of ``sum_g loss_g``."""
    tile = _tile(tile_elements, chunk_rows, weight.shape[0], DEFAULT_TILE_ELEMENTS)
    h, w = _prepare(hidden, weight, batch)
    if bool((batch.candidate_lens[:, 0] < 1).any()):
        raise ValueError("every group needs a chosen candidate (column 0) with at least one token")
    loss_g, logps, dh, dw = extension.sdpo_loss(
        h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, ref_logps.detach().float().contiguous(),
        batch.candidate_mask, batch.candidate_lens, float(beta), float(sft_weight), bool(need_h), bool(need_w), tile,
    )
    dhidden = _scatter_dhidden(hidden, batch, dh) if need_h else None
    dweight = dw.to(weight.dtype) if need_w else None
    return loss_g, logps, dhidden, dweight


backends.register("logprobs", "native", native_sequence_logprobs)
backends.register("sdpo_loss", "native", native_sdpo_loss)
