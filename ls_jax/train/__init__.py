"""Supervised fine-tuning with the fused label-smoothed loss (``python train.py``).

:func:`main` is the command; :func:`run` the same from Python with a :class:`TrainConfig`;
:func:`ls_jax.train.loop.train` one run on prepared data, for use from a user's own code.
"""

from ls_jax.train.config import TrainConfig, parse_args
from ls_jax.train.main import main, run

__all__ = ["TrainConfig", "main", "parse_args", "run"]
