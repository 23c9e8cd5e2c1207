"""A patch discriminator and hinge losses for the testbed VAEs' decoders (the adversarial term of VQGAN / SD-VAE /
Wan-VAE training, sized for a CPU).

Why a testbed decoder needs it: an L1/L2 decoder that is not sure which shape a latent holds draws the average of
the candidates, a round blob, and every shape reads as a circle. Measured on ``testbed:wan``'s 8x VAE: a small CNN
reads the right shape from 98.4 % of the held-out clips' latents (78.1 % of the latents the CPU transformer
generates; ``scripts/wan_latent_shape_probe.py``), but its L1/L2-trained decoders draw every one of them round. A
discriminator that sees frames, not pixel averages, prices a blob as unreal and makes the decoder commit to a shape.

We write the discriminator here rather than import one: Diffusers ships no discriminator (its VAE training examples
take one from ``taming``), and this one is three strided convolutions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """Per-frame PatchGAN: ``[N, 3, T, H, W]`` clips (or ``[N, 3, H, W]`` images) in [-1, 1] → one logit per
    ``H/8 x W/8`` patch of every frame. ``width`` channels after the first convolution, doubled at each stride."""

    def __init__(self, width: int = 32, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(2):
            c_in, c_out = width * 2 ** i, width * 2 ** (i + 1)
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width * 4, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5:  # frames are judged one by one: the adversarial term is about each frame's shapes
            x = x.transpose(1, 2).flatten(0, 1)
        return self.net(x)


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``E[relu(1 - D(x))] + E[relu(1 + D(x̂))]`` (the hinge loss of VQGAN's discriminator)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """``-E[D(x̂)]``: the decoder's adversarial term."""
    return -fake_logits.mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's λ: the ratio of the two losses' gradient norms at the decoder's last layer, so the adversarial term
    pulls as hard as the reconstruction term whatever their scales (detached; clamped to ``[0, max_weight]``)."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
