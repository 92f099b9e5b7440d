"""Supervised fine-tuning with label-smoothed, fused cross-entropy: ``python train.py --help``.

With no arguments: a tiny built-in model on generated arithmetic / multiple-choice data,
trained with label smoothing 0 and 0.1, offline, in a few minutes on a CPU.
"""

import sys

import ls_jax.s3ft  # noqa: F401  (registers the S3FT data source of --s3ft with the trainer)
from ls_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
