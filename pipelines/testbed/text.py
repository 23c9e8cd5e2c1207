"""The testbed's text side: offline tokenizers over the shapes vocabulary and tiny frozen text encoders.

The T5 encoder is a random ``T5EncoderModel`` whose relative-position bias is restricted to a window of
``±T5_WINDOW`` tokens (every other bucket gets a large negative bias). Word order still reaches each token through
its neighbours, and, because attention is local, the ``<pad>`` tokens far from the caption all produce *the same*
vector. Flux feeds the full 512-token sequence to its transformer with no mask and zero text position ids; identical
tokens are interchangeable there, so training can replace the run of identical pads with one token whose attention
logit carries ``log(count)`` (see :func:`collapse_t5_sequence`), which is exact, and 10x cheaper.
"""

from __future__ import annotations

import math

import torch

from ..tokenizers import build_clip_tokenizer, build_t5_tokenizer
from .shapes import vocabulary

T5_DIM = 64
CLIP_DIM = 64
T5_WINDOW = 3
T5_MAX_LENGTH = 32
#: Leading / trailing rows of a 512-token Flux T5 sequence kept as they are; the rows between are identical pads.
FLUX_HEAD_ROWS = 32
FLUX_TAIL_ROWS = 8
_BLOCKED = -1.0e4


def t5_tokenizer():
    """Unigram ``T5Tokenizer`` over the caption vocabulary (``model_max_length`` 32 covers every caption)."""
    return build_t5_tokenizer(vocabulary(), model_max_length=T5_MAX_LENGTH)


def clip_tokenizer():
    """Byte-level BPE ``CLIPTokenizer`` whose merges spell every caption word as one token."""
    return build_clip_tokenizer(vocabulary(), model_max_length=77)


def build_t5(seed: int, d_model: int = T5_DIM, num_layers: int = 2):
    """A frozen random ``T5EncoderModel`` with windowed relative attention (see the module docstring)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 4,
                      num_layers=num_layers, num_heads=4, relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, feed_forward_proj="relu", dropout_rate=0.0)
    model = T5EncoderModel(config)
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 1.0)
        window_relative_attention(model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
                                  config.relative_attention_num_buckets)
    return model.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def window_relative_attention(bias: torch.Tensor, num_buckets: int) -> None:
    """In place: block every relative-position bucket of a (U)T5 attention bias ``[num_buckets, heads]`` outside
    ``±T5_WINDOW`` tokens (both directions; bidirectional buckets put the positive offsets from ``num_buckets // 2``
    on) and draw the kept ones N(0, 0.5²)."""
    half = num_buckets // 2
    keep = [*range(0, T5_WINDOW + 1), *range(half + 1, half + T5_WINDOW + 1)]
    values = torch.full_like(bias, _BLOCKED)
    values[keep] = torch.randn(len(keep), bias.shape[1]) * 0.5
    bias.copy_(values)


def build_clip(seed: int, hidden: int = CLIP_DIM, num_layers: int = 2):
    """A frozen random ``CLIPTextModel`` (Flux uses its pooled output, which a causal model makes independent of
    padding)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=num_layers, num_attention_heads=4, projection_dim=hidden,
                            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                            hidden_act="gelu")
    return CLIPTextModel(config).eval().requires_grad_(False), tokenizer


def collapse_t5_sequence(embeds: torch.Tensor, head: int = FLUX_HEAD_ROWS, tail: int = FLUX_TAIL_ROWS,
                         atol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L, D]`` T5 outputs → ``([B, head + 1 + tail, D], log_counts [B, head + 1 + tail])``.

    Rows ``head .. L - tail - 1`` must be identical (checked); they become one row with log-count
    ``log(L - head - tail)``. Giving that log-count to the row's attention logit reproduces the full sequence."""
    length = embeds.shape[1]
    middle = embeds[:, head:length - tail]
    if not torch.allclose(middle, middle[:, :1].expand_as(middle), atol=atol):
        raise ValueError("the middle pad rows are not identical; is the caption longer than the head?")
    rows = torch.cat([embeds[:, :head], middle[:, :1], embeds[:, length - tail:]], dim=1)
    log_counts = torch.zeros(rows.shape[:2], dtype=embeds.dtype, device=embeds.device)
    log_counts[:, head] = math.log(middle.shape[1])
    return rows, log_counts
