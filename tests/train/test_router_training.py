"""Cache-router trainers (HarmoniCa, L2C) on a tiny PixArt: resume replays exactly, L2C pins its full steps, the
artefact applies with the contract it was trained under."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import diffusion_accel as da
from diffusion_accel.cache_router import CacheRouter
from diffusion_accel.testing import assert_pickle_free
from diffusion_accel.train import harmonica, train

TINY = {"pretrained_teacher_model": "tiny:pixart_alpha", "guidance_scale": 4.0, "resolution": 32,
        "num_inference_steps": 4, "num_train_samples": 16, "train_batch_size": 2, "validation_steps": 0,
        "learning_rate": 0.05}


def _logits(folder) -> torch.Tensor:
    return load_file(str(folder / "router.safetensors"))["logits"]


def test_killed_and_resumed_router_training_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    """4 trajectories straight vs 2, a crash, and a resume: the same router. The IEPO weights are refreshed at
    trajectories 0 and 3, so the resumed run must restore the weights of trajectory 0 (a checkpointed object), the
    optimizer's moments and the router."""
    common = {**TINY, "max_train_steps": 4, "checkpointing_steps": 2, "lambda_refresh_steps": 3,
              "num_lambda_prompts": 2}
    train("harmonica", output_dir=str(tmp_path / "straight"), **common)

    original = harmonica.HarmoniCa.loss

    def crash_at_step_2(self, model, stream, step, micro):
        if step == 2:
            raise KeyboardInterrupt("killed")
        return original(self, model, stream, step, micro)

    monkeypatch.setattr(harmonica.HarmoniCa, "loss", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        train("harmonica", output_dir=str(tmp_path / "killed"), **common)
    monkeypatch.setattr(harmonica.HarmoniCa, "loss", original)
    assert (tmp_path / "killed" / "checkpoint-2").is_dir()
    assert_pickle_free(tmp_path / "killed" / "checkpoint-2")
    train("harmonica", output_dir=str(tmp_path / "killed"), resume_from_checkpoint="latest", **common)

    straight, resumed = _logits(tmp_path / "straight"), _logits(tmp_path / "killed")
    assert torch.equal(straight, resumed)
    initial = torch.randn(straight.shape, generator=torch.Generator().manual_seed(0)).clamp(-5, 5)
    assert not torch.allclose(straight[1:], initial[1:])  # training moved the router


def test_l2c_pins_alternate_steps_and_the_router_applies(tmp_path):
    out = tmp_path / "l2c"
    record = train("l2c", output_dir=str(out), max_train_steps=3, **TINY)
    router = CacheRouter.load(out)
    assert record["objective"] == "l2c" and router.config["objective"] == "l2c"
    assert router.trainable[1::2].all() and not router.trainable[0::2].any()
    decisions = router.decisions(0.99)
    assert decisions[0::2].all()  # L2C's full steps compute whatever τ is
    assert router.config["num_inference_steps"] == 4 and router.config["guidance_scale"] == 4.0
    shares = router.config["unit_macs_share"]
    assert len(shares) == len(router.units) and 0.9 < sum(shares) < 1.0

    pipe = da.load_pipeline("tiny:pixart_alpha")
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a red circle", "num_inference_steps": 4, "guidance_scale": 4.0, "height": 32, "width": 32,
            "clean_caption": False, "use_resolution_binning": False, "output_type": "pt"}
    with da.accelerated(pipe, {"method": "l2c", "router": str(out), "threshold": 0.99}):
        pipe(**call, generator=torch.Generator().manual_seed(0))
        stats = da.stats(pipe)["l2c"]
    assert stats["units_reused"] == int((~decisions).sum())
    with pytest.raises(ValueError, match="guidance scale 4.0, the call uses 7.0"):
        with da.accelerated(pipe, {"method": "l2c", "router": str(out)}):
            pipe(**{**call, "guidance_scale": 7.0})


