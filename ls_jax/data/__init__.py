"""Supervised fine-tuning data: local files -> token ids with prompt masking -> batches.

Input rows (through ``datasets``, offline) have either chat ``messages`` (a list of
``{"role", "content"}``) or ``prompt`` / ``response`` strings. A row may give several weighted
answers instead of one (sequence-level soft labels): ``"responses": [{"text": "Positive", "p": 0.6},
{"text": "Neutral", "p": 0.4}]`` with a ``prompt`` (or with ``messages``, the conversation each
answer continues as the last assistant message). :func:`expand_responses` makes one example per
answer, weighted by its probability: each of its tokens counts ``p`` in the loss (the mean is
over the total weight), so a row's answers together weigh as one response.

Labels are aligned with ``input_ids`` (the model wrapper shifts them): ``-100`` on prompt and
padding tokens. Examples longer than ``max_length`` are cut at the end and counted; those left
without a response token are dropped and counted. Batches have a fixed shape ``[B, max_length]``
and are drawn in a seeded order per epoch, addressed by a plain integer position so a run can
resume exactly.

Modules, in pipeline order: :mod:`~ls_jax.data.files` (reading rows),
:mod:`~ls_jax.data.responses` (weighted answers), :mod:`~ls_jax.data.chat` (a row as token ids
and masked labels: the templates), :mod:`~ls_jax.data.encoding` (rows to examples, shared between
processes), :mod:`~ls_jax.data.packing` (examples to rows), :mod:`~ls_jax.data.batches`;
:class:`DataError` (:mod:`~ls_jax.data.errors`) is what each raises for bad data.
"""

from ls_jax.data.batches import Batches, eval_batches
from ls_jax.data.chat import IGNORE_INDEX, SIMPLE_TEMPLATE, prompt_ids, tokenize_example
from ls_jax.data.encoding import Encoded, Example, PrepareStats, encode_row, encode_shared, prepare
from ls_jax.data.errors import DataError
from ls_jax.data.files import load_rows, read_jsonl
from ls_jax.data.packing import build_row, pack
from ls_jax.data.responses import PROBABILITY_TOLERANCE, expand_responses, probabilities, weighted_responses

__all__ = [
    "IGNORE_INDEX",
    "PROBABILITY_TOLERANCE",
    "SIMPLE_TEMPLATE",
    "Batches",
    "DataError",
    "Encoded",
    "Example",
    "PrepareStats",
    "build_row",
    "encode_row",
    "encode_shared",
    "eval_batches",
    "expand_responses",
    "load_rows",
    "pack",
    "prepare",
    "probabilities",
    "prompt_ids",
    "read_jsonl",
    "tokenize_example",
    "weighted_responses",
]
