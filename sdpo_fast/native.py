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

``sequence_logprobs`` works vocabulary block by vocabulary block (``block`` columns, default 512): each
GEMM writes a cache-sized logits block that the row pass reads while it is hot. Its forward keeps the
logits of the first ``min(rows, D)`` rows in a buffer shaped like the weight gradient, which the
backward consumes block by block and returns as that gradient (``keep_in_grad``, when the weight
needs a gradient), plus ``keep_elements`` more logits (default ``2**23``, 32 MiB); only the other rows
are recomputed in the backward, ``chunk_rows`` (default ``2**20 // block``) at a time. When the
weight is frozen (LoRA) the forward instead accumulates ``softmax(logits) @ weight`` ``[rows, D]``
on the cache-hot blocks, and the backward forms dHidden from it without any logits (two GEMMs in all).
The S-DPO loss takes ``tile_elements`` (fp32 logits held at once): it keeps every group whose logit
rows fit it in one tile and reuses the tile for the gradients (three GEMMs); larger groups recompute
their logits (four GEMMs). The default is ``2**23`` (32 MiB), raised to the largest group's
``rows * V`` when that is more, up to ``2**27`` (512 MiB): with a 128k vocabulary one group of 16
candidates of 16 tokens is ~124 MB of logits, and recomputing it made the step 1.5x slower. Two cases
run through the plain op's kernels over all rows instead (``chunk_rows`` is then the recomputed rows
per GEMM): a frozen weight (the projected forward), and, unless a tile size is given, a batch of at
most D logit rows with a trainable weight whose logits exceed the base tile (all of them kept in the
buffer that becomes dW: no tile and no recompute; at V = 128256, 482 rows, 18 MiB of working memory
against 135 MiB for the tile).
bf16/fp16 inputs are computed in fp32 (``weight`` is converted once per call: ``V * D * 4`` bytes).

