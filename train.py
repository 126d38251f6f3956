"""Entry point: ``python train.py`` or ``deepspeed train.py ...`` (see sdpo_fast.train)."""

import os
import sys

# Passive OpenMP waits, set before torch loads its OpenMP runtime (libgomp reads it once, at start):
# spinning threads of the native backend took the default run from 3 to 51 minutes on a 2-core
# machine shared with other work (benchmarks/results/shared_cpu_train.md). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sdpo_fast.train import main  # noqa: E402  (after the environment above)

if __name__ == "__main__":
    sys.exit(main())
