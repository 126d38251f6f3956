"""Arguments and ``main`` of ``benchmarks/bench_step.py``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import graphs, methods, report, shapes, sweep

OVERRIDES = {"layers": "num_hidden_layers", "hidden": "hidden_size", "intermediate": "intermediate_size",
             "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "vocab": "vocab_size",
             "tie": "tie_word_embeddings"}


def parse_args(argv=None, doc: str | None = None):
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(shapes.PRESETS), default="quick")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=methods.METHODS, default=list(methods.METHODS))
    p.add_argument("--runs", nargs="+", metavar="CONFIG:MODE",
                   help=f"model config ({', '.join(shapes.MODEL_CONFIGS)}) and mode (lora or full)")
    p.add_argument("--shapes", nargs="+", metavar="SHAPE", help="'paper' (prompts 150-190, titles 3-8) or PxN")
    p.add_argument("--ks", type=int, nargs="+")
    p.add_argument("--groups-per-step", type=int, nargs="+", help="groups per optimizer step")
    p.add_argument("--refs", nargs="+", choices=("precomputed", "live"), help="reference log-probs")
    p.add_argument("--micro-batch", type=int, help="start the micro-batch search here (default: the whole step)")
    p.add_argument("--max-micro-batch", type=int, help="largest micro-batch the search tries")
    p.add_argument("--cpu-mem-cap-mib", type=float,
                   help="CPU: a micro-batch whose forward+backward grows the RSS by more counts as out of memory")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="(c) replays each micro-batch from a CUDA graph (shape buckets; CUDA only)")
    for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"override every config's {OVERRIDES[name]}")
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None, help="tie lm_head to the embeddings")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--budget-s", type=float, help="stop timing a method after this many seconds of timed steps (>= 1 step)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--sdpo-op", choices=("fused", "logprobs"), default="fused",
                   help="(c): candidate_sdpo_loss (fused) or candidate_logprobs + sdpo_loss")
    p.add_argument("--strict", action=argparse.BooleanOptionalAction, default=None,
                   help="stop when (b) or (c) disagrees with (a) (default: on in float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--replot", type=Path, default=None, help="only rewrite the markdown and PNG of this result JSON")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    p.add_argument("--name", default=None, help="result file stem (default bench_step_<preset>)")
    args = p.parse_args(argv)
    for key, value in shapes.PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.strict is None:
        args.strict = args.dtype == "float32"
    for name in ("ks", "groups_per_step"):
        if any(v < 1 for v in getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    for name in ("micro_batch", "max_micro_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for s in args.shapes:
        shapes.parse_shape(s)
    args.overrides = {OVERRIDES[k]: getattr(args, k) for k in OVERRIDES}
    for r in args.runs:
        cfg, sep, mode = r.partition(":")
        if not sep or mode not in ("lora", "full"):
            raise ValueError(f"--runs entries are CONFIG:MODE with MODE lora or full, got {r!r}")
        shapes.model_config(cfg, args.overrides)
    if args.cuda_graphs:
        graphs.refuse_unless_cuda(torch.device(args.device))
        if args.refs != ["precomputed"]:
            raise ValueError("--cuda-graphs needs --refs precomputed (the live reference reads the device)")
        if args.warmup < 1:  # else the first timed step holds the eager warm-ups and the capture
            raise ValueError(f"--cuda-graphs needs --warmup >= 1, got {args.warmup}")
    args.runs = list(dict.fromkeys(args.runs))
    args.flce_provider = methods.fused_linear_ce
    return args


def main(argv=None, flce_provider=None, doc: str | None = None):
    """Run the sweep and write the results; ``flce_provider`` replaces ``fused_linear_ce`` (tests)."""
    args = parse_args(argv, doc)
    if args.replot is not None:
        result = json.loads(args.replot.read_text())
        return result["meta"], result["rows"], report.write(result["meta"], result["rows"], args.replot.parent,
                                                            args.replot.stem)
    if flce_provider is not None:
        args.flce_provider = flce_provider
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name = args.name or f"bench_step_{args.preset}"
    try:
        # partial JSON + markdown after every cell: a run stopped by a time limit still leaves its rows
        meta, rows = sweep.run(args, on_cell=lambda meta, rows: report.write(meta, rows, args.out, name, make_plot=False))
    finally:
        torch.set_num_threads(threads)
    paths = report.write(meta, rows, args.out, name, make_plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return meta, rows, paths
