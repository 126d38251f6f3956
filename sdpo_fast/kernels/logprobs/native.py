"""The ``"native"`` backend: C++ CPU kernels (csrc/, loaded by ``sdpo_fast/kernels/extension.py``) for the fused
log-probs and the S-DPO loss. Contract and reference: ``reference.py`` beside this file.

``forward``/``backward`` (the plain op, ``sequence_logprobs``) work vocabulary block by vocabulary
block (``block`` columns, default 512): each GEMM writes a cache-sized logits block that the row pass
reads while it is hot. The forward keeps the logits of the first ``min(rows, D)`` rows in a buffer
shaped like the weight gradient, which the backward consumes block by block and returns as that
gradient (``keep_in_grad``, when the weight needs a gradient), plus ``keep_elements`` more logits
(default ``2**23``, 32 MiB); only the other rows are recomputed in the backward, ``chunk_rows``
(default ``2**20 // block``) at a time. When the weight is frozen (LoRA) the forward instead
accumulates ``softmax(logits) @ weight`` ``[rows, D]`` on the cache-hot blocks, and the backward forms
dHidden from it without any logits (two GEMMs in all).

``fused_loss`` (the S-DPO loss) runs one of two paths: the option ``path`` names it, and its default
``"auto"`` leaves the choice to ``loss_path``:
  * ``"tiled"``: the C++ ``sdpo_loss`` kernel on logits tiles of ``tile_elements`` fp32 values. Every
    group whose logit rows fit a tile is scored in it and the tile is reused for the gradients (three
    GEMMs); larger groups recompute their logits (four GEMMs). The default tile is ``2**23`` (32 MiB),
    raised to the largest group's ``rows * V`` when that is more, up to ``2**27`` (512 MiB), so that a
    group of a large vocabulary is not recomputed (``default_tile_elements``). The loss math inside the
    tile loop is ``group_loss_grad`` in ``csrc/sdpo_loss.cpp``, the C++ mirror of
    ``sdpo_fast.loss.group_loss_and_grad`` for every loss type (``loss.loss_code``, an int; a test holds
    the two together).
  * ``"whole_batch"``: the plain op's kernels over all rows at once (the generic forward -> loss ->
    backward of the loss driver, ``chunk_rows`` rows per recompute GEMM): for a frozen weight (the
    projected forward: dHidden without logits), and, unless a tile size is given, for a batch of at
    most D logit rows with a trainable weight whose logits exceed the base tile (all of them kept in
    the buffer that becomes dW: no tile, no recompute).
    The measurements behind the thresholds: ``benchmarks/results/design_measurements.md``.
bf16/fp16 inputs are computed in fp32 (``weight`` is converted once per call: ``V * D * 4`` bytes).

The GEMMs of a large call (logit rows x V x D >= 2**28) run on torch's oneDNN fp32 matmul where torch
provides it and the CPU has AVX-512, otherwise on torch's BLAS (MKL / OpenBLAS); ``gemm_engine()`` says
which. ``torch.backends.mkldnn.enabled = False`` selects the BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..extension import extension, gemm_engine
from ..options import OptionError, option

__all__ = [
    "DEFAULT_BLOCK", "DEFAULT_KEEP_ELEMENTS", "DEFAULT_TILE_ELEMENTS", "DEFAULT_WORK_ELEMENTS", "DW_PRECISION",
    "MAX_TILE_ELEMENTS", "Options", "backward", "default_tile_elements", "extension", "forward", "fused_loss",
    "gemm_engine", "loss_path",
]

DEFAULT_TILE_ELEMENTS = 1 << 23  # sdpo_loss
MAX_TILE_ELEMENTS = 1 << 27  # sdpo_loss: the default tile grows to one whole group's logits up to this
DEFAULT_BLOCK = 512  # sequence_logprobs: vocabulary columns per block
DEFAULT_KEEP_ELEMENTS = 1 << 23  # sequence_logprobs: logits kept besides the weight-gradient-shaped buffer
DEFAULT_WORK_ELEMENTS = 1 << 20  # sequence_logprobs: recomputed logits per block (chunk_rows * block)
DW_PRECISION = "fp32 accumulator (one buffer, blocks own disjoint rows), cast to the weight's dtype once"
INPUT_DTYPES = None  # any floating dtype: computed in fp32


@dataclass(frozen=True)
class Options:
    keep_elements: int = option(DEFAULT_KEEP_ELEMENTS, check="int>=0", ops=("logprobs",),
                                doc="logits kept for the backward besides the dW-shaped buffer (0: none)")
    keep_in_grad: bool = option(True, check="bool", ops=("logprobs",),
                                doc="keep min(rows, D) rows in the buffer that becomes dW")
    block: int = option(DEFAULT_BLOCK, check="int>=1", ops=("logprobs",), doc="vocabulary columns per block")
    chunk_rows: int | None = option(None, check="int>=1|None",
                                    doc="recomputed logit rows per GEMM of the plain op (and of the "
                                        "whole-batch loss path); default 2**20 // block")
    tile_elements: int | None = option(None, check="int>=1|None", ops=("sdpo_loss",),
                                       doc="fp32 logits per tile of the tiled loss path (default: "
                                           "default_tile_elements); giving it selects that path under 'auto'")
    path: str = option("auto", check="choice:auto,tiled,whole_batch", ops=("sdpo_loss",),
                       doc="the loss path: 'auto' (loss_path decides), 'tiled' or 'whole_batch'")

    def check(self, op: str, given: set) -> None:
        if self.path == "whole_batch" and "tile_elements" in given:
            raise OptionError("tile_elements sizes the tiled loss path; the whole_batch path takes no tile")


def _check_device(hidden: torch.Tensor, weight: torch.Tensor):
    if hidden.device.type != "cpu":
        raise ValueError(f"the native backend runs on CPU tensors, got {hidden.device}")
    if not hidden.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"hidden and weight must be floating point, got {hidden.dtype} and {weight.dtype}")
    if hidden.dtype != weight.dtype:  # as the torch backend (and the kernel backends) refuse
        raise ValueError(f"native backend: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")


def _prepare(hidden: torch.Tensor, weight: torch.Tensor, batch):
    """fp32 contiguous logit rows ``h [Nr, D]`` and weight ``[V, D]`` (no copy when already so)."""
    _check_device(hidden, weight)
    h = hidden.detach().index_select(0, batch.logit_rows).float().contiguous()
    w = weight.detach().float().contiguous()
    return h, w


def _scatter_dhidden(hidden: torch.Tensor, batch, dh: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(hidden).index_copy_(0, batch.logit_rows, dh.to(hidden.dtype))


def _chunk(opts: Options) -> int:
    return opts.chunk_rows if opts.chunk_rows is not None else max(1, DEFAULT_WORK_ELEMENTS // opts.block)


@dataclass
class _State:
    h: torch.Tensor  # [Nr, D] fp32 logit rows
    lse: torch.Tensor
    u: torch.Tensor | None  # frozen weight: softmax(logits) @ weight [Nr, D]
    kept: tuple  # (kept_a, kept_b): consumed (overwritten) by the first backward
    w: torch.Tensor | None  # the fp32 weight, kept only inside the fused loss (else rebuilt in backward)


def forward(hidden, weight, batch, opts: Options, need_h: bool, need_w: bool, fused: bool = False):
    """Contract ``forward``. Nothing is kept when no gradient will be taken; with a frozen weight the
    forward projects instead of keeping logits; inside the fused loss no extra logits are kept, only the
    dW-shaped buffer when the weight needs a gradient."""
    h, w = _prepare(hidden, weight, batch)
    G, C = batch.candidate_mask.shape
    tracked = need_h or need_w
    project = need_h and not need_w
    keep = 0 if (fused or not tracked or project) else opts.keep_elements
    in_grad = need_w and (fused or opts.keep_in_grad)
    lse, logps, kept_a, kept_b, u = extension.logprobs_forward(
        h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, G * C, in_grad, keep, opts.block,
        _chunk(opts), project,
    )
    return logps, _State(h, lse, u, (kept_a, None if fused else kept_b), w if fused else None)


def backward(hidden, weight, batch, state: _State, grad_logps, need_h: bool, need_w: bool, opts: Options):
    """Contract ``backward``. The kept logits are overwritten (and kept_a becomes dW): a second
    backward recomputes them."""
    w = state.w if state.w is not None else weight.detach().float().contiguous()
    (kept_a, kept_b), state.kept = state.kept, (None, None)
    dh, dw = extension.logprobs_backward(
        state.h, w, batch.row_ptr, batch.target_ids, batch.target_candidates, state.lse,
        grad_logps.reshape(-1).contiguous(), need_h, need_w, opts.block, _chunk(opts), kept_a, kept_b, state.u,
    )
    dhidden = _scatter_dhidden(hidden, batch, dh) if need_h else None
    return dhidden, (dw.to(weight.dtype) if need_w else None)


def default_tile_elements(batch, vocab: int, base: int = DEFAULT_TILE_ELEMENTS, cap: int = MAX_TILE_ELEMENTS) -> int:
    """The S-DPO loss's default tile: ``base``, or the largest group's ``rows * vocab`` when that is
    more (so it is scored without recompute), at most ``cap``."""
    largest = max((r1 - r0 for r0, r1, _, _ in batch.group_rows), default=0)
    if largest == 0:
        return base
    return max(base, min(largest * vocab, cap))


def loss_path(rows: int, vocab: int, dim: int, need_h: bool, need_w: bool, tile_given: bool,
              base_tile: int = DEFAULT_TILE_ELEMENTS) -> str:
    """``"whole_batch"`` or ``"tiled"`` (module docstring): the native loss's one path decision under
    ``path="auto"``. A batch whose logits fit the base tile takes the tiled kernel (one tile, fewer
    passes)."""
    if need_h and not need_w:
        return "whole_batch"
    if need_w and not tile_given and rows <= dim and rows * vocab > base_tile:
        return "whole_batch"
    return "tiled"


def fused_loss(hidden, weight, batch, loss, need_h: bool, need_w: bool, opts: Options):
    """Contract ``fused_loss``: the tiled C++ kernel, or None for the whole-batch path (``opts.path``;
    ``loss_path`` decides under ``"auto"``)."""
    if loss.padding_groups:  # the C++ loss mirror knows no padding groups: the generic path zeroes them
        return None
    vocab, dim = weight.shape
    tile = opts.tile_elements if opts.tile_elements is not None else default_tile_elements(batch, vocab)
    if bool((batch.candidate_lens[:, 0] < 1).any()):
        raise ValueError("every group needs a chosen candidate (column 0) with at least one token")
    path = opts.path
    if path == "auto":
        path = loss_path(batch.logit_rows.numel(), vocab, dim, need_h, need_w, opts.tile_elements is not None)
    if path == "whole_batch":
        return None
    _check_device(hidden, weight)
    # the kernel gathers the logit rows tile by tile: no [rows, D] fp32 copy of them is held
    loss_g, logps, dhidden, dw = extension.sdpo_loss(
        hidden.detach().contiguous(), batch.logit_rows, weight.detach().float().contiguous(), batch.row_ptr,
        batch.target_ids, batch.target_candidates, batch.group_row_ptr, loss.ref_logps.detach().float().contiguous(),
        loss.candidate_mask, loss.candidate_lens, float(loss.beta), float(loss.sft_weight), int(loss.loss_code),
        bool(need_h),
        bool(need_w), tile,
    )
    return loss_g, logps, dhidden, (dw.to(weight.dtype) if need_w else None)
