"""SFT then S-DPO training (``python train.py`` / ``deepspeed train.py``).

Not yet implemented: the trainer lands with the training issue (#6). The command exists so the README's
main command is stable.
"""

import sys


def main(argv=None) -> int:
    print("sdpo_fast train: not yet implemented (training issue #6); nothing was run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
