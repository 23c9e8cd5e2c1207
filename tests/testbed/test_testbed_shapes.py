"""The procedural shapes data: determinism, labels vs pixels, captions and their parser, video, tokenizers."""

from __future__ import annotations

import numpy as np
import pytest
from diffusion_accel.pipelines.testbed import shapes as S


def test_samples_are_deterministic_and_splits_differ():
    a, b = S.make_sample("train", 7), S.make_sample("train", 7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.objects == b.objects
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.uint8
    assert not np.array_equal(a.image, S.make_sample("train", 8).image)
    assert not np.array_equal(a.image, S.make_sample("heldout", 7).image)
    with pytest.raises(ValueError):
        S.rng_for("nope", 0)


def test_labels_match_pixels():
    for i in range(100):
        s = S.make_sample("train", i)
        assert 1 <= len(s.objects) <= 2
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects)
        for o in s.objects:
            assert S.cell_of(o.cx, o.cy) == o.position
            pixel = s.image[int(round(o.cy)), int(round(o.cx))].astype(int)
            assert np.abs(pixel - np.array(S.COLOURS[o.colour])).max() <= 2, (i, o)


def test_caption_round_trip_and_mentions_are_true():
    saw_plain = saw_two = False
    for i in range(300):
        s = S.make_sample("train", i)
        parsed = S.parse_caption(s.caption)
        assert parsed == s.mentioned
        assert S.caption_for(parsed) == s.caption
        for m, o in zip(parsed, s.objects, strict=True):
            assert (m.colour, m.shape) == (o.colour, o.shape)
            assert m.position in (None, o.position)
            assert m.size in (None, o.size)
        saw_plain |= len(parsed) == 1 and parsed[0].position is None and parsed[0].size is None
        saw_two |= len(parsed) == 2
    assert saw_plain and saw_two
    assert S.parse_caption("a red circle") == [S.PromptObject("circle", "red")]
    assert S.parse_caption("a red circle in the top left and a small blue square") == [
        S.PromptObject("circle", "red", 0), S.PromptObject("square", "blue", None, "small")]


@pytest.mark.parametrize("bad", ["a pink circle", "two red circles", "a red circle in the middle", ""])
def test_parser_rejects_other_text(bad):
    with pytest.raises(ValueError):
        S.parse_caption(bad)


def test_heldout_prompts_are_fixed_and_parseable():
    prompts = S.heldout_prompts()
    assert len(prompts) == 64 and prompts == S.heldout_prompts()
    counts = [len(S.parse_caption(p)) for p in prompts]
    assert set(counts) == {1, 2}
    train_images = {S.make_sample("train", i).image.tobytes() for i in range(64)}
    assert not train_images & {S.make_sample("heldout", i).image.tobytes() for i in range(64)}


def test_video_moves_with_its_caption():
    agree = 0
    for i in range(20):
        frames, labels, caption = S.make_video(i)
        assert frames.shape == (16, 64, 64, 3) and len(labels) == 16
        direction = caption.rsplit(" ", 1)[1]
        first, second = labels[0][0], labels[1][0]
        agree += S.direction_of(second.cx - first.cx, second.cy - first.cy) == direction
        assert S.parse_caption(caption)[0].shape == first.shape
        assert not np.array_equal(frames[0], frames[-1])
    assert agree >= 16  # the rest bounced off a border on the first step


def test_tokenizers_know_every_caption_word():
    from diffusion_accel.pipelines.testbed.text import clip_tokenizer, t5_tokenizer

    t5, clip = t5_tokenizer(), clip_tokenizer()
    for prompt in S.heldout_prompts()[:16]:
        ids = t5(prompt).input_ids
        assert t5.unk_token_id not in ids and len(ids) == len(prompt.split()) + 1
        clip_ids = clip(prompt).input_ids
        assert len(clip_ids) < 40 and clip.decode(clip_ids, skip_special_tokens=True).strip() == prompt
