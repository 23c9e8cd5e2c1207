"""``ResShiftPipeline``: few-step super-resolution by residual shifting (ResShift) in a VAE's latent space.

``pipe(image=low_res, num_inference_steps=4).images``. The steps (ResShift §1.7 of the project's spec):

1. the LR image is upsampled ×``scale_factor`` bicubically and encoded: y0 (the paper's ``z_y``);
2. x_T = y0 + κ √η_T ε (the prior is centred on the LR latent, so T can be small);
3. for t_idx = T−1 … 0: x̂0 = f_θ([x_t / √(κ²η_t+1), LR], t_idx); x_{t−1} ~ q(x_{t−1} | x_t, x̂0) (exact posterior);
4. the HR image is the decoded x_0.

The folder ``save_pretrained`` writes holds the scheduler config the network was trained with (T, κ, p, η_1, η_T),
so the sampler contract travels with the weights; ``resshift_pipeline.py`` beside ``model_index.json`` lets
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` find this class (Diffusers' convention for a
local custom pipeline; the file only imports this module).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .degrade import bicubic_up
from .latents import decode, encode, lr_condition, vae_scale_factor
from .scheduler import ResShiftScheduler

LOADER_MODULE = "resshift_pipeline"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def loader_source() -> str:
    """The whole text of the loader module saved beside ``model_index.json``."""
    return ('"""Loads ResShiftPipeline (diffusion-accel) for DiffusionPipeline.from_pretrained."""\n'
            "from diffusion_accel.pipelines.resshift.pipeline import ResShiftPipeline  # noqa: F401\n")


def is_own_resshift_folder(folder: str | Path) -> bool:
    """True when ``folder`` names :class:`ResShiftPipeline` through a loader file whose text is exactly ours (so
    running it only imports this package: safe for ``trust_remote_code``)."""
    folder = Path(folder)
    index, loader = folder / "model_index.json", folder / f"{LOADER_MODULE}.py"
    if not (index.is_file() and loader.is_file()):
        return False
    name = json.loads(index.read_text()).get("_class_name")
    return name == [LOADER_MODULE, "ResShiftPipeline"] and loader.read_text() == loader_source()


@dataclass
class ResShiftPipelineOutput(BaseOutput):
    """``images``: PIL list, ``np.ndarray [N, H, W, 3]`` in [0, 1], a tensor ``[N, 3, H, W]`` in [0, 1], or the
    final latents (``output_type="latent"``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class ResShiftPipeline(DiffusionPipeline):
    """Super-resolution by ResShift. Components: ``unet`` (x0-predicting denoiser whose input is the scaled latent
    concatenated with the LR image), ``vae`` (the latent space of x0 and y0), ``scheduler``
    (:class:`ResShiftScheduler`). ``scale_factor`` (the paper's ``sf``) is stored in the pipeline config."""

    model_cpu_offload_seq = "vae->unet->vae"

    def __init__(self, unet: UNet2DModel, vae: AutoencoderKL, scheduler: ResShiftScheduler, scale_factor: int = 4):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(scale_factor=int(scale_factor))
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor(vae), do_resize=False)
        latent, image = vae.config.latent_channels, 3
        if unet.config.in_channels != latent + image or unet.config.out_channels != latent:
            raise ValueError(f"the unet must take {latent + image} channels (latent {latent} + LR image {image}) and "
                             f"return {latent}; it has {unet.config.in_channels} → {unet.config.out_channels}.")

    # -- input checks -------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """LR sides must be multiples of this: the HR side (×sf) must split into latents the UNet can halve at
        every level."""
        unet_factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        need = vae_scale_factor(self.vae) * unet_factor
        sf = self.config.scale_factor
        return need // np.gcd(need, sf)

    def _to_tensor(self, image: Any) -> torch.Tensor:
        """LR images as float ``[N, 3, h, w]`` in [-1, 1], with errors that name the fix."""
        if image is None:
            raise ValueError("pass image=<low-resolution image(s)>: PIL, a numpy array or a tensor.")
        items = image if isinstance(image, list) else [image]
        if len(items) == 0:
            raise ValueError("image is an empty list; pass at least one low-resolution image.")
        arrays = []
        for item in items:
            if isinstance(item, PIL.Image.Image):
                item = item.convert("RGB")  # L / RGBA / P → RGB, as Diffusers' image processor
                arrays.append(torch.from_numpy(np.asarray(item, dtype=np.float32) / 255.0).permute(2, 0, 1)[None])
                continue
            if isinstance(item, np.ndarray):
                arr = item
                if arr.ndim == 3:
                    arr = arr[None]
                if arr.ndim != 4 or arr.shape[-1] != 3:
                    raise ValueError(f"numpy images must be [H, W, 3] or [N, H, W, 3] (RGB, channels last); got "
                                     f"shape {item.shape}: convert grayscale/RGBA to RGB first.")
                scale = 255.0 if arr.dtype == np.uint8 else 1.0
                arrays.append(torch.from_numpy(arr.astype(np.float32) / scale).permute(0, 3, 1, 2))
                continue
            if isinstance(item, torch.Tensor):
                t = item[None] if item.ndim == 3 else item
                if t.ndim != 4 or t.shape[1] != 3:
                    raise ValueError(f"tensor images must be [3, H, W] or [N, 3, H, W] (RGB, channels first) in "
                                     f"[0, 1]; got shape {tuple(item.shape)}: convert to 3 channels first.")
                arrays.append(t.float().cpu())
                continue
            raise ValueError(f"unsupported image type {type(item).__name__}; pass PIL images, numpy arrays or tensors.")
        sizes = {tuple(a.shape[-2:]) for a in arrays}
        if len(sizes) != 1:
            raise ValueError(f"all images of a batch must have the same size, got {sorted(sizes)}.")
        x = torch.cat(arrays).contiguous()  # channels-last views (numpy NHWC) would pick other conv kernels
        if x.shape[0] == 0:
            raise ValueError("the image batch is empty; pass at least one low-resolution image.")
        h, w = x.shape[-2:]
        m = self.size_multiple
        if h % m or w % m:
            raise ValueError(f"low-resolution size {h}x{w} does not fit scale factor {self.config.scale_factor}: "
                             f"the sides must be multiples of {m} (HR = ×{self.config.scale_factor}, encoded by the "
                             f"VAE at 1/{vae_scale_factor(self.vae)}); crop or pad the image.")
        return x.clamp(0, 1) * 2.0 - 1.0

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image: Any = None, num_inference_steps: int | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "pil",
                 return_dict: bool = True) -> ResShiftPipelineOutput | tuple:
        """Super-resolve ``image`` (PIL / numpy ``[H, W, 3]`` or ``[N, H, W, 3]`` in [0, 1] or uint8 / tensor
        ``[N, 3, H, W]`` in [0, 1], or a list of them) by ``scale_factor``. ``num_inference_steps`` defaults to
        (and must equal) the scheduler's T."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}.")
        device = self._execution_device
        low_res = self._to_tensor(image).to(device)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        y0 = encode(self.vae, bicubic_up(low_res, self.config.scale_factor)).to(self.unet.dtype)
        lq = lr_condition(low_res, tuple(y0.shape[-2:])).to(y0.dtype)
        if isinstance(generator, list) and len(generator) != len(y0):
            raise ValueError(f"{len(generator)} generators for a batch of {len(y0)} images; pass one per image.")
        noise = randn_tensor(y0.shape, generator=generator, device=device, dtype=y0.dtype)
        x = self.scheduler.prior_sample(y0, noise)
        for t in self.progress_bar(self.scheduler.timesteps):
            t_batch = torch.full((len(x),), int(t), device=device, dtype=torch.long)
            model_in = torch.cat([self.scheduler.scale_model_input(x, t_batch), lq], dim=1)
            out = self.unet(model_in, t_batch).sample
            step_noise = randn_tensor(x.shape, generator=generator, device=device, dtype=x.dtype)
            x = self.scheduler.step(out, t_batch, x, low_res_latents=y0, noise=step_noise).prev_sample
        if output_type == "latent":
            images = x
        else:
            decoded = decode(self.vae, x)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ResShiftPipelineOutput(images=images)

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Diffusers' ``save_pretrained`` plus the loader file that names this class in ``model_index.json``."""
        super().save_pretrained(save_directory, *args, **kwargs)
        folder = Path(save_directory)
        (folder / f"{LOADER_MODULE}.py").write_text(loader_source())
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [LOADER_MODULE, "ResShiftPipeline"]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
