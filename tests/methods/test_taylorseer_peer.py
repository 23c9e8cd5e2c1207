"""Diffusers' TaylorSeer through ``apply`` must actually cache: its default module patterns miss ``attn1``/``attn2``."""

import numpy as np
import pytest
import torch

import diffusion_accel as da
from diffusion_accel.testing import tiny_call_kwargs, tiny_pipeline


@pytest.mark.parametrize("family", ["pixart_alpha", "flux", "wan"])
def test_taylorseer_hooks_every_attention_module_and_changes_the_output(family):
    pipe = tiny_pipeline(family)
    kwargs = {**tiny_call_kwargs(family), "num_inference_steps": 8, "output_type": "np"}
    baseline = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0])
    da.apply(pipe, "taylorseer", cache_interval=2, disable_cache_before_step=1)
    hooked = [name for name, module in pipe.transformer.named_modules()
              if name.split(".")[-1].startswith("attn") and hasattr(module, "_diffusers_hook")
              and "taylorseer_cache" in str(list(module._diffusers_hook.hooks))]
    attention = [name for name, module in pipe.transformer.named_modules()
                 if name.split(".")[-1] in ("attn", "attn1", "attn2") and name.count(".") == 2]
    assert attention and sorted(hooked) == sorted(attention)
    cached = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0])
    assert not np.array_equal(cached, baseline)  # predicted (not computed) attention outputs on skipped steps
    da.remove(pipe)
    again = np.asarray(pipe(**kwargs, generator=torch.Generator().manual_seed(0))[0])
    assert np.array_equal(again, baseline)
