"""``train.py --s3ft``: S3FT as a data source of the trainer's causal-LM task (:mod:`ls_jax.train.sources`).

Importing :mod:`ls_jax.s3ft` registers :data:`SOURCE`: the trainer then checks ``--judge`` and
the code judge's opt-in with every config, and with ``--s3ft`` trains on the S3FT set that
:func:`ls_jax.s3ft.pipeline.build_cached` builds (or reuses) from the training rows.
"""

import os
from collections.abc import Callable

from ls_jax import data
from ls_jax.s3ft import judges
from ls_jax.s3ft.pipeline import build_cached, checkpoint_id
from ls_jax.train import sources
from ls_jax.train.config import ConfigError, TrainConfig


class S3FTSource:
    """The S3FT data source (``--s3ft``, ``--judge``, ``--s3ft-paraphrase``, ``--s3ft-out``,
    ``--allow-code-execution``)."""

    flag = "s3ft"

    def check(self, c: TrainConfig) -> None:
        """Raise :class:`ConfigError` for an unknown ``--judge``, or the code judge without
        ``--allow-code-execution`` under ``--s3ft``."""
        if c.judge not in judges.NAMES:
            raise ConfigError(f"--judge must be one of {judges.NAMES}, got {c.judge!r}")
        try:
            judges.require_opt_in(c.judge if c.s3ft else None, c.allow_code_execution)
        except judges.CodeExecutionRefused as e:
            raise ConfigError(str(e)) from None

    def rows(
        self,
        c: TrainConfig,
        build_model: Callable,
        tokenizer,
        rows: list[dict],
        where: list[str] | None,
        log: list[str],
    ) -> tuple[list[dict], list[str] | None]:
        """The S3FT training rows (built, or reused when current) and their places in the data;
        the counts per source go to ``log``. Rows left out are reported there, never silently.

        Raises:
          ConfigError: a row asks for the code judge without ``--allow-code-execution``.
          ls_jax.data.DataError: no training row is left.
        """
        out = c.s3ft_out or os.path.join(
            os.path.dirname(os.path.abspath(c.output_dir or "runs/x")),
            "s3ft-cache",
            f"{os.path.basename(c.data or 'generated')}-{os.path.basename(c.model)}.jsonl",
        )
        model_id = checkpoint_id(c.model) if os.path.isdir(c.model) else f"{c.model} seed={c.seed} {c.param_dtype}"
        try:
            result = build_cached(
                out,
                build_model,
                tokenizer,
                rows,
                model_id,
                force=False,
                log=log.append,
                where=where,
                allow_code_execution=c.allow_code_execution,
                judge=c.judge,
                paraphrase=c.s3ft_paraphrase,
                max_new_tokens=c.max_length,
                batch_size=c.eval_batch_size,
                progress=c.progress,
            )
        except judges.CodeExecutionRefused as e:  # a row asks for the code judge
            raise ConfigError(str(e)) from None
        log.extend(["s3ft targets (train rows):", *result.table().splitlines()])
        if not result.rows:
            raise data.DataError(
                f"s3ft: no training row left ({len(result.skipped)} left out; see {out}.skipped.jsonl)"
            )
        return result.rows, None if where is None else [where[r] for r in result.kept_rows()]


SOURCE = S3FTSource()
sources.register(SOURCE)
