"""Denoisers with their own conventions, declared by the adapter (Z-Image): the timestep argument and its mapping to
the scheduler, the output sign, per-sample lists, and CFG on from a scale above 0. Methods see batched tensors of the
prediction; the pipeline and the denoiser see their own."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import ModelHook
from diffusion_accel.pipelines.adapters import ModelAdapter, find_adapter

import diffusion_accel as da
from diffusion_accel.batching import DenoiserIO, SampleList, slice_batch
from diffusion_accel.diffusers_internals import block_metadata, register_block_class
from diffusion_accel.session import _CONTEXT_HOOK, DenoiserContextHook
from diffusion_accel.testing import run_pipe, tiny_pipeline


class _MethodView(ModelHook):
    """Inside the context hook, where methods' hooks sit: records what they see of each denoiser call."""

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.calls = []

    def pre_forward(self, module, *args, **kwargs):
        ctx = self.session.context
        self.calls.append({"step": ctx.step_index, "timestep": ctx.timestep, "rows": list(ctx.rows),
                           "latent": args[0], "captions": args[2]})
        return args, kwargs

    def post_forward(self, module, output):
        self.calls[-1]["output"] = output[0]
        return output


def _run_viewed(pipe, **call):
    handle = da.apply(pipe)
    session = handle.session
    view = _MethodView(session)
    session.denoiser._diffusers_hook.remove_hook(_CONTEXT_HOOK, recurse=False)
    session.register_hook(session.denoiser, view, "test.method_view")
    session.register_hook(session.denoiser, DenoiserContextHook(session), _CONTEXT_HOOK)
    native = []
    torch_hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: native.append((args, output)), with_kwargs=True)
    try:
        run_pipe(pipe, "z_image", **call)
    finally:
        torch_hook.remove()
        handle.remove()
    return view.calls, native


def test_methods_see_batched_velocity_and_the_pipeline_its_lists():
    pipe = tiny_pipeline("z_image")
    calls, native = _run_viewed(pipe)
    # the step comes from t = (1000 - timestep) / 1000, in generation order
    assert [c["step"] for c in calls] == [0, 1, 2, 3]
    assert [c["timestep"] for c in calls] == pipe.scheduler.timesteps.tolist()
    # batched CFG, prompt first; CFG is on at guidance_scale 4 and also at 0.5 (Z-Image guides for any scale > 0)
    assert calls[0]["rows"] == [("cond", 0), ("uncond", 0)]
    for call, (args, output) in zip(calls, native, strict=True):
        assert isinstance(call["latent"], torch.Tensor) and torch.equal(call["latent"], torch.stack(args[0]))
        assert isinstance(call["captions"], SampleList) and len(call["captions"]) == 2
        # the pipeline gets its per-sample list of the negated velocity; methods saw the velocity itself
        assert isinstance(output[0], list) and torch.equal(call["output"], -torch.stack(output[0]))
    calls, _ = _run_viewed(pipe, guidance_scale=0.5)
    assert calls[0]["rows"] == [("cond", 0), ("uncond", 0)]
    calls, _ = _run_viewed(pipe, guidance_scale=0.0)
    assert calls[0]["rows"] == [("cond", 0)]


def test_cond_only_steps_of_a_batched_cfg_call():
    """Past cfg_truncation Z-Image runs its samples alone: a batch the size of the samples is cond-only, not halves."""
    pipe = tiny_pipeline("z_image")
    baseline = run_pipe(pipe, "z_image", num_images_per_prompt=2, cfg_truncation=0.5)
    calls, _ = _run_viewed(pipe, num_images_per_prompt=2, cfg_truncation=0.5)  # t_norm 0, .25, .5, .75
    assert [c["rows"] for c in calls[:3]] == [[("cond", 0), ("cond", 1), ("uncond", 0), ("uncond", 1)]] * 3
    assert calls[3]["rows"] == [("cond", 0), ("cond", 1)]
    with da.accelerated(pipe, "delta_cache"):
        assert torch.isfinite(run_pipe(pipe, "z_image", num_images_per_prompt=2, cfg_truncation=0.5)).all()
    assert torch.equal(run_pipe(pipe, "z_image", num_images_per_prompt=2, cfg_truncation=0.5), baseline)


def test_cfg_cutoff_at_step_zero_is_the_unguided_call():
    """Dropping every unconditional row must pick the prompt's caption (the first half of the caption list) and hand
    the pipeline the negated cond prediction in the uncond slot: Z-Image's c + s·(c − c) = c, i.e. the call
    without guidance, bit for bit."""
    pipe = tiny_pipeline("z_image")
    unguided = run_pipe(pipe, "z_image", guidance_scale=0.0, prompt=["a red circle", "a big blue square"])
    with da.accelerated(pipe, {"method": "cfg_cutoff", "cutoff_step_index": 0}):
        cut = run_pipe(pipe, "z_image", prompt=["a red circle", "a big blue square"])
        assert da.stats(pipe)["uncond_skipped"] == 8
    assert torch.equal(cut, unguided)


