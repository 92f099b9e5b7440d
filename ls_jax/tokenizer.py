"""Tokenizers: a checkpoint's own (:func:`load_tokenizer`), or a tiny byte-level BPE trained
locally (no hub), wrapped for transformers (:func:`train_bpe_tokenizer`).

Used by the embedded default of ``train.py`` and by tests. Digits are split one per token
before the byte-level step, so numbers stay readable to a small model. Special tokens:
``<pad>`` (id 0), ``<eos>`` (id 1), ``<bos>`` (id 2); no chat template.
"""

import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 256 + 64) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (about a second for a few thousand lines).

    The vocabulary always holds the 256 byte symbols and the special tokens, so any text
    encodes; ``vocab_size`` bounds the total (merges fill the rest).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    pad, eos, bos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos)


# the files transformers builds a tokenizer from (a directory with none of them holds no tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: str):
    """The tokenizer saved in the checkpoint directory ``path`` (a pad token set to eos if it has
    none), offline.

    Raises:
      ValueError: a one-line message when ``path`` holds no tokenizer (naming the missing files:
        transformers 5 would build an empty tokenizer from the config alone, every text encoding
        to nothing or to unknown tokens, or fail with a message about converters), or one that
        does not load or encodes text to nothing.
    """
    from transformers import AutoTokenizer

    missing = (
        f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the model's tokenizer "
        f"there (tokenizer.save_pretrained)"
    )
    has_files = any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(
            missing if not has_files else f"cannot load a tokenizer from {path}: {str(e).splitlines()[0]}"
        ) from None
    ids = tok("The answer is 42.", add_special_tokens=False)["input_ids"]
    if all(i == tok.unk_token_id for i in ids):
        raise ValueError(
            missing
            if not has_files
            else f"the tokenizer in {path} encodes text to {'unknown tokens only' if ids else 'nothing'}"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
