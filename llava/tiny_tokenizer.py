"""A character-level tokenizer built in-process, for tiny offline checkpoints of every family.

Real tokenizers cannot be downloaded here; a char-level one with the family's special tokens
(added as single tokens) is enough to exercise prompts, placeholders and generation end to end.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

BASE_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n\t"


def build_char_tokenizer(
    special_tokens: list[str],
    *,
    eos_token: str,
    pad_token: str | None = None,
    bos_token: str | None = None,
    unk_token: str = "<unk>",
    chat_template: str | None = None,
    padding_side: str = "left",
) -> PreTrainedTokenizerFast:
    """Every printable ASCII character is one token; each special token is one more.

    Token ids: specials first (in the given order, after unk), then characters, so ids are stable
    for a given list of specials.
    """
    specials = [unk_token] + [t for t in dict.fromkeys(special_tokens) if t != unk_token]
    for extra in (eos_token, pad_token, bos_token):
        if extra is not None and extra not in specials:
            specials.append(extra)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in BASE_CHARS:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk_token,
        eos_token=eos_token,
        pad_token=pad_token or eos_token,
        bos_token=bos_token,
        padding_side=padding_side,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [t for t in specials if t != unk_token]})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
