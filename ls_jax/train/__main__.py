"""``python -m ls_jax.train [flags]``: the same command as ``python train.py`` (installed package)."""

import sys

import ls_jax.s3ft  # noqa: F401  (the command, like train.py, registers the S3FT data source of --s3ft)
from ls_jax.train import main

sys.exit(main())
