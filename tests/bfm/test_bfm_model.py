"""Blockwise Flow Matching's transformer: segment routing, K = 1 as plain flow matching, the feature residual path,
and the save/load round trip through a plain FluxPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusion_accel.pipelines.adapters import find_adapter
from diffusion_accel.pipelines.bfm import (
    BlockwiseFlowTransformer,
    feature_residual_hook,
    segment_boundaries,
    segment_index,
    use_feature_residual,
)

from diffusion_accel.testing import tiny_pipeline
from diffusion_accel.train.bfm import stratified_times

TOKENS, TEXT, CHANNELS = 16, 5, 16


def _model(**overrides) -> BlockwiseFlowTransformer:
    torch.manual_seed(0)
    config = dict(in_channels=CHANNELS, num_segments=4, segment_layers=1, alignment_layers=1,
                  alignment_single_layers=1, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                  pooled_projection_dim=12, axes_dims_rope=(2, 2, 4), feature_dim=6, projector_dim=8)
    model = BlockwiseFlowTransformer(**{**config, **overrides}).eval()
    with torch.no_grad():  # leave the zero-initialised fusion: the tests must see R's influence
        if model.fuse is not None:
            model.fuse.weight.normal_(0, 0.2)
    return model


def _inputs(batch: int, t: torch.Tensor, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(TOKENS, 3)
    ids[:, 1], ids[:, 2] = torch.arange(TOKENS) // 4, torch.arange(TOKENS) % 4
    return {"hidden_states": torch.randn(batch, TOKENS, CHANNELS, generator=gen),
            "encoder_hidden_states": torch.randn(batch, TEXT, 12, generator=gen),
            "pooled_projections": torch.randn(batch, 12, generator=gen), "timestep": t,
            "img_ids": ids, "txt_ids": torch.zeros(TEXT, 3)}


def test_segment_routing_is_exact_at_the_boundaries():
    sigma = segment_boundaries(4)
    # the noisy end of each segment is inclusive, also as the pipeline passes it (float32(σ·1000) / 1000)
    for m in range(4):
        exact = torch.tensor([float(sigma[m])])
        assert int(segment_index(exact, 4)) == m
        assert int(segment_index((exact.float() * 1000).float() / 1000, 4)) == m
        inside = torch.tensor([float(sigma[m]) - 1e-3])
        assert int(segment_index(inside, 4)) == m
    assert int(segment_index(torch.tensor([0.0]), 4)) == 3  # the data end belongs to the last segment
    assert int(segment_index(torch.tensor([0.75 - 1e-3]), 4)) == 1
    # FluxPipeline's 28-step grid enters each of 4 segments at its boundary, 7 steps each
    grid = torch.tensor(np.linspace(1.0, 1 / 28, 28), dtype=torch.float32)
    assert segment_index(grid, 4).tolist() == [m for m in range(4) for _ in range(7)]


def test_each_row_runs_its_own_segment_and_only_it_gets_gradients():
    model = _model()
    t = torch.tensor([0.9, 0.3, 0.6, 0.05, 0.8])  # segments 0, 2, 1, 3, 0
    args = _inputs(5, t)
    mixed = model(**args, return_dict=False)[0]
    for row in range(5):
        single = {k: (v[row:row + 1] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections",
                                                "timestep") else v) for k, v in args.items()}
        assert torch.allclose(model(**single, return_dict=False)[0], mixed[row:row + 1], atol=1e-5)
    # rows of segments 0 and 2 only: segments 1 and 3 get no gradient
    model.train()
    rows = torch.tensor([0, 1, 4])
    sub = {k: (v[rows] if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep") else v)
           for k, v in args.items()}
    model(**sub, return_dict=False)[0].square().mean().backward()
    grads = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in seg.parameters())
             for seg in model.segments]
    assert grads == [True, False, True, False]


def test_one_segment_without_alignment_is_plain_flow_matching():
    """K = 1, no R: the model is one velocity network for every t, the stratified times are U[0, 1), and the
    stage-1 loss on a batch is exactly the rectified-flow loss ‖v̂(x_t, t) − (ε − x)‖²."""
    u = np.random.default_rng(0).random(64)
    assert np.array_equal(stratified_times(u, 1), 1.0 - u)
    model = _model(num_segments=1, alignment_layers=0, alignment_single_layers=0)
    assert model.alignment is None and len(model.segments) == 1
    t = torch.from_numpy(stratified_times(u[:4], 1)).float()
    args = _inputs(4, t)
    x0 = args["hidden_states"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    v = model(**{**args, "hidden_states": x_t}, return_dict=False)[0]
    by_hand = ((v - (noise - x0)) ** 2).mean()
    assert torch.equal(F.mse_loss(v, noise - x0), by_hand)
    # ... and the velocity network is the segment's blocks on the embedded tokens, nothing else
    temb, context, rotary = model.embed(x_t, args["encoder_hidden_states"], args["pooled_projections"], t,
                                        args["img_ids"], args["txt_ids"])
    direct = model.segments[0](model.x_embedder(x_t), context, temb, rotary, None)
    assert torch.equal(direct, v)
    # stratification with M segments puts each contiguous group of rows in its own segment
    times = stratified_times(np.random.default_rng(1).random(10), 4)
    assert segment_index(torch.from_numpy(times), 4).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]


def test_feature_residual_path_shape_anchor_and_stage2_loss():
    model = _model(frn_single_layers=1)
    with torch.no_grad():
        model.frn.proj.weight.normal_(0, 0.1)  # a trained-looking FRN (zero-init would hide the residual)
    args = _inputs(2, torch.tensor([0.6, 0.6]))
    temb, context, rotary = model.embed(args["hidden_states"], args["encoder_hidden_states"],
                                        args["pooled_projections"], args["timestep"], args["img_ids"],
                                        args["txt_ids"])
    embedded = model.alignment.x_embedder(args["hidden_states"])
    residual = model.frn(embedded, context, temb, rotary, None)
    assert residual.shape == (2, TOKENS, model.inner_dim)
    hook = feature_residual_hook(model)
    # inside a pipeline's cache context: the first call of a segment runs R (the anchor), later ones the FRN
    with torch.no_grad(), model.cache_context("cond"):
        start = dict(args, timestep=torch.tensor([0.75, 0.75]))
        anchor = model.alignment(start["hidden_states"], context, temb, rotary, None, start["timestep"])
        at_start = model.alignment(start["hidden_states"], context, temb, rotary, None, torch.tensor([0.75, 0.75]))
        later = model.alignment(args["hidden_states"], context, temb, rotary, None, args["timestep"])
    assert hook.full_runs == 1 and hook.residual_runs == 2
    assert torch.equal(at_start, anchor)  # coeff(t_a) = 0: exactly the anchor
    coeff = (0.75 - 0.6) / (0.75 - 0.5)
    assert torch.allclose(later, anchor + coeff * residual, atol=1e-6)
    # without a cache context (training, a direct call) R always runs
    full = model.alignment(args["hidden_states"], context, temb, rotary, None, args["timestep"])
    assert not torch.allclose(full, later)
    use_feature_residual(model, False)
    with torch.no_grad(), model.cache_context("cond"):
        off = model.alignment(args["hidden_states"], context, temb, rotary, None, args["timestep"])
    assert torch.equal(off, full)


def test_frn_training_loss_matches_its_definition():
    """The stage-2 objective the recipe minimises, computed by hand on one batch."""
    from diffusion_accel.train.bfm import BFMFeatureResidual

    model = _model(frn_single_layers=1)
    t = torch.tensor([0.6, 0.2])
    args = _inputs(2, t)
    x0 = args["hidden_states"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))

    class Data:
        def call_args(self, rows):
            return {k: args[k] for k in ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")} | {
                "joint_attention_kwargs": None}

    recipe = BFMFeatureResidual.__new__(BFMFeatureResidual)
    recipe.data, recipe.boundaries = Data(), [1.0, 0.75, 0.5, 0.25, 0.0]
    recipe.draw_batch = lambda stream, step, micro, k: (None, x0, noise, t, None)
    loss, logs = recipe.loss(model, None, 0, 0)
    start = torch.tensor([0.75, 0.25])
    coeff = ((start - t) / 0.25).view(-1, 1, 1)

    def rep(time, x):
        temb, context, rotary = model.embed(x, args["encoder_hidden_states"], args["pooled_projections"], time,
                                            args["img_ids"], args["txt_ids"])
        return model.alignment(x, context, temb, rotary, None, time), (temb, context, rotary)

    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    x_s = (1 - start.view(-1, 1, 1)) * x0 + start.view(-1, 1, 1) * noise
    target, (temb, context, rotary) = rep(t, x_t)
    anchor, _ = rep(start, x_s)
    residual = model.frn(model.alignment.x_embedder(x_t), context, temb, rotary, None)
    assert torch.allclose(loss, F.mse_loss(anchor + coeff * residual, target), atol=1e-6)
    assert logs["reuse_loss"] == pytest.approx(float(F.mse_loss(anchor, target).detach()), rel=1e-5)


def test_pipeline_round_trip_runs_r_once_per_segment_and_branch(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusion_accel.testing import tiny_call_kwargs

    pipe = tiny_pipeline("bfm")
    kwargs = tiny_call_kwargs("bfm")
    hook = feature_residual_hook(pipe.transformer)
    first = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    # 4 steps, 2 segments, true CFG: R at the first step of each segment in each branch, the FRN at the others
    assert (hook.full_runs, hook.residual_runs) == (4, 4)
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.equal(first, again)  # a new call takes new anchors
    pipe.save_pretrained(tmp_path / "bfm")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "bfm")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer).__name__ == "BlockwiseFlowTransformer"
    assert feature_residual_hook(loaded.transformer) is not None
    saved, restored = pipe.transformer.state_dict(), loaded.transformer.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    out = loaded(**kwargs, generator=torch.Generator().manual_seed(0), output_type="pt").images
    # The weights round-trip bit for bit (above); the output may differ in the last float bits only, because the
    # loaded tensors lie at other memory alignments and CPU GEMM kernels split their sums by alignment (measured with
    # safetensors 0.8: max 9.5e-7; the same weights cloned into fresh allocations give the original bits).
    assert torch.allclose(out, first, rtol=0.0, atol=1e-5)
    assert find_adapter(loaded).family == "bfm"  # not "flux": the methods hook R's blocks


def test_bad_configurations_name_the_fix():
    with pytest.raises(ValueError, match="at least one segment"):
        _model(num_segments=0)
    with pytest.raises(ValueError, match="alignment network"):
        _model(alignment_layers=0, alignment_single_layers=0, frn_single_layers=1)
    with pytest.raises(ValueError, match="true classifier-free guidance"):
        _model(guidance_embeds=True)
    model = _model()
    with pytest.raises(ValueError, match="no feature residual network"):
        use_feature_residual(model, True)
    with pytest.raises(ValueError, match="true CFG"):
        model(**_inputs(1, torch.tensor([0.5])), guidance=torch.tensor([3.5]))
