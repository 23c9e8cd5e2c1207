"""The shipped video students ``testbed:wan-tdm`` and ``testbed:wan-blade``: they load by name and by folder, their
fp16-stored transformers come back as fp32 (the stored values exactly), and a plain call samples with the stored
steps, without CFG, and (BLADE) under the stored block-sparse attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusion_accel.pipelines.testbed import registry
from diffusion_accel.pipelines.testbed.registry import VIDEO_STUDENT_NAMES, default_call_kwargs
from safetensors import safe_open
from safetensors.torch import load_file

import diffusion_accel as da


def _folder(name):
    try:
        return registry.testbed_path(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", VIDEO_STUDENT_NAMES)
def test_shipped_wan_student_samples_its_steps_and_sparse_config_from_a_plain_call(name):
    from diffusers import DiffusionPipeline, WanPipeline
    from diffusion_accel.pipelines.contract import stored_methods

    from diffusion_accel.loading import load_pipeline

    folder = _folder(name)
    contract = default_call_kwargs(name)
    assert contract["num_inference_steps"] == 4 and contract["guidance_scale"] == 1.0
    assert (contract["num_frames"], contract["height"]) == (9, 64)
    for component in ("vae", "text_encoder", "tokenizer"):  # the teacher's, linked
        assert (folder / component).is_symlink() and (folder / component).resolve().parent.name == "testbed-wan"
    by_name = load_pipeline(f"testbed:{name}")
    by_folder = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)
    methods = stored_methods(by_name)
    if name == "wan-blade":
        assert [m["method"] for m in methods] == ["sparse_attention"] and methods[0]["mask"] == "asa"
    else:
        assert methods == []
    passes = []
    for pipe in (by_name, by_folder):
        assert isinstance(pipe, WanPipeline) and pipe.transformer.dtype == torch.float32
        pipe.set_progress_bar_config(disable=True)
    by_name.transformer.register_forward_pre_hook(lambda m, a, k: passes.append(k["hidden_states"].shape[0]),
                                                  with_kwargs=True)
    a = by_name("a red circle moving left", generator=torch.Generator().manual_seed(0), output_type="np").frames
    b = by_folder("a red circle moving left", generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert np.asarray(a).shape == (1, 9, 64, 64, 3) and passes == [1] * 4  # 4 steps, no CFG batch
    assert np.array_equal(np.asarray(a), np.asarray(b))
    if name == "wan-blade":  # the call ran under the stored masks
        density = np.mean([e["density"] for e in da.stats(by_name)["sparse_attention"]["density"]])
        assert 0.15 < density < 0.26
    else:
        assert getattr(by_name, "_diffusion_accel_session", None) is None


@pytest.mark.parametrize("name", VIDEO_STUDENT_NAMES)
def test_fp16_stored_wan_student_loads_as_fp32_of_the_stored_values(name):
    from diffusion_accel.loading import load_pipeline

    folder = _folder(name)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        dtypes = {handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes == {"F16"}
    record = json.loads((folder / "distillation.json").read_text())["stored_weights"]
    assert record["transformer"].startswith("float16") and record["max_abs_weight_error"] < 1e-3
    stored = load_file(str(path))
    state = load_pipeline(f"testbed:{name}").transformer.state_dict()
    for key, value in stored.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float()), key


def test_store_fp16_rounds_weights_and_from_pretrained_gives_fp32(tmp_path):
    """On a fresh quality-tier Wan transformer: the rewritten file is fp16, ``from_pretrained`` returns fp32
    weights equal to the rounded ones, and the forward moves by about fp16's rounding only."""
    from diffusers import WanTransformer3DModel
    from diffusion_accel.pipelines.testbed.students import store_fp16
    from diffusion_accel.pipelines.testbed.wan import UMT5_DIM, Z_DIM, build_transformer

    model = build_transformer("quality", seed=3).eval()
    model.save_pretrained(str(tmp_path))
    errors = store_fp16(tmp_path)
    assert 0 < errors["max_abs_weight_error"] < 1e-3
    loaded = WanTransformer3DModel.from_pretrained(str(tmp_path)).eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    for (key, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b), key
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, Z_DIM, 3, 8, 8, generator=g)
    text = torch.randn(1, 8, UMT5_DIM, generator=g)
    with torch.no_grad():
        ref = model(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]
        out = loaded(hidden_states=x, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)[0]
    assert (out - ref).abs().max() < 1e-2 * ref.abs().max()
