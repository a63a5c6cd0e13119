"""Tokenizers of each kind a model may use, all loadable offline: byte-level BPE (the default
model's), SentencePiece with byte fallback (built here), and characters (conftest)."""

from __future__ import annotations

import functools

from conftest import tiny_tokenizer


def sentencepiece_tokenizer():
    """A Llama-2 style tokenizer, built offline: "▁" marks spaces, the first one is stripped, and
    characters outside the vocabulary fall back to byte tokens "<0xE4>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece in ["▁", "▁▁", "▁the", "▁hello", "▁world"] + [chr(i) for i in range(33, 127)]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def default_tokenizer():
    from aded.models import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


TOKENIZERS = {"byte-level": default_tokenizer, "sentencepiece": sentencepiece_tokenizer,
              "characters": tiny_tokenizer}


@functools.cache
def offline_tokenizer(name: str):
    return TOKENIZERS[name]()


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class CountingTokenizer:
    """A tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_ids = 0

    def decode(self, ids, **kwargs) -> str:
        self.decoded_ids += len(ids)
        return self.tokenizer.decode(ids, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)
