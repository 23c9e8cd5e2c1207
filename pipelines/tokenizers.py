"""Tokenizers built in code, with no network.

Diffusers' own tests download ``hf-internal-testing/tiny-random-*`` tokenizers; nothing may be downloaded here, so we
construct real ``transformers`` tokenizer classes (T5 Unigram, CLIP byte-level BPE, Llama BPE) from a small
vocabulary. They round-trip through ``save_pretrained`` / ``from_pretrained`` like any Hub tokenizer.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

#: Words every offline tokenizer knows, enough for readable test prompts (the testbed brings its own vocabulary).
DEFAULT_WORDS: tuple[str, ...] = tuple(
    """a an the of in on and with small large big tiny red green blue yellow purple orange white black
    circle square triangle cat dog photo astronaut riding horse top bottom left right center moving""".split()
)

_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 64):
    """A SentencePiece-style Unigram ``T5Tokenizer``: whole words, then single characters as a fallback."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in _CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """A byte-level BPE ``CLIPTokenizer`` whose merges spell out ``words`` as single tokens."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for code in range(33, 127):
        vocab.setdefault(chr(code), len(vocab))
        vocab.setdefault(chr(code) + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: "c i r c l e</w>" -> "ci r ..." -> "circle</w>"
            pair = (symbols[0], symbols[1])
            merged = symbols[0] + symbols[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def build_llama_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 256):
    """A ``LlamaTokenizer`` (BPE with the ``▁`` metaspace) over characters and ``words``."""
    from transformers import LlamaTokenizer

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3}
    for c in _CHARS + string.ascii_uppercase + "<|>:_\n ":
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = ["▁"] + list(word)
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer
