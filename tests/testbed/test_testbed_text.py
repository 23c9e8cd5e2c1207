"""The windowed T5 gives identical far pads, and the collapsed Flux sequence is exact."""

from __future__ import annotations

import torch
from diffusion_accel.pipelines.testbed.text import build_clip, build_t5, collapse_t5_sequence


def test_t5_pads_far_from_the_caption_are_identical_and_words_see_order():
    model, tok = build_t5(0)
    ids = tok(["a red circle and a blue square", "a blue circle and a red square"], padding="max_length",
              max_length=128, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids)[0]
    middle = out[:, 40:100]
    assert torch.allclose(middle, middle[:, :1].expand_as(middle), atol=1e-5)
    assert not torch.allclose(out[0, 1], out[1, 1], atol=1e-3)  # "red" next to "circle" vs next to "square"


def test_collapsed_sequence_reproduces_the_full_flux_forward():
    from diffusers import FluxPipeline
    from diffusion_accel.pipelines.testbed.models import build_transformer

    transformer = build_transformer("flow", "quality", seed=0).eval()
    t5, t5_tok = build_t5(1)
    clip, clip_tok = build_clip(0)
    captions = ["a small red circle in the top left", ""]
    with torch.no_grad():
        embeds = t5(t5_tok(captions, padding="max_length", max_length=512, return_tensors="pt").input_ids)[0]
        pooled = clip(clip_tok(captions, padding="max_length", max_length=77, return_tensors="pt").input_ids
                      ).pooler_output
        x = torch.randn(2, 64, 16)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32)
        t = torch.tensor([0.3, 0.8])
        full = transformer(hidden_states=x, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                           img_ids=img_ids, txt_ids=torch.zeros(512, 3), return_dict=False)[0]
        rows, log_counts = collapse_t5_sequence(embeds)
        bias = torch.cat([log_counts, torch.zeros(2, 64)], dim=1).view(2, 1, 1, -1)
        short = transformer(hidden_states=x, encoder_hidden_states=rows, pooled_projections=pooled, timestep=t,
                            img_ids=img_ids, txt_ids=torch.zeros(rows.shape[1], 3),
                            joint_attention_kwargs={"attention_mask": bias}, return_dict=False)[0]
        wrong = transformer(hidden_states=x, encoder_hidden_states=rows, pooled_projections=pooled, timestep=t,
                            img_ids=img_ids, txt_ids=torch.zeros(rows.shape[1], 3), return_dict=False)[0]
    assert rows.shape[1] < 64
    assert torch.allclose(full, short, atol=1e-4)
    assert not torch.allclose(full, wrong, atol=1e-3)  # the log-count matters
