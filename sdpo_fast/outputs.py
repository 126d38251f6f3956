"""The run's output folder: refusing to mix runs, and the metrics log.

``prepare_output_dir``: a non-empty ``--output_dir`` is refused unless the run resumes
(``--resume_from_checkpoint``) or ``--overwrite_output_dir`` is given (the Hugging Face convention);
overwriting deletes the previous run's outputs (``RUN_OUTPUTS`` and every ``checkpoint-*``) and keeps
the caches (``CACHES``), which carry fingerprints of what they were computed from.

``MetricsLog``: ``metrics.jsonl`` of one run, strict JSON (non-finite numbers are written as null).
Its rows are kept in memory and saved in every checkpoint, so a resumed run rewrites the log as it
was at the checkpoint and continues it: no rows of an abandoned continuation, no duplicates.
"""

from __future__ import annotations

import json
import math
import os
import shutil

from .checkpoint import write_bytes_atomic
from .errors import UserError

__all__ = ["CACHES", "RUN_OUTPUTS", "prepare_output_dir", "strict_json", "MetricsLog", "write_json_atomic"]

CACHES = ("tokenizer", "cache", "reference_logps.pt")
RUN_OUTPUTS = ("metrics.jsonl", "results.json", "args.json", "final", "final-base", "tensorboard")


def prepare_output_dir(path: str, *, resume: str | None, overwrite: bool) -> None:
    """Create ``path``, or check that training may write into it (module docstring)."""
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output_dir {path} is a file, not a folder")
    if entries and resume is None:
        if not overwrite:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise UserError(
                f"--output_dir {path} is not empty ({shown}): give --overwrite_output_dir to replace its run, "
                "--resume_from_checkpoint latest to continue it, or another --output_dir"
            )
        for name in entries:
            if name in RUN_OUTPUTS or name.startswith(("checkpoint-", ".tmp-", ".old-")):
                full = os.path.join(path, name)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
    os.makedirs(path, exist_ok=True)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(record, **kwargs) -> str:
    """``json.dumps`` with NaN/inf written as null (strict JSON, which ``json.dumps`` is not by default)."""
    return json.dumps(_finite(record), allow_nan=False, **kwargs)


def write_json_atomic(path: str, obj) -> None:
    write_bytes_atomic(path, (strict_json(obj, indent=2) + "\n").encode())


class MetricsLog:
    """``<output_dir>/metrics.jsonl`` on rank 0 (and TensorBoard when installed).

    Args:
        output_dir: the run's folder.
        rows: the rows of the checkpoint resumed from (the file is rewritten to exactly these).
        active: whether this process writes (rank 0).
    """

    def __init__(self, output_dir: str, rows: list[str] | None = None, active: bool = True):
        self.active = active
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.rows = list(rows or [])
        self.tb = None
        if not self.active:
            return
        write_bytes_atomic(self.path, "".join(r + "\n" for r in self.rows).encode())
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except Exception:  # noqa: BLE001  (tensorboard not installed)
            self.tb = None

    def write(self, record: dict, step: int | None = None):
        line = strict_json(record)
        self.rows.append(line)
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.tb is not None and step is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and math.isfinite(v) and k not in ("step", "epoch"):
                    self.tb.add_scalar(f"{record.get('stage', 'train')}/{k}", v, step)
