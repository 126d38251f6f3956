"""The headline benchmark: full S-DPO optimizer steps (forward, backward, AdamW) of a Llama-architecture
model built from a config (random init), three ways, in the same process on the same weights and data.

    a  paper      a prompt copy per candidate, full fp32 logits (the TRL DPO trainer's computation)
    b  paper+FLCE the same layout through a fused linear cross-entropy (skipped when none imports)
    c  sdpo_fast  shared-prefix packing and the fused S-DPO loss

Every method trains the same number of groups per optimizer step (``--groups-per-step``) through
micro-batches and gradient accumulation, each at the largest micro-batch that fits (found by trying:
CUDA out-of-memory, or on CPU ``--cpu-mem-cap-mib``, halves it). Reference log-probs precomputed (the
trainer's default) and live, labelled. Reported per cell: optimizer-step time (median of steps taken
in turns, and its spread), groups/s, tokens/s (real tokens, the same numerator for every method),
the micro-batch used, memory, the wall-clock of one ML-100K-sized epoch (78k groups), the check
against (a) from identical weights, and c's speed-up over a and b.

    python benchmarks/bench_step.py                    # quick CPU look at the paper's shape
    python benchmarks/bench_step.py --preset cpu       # tiny configs of the realistic sweep, a few minutes
    python benchmarks/bench_step.py --preset cpu-long  # the P = 256 / 1024, titles of 16, K to 63 series
    python benchmarks/bench_step.py --preset gpu       # Llama-2-7B / Llama-3.2-1B configs, bf16, one GPU
    python benchmarks/bench_step.py --preset gpu --runs llama3.2-1b:lora --shapes 1024x16 --ks 15 \\
        --groups-per-step 32 --cuda-graphs

The code lives in ``benchmarks/step/`` (one module per idea); this file is the entry point. Writes
``<out>/<name>.json``, ``.md`` and ``.png`` (name default ``bench_step_<preset>``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness and the step package

from step import graphs, methods, microbatch, shapes, sweep  # noqa: E402
from step.cli import main as _main  # noqa: E402
from step.cli import parse_args as _parse_args  # noqa: E402

REF32_FLOOR = sweep.REF32_FLOOR
__all__ = ["main", "parse_args", "methods", "microbatch", "shapes", "sweep", "REF32_FLOOR"]


def parse_args(argv=None):
    return _parse_args(argv, __doc__)


def main(argv=None, flce_provider=None):
    return _main(argv, flce_provider, __doc__)


if __name__ == "__main__":
    main()
