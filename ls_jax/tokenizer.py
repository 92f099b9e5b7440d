"""A tiny byte-level BPE tokenizer trained locally (no hub), wrapped for transformers.

Used by the embedded default of ``train.py`` and by tests. Digits are split one per token
before the byte-level step, so numbers stay readable to a small model. Special tokens:
``<pad>`` (id 0), ``<eos>`` (id 1), ``<bos>`` (id 2); no chat template.
"""

from typing import Iterable

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
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
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
