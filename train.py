"""Entry point: ``python train.py`` or ``deepspeed train.py ...`` (see sdpo_fast.train)."""

from sdpo_fast.train import main

if __name__ == "__main__":
    main()
