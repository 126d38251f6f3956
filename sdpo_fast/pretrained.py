"""Local pretrained models: a HF folder, or a GGUF file inside a folder, as a plain HF causal LM.

Models are read from local folders only (there is no model hub to download from). A GGUF file
(``gguf_file=``, needs the ``gguf`` package) is dequantised by transformers to fp32 and its weights
are copied into a plain model of the same architecture, so ``save_pretrained`` writes a normal HF
folder (transformers refuses to save a GGUF-loaded model) with the same logits.
"""

from __future__ import annotations

import copy
import os

import torch

__all__ = ["load_local_model"]


def _fail(message: str):
    raise SystemExit(message)


def load_local_model(folder: str, *, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """``(tokenizer, model)`` from the local ``folder`` (a HF checkpoint, or holding ``gguf_file``).

    The tokenizer gets ``pad_token = eos_token`` when it has no pad token. Raises ``SystemExit`` with
    a one-line message when the folder or file is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    flag = "--model_name_or_path"
    if not os.path.isdir(folder):
        _fail(f"{flag} {folder}: no such local folder (models are read from local folders; nothing is "
              "downloaded from a model hub)")
    if gguf_file is not None:
        path = os.path.join(folder, gguf_file)
        if not os.path.isfile(path):
            found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
            _fail(f"--gguf_file {gguf_file}: not found in {folder} (its .gguf files: {', '.join(found) or 'none'})")
        try:
            import gguf  # noqa: F401  (transformers needs it to read the file)
        except ImportError:
            _fail("--gguf_file needs the gguf package: pip install gguf")
    elif not os.path.isfile(os.path.join(folder, "config.json")):
        found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        hint = f"; for a GGUF file add --gguf_file {found[0]}" if found else ""
        _fail(f"{flag} {folder}: no config.json, not a HF model folder{hint}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32 if gguf_file else dtype)
    if gguf_file is not None:
        model = _plain_copy(model)
    return tokenizer, model.to(dtype)


def _plain_copy(model):
    """The same architecture built from the config, holding ``model``'s weights (tied ones stay tied)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    # The GGUF marker would make every later load of the export a "quantized" model that
    # save_pretrained refuses; the weights here are plain fp32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit {type(plain).__name__}: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")
    if tied:
        plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()
