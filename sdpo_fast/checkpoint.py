"""Checkpoint folders that are either complete or absent.

A checkpoint is written into ``<parent>/.tmp-<name>``; when every file is written, a manifest
``checkpoint.json`` (the files and their sizes, plus what the trainer records) is added and the
folder is renamed to ``<parent>/<name>`` (an older folder of that name is replaced only then). A
crash or a full disk therefore leaves the previous checkpoints as they were and no half-written
``checkpoint-*``. Reading checks the manifest and every file's size before anything is loaded, so a
partial or corrupt checkpoint is a one-line ``UserError`` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil

from . import fingerprint
from .errors import UserError, disk_full

__all__ = [
    "MANIFEST", "MUST_MATCH", "write_folder", "read_manifest", "latest", "resolve", "load_file", "write_bytes_atomic",
    "run_signature", "resume_mismatches",
]

MANIFEST = "checkpoint.json"
FORMAT = 1


def _files(folder: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(root, name)
            out[os.path.relpath(full, folder)] = os.path.getsize(full)
    return out


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomic(path: str, data: bytes) -> None:
    """``data`` to ``path`` through a temporary file and a rename (readers never see a partial file)."""
    tmp = f"{path}.tmp"
    try:
        _fsync_write(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def start_folder(path: str) -> str:
    """A fresh, empty temporary folder beside ``path`` to write the checkpoint into."""
    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def finish_folder(tmp: str, path: str, meta: dict) -> None:
    """Add the manifest to ``tmp`` and rename it to ``path``."""
    manifest = {"format": FORMAT, "files": _files(tmp), "meta": meta}
    _fsync_write(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, allow_nan=False).encode())
    path = os.path.abspath(path)
    old = None
    if os.path.exists(path):
        old = os.path.join(os.path.dirname(path), f".old-{os.path.basename(path)}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abandon_folder(tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def save_error(path: str, exc: BaseException) -> UserError:
    """The one-line error for a failed checkpoint write (the previous checkpoints are untouched)."""
    if disk_full(exc):
        return UserError(
            f"the disk is full (no space left on device) while writing checkpoint {path}; nothing of it was kept "
            "and the earlier checkpoints are intact: free some space and resume with --resume_from_checkpoint latest"
        )
    return UserError(f"could not write checkpoint {path} ({type(exc).__name__}: {exc}); nothing of it was kept")


def write_folder(path: str, write, meta: dict) -> None:
    """One-process form: ``write(tmp_folder)`` writes the files, then the folder is completed and
    renamed. Any failure removes the temporary folder and raises ``UserError``."""
    tmp = None
    try:
        tmp = start_folder(path)
        write(tmp)
        finish_folder(tmp, path, meta)
    except (OSError, RuntimeError) as exc:
        if tmp is not None:
            abandon_folder(tmp)
        raise save_error(path, exc) from exc


def read_manifest(path: str) -> dict:
    """The manifest of a complete checkpoint, after checking that every file it lists is there with
    its recorded size; ``UserError`` naming the folder or file otherwise."""
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path}: no such folder")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise UserError(
            f"checkpoint {path} is incomplete: it has no {MANIFEST} (it was not finished writing, or predates "
            "this version); use another checkpoint, e.g. --resume_from_checkpoint latest"
        )
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
        manifest["meta"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{mpath} is corrupt ({type(exc).__name__}: {exc})") from None
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise UserError(f"checkpoint file {full} is missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise UserError(f"checkpoint file {full} is truncated or corrupt ({actual} bytes, written as {size})")
    return manifest


def order_key(meta: dict) -> tuple:
    """Training progress of a checkpoint: (stage index, steps done in it)."""
    return tuple(meta.get("progress", (-1, -1)))


def latest(output_dir: str) -> str | None:
    """The complete checkpoint of ``output_dir`` furthest along in training, None when there is none."""
    best, best_key = None, None
    if not os.path.isdir(output_dir):
        return None
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if not name.startswith("checkpoint-") or not os.path.isdir(path):
            continue
        try:
            key = order_key(read_manifest(path)["meta"])
        except UserError:
            continue
        if best_key is None or key > best_key:
            best, best_key = path, key
    return best


def load_file(path: str, **kwargs):
    """``torch.load(path)`` with an unreadable file reported as a one-line ``UserError`` naming it."""
    import torch

    if not os.path.isfile(path):
        raise UserError(f"checkpoint file {path} is missing")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint file {path} is empty (0 bytes)")
    try:
        return torch.load(path, **kwargs)
    except Exception as exc:  # EOFError, pickle.UnpicklingError, RuntimeError (bad zip): a damaged file
        raise UserError(f"checkpoint file {path} cannot be read ({type(exc).__name__}: {exc})") from None


def resume_mismatches(saved: dict, current: dict) -> list[str]:
    """``"--name: checkpoint X, now Y"`` for every recorded setting that differs."""
    out = []
    for k in sorted(set(saved) | set(current)):
        if saved.get(k) != current.get(k):
            out.append(f"{k}: the checkpoint has {saved.get(k)!r}, this run {current.get(k)!r}")
    return out


def resolve(path: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a folder as given, ``"latest"`` as ``latest(output_dir)``."""
    if path != "latest":
        return path
    found = latest(output_dir)
    if found is None:
        raise UserError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
    return found


# Flags a resumed run must share with its checkpoint: they change the batches, the model or the
# optimisation. Not listed (free to change on resume): output and logging, evaluation, backend,
# gradient checkpointing, save_steps.
MUST_MATCH = {
    "model": ("model_name_or_path", "tiny_layers", "tiny_hidden", "tiny_heads", "tiny_kv_heads", "tokenizer_vocab",
              "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_targets"),
    "data": ("dataset", "data_path", "titles_path", "data_seed", "num_negatives", "negatives", "max_prompt_tokens",
             "max_train_examples"),
    "train": ("stage", "seed", "sft_epochs", "sdpo_epochs", "sft_learning_rate", "sdpo_learning_rate", "weight_decay",
              "warmup_ratio", "max_grad_norm", "batch_size", "beta", "sft_weight", "reference", "max_steps"),
}


def run_signature(model_args, data_args, train_args, *, bf16, world_size, train_ds, base_weights) -> dict:
    """What a checkpoint records and a resumed run must match: ``{"--flag": value, ...}`` plus the
    world size, the precision and fingerprints of the tokenized training data and the starting weights
    (``base_weights``, a ``fingerprint.model_weights`` digest)."""
    sig = {}
    for group, args in (("model", model_args), ("data", data_args), ("train", train_args)):
        for name in MUST_MATCH[group]:
            sig[f"--{name}"] = getattr(args, name)
    sig["world size"] = world_size
    sig["bf16"] = bool(bf16)
    if train_args.weight_update != "fp32_masters":  # absent at the default: older checkpoints stay resumable
        sig["--weight_update"] = train_args.weight_update
    sig["tokenized training data"] = fingerprint.features(train_ds)
    sig["starting model weights"] = base_weights
    return sig