def test_iepo_trajectories_share_their_prefix_exactly():
    """x0^{(≤k)} from the shared-prefix computation equals an independent sampling with soft routing at steps 1..k
    and full compute after, for every k (so λ is the authors' get_lambda, at half the cost)."""
    import copy

    from diffusion_accel.train.options import build_options
    from diffusion_accel.train.trainer import make_accelerator

    options = build_options(harmonica.HarmoniCaOptions, {**TINY, "output_dir": "unused", "num_lambda_prompts": 2})
    recipe = harmonica.HarmoniCa(options, make_accelerator(options))
    recipe.load_teacher()
    recipe.check()
    router = recipe.setup(lambda n: None)
    scores = router().detach()
    scores[1:] = torch.rand(scores[1:].shape, generator=torch.Generator().manual_seed(3))  # cells above and below τ
    rows, noise = recipe.probe
    cond, uncond = recipe.conditioning(rows)
    shared = recipe.samples_switching_on(noise, cond, uncond, scores)
    assert len(shared) == recipe.steps
    batch_rows = recipe.rows(len(noise))
    with torch.no_grad():
        for k in range(recipe.steps):
            scheduler, x = copy.deepcopy(recipe.scheduler), noise
            recipe.units.reset()
            for step, t in enumerate(scheduler.timesteps):
                if 1 <= step <= k:
                    recipe.units.set_step("soft", batch_rows, scores=scores[step])
                else:
                    recipe.units.set_step("fill", batch_rows)
                x = scheduler.step(recipe.guided(x, t, cond, uncond, scheduler), t, x, return_dict=False)[0]
            assert torch.equal(shared[k], x), k
    assert not torch.equal(shared[0], shared[-1])
    recipe.units.uninstall()


def test_pinned_steps_run_one_plain_forward_and_train_the_same_router(tmp_path, monkeypatch):
    """With --full_every_other_step the even steps are pinned to compute: the trainer runs them as one plain forward
    (no routed forward, no target) and skips finishing their IEPO trajectory (it equals the previous one). The router,
    its λ and the logged loss are the same, bit for bit, as running every step in full; the denoiser runs fewer
    times."""
    common = {**TINY, "num_inference_steps": 6, "max_train_steps": 3, "lambda_refresh_steps": 2,
              "num_lambda_prompts": 2, "full_every_other_step": True, "init_std": 1.0}
    calls = {"n": 0}
    original = harmonica.RouterRecipe.guided

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(harmonica.RouterRecipe, "guided", counted)
    records, counts = {}, {}
    for skip in (False, True):
        monkeypatch.setattr(harmonica.RouterRecipe, "skip_pinned_steps", skip)
        calls["n"] = 0
        records[skip] = train("harmonica", output_dir=str(tmp_path / str(skip)), **common)
        counts[skip] = calls["n"]
    assert torch.equal(_logits(tmp_path / "False"), _logits(tmp_path / "True"))
    # Per trajectory: 1 + 5·2 forwards in full vs 3 pinned + 3 routed·2 = 9; per λ refresh (steps 0 and 2):
    # 6 + Σ_{k=1..5}(6 − k) = 21 forwards vs 6 + the finishes of x0^{(≤0)}, x0^{(≤1)}, x0^{(≤3)} (5 + 4 + 2) = 17.
    assert counts[False] - counts[True] == 3 * (11 - 9) + 2 * (21 - 17)


@pytest.mark.parametrize(("preset", "recipe", "folder"), [
    ("pixart-harmonica", "harmonica", "testbed-pixart/routers/harmonica"),
    ("pixart-l2c", "l2c", "testbed-pixart/routers/l2c"),
    ("flow-harmonica", "harmonica", "testbed-flow/routers/harmonica"),
    ("flow-l2c", "l2c", "testbed-flow/routers/l2c"),
])
def test_router_presets_are_the_shipped_recipes(preset, recipe, folder):
    """Each router preset is a valid recipe and the shipped router's training record ran exactly it."""
    import json

    from diffusion_accel.pipelines.testbed.shapes_net import assets_root

    from diffusion_accel.train import recipe_class
    from diffusion_accel.train.options import build_options, load_config_file

    values = load_config_file(preset)
    build_options(recipe_class(recipe).options_class, {**values, "output_dir": "unused"})
    record = json.loads((assets_root() / folder / "training.json").read_text())
    assert record["recipe"] == recipe
    assert {k: record["options"][k] for k in values} == values


