"""Learned cache routers (HarmoniCa / L2C) at inference: the schedule applied is the router's, its cost is the
predicted one, an all-compute router changes nothing, and a router that does not fit is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusion_accel.pipelines.adapters import find_adapter

import diffusion_accel as da
from diffusion_accel.cache_router import CacheRouter
from diffusion_accel.testing import fingerprint, run_pipe, tiny_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("pixart_alpha")


def _router(pipe, tmp_path, logits=None, guidance=None, name="router"):
    units = len(find_adapter(pipe).routing_units(pipe))
    if logits is None:
        logits = torch.randn(STEPS, units, generator=torch.Generator().manual_seed(1))
    return CacheRouter.for_pipeline(pipe, STEPS, guidance, logits=logits).save(tmp_path / name)


def _executed(pipe, config):
    """Per denoiser forward: (step, which units computed), from the method's runtime."""
    with da.accelerated(pipe, config) as handle:
        method = handle.session.methods[0]
        trace = []
        original = method.units.set_step

        def spy(mode, rows, **kw):
            if method.units.rows or trace:
                trace.append(torch.tensor(method.units.executed))
            original(mode, rows, **kw)

        method.units.set_step = spy
        out = run_pipe(pipe, "pixart_alpha")
        trace.append(torch.tensor(method.units.executed))
        stats = da.stats(pipe)
    return out, trace, stats


def test_units_are_the_gated_branches(pipe):
    names = [n for n, _ in find_adapter(pipe).routing_units(pipe)]
    assert names[:3] == ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"]
    assert len(names) == 3 * len(pipe.transformer.transformer_blocks)


def test_all_compute_router_is_bit_identical(pipe, tmp_path):
    baseline = run_pipe(pipe, "pixart_alpha")
    before = fingerprint(pipe)
    folder = _router(pipe, tmp_path)
    with da.accelerated(pipe, {"method": "harmonica", "router": str(folder), "threshold": 0.0}):
        assert torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)
    with da.accelerated(pipe, {"method": "harmonica", "router": str(folder), "threshold": 0.5}):
        assert not torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, "pixart_alpha"), baseline)


def test_schedule_applied_is_the_routers(pipe, tmp_path):
    folder = _router(pipe, tmp_path)
    router = CacheRouter.load(folder)
    expected = router.decisions(0.5)
    _, trace, stats = _executed(pipe, {"method": "harmonica", "router": str(folder), "threshold": 0.5})
    assert len(trace) == STEPS  # batched CFG: one forward per step
    for step, executed in enumerate(trace):
        assert torch.equal(executed, expected[step]), step
    extra = stats["harmonica"]
    assert extra["units_reused"] == int((~expected).sum())
    assert abs(extra["cache_rate"] - router.cache_rate(0.5)) < 1e-9


@pytest.fixture(scope="module")
def flux():
    return tiny_pipeline("flux")


def _counted_macs(pipe, family, config=None):
    """Flop counts of one tiny call (per module path) and its number of denoiser forwards."""
    from torch.utils.flop_counter import FlopCounterMode

    forwards = []
    handle = find_adapter(pipe).get_denoiser(pipe).register_forward_pre_hook(lambda *_: forwards.append(1))
    counter = FlopCounterMode(display=False)
    try:
        with da.accelerated(pipe, *([config] if config else [])):
            with counter:
                run_pipe(pipe, family)
    finally:
        handle.remove()
    return counter.get_flop_counts(), len(forwards)


@pytest.mark.parametrize("family", ["pixart_alpha", "flux"])
def test_predicted_macs_equal_the_flop_counter(family, pipe, flux, tmp_path):
    """Per-unit MACs (a unit's feeders included: Flux's single-stream proj_out with attn and proj_mlp) times the
    schedule give the MACs the flop counter counts with the router applied."""
    model = pipe if family == "pixart_alpha" else flux
    adapter = find_adapter(model)
    names = [n for n, _ in adapter.routing_units(model)]
    feeders = {unit: [n for n, _ in found] for unit, found in adapter.unit_feeders(model).items()}
    assert (family == "flux") == bool(feeders)
    full, forwards = _counted_macs(model, family)
    per_step = forwards // STEPS  # denoiser forwards per step (separate CFG passes)
    root = type(adapter.get_denoiser(model)).__name__

    def macs(name):  # flops are 2 per MAC; one forward's worth
        return sum(full.get(f"{root}.{name}", {}).values()) / 2 / forwards

    unit = torch.tensor([macs(n) + sum(macs(f) for f in feeders.get(n, [])) for n in names], dtype=torch.float64)
    rest = sum(full[root].values()) / 2 / forwards - float(unit.sum())
    folder = _router(model, tmp_path)
    router = CacheRouter.load(folder)
    decisions = router.decisions(0.5)
    routed, _ = _counted_macs(model, family, {"method": "harmonica", "router": str(folder), "threshold": 0.5})
    measured = sum(routed[root].values()) / 2 / per_step
    assert decisions.sum() < decisions.numel()
    assert router.predicted_macs(decisions, unit, rest) == pytest.approx(measured, rel=1e-9)


def test_threshold_from_a_target(pipe, tmp_path):
    folder = _router(pipe, tmp_path)
    router = CacheRouter.load(folder)
    router.config["unit_macs_share"] = [1.0 / len(router.units)] * len(router.units)
    router.config["rest_macs_share"] = 0.0
    tau = router.threshold_for(macs_ratio=1.5)
    assert router.macs_ratio(tau) >= 1.5
    scores = router.scores()[1:].flatten()
    smaller = scores[scores < tau]
    if smaller.numel():  # one cell fewer reused falls short: τ is the smallest that reaches the target
        assert router.macs_ratio(float(smaller.max())) < 1.5
    rate_tau = router.threshold_for(cache_rate=0.3)
    assert router.cache_rate(rate_tau) >= 0.3
    with pytest.raises(ValueError, match="reaches at most"):
        router.threshold_for(macs_ratio=100.0)


