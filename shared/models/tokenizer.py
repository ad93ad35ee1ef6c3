"""The family's shared byte-level BPE tokenizer: trained on the corpus, saved as a HF tokenizer.

Byte-level means every string round-trips exactly: `decode(encode(x)) == x`, no unknown
tokens, no normalisation. The only special tokens are `<|endoftext|>` (end of document,
also used as BOS) and `<|pad|>`; neither is ever added by `encode`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int, threads: int = 2):
    """Train a byte-level BPE of `vocab_size` tokens; returns a `PreTrainedTokenizerFast`."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok):
    """A `tokenizers.Tokenizer` as the `PreTrainedTokenizerFast` every model folder carries."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
    )


def load_tokenizer(path: Path):
    """The tokenizer saved in a model (or tokenizer) folder, via `AutoTokenizer`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, each followed by the end-of-document token."""
    backend = tokenizer.backend_tokenizer
    eos = tokenizer.eos_token_id
    return [enc.ids + [eos] for enc in backend.encode_batch(texts, add_special_tokens=False)]
