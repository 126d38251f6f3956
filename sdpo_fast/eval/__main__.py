"""``python -m sdpo_fast.eval``: the baseline table of a dataset (``cli.main``)."""

from .cli import main

raise SystemExit(main())
