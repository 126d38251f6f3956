"""Command-line and file configuration of ``train.py``.

Three dataclasses parsed by ``transformers.HfArgumentParser``. ``--config FILE`` (YAML or JSON, flat
keys of any of the three) sets defaults; flags given on the command line override it. Everything
that can be checked before work starts is checked in ``validate`` (model-dependent checks such as
LoRA target names happen right after the model is built, before data is touched). Problems are
``UserError``s, one line each; ``sdpo_fast.errors.cli`` prints them without a traceback.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field, fields

from transformers import HfArgumentParser

from . import backends
from .data.negatives import NEGATIVES
from .errors import UserError
from .kernels.options import OPS
from .kernels.options import resolve as resolve_options
from .loss import LOSS_TYPES
from .optim import WEIGHT_UPDATES
from .runtime import SMALL_HIDDEN

LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "local folder of a HF causal LM and tokenizer (models are read from local folders, "
                          "never downloaded); default: a tiny Llama built from a config"},
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "a GGUF file inside --model_name_or_path (needs the gguf package); the export "
                                        "writes a normal HF folder"}
    )
    tiny_layers: int = field(default=2, metadata={"help": "tiny default model: decoder layers"})
    tiny_hidden: int = field(default=128, metadata={"help": "tiny default model: hidden size"})
    tiny_heads: int = field(default=4, metadata={"help": "tiny default model: attention heads"})
    tiny_kv_heads: int = field(default=2, metadata={"help": "tiny default model: KV heads (GQA)"})
    tokenizer_vocab: int = field(default=1024, metadata={"help": "tiny default model: tokenizer vocabulary size"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (peft) instead of all parameters"})
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = field(default=LORA_TARGETS, metadata={"help": "comma-separated module names"})
    gradient_checkpointing: bool = False


@dataclass
class DataArguments:
    dataset: str = field(
        default="synthetic",
        metadata={"help": "synthetic | movielens | lastfm | goodreads | recbole (folder of <name>.inter/.item) | "
                          "sdpo (folder of the paper's <name>-train/-val/-test.json) | jsonl | a path"},
    )
    data_path: str | None = field(default=None, metadata={"help": "folder or file of the dataset"})
    titles_path: str | None = field(default=None, metadata={"help": "Goodreads: book titles file"})
    data_seed: int = 0
    num_negatives: int = field(default=7, metadata={"help": "K negatives per group in S-DPO (dpo stage: 1)"})
    negatives: str = field(
        default="random",
        metadata={"help": "random (redrawn each epoch) | hard (the policy's top-scored) | boundary (scored by the policy "
                          "at least as high as the chosen item, topped up at random)"},
    )
    max_prompt_tokens: int = 512
    max_train_examples: int | None = field(
        default=None, metadata={"help": "training EXAMPLES used: a seeded sample spread over users (--data_seed; default: all)"}
    )
    max_eval_examples: int | None = field(
        default=None, metadata={"help": "test EXAMPLES evaluated: a seeded sample spread over users (--data_seed; default: all)"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets.map cache (default: <output_dir>/cache)"})


@dataclass
class TrainArguments:
    config: str | None = field(default=None, metadata={"help": "YAML/JSON file of defaults for any flag"})
    stage: str = field(
        default="all", metadata={"help": "sft | sdpo | dpo (sdpo with K=1) | all (sft then sdpo) | eval (no training)"}
    )
    output_dir: str = "outputs/default"
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "train into a non-empty --output_dir, deleting its previous run's outputs (caches are kept "
                          "and checked against their fingerprints)"},
    )
    seed: int = 0
    sft_epochs: float = 3.0
    sdpo_epochs: float = 2.0
    sft_learning_rate: float = 2e-3
    sdpo_learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    batch_size: int = field(default=16, metadata={"help": "groups per optimizer step on each rank"})
    beta: float = 1.0
    sft_weight: float = field(default=0.0, metadata={"help": "extra SFT term in S-DPO (chosen's mean token NLL)"})
    loss_type: str = field(
        default="sdpo", metadata={"help": "sdpo | dmpo | dpo_pairs | dynamic: the multi-negative loss (README, Loss types)"}
    )
    reference: str = field(
        default="precompute",
        metadata={"help": "precompute (one pass before S-DPO, cached) | live (LoRA: adapters disabled)"},
    )
    backend: str = field(default="auto", metadata={"help": "auto | cublas | triton | native | torch"})
    backend_options: str | None = field(
        default=None,
        metadata={"help": 'JSON {"logprobs": {...}, "sdpo_loss": {...}}: the --backend\'s tuning options '
                          "(README, Backend options); needs an explicit --backend"},
    )
    deepspeed: str | None = field(default=None, metadata={"help": "DeepSpeed JSON config (see configs/)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})
    bf16: bool | None = field(default=None, metadata={"help": "default: on for CUDA, off on CPU"})
    weight_update: str = field(
        default="fp32_masters",
        metadata={"help": "without --deepspeed, how AdamW updates reach bf16 weights: fp32_masters (an fp32 copy of "
                          "each, 16 B/param) | stochastic_rounding (no copy, unbiased rounding, 12 B/param; README)"},
    )
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N optimizer steps (0: end of stage only)"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint-* folder, or 'latest' (the newest complete one in --output_dir)"}
    )
    max_steps: int | None = field(default=None, metadata={"help": "stop each stage after this many steps"})
    eval: str = field(
        default="both",
        metadata={"help": "none, or a comma-separated set of ranking, generation, constrained, full_catalog "
                          "(both = ranking,generation)"},
    )
    full_catalog_users: int = field(
        default=50, metadata={"help": "--eval full_catalog: test users ranked over the whole catalog (a seeded subset "
                                      "of the evaluated sample, --data_seed)"}
    )
    full_catalog_prompt: str = field(
        default="history", metadata={"help": "--eval full_catalog: history (prompt without the candidate list) | listed "
                                             "(the ranking prompt)"}
    )
    full_catalog_chunk_tokens: int = field(
        default=4096, metadata={"help": "--eval full_catalog: catalog item tokens per shared-prefix forward"}
    )
    constrained_num_beams: int = field(
        default=1, metadata={"help": "--eval constrained: 1 = greedy, else beam search over the candidate trie"}
    )
    eval_untrained: bool = field(default=True, metadata={"help": "evaluate before training as a baseline"})
    log_every: int = field(
        default=1, metadata={"help": "log (and read the metrics from the device) every N steps; the values are means over them"}
    )
    dataloader_num_workers: int | None = field(
        default=None,
        metadata={"help": "processes collating batches (default: 2 on CUDA, 0 on CPU; 0: on the training thread; "
                          "hard and boundary negatives always collate on the training thread)"},
    )
    cuda_graphs: bool = field(
        default=False,
        metadata={"help": "CUDA only, not with --deepspeed: pack each step's groups into a shape bucket and replay its "
                          "forward + backward from a CUDA graph captured once per bucket (README, CUDA graphs)"},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "intra-op threads when training on the CPU (default: 1 for a model of hidden size below "
                          f"{SMALL_HIDDEN}, whose ops are too small to pay for waking a second thread, else "
                          "torch's default)"},
    )
    cuda_graph_buckets: int = field(
        default=8, metadata={"help": "--cuda_graphs: graphs kept (one per bucket; each holds its own activation "
                                     "memory); steps of further buckets run eagerly"}
    )


ALL_ARGS = (ModelArguments, DataArguments, TrainArguments)

EVAL_PROTOCOLS = ("ranking", "generation", "constrained", "full_catalog")


def eval_protocols(value: str) -> frozenset:
    """The protocols ``--eval`` names: ``"none"`` -> empty, ``"both"`` -> ranking and generation, else
    the comma-separated names (``EVAL_PROTOCOLS``; ``both`` may be one of them). ``ValueError`` on
    an unknown or empty name."""
    names = [v.strip() for v in str(value).split(",")]
    if names == ["none"]:
        return frozenset()
    out = set()
    for name in names:
        if name == "both":
            out |= {"ranking", "generation"}
        elif name in EVAL_PROTOCOLS:
            out.add(name)
        else:
            raise ValueError(f"--eval must be none or a comma-separated set of {', '.join(EVAL_PROTOCOLS)} (or both), "
                             f"got {value!r}")
    return frozenset(out)


def _read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path}")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: a malformed file
        raise UserError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({exc})")
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values")
    known = {f.name for cls in ALL_ARGS for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"--config {path}: unknown keys {unknown}")
    return data


class _Parser(HfArgumentParser):
    def error(self, message):  # argparse prints the usage and exits; a user error is one line
        raise UserError(f"{message} (see --help)")


def parse_args(argv=None):
    """``(ModelArguments, DataArguments, TrainArguments)`` from ``--config`` and the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(ALL_ARGS)
    defaults = {}
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            defaults = _read_config_file(argv[i + 1])
        elif a.startswith("--config="):
            defaults = _read_config_file(a.split("=", 1)[1])
    parser.set_defaults(**defaults)
    model_args, data_args, train_args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        raise UserError(f"unrecognized arguments: {' '.join(rest)} (see --help)")
    validate(model_args, data_args, train_args)
    return model_args, data_args, train_args


