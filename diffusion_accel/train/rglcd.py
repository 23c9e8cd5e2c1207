"""Reward-guided latent consistency distillation (RG-LCD; Li et al., arXiv 2403.11027).

LCD (:mod:`.lcd`) plus a reward on the student's one-step output f_θ (its x0 estimate at t_{n+k}):

    L = L_LCD − β · mean R(f_θ, prompt),   β = ``reward_scale``

* expert reward (``latent_reward`` off): R = the shapes classifier's log-likelihood of the prompt's content on the
  VAE-decoded f_θ (the gradient flows through the decoder), optionally averaged over random views of the image
  (shifted, blurred, noised: :mod:`.reward_views`) so that textures the classifier alone responds to stop paying;
* latent proxy reward (``latent_reward`` on): R = an LRM over latents (:mod:`.latent_reward`), trained online after
  every optimizer step to rank [f_θ, f_θ⁻, real latent] as the expert does; its reward gradient is used after
  ``rm_warmup_steps`` steps of LRM training.

The reward is a training signal, so it is never the only judge: the distillation benchmark reports adherence by a
second, independently trained classifier next to the reward classifier's own verdict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .latent_reward import LatentRewardModel, pairwise_kl
from .lcd import LCD, LCDOptions
from .reward_views import RewardViews, draw_views, random_views

#: Seeds the reward views' generator from the step's draw; apart from the noise tensors' streams (small offsets).
VIEW_STREAM = 7_000_001


@dataclass
class RGLCDOptions(LCDOptions):
    """LCD with a differentiable reward on the student's one-step output."""

    reward_scale: float = field(default=0.05, metadata={"help": "β: weight of the reward term"})
    reward_model: str | None = field(default=None, metadata={
        "help": "folder of the shapes classifier used as the expert reward (default: the shipped shapes-net)"})
    latent_reward: bool = field(default=False, metadata={"help": "climb a latent proxy reward model (LRM) trained "
                                                                 "online, instead of the expert through the VAE"})
    rm_learning_rate: float = 1e-3
    rm_batch_size: int = 16
    rm_warmup_steps: int = field(default=100, metadata={"help": "LRM-only steps before its gradient guides the "
                                                                "student"})
    reward_views: int = field(default=1, metadata={"help": "V: the expert reward is the mean over V random views "
                                                          "of the decoded image (1 with no shift, blur or noise: "
                                                          "the image as is)"})
    reward_max_shift: int = field(default=0, metadata={"help": "S: each view is shifted by up to S pixels in x and "
                                                              "y (edges replicated)"})
    reward_blur_sigma: float = field(default=0.0, metadata={"help": "σ in pixels of each view's Gaussian blur"})
    reward_noise_std: float = field(default=0.0, metadata={"help": "ν: Gaussian noise added to each view (image "
                                                                  "range [-1, 1])"})

    def validate(self) -> None:
        super().validate()
        if self.reward_scale < 0:
            raise ValueError(f"--reward_scale must be >= 0, got {self.reward_scale}.")
        if self.rm_batch_size < 1 or self.rm_warmup_steps < 0:
            raise ValueError("--rm_batch_size must be >= 1 and --rm_warmup_steps >= 0.")
        views = self.views  # validates the view settings
        if self.latent_reward and not views.identity:
            raise ValueError("the reward views (--reward_views, --reward_max_shift, --reward_blur_sigma, "
                             "--reward_noise_std) apply to the direct expert reward; drop --latent_reward or the "
                             "view options.")

    @property
    def views(self) -> RewardViews:
        return RewardViews(self.reward_views, self.reward_max_shift, self.reward_blur_sigma, self.reward_noise_std)


