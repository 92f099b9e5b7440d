"""Selective self-to-supervised fine-tuning (S3FT): judges and the training-set builder.

``python -m ls_jax.s3ft --model M --data train.jsonl --judge numeric --out s3ft.jsonl`` builds
the set; ``train.py --s3ft`` builds (or reuses) it and trains on it: importing this package
registers S3FT as a data source of the trainer (:mod:`ls_jax.s3ft.source`).
"""

from ls_jax.s3ft.judges import JUDGES, NAMES, exact_match, final_number, numeric_match, resolve, run_python_tests
from ls_jax.s3ft.pipeline import S3FTSet, build, build_cached
from ls_jax.s3ft.source import SOURCE

__all__ = [
    "JUDGES",
    "NAMES",
    "S3FTSet",
    "SOURCE",
    "build",
    "build_cached",
    "exact_match",
    "final_number",
    "numeric_match",
    "resolve",
    "run_python_tests",
]
