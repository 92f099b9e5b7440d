"""Selective self-to-supervised fine-tuning (S3FT): judges and the training-set builder.

``python -m ls_jax.s3ft --model M --data train.jsonl --judge numeric --out s3ft.jsonl`` builds
the set; ``train.py --s3ft`` builds (or reuses) it and trains on it.
"""

from ls_jax.s3ft.judges import JUDGES, NAMES, exact_match, final_number, numeric_match, resolve, run_python_tests
from ls_jax.s3ft.pipeline import S3FTSet, build, build_cached

__all__ = ["JUDGES", "NAMES", "S3FTSet", "build", "build_cached", "exact_match", "final_number", "numeric_match",
           "resolve", "run_python_tests"]