def test_mismatched_routers_are_refused(pipe, tmp_path):
    before = fingerprint(pipe)
    folder = _router(pipe, tmp_path)
    with pytest.raises(ValueError, match="trained for 4 sampling steps, the call runs 3"):
        with da.accelerated(pipe, {"method": "harmonica", "router": str(folder)}):
            run_pipe(pipe, "pixart_alpha", num_inference_steps=3)
    guided = _router(pipe, tmp_path, guidance=7.0, name="guided")
    with pytest.raises(ValueError, match="guidance scale 7.0"):
        with da.accelerated(pipe, {"method": "harmonica", "router": str(guided)}):
            run_pipe(pipe, "pixart_alpha")
    # another model depth
    config = json.loads((folder / "router_config.json").read_text())
    config["depth"] = 28
    (folder / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model depth"):
        da.apply(pipe, {"method": "harmonica", "router": str(folder)})
    config["depth"] = len(pipe.transformer.transformer_blocks)
    config["scheduler_class"] = "EulerDiscreteScheduler"
    (folder / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="scheduler"):
        da.apply(pipe, {"method": "harmonica", "router": str(folder)})
    with pytest.raises(ValueError, match="diffusion-accel train harmonica"):
        da.apply(pipe, "harmonica")  # no router shipped with a tiny pipeline
    with pytest.raises(ValueError, match="not a cache router folder"):
        da.apply(pipe, {"method": "harmonica", "router": str(tmp_path)})
    assert fingerprint(pipe) == before


def test_flux_blocks_route_both_streams(flux, tmp_path):
    """Flux: dual-stream blocks' attention returns two streams; a single-stream block's unit is its whole gated
    branch, proj_out, fed by attn and proj_mlp."""
    adapter = find_adapter(flux)
    names = [n for n, _ in adapter.routing_units(flux)]
    assert "transformer_blocks.0.ff_context" in names and "single_transformer_blocks.0.proj_out" in names
    assert not any(n.startswith("single_transformer_blocks.0.") and n.endswith(("attn", "proj_mlp")) for n in names)
    feeders = adapter.unit_feeders(flux)
    assert [n for n, _ in feeders["single_transformer_blocks.0.proj_out"]] == [
        "single_transformer_blocks.0.attn", "single_transformer_blocks.0.proj_mlp"]
    baseline = run_pipe(flux, "flux")
    folder = _router(flux, tmp_path)
    with da.accelerated(flux, {"method": "harmonica", "router": str(folder), "threshold": 0.5}):
        out = run_pipe(flux, "flux")
        assert da.stats(flux)["harmonica"]["units_reused"] > 0
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert torch.equal(run_pipe(flux, "flux"), baseline)


class _LinearCalls(torch.overrides.TorchFunctionMode):
    """Counts F.linear calls per weight tensor (the work of a module, whatever hook wraps its forward)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.calls = dict.fromkeys(weights, 0)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.linear:
            for name, weight in self.weights.items():
                if args[1] is weight:
                    self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def test_reused_single_stream_branch_skips_its_feeders(flux, tmp_path):
    """Where a single-stream block's proj_out is reused, its feeders attn and proj_mlp do not run; every other
    step runs them once per denoiser forward."""
    adapter = find_adapter(flux)
    names = [n for n, _ in adapter.routing_units(flux)]
    unit = names.index("single_transformer_blocks.0.proj_out")
    logits = torch.full((STEPS, len(names)), 5.0)
    logits[2:, unit] = -5.0  # reuse step 1's output at steps 2 and 3
    folder = _router(flux, tmp_path, logits=logits)
    block = flux.transformer.single_transformer_blocks[0]
    weights = {"attn": block.attn.to_q.weight, "proj_mlp": block.proj_mlp.weight, "proj_out": block.proj_out.weight}
    counts = {}
    for label, config in (("plain", None), ("routed", {"method": "harmonica", "router": str(folder),
                                                        "threshold": 0.5})):
        with da.accelerated(flux, *([config] if config else [])), _LinearCalls(weights) as mode:
            run_pipe(flux, "flux")
        counts[label] = mode.calls
    per_step = counts["plain"]["proj_out"] // STEPS
    assert per_step >= 1 and set(counts["plain"].values()) == {STEPS * per_step}
    assert counts["routed"] == dict.fromkeys(weights, (STEPS - 2) * per_step)


def test_reused_branch_gets_a_zero_width_input_unless_compiled(flux, tmp_path, monkeypatch):
    """Eager blocks: a reused proj_out's feeders return zero-width placeholders, so the GELU and concatenation
    before it run on empty tensors. Compiled blocks get the real width (a new shape would recompile the code
    between the hooks). Either way the output is the same bits, and the compile check sees regional compile."""
    from diffusion_accel.session import AccelSession

    adapter = find_adapter(flux)
    names = [n for n, _ in adapter.routing_units(flux)]
    logits = torch.full((STEPS, len(names)), 5.0)
    logits[2:, names.index("single_transformer_blocks.0.proj_out")] = -5.0
    folder = _router(flux, tmp_path, logits=logits)
    block = flux.transformer.single_transformer_blocks[0]
    config = {"method": "harmonica", "router": str(folder), "threshold": 0.5}

    def widths_and_output():
        widths = []
        handle = block.proj_out.register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[-1]))
        try:
            with da.accelerated(flux, config):
                out = run_pipe(flux, "flux")
        finally:
            handle.remove()
        return widths, out

    eager_widths, eager = widths_and_output()
    monkeypatch.setattr(AccelSession, "runs_compiled", lambda self: True)
    compiled_widths, compiled = widths_and_output()
    full = block.proj_out.in_features
    assert 0 in eager_widths and set(eager_widths) == {0, full}
    assert set(compiled_widths) == {full} and len(compiled_widths) == len(eager_widths)
    assert torch.equal(eager, compiled)
    monkeypatch.undo()
    with da.accelerated(flux, config) as handle:
        assert not handle.session.runs_compiled()
        block.compile()
        try:
            assert handle.session.runs_compiled()
        finally:
            block._compiled_call_impl = None


def test_reused_single_stream_branch_is_regated(flux):
    """A reused proj_out output is re-gated with the current step's gate: the block returns residual + gate_k ·
    P_j, with P_j the proj_out output of the step that computed it."""
    from diffusion_accel.routed_units import RoutedUnits

    block = flux.transformer.single_transformer_blocks[0]
    dim = block.proj_out.out_features
    gen = torch.Generator().manual_seed(0)
    hidden, context = torch.randn(2, 6, dim, generator=gen), torch.randn(2, 3, dim, generator=gen)
    temb = [torch.randn(2, dim, generator=gen) for _ in range(2)]
    units = RoutedUnits([("proj_out", block.proj_out)], {"proj_out": [("attn", block.attn),
                                                                      ("proj_mlp", block.proj_mlp)]}).install()
    cached = []
    handle = block.proj_out.register_forward_hook(lambda _m, _a, out: cached.append(out))
    rows = [("cond", 0), ("cond", 1)]
    try:
        with torch.no_grad():
            units.set_step("fill", rows)
            block(hidden, context, temb[0])
            units.set_step("hard", rows, compute=[False])
            text, image = block(hidden, context, temb[1])
            joint = torch.cat([context, hidden], dim=1)
            _, gate = block.norm(joint, emb=temb[1])
    finally:
        handle.remove()
        units.uninstall()
    assert units.reused == 1 and units.computed == 1
    expected = joint + gate.unsqueeze(1) * cached[0]
    assert torch.equal(torch.cat([text, image], dim=1), expected)


#: Per testbed and objective: the steps its routers were trained for, the MACs ratio their stored τ reaches (L2C
#: computes every even step, which caps it at ~1.98x on testbed:flow; its trainer stored τ for 1.9x there) and the
#: denoiser passes per step (PixArt batches CFG into one; Flux runs its true CFG as two).
SHIPPED = [("testbed:pixart", "harmonica", 20, 1.6, 1), ("testbed:pixart", "l2c", 20, 1.6, 1),
           ("testbed:flow", "harmonica", 28, 2.0, 2), ("testbed:flow", "l2c", 28, 1.9, 2)]


@pytest.mark.parametrize(("testbed", "method", "steps", "macs", "passes"), SHIPPED)
def test_testbed_ships_its_routers(testbed, method, steps, macs, passes):
    """The testbeds carry their trained routers: a plain apply picks the one in the pipeline's folder and uses it at
    the τ its trainer stored, the router fits the pipeline, and a call at another step count is refused naming the
    router's."""
    pipe = da.load_pipeline(testbed)
    pipe.set_progress_bar_config(disable=True)
    assert method in da.list_methods(pipe)
    folder = Path(pipe.config._name_or_path) / "routers" / method
    router = CacheRouter.load(folder)
    adapter = find_adapter(pipe)
    assert router.mismatch(pipe, adapter, [name for name, _ in adapter.routing_units(pipe)]) is None
    assert router.config["pipeline"] == testbed and router.num_steps == steps
    with da.accelerated(pipe, method):
        pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent")
        stats = da.stats(pipe)[method]
        with pytest.raises(ValueError, match=f"trained for {steps} sampling steps"):
            pipe("a red circle", num_inference_steps=10)
    assert stats["router"] == str(folder)  # the shipped router, picked without router=
    assert stats["threshold"] == router.config["threshold"]
    assert stats["units_reused"] == passes * int((~router.decisions(router.config["threshold"])).sum())
    assert router.config["macs_ratio"] >= macs