def test_adaptive_guidance_measures_the_velocity_not_its_negation():
    """γ at each step is the x0-space cosine of x0 = x − σ·v with v the negated transformer output."""
    pipe = tiny_pipeline("z_image")
    captured = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: captured.append((args, output)), with_kwargs=True)
    with da.accelerated(pipe, {"method": "adaptive_guidance", "threshold": 0.999999}):
        run_pipe(pipe, "z_image")
        gamma = da.stats(pipe)["adaptive_guidance"]["gamma"][0]
    hook.remove()

    def cosine(x0):
        return float(torch.nn.functional.cosine_similarity(x0[0].flatten(), x0[1].flatten(), dim=0))

    assert [step for step, _ in gamma] == [0, 1, 2, 3]
    for (step, value), (args, output) in zip(gamma, captured, strict=True):
        x = torch.stack(args[0]).double()
        velocity = -torch.stack(output[0]).double()
        sigma = float(pipe.scheduler.sigmas[step])
        expected, wrong_sign = cosine(x - sigma * velocity), cosine(x + sigma * velocity)
        assert value == pytest.approx(expected, abs=1e-6), step
        assert abs(expected - wrong_sign) > 1e-5, step  # the test can tell the signs apart


def test_denoiser_io_round_trip_and_slicing():
    io = DenoiserIO(["x", "t", "cap_feats", "return_dict"], ("x", "cap_feats"), -1.0)
    latents = [torch.randn(4, 1, 2, 2) for _ in range(3)]
    captions = [torch.randn(n, 8) for n in (3, 5, 3)]  # ragged, and one as long as the batch
    args, kwargs = io.to_methods((latents, torch.ones(3)), {"cap_feats": captions})
    assert args[0].shape == (3, 4, 1, 2, 2) and isinstance(kwargs["cap_feats"], SampleList)
    index = torch.tensor([2, 0])
    (sliced_args, sliced_kwargs) = slice_batch((args, kwargs), index, 3)
    assert [c.shape[0] for c in sliced_kwargs["cap_feats"]] == [3, 3]
    assert sliced_kwargs["cap_feats"][0] is captions[2] and torch.equal(sliced_args[0][1], latents[0])
    back_args, back_kwargs = io.to_denoiser(args, kwargs)
    assert all(torch.equal(a, b) for a, b in zip(back_args[0], latents, strict=True))
    assert type(back_kwargs["cap_feats"]) is list
    output = ([torch.randn(4, 1, 2, 2) for _ in range(3)],)
    seen = io.output_to_methods(output)
    assert torch.equal(seen[0], -torch.stack(output[0]))
    returned = io.output_to_pipeline(seen)
    assert all(torch.equal(a, b) for a, b in zip(returned[0], output[0], strict=True))
    assert DenoiserIO(["hidden_states", "timestep"], (), 1.0).identity
    with pytest.raises(ValueError, match="per_sample_lists"):
        DenoiserIO(["x", "t"], ("latents",), 1.0)


def test_adapter_output_sign_is_plus_or_minus_one():
    with pytest.raises(ValueError, match="output_sign must be 1 or -1"):
        ModelAdapter(family="bad", pipeline_classes=("X",), output_sign=0.5)


def test_block_registry_correction_names_the_argument_the_block_takes():
    """Diffusers 0.42.1 registers Z-Image's block with `hidden_states`; the adapter module corrects it to `x`, and a
    correct entry of Diffusers' own is left alone."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    assert block_metadata(ZImageTransformerBlock).hidden_states_argument_name == "x"
    flux = block_metadata(FluxTransformerBlock)
    register_block_class(FluxTransformerBlock, 0, None, "encoder_hidden_states", "x")
    assert block_metadata(FluxTransformerBlock) is flux


def test_magcache_reads_z_image_blocks_through_the_corrected_registry():
    """MagCache reads a block's input by the registry's argument name: with `x` it skips blocks on Z-Image (with
    Diffusers' `hidden_states` it raised KeyError), and removing it gives the baseline back."""
    pipe = tiny_pipeline("z_image")
    baseline = run_pipe(pipe, "z_image")
    spec = {"method": "magcache", "mag_ratios": [1.0] * 4, "num_inference_steps": 4, "threshold": 0.5}
    with da.accelerated(pipe, spec):
        assert torch.isfinite(run_pipe(pipe, "z_image")).all()
        stats = da.stats(pipe)
    assert stats["blocks_run"] < stats["blocks_total"]
    assert torch.equal(run_pipe(pipe, "z_image"), baseline)


def test_z_image_adapter():
    pipe = tiny_pipeline("z_image")
    adapter = find_adapter(pipe)
    assert adapter.family == "z_image" and adapter.cfg_mode({"guidance_scale": 0.5}) == "batched"
    assert adapter.cfg_mode({"guidance_scale": 0.0}) == "none"
    assert {"fbcache", "sparse_attention"} <= set(adapter.unsupported_methods)


def test_z_image_img2img_runs_the_same_conventions():
    from diffusers import ZImageImg2ImgPipeline

    pipe = ZImageImg2ImgPipeline(**tiny_pipeline("z_image").components)
    pipe.set_progress_bar_config(disable=True)
    assert find_adapter(pipe).family == "z_image"
    call = {"image": torch.rand(1, 3, 32, 32), "strength": 0.75, "num_inference_steps": 8}
    baseline = run_pipe(pipe, "z_image", **call)
    with da.accelerated(pipe, "delta_cache"):
        assert torch.isfinite(run_pipe(pipe, "z_image", **call)).all()
        stats = da.stats(pipe)
    # strength 0.75 of 8 steps: the last 6 of the schedule, in order; Δ-cache skips blocks in them
    assert [s["step"] for s in stats["steps"]] == [2, 3, 4, 5, 6, 7] and stats["blocks_run"] < stats["blocks_total"]
    assert torch.equal(run_pipe(pipe, "z_image", **call), baseline)
