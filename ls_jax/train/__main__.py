"""``python -m ls_jax.train [flags]``: the same command as ``python train.py`` (installed package)."""

import sys

from ls_jax.train import main

sys.exit(main())