The GEMMs of a large call (logit rows x V x D >= 2**28) run on torch's oneDNN fp32 matmul where torch
provides it and the CPU has AVX-512 (faster than torch's default BLAS on the CI-like Zen 4 machine),
otherwise on torch's BLAS (MKL / OpenBLAS); ``gemm_engine()`` says which.
``torch.backends.mkldnn.enabled = False`` selects the BLAS.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

import torch

from . import backends
from .fused_loss import group_loss_and_grad
from .packing import PackedBatch

__all__ = [
    "DEFAULT_BLOCK", "DEFAULT_KEEP_ELEMENTS", "DEFAULT_TILE_ELEMENTS", "DEFAULT_WORK_ELEMENTS", "MAX_TILE_ELEMENTS",
    "default_tile_elements", "extension", "gemm_engine", "native_sdpo_loss", "native_sequence_logprobs",
]

DEFAULT_TILE_ELEMENTS = 1 << 23  # sdpo_loss
MAX_TILE_ELEMENTS = 1 << 27  # sdpo_loss: the default tile grows to one whole group's logits up to this
DEFAULT_BLOCK = 512  # sequence_logprobs: vocabulary columns per block
DEFAULT_KEEP_ELEMENTS = 1 << 23  # sequence_logprobs: logits kept besides the weight-gradient-shaped buffer
DEFAULT_WORK_ELEMENTS = 1 << 20  # sequence_logprobs: recomputed logits per block (chunk_rows * block)
SOURCES = ("sdpo_native.cpp", "rowops.cpp", "gemm.cpp")
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


def gemm_engine(work: int | None = None) -> str:
    """The library (``"onednn"`` or ``"blas"``) an op call runs its GEMMs on now, for a call whose GEMM
    passes cost ``work`` multiply-adds (logit rows x V x D; default: a large one). Smaller calls than
    ``2**28`` always use the BLAS: oneDNN compiles a kernel per new shape, which they never earn back."""
    return extension.gemm_engine(1 << 62 if work is None else int(work))


def _tile(tile_elements: int | None, chunk_rows: int | None, vocab: int, default: int) -> int:
    if tile_elements is not None and chunk_rows is not None:
        raise ValueError("give tile_elements or chunk_rows, not both")
    if chunk_rows is not None:
        return _positive("chunk_rows", chunk_rows, 1) * vocab
    return _positive("tile_elements", tile_elements, default)


def default_tile_elements(batch: PackedBatch, vocab: int) -> int:
    """The S-DPO loss's default tile: ``DEFAULT_TILE_ELEMENTS``, or the largest group's ``rows * vocab``
    when that is more (so it is scored without recompute), at most ``MAX_TILE_ELEMENTS``."""
    if batch.logit_rows.numel() == 0:
        return DEFAULT_TILE_ELEMENTS
    group_of_row = batch.target_candidates[batch.row_ptr[:-1]] // batch.candidate_mask.shape[1]
    largest = int(torch.bincount(group_of_row).max())
    return max(DEFAULT_TILE_ELEMENTS, min(largest * vocab, MAX_TILE_ELEMENTS))


def _check_device(hidden: torch.Tensor, weight: torch.Tensor):
    if hidden.device.type != "cpu":
        raise ValueError(f"the native backend runs on CPU tensors, got {hidden.device}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:  # as the torch backend (and the kernel backends) refuse
        raise ValueError(f"native backend: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, batch: PackedBatch):
    """fp32 contiguous logit rows ``h [Nr, D]`` and weight ``[V, D]`` (no copy when already so)."""
    _check_device(hidden, weight)
    h = hidden.detach().index_select(0, batch.logit_rows).float().contiguous()
    w = weight.detach().float().contiguous()
    return h, w


def _scatter_dhidden(hidden: torch.Tensor, batch: PackedBatch, dh: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(hidden).index_copy_(0, batch.logit_rows, dh.to(hidden.dtype))


class _NativeSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, batch, keep_elements, keep_in_grad, block, chunk_rows, project):
        h, w = _prepare(hidden, weight, batch)
        G, C = batch.candidate_mask.shape
        lse, logps, kept_a, kept_b, u = extension.logprobs_forward(
            h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, G * C, keep_in_grad, keep_elements,
            block, chunk_rows, project,
        )
        # the fp32 weight is rebuilt in backward rather than kept alive when weight is bf16/fp16
        ctx.save_for_backward(hidden, weight, h, lse, u)
        ctx.batch, ctx.block, ctx.chunk_rows, ctx.kept = batch, block, chunk_rows, (kept_a, kept_b)
        return logps.view(G, C)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, h, lse, u = ctx.saved_tensors
        batch = ctx.batch
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.detach().float().contiguous()
        # the kept logits are overwritten (and kept_a becomes dW): a second backward recomputes them
        (kept_a, kept_b), ctx.kept = ctx.kept, (None, None)
        dh, dw = extension.logprobs_backward(
            h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, lse,
            grad_logps.reshape(-1), need_h, need_w, ctx.block, ctx.chunk_rows, kept_a, kept_b, u,
        )
        dhidden = _scatter_dhidden(hidden, batch, dh) if need_h else None
        dweight = dw.to(weight.dtype) if need_w else None
        return dhidden, dweight, None, None, None, None, None, None


def _positive(name: str, value: int | None, default: int, minimum: int = 1) -> int:
    if value is None:
        return default
    if int(value) != value or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def native_sequence_logprobs(hidden, weight, batch: PackedBatch, keep_elements=None, keep_in_grad=True, block=None,
                             chunk_rows=None):
    """``"logprobs"`` op: ``[G, C]`` fp32 log-probs, differentiable w.r.t. hidden ``[T, D]`` and weight ``[V, D]``.

    Options (module docstring): ``keep_elements`` (logits kept for the backward besides the gradient-shaped
    buffer; 0 keeps none), ``keep_in_grad`` (keep ``min(rows, D)`` rows in the buffer that becomes dW),
    ``block`` (vocabulary columns per block), ``chunk_rows`` (recomputed rows per GEMM).
    Nothing is kept when no gradient will be taken (``torch.no_grad`` or no input requiring grad).
    """
    keep = _positive("keep_elements", keep_elements, DEFAULT_KEEP_ELEMENTS, minimum=0)
    block = _positive("block", block, DEFAULT_BLOCK)
    chunk = _positive("chunk_rows", chunk_rows, max(1, DEFAULT_WORK_ELEMENTS // block))
    tracked = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # frozen weight: the forward also forms softmax(logits) @ weight, and the backward needs no logits
    project = tracked and hidden.requires_grad and not weight.requires_grad
    if not tracked or project:
        keep = 0
    in_grad = bool(keep_in_grad) and tracked and weight.requires_grad
    return _NativeSequenceLogprobs.apply(hidden, weight, batch, keep, in_grad, block, chunk, project)


def _whole_batch_sdpo_loss(hidden, weight, batch: PackedBatch, ref_logps, beta, sft_weight, need_h, need_w,
                           chunk_rows):
    """The loss through the plain op's kernels over all rows at once (GEMMs on every row together, which
    run faster than per-group tiles): the forward, the closed-form dL/dlogp, then the backward. Taken
    when the weight is frozen (the projected forward: dHidden without logits) or when every logit row
    fits the buffer that becomes dW (rows <= D: no logits recomputed and no tile held)."""
    h, w = _prepare(hidden, weight, batch)
    G, C = batch.candidate_mask.shape
    project = not need_w
    chunk = chunk_rows if chunk_rows is not None else max(1, DEFAULT_WORK_ELEMENTS // DEFAULT_BLOCK)
    lse, logps, kept_a, _, u = extension.logprobs_forward(
        h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, G * C, need_w, 0, DEFAULT_BLOCK, chunk,
        project,
    )
    logps = logps.view(G, C)
    loss_g, grad = group_loss_and_grad(logps, ref_logps, batch.candidate_mask, batch.candidate_lens, beta, sft_weight)
    dh, dw = extension.logprobs_backward(
        h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, lse, grad.flatten().contiguous(), need_h,
        need_w, DEFAULT_BLOCK, chunk, kept_a, None, u,
    )
    dhidden = _scatter_dhidden(hidden, batch, dh) if need_h else None
    return loss_g, logps, dhidden, dw.to(weight.dtype) if need_w else None


def native_sdpo_loss(hidden, weight, batch: PackedBatch, ref_logps, beta, sft_weight, need_h, need_w,
                     tile_elements=None, chunk_rows=None):
    """``"sdpo_loss"`` op (fused_loss.py): ``(loss_g [G], logps [G, C], dhidden [T, D] | None,
    dweight [V, D] | None)``, gradients of ``sum_g loss_g``."""
    tile = _tile(tile_elements, chunk_rows, weight.shape[0], default_tile_elements(batch, weight.shape[0]))
    if bool((batch.candidate_lens[:, 0] < 1).any()):
        raise ValueError("every group needs a chosen candidate (column 0) with at least one token")
    rows, vocab, dim = batch.logit_rows.numel(), weight.shape[0], weight.shape[1]
    explicit_tile = tile_elements is not None or chunk_rows is not None
    # a batch whose logits fit the base tile takes the tiled kernel: one tile, fewer passes (1.2 vs 1.5 ms
    # at 128 rows, V 816, D 128)
    rows_fit_grad = need_w and not explicit_tile and rows <= dim and rows * vocab > DEFAULT_TILE_ELEMENTS
    if (need_h and not need_w) or rows_fit_grad:
        return _whole_batch_sdpo_loss(hidden, weight, batch, ref_logps, beta, sft_weight, need_h, need_w, chunk_rows)
    _check_device(hidden, weight)
    # the kernel gathers the logit rows tile by tile: no [rows, D] fp32 copy of them is held
    loss_g, logps, dhidden, dw = extension.sdpo_loss(
        hidden.detach().contiguous(), batch.logit_rows, weight.detach().float().contiguous(), batch.row_ptr,
        batch.target_ids, batch.target_candidates, ref_logps.detach().float().contiguous(), batch.candidate_mask,
        batch.candidate_lens, float(beta), float(sft_weight), bool(need_h), bool(need_w), tile,
    )
    dweight = dw.to(weight.dtype) if need_w else None
    return loss_g, logps, dhidden, dweight


backends.register("logprobs", "native", native_sequence_logprobs)
backends.register("sdpo_loss", "native", native_sdpo_loss)