def _recipe(**values):
    from diffusion_accel.train.options import build_options
    from diffusion_accel.train.trainer import make_accelerator

    options = build_options(harmonica.HarmoniCaOptions, {**TINY, "output_dir": "unused", **values})
    recipe = harmonica.HarmoniCa(options, make_accelerator(options))
    recipe.load_teacher()
    recipe.check()
    return recipe, recipe.setup(lambda n: None)


def test_full_compute_period_pins_every_kth_step():
    """--full_compute_period K pins steps 0, K, 2K, ... (a reused output is at most K − 1 steps old);
    --full_every_other_step is K = 2; K = 1 and a conflicting pair are refused."""
    _, router = _recipe(num_inference_steps=7, full_compute_period=3)
    pinned = ~router.trainable.any(dim=1)
    assert pinned.tolist() == [True, False, False, True, False, False, True]
    _, alias = _recipe(num_inference_steps=7, full_every_other_step=True)
    _, period = _recipe(num_inference_steps=7, full_compute_period=2)
    assert torch.equal(alias.trainable, period.trainable)
    assert (~period.trainable.any(dim=1)).tolist() == [True, False] * 3 + [True]
    with pytest.raises(ValueError, match="must be 0"):
        _recipe(full_compute_period=1)
    with pytest.raises(ValueError, match="means --full_compute_period 2"):
        _recipe(full_every_other_step=True, full_compute_period=3)


def test_cache_weight_by_macs_follows_the_unit_shares():
    """--cache_weight_by_macs: β per unit ∝ the unit's MAC share, mean 1; off: 1 for every unit."""
    recipe, _ = _recipe(cache_weight_by_macs=True)
    shares = torch.tensor(recipe.unit_macs_shares()[0], dtype=torch.float32)
    weights = recipe.unit_weights.cpu()
    assert weights.mean().item() == pytest.approx(1.0)
    assert torch.allclose(weights / weights[0], shares / shares[0])
    assert not torch.allclose(weights, torch.ones_like(weights))  # PixArt's branches differ in MACs
    plain, _ = _recipe()
    assert torch.equal(plain.unit_weights.cpu(), torch.ones(len(plain.units)))
    recipe.units.uninstall()
    plain.units.uninstall()


def test_pixel_iepo_weighs_steps_by_the_decoded_images():
    """--iepo_space pixel: λ_k = mean‖D(x0^{(≤k)}) − D(x0^{(≤k−1)})‖² over the VAE's images, normalised to mean 1
    (not the latent weights); an unknown space is refused."""
    recipe, router = _recipe(iepo_space="pixel", num_lambda_prompts=2)
    scores = router().detach()
    scores[1:] = torch.rand(scores[1:].shape, generator=torch.Generator().manual_seed(5))
    recipe.refresh_weights(scores)
    pixel = recipe.weights.values.clone()
    rows, noise = recipe.probe
    finals = recipe.samples_switching_on(noise, *recipe.conditioning(rows), scores)
    with torch.no_grad():
        images = [recipe.family.decode(f) for f in finals]
    expected = torch.tensor([0.0] + [float((images[k] - images[k - 1]).pow(2).mean())
                                     for k in range(1, recipe.steps)])
    expected[1:] /= expected[1:].mean()
    assert torch.allclose(pixel, expected, rtol=1e-4)
    recipe.options.iepo_space = "latent"
    recipe.refresh_weights(scores)
    assert not torch.allclose(recipe.weights.values, pixel)
    assert recipe.router_facts() == {"iepo": "latent"}
    recipe.units.uninstall()
    with pytest.raises(ValueError, match="iepo_space 'image' is not one of latent, pixel"):
        _recipe(iepo_space="image")