def _check_backend_options(train_args: TrainArguments) -> list[str]:
    """Parses ``--backend_options`` (a JSON string, or a mapping from a config file) into a dict in place
    and checks it against the backend's options; returns the problems found."""
    opts = train_args.backend_options
    if opts is None:
        train_args.backend_options = {}
        return []
    if isinstance(opts, str):
        try:
            opts = json.loads(opts)
        except json.JSONDecodeError as exc:
            return [f"--backend_options: not valid JSON ({exc})"]
    if not isinstance(opts, dict) or not all(isinstance(v, dict) for v in opts.values()):
        return ['--backend_options must map ops to option mappings, e.g. {"sdpo_loss": {"tile_elements": 4194304}}']
    train_args.backend_options = opts
    if train_args.backend == "auto":
        return ["--backend_options needs an explicit --backend (each backend has its own options)"]
    problems = []
    for op, given in opts.items():
        if op not in OPS:
            problems.append(f"--backend_options: unknown op {op!r}; ops: {', '.join(OPS)}")
            continue
        try:
            impl = backends.implementation(op, train_args.backend)
            resolve_options(impl.Options, train_args.backend, op, "cpu", given)
        except ValueError as exc:
            problems.append(f"--backend_options: {exc}")
    return problems


def _number_checks(model_args, data_args, train_args) -> list[str]:
    """Numeric flags outside the range where they mean something (NaN and inf included)."""
    problems = []

    def check(name, value, ok, allowed, optional=False):
        if value is None and optional:
            return
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        if not finite or not ok(value):
            problems.append(f"--{name} must be {allowed}, got {value!r}")

    positive = (lambda v: v > 0, "> 0")
    at_least_1 = (lambda v: v >= 1, ">= 1")
    at_least_0 = (lambda v: v >= 0, ">= 0")
    for name, value, (ok, allowed), optional in (
        ("beta", train_args.beta, positive, False),
        ("sft_epochs", train_args.sft_epochs, positive, False),
        ("sdpo_epochs", train_args.sdpo_epochs, positive, False),
        ("sft_learning_rate", train_args.sft_learning_rate, positive, False),
        ("sdpo_learning_rate", train_args.sdpo_learning_rate, positive, False),
        ("max_grad_norm", train_args.max_grad_norm, positive, False),
        ("weight_decay", train_args.weight_decay, at_least_0, False),
        ("sft_weight", train_args.sft_weight, at_least_0, False),
        ("warmup_ratio", train_args.warmup_ratio, (lambda v: 0 <= v <= 1, "in [0, 1]"), False),
        ("batch_size", train_args.batch_size, at_least_1, False),
        ("max_steps", train_args.max_steps, at_least_1, True),
        ("save_steps", train_args.save_steps, (lambda v: v >= 0, ">= 0 (0: a checkpoint at the end of each stage only)"), False),
        ("log_every", train_args.log_every, at_least_1, False),
        ("full_catalog_users", train_args.full_catalog_users, at_least_1, False),
        ("full_catalog_chunk_tokens", train_args.full_catalog_chunk_tokens, at_least_1, False),
        ("constrained_num_beams", train_args.constrained_num_beams, at_least_1, False),
        ("dataloader_num_workers", train_args.dataloader_num_workers, at_least_0, True),
        ("cpu_threads", train_args.cpu_threads, at_least_1, True),
        ("cuda_graph_buckets", train_args.cuda_graph_buckets, at_least_1, False),
        ("max_prompt_tokens", data_args.max_prompt_tokens, at_least_1, False),
        ("max_train_examples", data_args.max_train_examples, at_least_1, True),
        ("max_eval_examples", data_args.max_eval_examples, at_least_1, True),
        ("tiny_layers", model_args.tiny_layers, at_least_1, False),
        ("tiny_hidden", model_args.tiny_hidden, at_least_1, False),
        ("tiny_heads", model_args.tiny_heads, at_least_1, False),
        ("tiny_kv_heads", model_args.tiny_kv_heads, at_least_1, False),
        ("tokenizer_vocab", model_args.tokenizer_vocab, (lambda v: v >= 300, ">= 300 (256 bytes + specials + merges)"), False),
        ("lora_r", model_args.lora_r, at_least_1, False),
        ("lora_alpha", model_args.lora_alpha, positive, False),
        ("lora_dropout", model_args.lora_dropout, (lambda v: 0 <= v < 1, "in [0, 1)"), False),
    ):
        check(name, value, ok, allowed, optional)
    if model_args.model_name_or_path is None and model_args.tiny_heads >= 1 and model_args.tiny_kv_heads >= 1:
        if model_args.tiny_hidden % model_args.tiny_heads:
            problems.append(f"--tiny_hidden {model_args.tiny_hidden} must be a multiple of --tiny_heads {model_args.tiny_heads}")
        if model_args.tiny_heads % model_args.tiny_kv_heads:
            problems.append(f"--tiny_heads {model_args.tiny_heads} must be a multiple of --tiny_kv_heads {model_args.tiny_kv_heads}")
    return problems


