"""Entry point: ``python train.py`` or ``deepspeed train.py ...`` (see sdpo_fast.train)."""

import sys

from sdpo_fast.train import main

if __name__ == "__main__":
    sys.exit(main())
