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


def build_llama_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 256, add_bos: bool = False):
    """A ``LlamaTokenizer`` (BPE with the ``▁`` metaspace) over characters and ``words``.

    ``add_bos``: start every sequence with ``<s>``, as tokenizers do whose pipelines encode an empty negative prompt
    (CogView4's GLM tokenizer prefixes its own start tokens)."""
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
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=add_bos)
    tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


#: A plain chat template for tokenizers that stand in for a chat model's processor: each message's role, then its
#: text (a string or a list of ``{"type": "text", "text": ...}`` parts, as Flux 2 passes them).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_llama_tokenizer(words: Iterable[str] = DEFAULT_WORDS + ("system", "user", "assistant"),
                               model_max_length: int = 512):
    """:func:`build_llama_tokenizer` with :data:`CHAT_TEMPLATE`, for pipelines that call ``apply_chat_template``."""
    tokenizer = build_llama_tokenizer(words, model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_gemma_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 512):
    """A ``GemmaTokenizer`` (BPE with the ``▁`` metaspace) over characters and ``words``, with Gemma's specials."""
    from transformers import GemmaTokenizer

    vocab: dict[str, int] = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5}
    for c in _CHARS + string.ascii_uppercase + "<>:_\n":
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = ["▁", *word]
        while len(symbols) > 1:
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2's table: printable bytes map to
    themselves, the others to code points from 256 up)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


#: Words of the system prompts that chat-style text encoders (Qwen) wrap around the user's prompt.
TEMPLATE_WORDS: tuple[str, ...] = tuple(
    """describe image video by detailing color shape size texture quantity text spatial relationships objects
    background system user assistant you are helpful""".split()
)


def build_qwen2_tokenizer(words: Iterable[str] = DEFAULT_WORDS + TEMPLATE_WORDS, model_max_length: int = 1024):
    """A byte-level BPE ``Qwen2Tokenizer`` (every byte is a token, ``words`` merge to one) with the chat tokens and
    :data:`CHAT_TEMPLATE`."""
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for symbol in _byte_symbols():
        vocab.setdefault(symbol, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = ["Ġ", *word]  # "Ġ" is the byte-level stand-in for the space before a word
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in specials:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE  # Qwen's own template has the same <|im_start|>role ... <|im_end|> shape
    return tokenizer