def validate(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments) -> None:
    """Errors that need no model or data, raised before any work: one ``UserError`` listing every
    problem found, one per line."""
    problems = _number_checks(model_args, data_args, train_args)
    if train_args.stage not in ("sft", "sdpo", "dpo", "all", "eval"):
        problems.append(f"--stage must be sft, sdpo, dpo, all or eval, got {train_args.stage!r}")
    if train_args.stage == "dpo":
        data_args.num_negatives = 1
    if data_args.num_negatives < 1 and train_args.stage != "sft":
        problems.append(f"--num_negatives must be >= 1 for S-DPO, got {data_args.num_negatives}")
    if data_args.negatives not in NEGATIVES:
        problems.append(f"--negatives must be one of {', '.join(NEGATIVES)}, got {data_args.negatives!r}")
    if train_args.loss_type not in LOSS_TYPES:
        problems.append(f"--loss_type must be one of {', '.join(LOSS_TYPES)}, got {train_args.loss_type!r}")
    if train_args.reference not in ("precompute", "live"):
        problems.append(f"--reference must be precompute or live, got {train_args.reference!r}")
    if train_args.reference == "live" and not (model_args.lora and train_args.stage in ("sdpo", "dpo")):
        problems.append(
            "--reference live needs --lora and --stage sdpo/dpo (the reference is the policy with adapters "
            "disabled, i.e. the starting model); --stage all uses --reference precompute"
        )
    if train_args.backend not in backends.BACKENDS:
        problems.append(f"--backend must be one of {', '.join(backends.BACKENDS)}, got {train_args.backend!r}")
    problems += _check_backend_options(train_args)
    try:
        eval_protocols(train_args.eval)
    except ValueError as exc:
        problems.append(str(exc))
    if train_args.full_catalog_prompt not in ("history", "listed"):
        problems.append(f"--full_catalog_prompt must be history or listed, got {train_args.full_catalog_prompt!r}")
    if train_args.cuda_graphs and train_args.deepspeed is not None:
        problems.append("--cuda_graphs does not run under --deepspeed (ZeRO's hooks gather and reduce on the host "
                        "side of every step)")
    if train_args.cuda_graphs and model_args.gradient_checkpointing:
        problems.append("--cuda_graphs with --gradient_checkpointing is not supported (the recomputation saves and "
                        "restores the RNG state inside the captured step; untested on a GPU)")
    if train_args.cuda_graphs and train_args.backend not in ("auto", "cublas", "triton"):
        problems.append(f"--cuda_graphs needs --backend auto, cublas or triton (the CUDA kernels), got {train_args.backend!r}")
    if train_args.weight_update not in WEIGHT_UPDATES:
        problems.append(f"--weight_update must be one of {', '.join(WEIGHT_UPDATES)}, got {train_args.weight_update!r}")
    elif train_args.weight_update != "fp32_masters" and train_args.deepspeed is not None:
        problems.append("--weight_update stochastic_rounding is for one process without --deepspeed (DeepSpeed's bf16 "
                        "mode keeps its own fp32 masters; ZeRO-3 shards them over the ranks)")
    if train_args.deepspeed is not None and not os.path.isfile(train_args.deepspeed):
        problems.append(f"--deepspeed: no such file {train_args.deepspeed}")
    if data_args.dataset != "synthetic":
        path = data_args.data_path or (data_args.dataset if os.path.exists(data_args.dataset) else None)
        if path is None or not os.path.exists(path):
            problems.append(f"--dataset {data_args.dataset}: data not found (give --data_path; got {data_args.data_path})")
    if model_args.model_name_or_path is not None and not os.path.isdir(model_args.model_name_or_path):
        problems.append(f"--model_name_or_path {model_args.model_name_or_path}: no such local folder (models are read "
                        "from local folders; nothing is downloaded from a model hub)")
    if model_args.gguf_file is not None and model_args.model_name_or_path is None:
        problems.append("--gguf_file needs --model_name_or_path FOLDER (the folder that holds the file)")
    resume = train_args.resume_from_checkpoint
    if resume is not None and resume != "latest" and not os.path.isdir(resume):
        problems.append(f"--resume_from_checkpoint: no such folder {resume} (give a checkpoint-* folder or 'latest')")
    if problems:
        raise UserError("\n".join(problems))