class RGLCD(LCD):
    name = "rglcd"
    summary = "reward-guided LCD: LCD plus a shapes-classifier reward (direct or through a latent proxy)"
    options_class = RGLCDOptions

    def check(self) -> None:
        super().check()
        if self.image_folder is not None:
            self._check_reward_captions()

    def _check_reward_captions(self) -> None:
        """The expert reward scores an image against its caption read in the shapes grammar, so a folder for
        RG-LCD must be captioned in it; a mirror image would contradict a caption that names left or right."""
        from ..pipelines.testbed.shapes import parse_caption

        opts: RGLCDOptions = self.options  # type: ignore[assignment]
        unparsed, sided = [], []
        for row in self.image_folder.rows:
            for caption in row.captions:
                try:
                    objects = parse_caption(caption)
                except ValueError:
                    unparsed.append(f"{row.where}: {caption!r}")
                    continue
                if any(o.position is not None and o.position % 3 != 1 for o in objects):
                    sided.append(f"{row.where}: {caption!r}")
        if unparsed:
            shown = "; ".join(unparsed[:3]) + (f"; ... and {len(unparsed) - 3} more" if len(unparsed) > 3 else "")
            raise ValueError(f"rglcd's reward (the shapes classifier) reads captions in the shapes grammar, e.g. "
                             f"'a small red circle in the top left and a blue square'; {len(unparsed)} caption(s) "
                             f"of --train_data_dir are not ({shown}). Train `lcd` on this folder instead, or "
                             "caption its images in that grammar.")
        if opts.random_flip and sided:
            raise ValueError(f"--random_flip mirrors images whose captions name a left or right position "
                             f"({len(sided)} of them, e.g. {sided[0]}), so the reward would score the mirror "
                             "image against the wrong side; drop --random_flip.")

    def setup(self, stream_factory):
        from ..pipelines.testbed.shapes_net import load_shapes_net

        student = super().setup(stream_factory)
        opts: RGLCDOptions = self.options  # type: ignore[assignment]
        self.expert = load_shapes_net(opts.reward_model).to(self.accelerator.device).eval().requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.lrm = self.lrm_optimizer = None
        if opts.latent_reward:
            torch.manual_seed(opts.seed + 1)
            channels = self.pipe.vae.config.latent_channels
            self.lrm = LatentRewardModel(channels, self.cond.pooled.shape[-1]).to(self.accelerator.device)
            self.lrm_optimizer = torch.optim.AdamW(self.lrm.parameters(), lr=opts.rm_learning_rate)
        self._last: dict[str, Any] | None = None
        return student

    def prepare_auxiliary(self) -> None:
        if self.lrm is not None:  # prepared: saved and restored with every checkpoint, synced across processes
            self.lrm, self.lrm_optimizer = self.accelerator.prepare(self.lrm, self.lrm_optimizer)

    def run_record(self) -> dict[str, Any]:
        opts: RGLCDOptions = self.options  # type: ignore[assignment]
        record = {**super().run_record(), "reward": "latent proxy (LRM)" if opts.latent_reward else "expert",
                  "reward_model": opts.reward_model or "shapes-net (shipped)"}
        if not opts.views.identity:
            views = opts.views
            record["reward_views"] = {"views": views.views, "max_shift": views.max_shift,
                                      "blur_sigma": views.blur_sigma, "noise_std": views.noise_std}
        return record

    def expert_reward(self, latents: torch.Tensor, captions: list[str], views_at=None) -> torch.Tensor:
        """The classifier's log-likelihood of each caption's content on the decoded latents (differentiable), ``[B]``;
        with ``views_at`` (the step's :meth:`view_draws`, bound to all but the image shape) the mean over the
        option's random views.

        The decoded image is clamped to the displayable range first, as RG-LCD does: otherwise the student can
        raise the reward with pixel values no saved image keeps."""
        from ..pipelines.testbed.reward import prompt_reward

        images = self.family.decode(latents).clamp(-1.0, 1.0)
        draws = None if views_at is None else views_at(tuple(images.shape[1:]))
        if draws is None:
            return prompt_reward(self.expert, images, captions)
        views = self.options.views  # type: ignore[attr-defined]
        scores = prompt_reward(self.expert, random_views(images, views, draws), captions * views.views)
        return scores.view(views.views, len(captions)).mean(0)

    def view_draws(self, stream, step: int, micro: int, image_shape: tuple[int, ...]):
        """This process's rows of the step's view draws (``None`` when the reward sees the image as is)."""
        views = self.options.views  # type: ignore[attr-defined]
        if views.identity:
            return None
        generator = torch.Generator().manual_seed(stream.draw(step, micro).noise_seed + VIEW_STREAM)
        return draw_views(views, stream.global_batch, image_shape, generator).rows(stream.local())

    def loss(self, model, stream, step, micro):
        opts: RGLCDOptions = self.options  # type: ignore[assignment]
        pair = self.consistency_pair(model, stream, step, micro)
        distill = self.distillation_loss(pair)
        captions = [self.captions[i] for i in pair["idx"].tolist()]
        logs = {"distill_loss": float(distill.detach())}
        if self.lrm is None:
            reward = self.expert_reward(pair["f_online"], captions,
                                        lambda shape: self.view_draws(stream, step, micro, shape))
            logs["reward"] = float(reward.detach().mean())
            loss = distill - opts.reward_scale * reward.mean()
        else:
            pooled = self.cond.pooled[pair["rows"]]
            proxy = self.accelerator.unwrap_model(self.lrm)(self.family.grid_latents(pair["f_online"]), pooled)
            logs["proxy_reward"] = float(proxy.detach().mean())
            scale = opts.reward_scale if step >= opts.rm_warmup_steps else 0.0
            loss = distill - scale * proxy.mean()
            self._last = {"online": pair["f_online"].detach(), "target": pair["f_target"].detach(),
                          "real": pair["x0"], "pooled": pooled, "captions": captions}
        logs["loss"] = float(loss.detach())
        return loss, logs

    def after_optimizer_step(self, model, step):
        logs = super().after_optimizer_step(model, step)
        if self.lrm is None or self._last is None:
            return logs
        opts: RGLCDOptions = self.options  # type: ignore[assignment]
        last, n = self._last, min(opts.rm_batch_size, len(self._last["captions"]))
        triplet = torch.stack([last["online"][:n], last["target"][:n], last["real"][:n]], 1)  # [n, 3, ...]
        flat = self.family.grid_latents(triplet.flatten(0, 1))
        captions3 = [c for c in last["captions"][:n] for _ in range(3)]
        with torch.no_grad():
            expert = self.expert_reward(triplet.flatten(0, 1), captions3).view(n, 3)
        self.lrm_optimizer.zero_grad(set_to_none=True)  # drops the gradient the student's loss left on the LRM
        proxy = self.lrm(flat, last["pooled"][:n].repeat_interleave(3, 0)).view(n, 3)
        rm_loss = pairwise_kl(expert, proxy)
        self.accelerator.backward(rm_loss)
        self.lrm_optimizer.step()
        agree = ((expert[:, 0] > expert[:, 2]) == (proxy[:, 0] > proxy[:, 2])).float().mean()
        return {**logs, "rm_loss": float(rm_loss.detach()), "rm_rank_agreement": float(agree),
                "expert_reward": float(expert[:, 0].mean())}
