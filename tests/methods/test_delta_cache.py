"""Δ-cache (Δ-DiT): exactness at N=1, the cached-step identity, stage switching, CFG rows, depth checks."""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.methods.delta_cache import DeltaCacheConfig
from diffusion_accel.row_store import RowStore
from diffusion_accel.testing import run_pipe, tiny_pipeline


@pytest.mark.parametrize("family", ["pixart_alpha", "flux", "wan", "sd3", "hunyuan_video"])
def test_interval_one_is_bit_identical(family):
    pipe = tiny_pipeline(family)
    baseline = run_pipe(pipe, family)
    with da.accelerated(pipe, "delta_cache", interval=1):
        out = run_pipe(pipe, family)
        stats = da.stats(pipe)
    assert torch.equal(out, baseline)
    assert stats["blocks_run"] == stats["blocks_total"]


def test_cached_step_is_range_input_plus_stored_delta():
    pipe = tiny_pipeline("pixart_alpha")
    handle = da.apply(pipe, "delta_cache", interval=2, num_cached_blocks=2, boundary=0)  # front range only
    method = handle.session.methods[0]
    blocks = pipe.transformer.transformer_blocks
    inputs: dict[int, list[torch.Tensor]] = {0: [], 2: []}
    deltas: list[torch.Tensor] = []

    def capture(index):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            inputs[index].append(hidden.clone())
            if index == 2 and not method.plan.full:
                deltas.append(method.stores["front"].get(handle.session.context.rows)[0].clone())
        return hook

    hooks = [blocks[i].register_forward_pre_hook(capture(i), with_kwargs=True) for i in (0, 2)]
    try:
        run_pipe(pipe, "pixart_alpha")
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    assert len(deltas) == 2  # steps 1 and 3 are cached
    for step, delta in zip((1, 3), deltas, strict=True):
        assert torch.equal(inputs[2][step], inputs[0][step] + delta)
    # and the stored delta is the full step's deviation of the same range
    assert not torch.equal(deltas[0], deltas[1])


def test_stage_switch_rear_then_front():
    pipe = tiny_pipeline("pixart_alpha")
    with da.accelerated(pipe, "delta_cache", interval=2, num_cached_blocks=3, boundary=2):
        run_pipe(pipe, "pixart_alpha")
        steps = da.stats(pipe)["steps"]
    assert [s["blocks_skipped"] for s in steps] == [[], [1, 2, 3], [], [0, 1, 2]]
    with da.accelerated(pipe, "delta_cache", interval=2, num_cached_blocks=3, boundary=2,
                        stage_order="front_then_rear"):
        run_pipe(pipe, "pixart_alpha")
        steps = da.stats(pipe)["steps"]
    assert [s["blocks_skipped"] for s in steps] == [[], [0, 1, 2], [], [1, 2, 3]]


def test_warmup_steps_compute_in_full_then_the_interval_counts_from_there():
    pipe = tiny_pipeline("pixart_alpha")
    baseline = run_pipe(pipe, "pixart_alpha", num_inference_steps=6)
    with da.accelerated(pipe, "delta_cache", interval=2, num_cached_blocks=3, boundary=0, warmup_steps=3):
        run_pipe(pipe, "pixart_alpha", num_inference_steps=6)
        steps = da.stats(pipe)["steps"]
    assert [s["blocks_skipped"] for s in steps] == [[], [], [], [], [0, 1, 2], []]
    with da.accelerated(pipe, "delta_cache", interval=2, num_cached_blocks=3, warmup_steps=6):
        assert torch.equal(run_pipe(pipe, "pixart_alpha", num_inference_steps=6), baseline)
    with pytest.raises(ValueError, match="warmup_steps"):
        da.apply(pipe, "delta_cache", warmup_steps=-1)


def test_compute_fraction_matches_the_paper_formula():
    """Blocks run / blocks total = 1/N + (N-1)/N (1 - N_c/L) when T is a multiple of N."""
    pipe = tiny_pipeline("dit")
    for interval, n_c in ((2, 3), (4, 2)):
        with da.accelerated(pipe, "delta_cache", interval=interval, num_cached_blocks=n_c):
            run_pipe(pipe, "dit", num_inference_steps=8)
            stats = da.stats(pipe)
        expected = 1 / interval + (interval - 1) / interval * (1 - n_c / 4)
        assert stats["blocks_run"] / stats["blocks_total"] == pytest.approx(expected)


def test_batch_samples_and_cfg_halves_do_not_leak():
    """Two prompts in one batch give the same images as each prompt alone (state is per sample and branch)."""
    pipe = tiny_pipeline("pixart_alpha")
    prompts = ["a red circle", "a big blue square in the top left"]
    with da.accelerated(pipe, "delta_cache", interval=3, num_cached_blocks=2):
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 4, 4, 4, generator=gen)
        together = pipe(prompt=prompts, latents=latents, num_inference_steps=6, height=32, width=32,
                        guidance_scale=4.0, max_sequence_length=16, use_resolution_binning=False,
                        clean_caption=False, output_type="pt").images
        alone = [pipe(prompt=p, latents=latents[i : i + 1], num_inference_steps=6, height=32, width=32,
                      guidance_scale=4.0, max_sequence_length=16, use_resolution_binning=False,
                      clean_caption=False, output_type="pt").images for i, p in enumerate(prompts)]
    for i in range(2):
        assert torch.allclose(together[i], alone[i][0], atol=1e-5)
    assert not torch.allclose(together[0], together[1], atol=1e-3)


def test_row_store_gathers_subsets_in_order():
    store = RowStore()
    batch = torch.arange(4.0).view(4, 1)
    rows = [("uncond", 0), ("uncond", 1), ("cond", 0), ("cond", 1)]
    store.put(rows, (batch, None))
    assert store.get(rows)[0] is batch  # whole entry: no copy
    shrunk = store.get([("uncond", 1), ("cond", 0), ("cond", 1)])
    assert shrunk[0].flatten().tolist() == [1.0, 2.0, 3.0] and shrunk[1] is None
    assert not store.has([("uncond", 2)])
    store.put([("cond", 0)], (torch.tensor([[9.0]]), None))
    assert store.get([("cond", 0), ("cond", 1)])[0].flatten().tolist() == [9.0, 3.0]


def test_presets_and_serialisation(tmp_path):
    config = DeltaCacheConfig(preset="pixart-alpha-20")
    assert (config.interval, config.num_cached_blocks, config.boundary) == (2, 0.75, 12)
    assert config.cached_blocks(28) == 21 and config.boundary_step(20) == 12
    assert DeltaCacheConfig(preset="pixart-alpha-20", interval=3).interval == 3
    path = tmp_path / "delta.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config.to_dict()))
    loaded = da.parse_config(str(path))
    assert loaded == config
    assert da.parse_config(config.to_dict()) == config


def test_few_step_lcm_preset():
    """The paper's 4-step LCM-PixArt case: an LCM scheduler, the pixart-lcm-4 preset."""
    from diffusers import LCMScheduler

    pipe = tiny_pipeline("pixart_alpha")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    baseline = run_pipe(pipe, "pixart_alpha", guidance_scale=1.0)
    with da.accelerated(pipe, "delta_cache", preset="pixart-lcm-4"):
        out = run_pipe(pipe, "pixart_alpha", guidance_scale=1.0)
        steps = da.stats(pipe)["steps"]
    # b = 2: step 1 caches the rear range (outline stage), step 3 the front range (detail stage), N_c = 1 of 4
    assert [s["blocks_skipped"] for s in steps] == [[], [3], [], [0]]
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
