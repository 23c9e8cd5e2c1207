"""Offloading, layerwise casting and low precision with every method; a NaN from the model is reported.

Offloading on this CPU-only machine: ``enable_model_cpu_offload(device="cpu")`` runs accelerate's real offload hooks
with the CPU as execution device (Diffusers refuses without ``device=`` when no accelerator is present);
``enable_sequential_cpu_offload`` fails inside accelerate on CPU with or without our methods, so that test skips
with the error unless an accelerator is present.

Every method runs through each test: the families are Flux (dual + single stream blocks, true CFG) and PixArt-α
(batched CFG, unpacked latents: the family FasterCache and DBCache need), and ``linear_ag`` runs with synthetic
coefficients (:func:`conftest.compat_methods`).
"""

from __future__ import annotations

import pytest
import torch

import diffusion_accel as da
from diffusion_accel.session import NonFiniteOutputError
from diffusion_accel.testing import compat_methods, fingerprint, method_name, run_pipe

FAMILY = "flux"
FAMILIES = ["flux", "pixart_alpha"]
#: Each family's methods, so a method missing from a run (refused, or left out by mistake) fails the comparison.
EXPECTED = {"pixart_alpha": {"fastercache", "dbcache", "linear_ag"}, "flux": {"bottleneck", "linear_ag"}}


def _pipe(family=FAMILY):
    return da.load_pipeline(f"tiny:{family}")


def _method_outputs(pipe, family=FAMILY):
    """Output and work done by each applicable method on ``pipe`` (applied, run, removed)."""
    results = {}
    for method in compat_methods(pipe):
        with da.accelerated(pipe, method):
            out = run_pipe(pipe, family)
            stats = da.stats(pipe)
        results[method_name(method)] = (out, stats["nfe"], stats["blocks_run"])
    assert EXPECTED[family] <= set(results), f"{family}: {sorted(EXPECTED[family] - set(results))} did not run"
    return results


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def plain_results(family):
    return _method_outputs(_pipe(family), family)


def _assert_same(results, plain_results, what):
    assert results.keys() == plain_results.keys()
    for method, (out, nfe, blocks) in results.items():
        ref, ref_nfe, ref_blocks = plain_results[method]
        assert torch.equal(out, ref), f"{what}/{method}: max diff {(out - ref).abs().max():.2e}"
        assert (nfe, blocks) == (ref_nfe, ref_blocks), f"{what}/{method}"


def _offload_and_check(pipe, plain_results, what, family):
    baseline = run_pipe(pipe, family)
    before = fingerprint(pipe)
    _assert_same(_method_outputs(pipe, family), plain_results, what)
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline), f"{what}: remove() is not exact"


def test_model_cpu_offload_every_method(family, plain_results):
    pipe = _pipe(family)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.enable_model_cpu_offload(device=device)
    if device == "cpu":  # same device as the reference: bit-identical
        _offload_and_check(pipe, plain_results, "model_cpu_offload", family)
    else:
        for method, (out, _, _) in _method_outputs(pipe, family).items():
            assert torch.allclose(out, plain_results[method][0], atol=1e-3), method


