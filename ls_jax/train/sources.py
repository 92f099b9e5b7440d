"""Data sources of the causal-LM task: training rows rewritten by another package before encoding.

The trainer declares the flags (``--s3ft``, ``--judge``, ...) and calls the source; the package
that implements it registers itself here when imported (``ls_jax.s3ft`` registers S3FT), so
the trainer imports nothing of it. ``train.py`` and ``python -m ls_jax.train`` import
``ls_jax.s3ft``; from Python, import it before :func:`ls_jax.train.run` with ``s3ft=True``.
"""

from collections.abc import Callable
from typing import Protocol

from ls_jax.train.config import ConfigError, TrainConfig


class Source(Protocol):
    """A data source, turned on by the boolean :class:`TrainConfig` field :attr:`flag`."""

    flag: str

    def check(self, c: TrainConfig) -> None:
        """Raise :class:`ConfigError` for a bad value of the source's flags (run for every config)."""

    def rows(
        self,
        c: TrainConfig,
        build_model: Callable,
        tokenizer,
        rows: list[dict],
        where: list[str] | None,
        log: list[str],
    ) -> tuple[list[dict], list[str] | None]:
        """The training rows to encode instead of ``rows`` and their places in the data (``where``;
        None for generated data); lines for the user go to ``log``. ``build_model(seed)`` builds
        the model being fine-tuned, before training."""


_SOURCES: dict[str, Source] = {}


def register(source: Source) -> None:
    """Make ``source`` the data source of its flag (replacing an earlier one)."""
    _SOURCES[source.flag] = source


def check(c: TrainConfig) -> None:
    """Every registered source's :meth:`Source.check`; :class:`ConfigError` when ``--s3ft`` is
    given and no source is registered for it."""
    if c.s3ft and "s3ft" not in _SOURCES:
        raise ConfigError(
            "--s3ft: the S3FT data source is not loaded: import ls_jax.s3ft first "
            "(train.py and python -m ls_jax.train do)"
        )
    for source in _SOURCES.values():
        source.check(c)


def train_rows(
    c: TrainConfig, build_model: Callable, tokenizer, rows: list[dict], where: list[str] | None, log: list[str]
) -> tuple[list[dict], list[str] | None]:
    """``rows`` and ``where`` rewritten by the sources turned on in ``c`` (unchanged when none is)."""
    for flag, source in _SOURCES.items():
        if getattr(c, flag):
            rows, where = source.rows(c, build_model, tokenizer, rows, where, log)
    return rows, where