def test_sequential_cpu_offload_every_method(family, plain_results):
    pipe = _pipe(family)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        pipe.enable_sequential_cpu_offload(device=device)
        run_pipe(pipe, family)
    except Exception as exc:  # noqa: BLE001 - the reason is reported in the skip
        pytest.skip(f"enable_sequential_cpu_offload does not run here without our methods either: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
    for method, (out, _, _) in _method_outputs(pipe, family).items():
        assert torch.allclose(out, plain_results[method][0], atol=1e-3), method


def test_group_offload_every_method(family, plain_results):
    pipe = _pipe(family)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    _offload_and_check(pipe, plain_results, "group_offload", family)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_casting_fp8_every_method(family):
    """fp8 storage changes the weights, so the reference is the same casting pipeline: each method's cache
    decisions with casting equal those of a pipeline whose casting was enabled before the method ran; outputs finite
    and ``remove`` exact."""
    pipe = _pipe(family)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    baseline = run_pipe(pipe, family)
    before = fingerprint(pipe)
    first = _method_outputs(pipe, family)
    other = _pipe(family)
    other.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    _assert_same(_method_outputs(other, family), first, "layerwise_casting")
    for method, (out, _, _) in first.items():
        assert torch.isfinite(out).all(), method
    assert fingerprint(pipe) == before
    assert torch.equal(run_pipe(pipe, family), baseline)
    # casting is not a no-op here: stored weights really are fp8
    assert any(p.dtype == torch.float8_e4m3fn for p in pipe.transformer.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_dtype(dtype, family):
    pipe = _pipe(family).to(dtype)
    ran = set()
    for method in compat_methods(pipe):
        with da.accelerated(pipe, method):
            out = run_pipe(pipe, family)
            memory = da.stats(pipe)["cache_memory"]
        method = method_name(method)
        ran.add(method)
        assert torch.isfinite(out).all(), (dtype, method)
        # cached tensors stay in the pipeline's dtype: no silent float32 copies of activations
        wider = {k: v for k, v in memory["by_dtype"].items() if k in ("float32", "float64")}
        assert not wider, f"{method} caches {wider} in a {dtype} pipeline"
        assert memory["bytes"] == sum(memory["by_dtype"].values())
    assert EXPECTED[family] <= ran


def test_cache_memory_reported():
    pipe = _pipe()
    with da.accelerated(pipe, "delta_cache"):
        run_pipe(pipe, FAMILY)
        stats = da.stats(pipe)
    memory = stats["cache_memory"]
    assert memory["bytes"] > 0 and set(memory["by_dtype"]) == {"float32"}
    # print(stats) shows it, and what torch.compile did (nothing here: eager)
    from diffusion_accel.call_stats import format_bytes

    table = str(stats)
    assert f"cache memory: {format_bytes(memory['bytes'])} (float32 {format_bytes(memory['bytes'])})" in table
    assert "compile: 0 compiled regions | this call: frames compiled 0, recompiles 0, graph breaks 0" in table
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(100) == "100 B" and format_bytes(3 << 30) == "3.0 GiB"


class _NaNBlock:
    """Makes one block return NaN from a chosen call on (a forward hook, as a broken model would)."""

    def __init__(self, block, from_call=0):
        self.calls, self.from_call = 0, from_call
        self.handle = block.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls <= self.from_call:
            return output
        if isinstance(output, tuple):
            return tuple(o * float("nan") for o in output)
        return output * float("nan")


@pytest.mark.parametrize("method", ["delta_cache", "fbcache"])
def test_nan_from_the_model_is_reported_not_cached(method):
    pipe = _pipe()
    nan = _NaNBlock(pipe.transformer.transformer_blocks[0], from_call=2)  # steps 0 fine, NaN from step 1
    with da.accelerated(pipe, method):
        with pytest.raises(NonFiniteOutputError, match=rf"step 1 of 4 .*{method}"):
            run_pipe(pipe, FAMILY)
        assert da.stats(pipe)["non_finite"]["step"] == 1
        assert "non-finite output: step 1 of 4" in str(da.stats(pipe))
        nan.handle.remove()
        out = run_pipe(pipe, FAMILY)  # the next call starts clean: nothing NaN was kept
    assert torch.isfinite(out).all()


def test_model_cpu_offload_hooks_survive_every_call():
    """Each call ends in ``maybe_free_model_hooks``, which re-hooks the denoiser: our hooks must stay on it."""
    pipe = _pipe()
    pipe.enable_model_cpu_offload(device="cpu")
    plain = _pipe()
    with da.accelerated(plain, "delta_cache"):
        reference = run_pipe(plain, FAMILY)
    with da.accelerated(pipe, "delta_cache"):
        for _ in range(3):
            assert torch.equal(run_pipe(pipe, FAMILY), reference)
            stats = da.stats(pipe)
            assert stats["nfe"] == 8 and stats["blocks_run"] < stats["blocks_total"]
