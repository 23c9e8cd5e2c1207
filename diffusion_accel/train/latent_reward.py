"""The latent proxy reward model (LRM) of RG-LCD (Li et al., "Reward Guided Latent Consistency Distillation",
arXiv 2403.11027, §3.3).

The expert reward (here the shapes classifier) needs the VAE decoder in the loop; the LRM scores latents directly
and is trained online to *rank* like the expert: for every pair (i, j) of a triplet [student one-step output,
target output, real latent], the KL divergence between the expert's and the LRM's two-way softmax
(``pairwise_kl``). The student then climbs the LRM instead of the expert, which the paper reports avoids the
high-frequency artefacts of direct expert gradients.

Architecture (ours; the paper's LRM is an open_clip ViT over latents, unavailable offline): a small conv net over
the latent grid, pooled to the 3x3 cells our prompts talk about, and an MLP over the pooled caption embedding;
the score is their scaled cosine, as a CLIP score is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LatentRewardModel(nn.Module):
    """score(latents ``[B, C, H, W]``, pooled text ``[B, D]``) → ``[B]``."""

    def __init__(self, latent_channels: int, text_dim: int, width: int = 64, embed_dim: int = 128, cells: int = 3):
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(latent_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(cells), nn.Flatten(), nn.Linear(2 * width * cells * cells, embed_dim))
        self.text = nn.Sequential(nn.Linear(text_dim, 2 * embed_dim), nn.SiLU(), nn.Linear(2 * embed_dim, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ≈ 10, learned as CLIP's is

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        a = F.normalize(self.image(latents.float()), dim=-1)
        b = F.normalize(self.text(text.float()), dim=-1)
        return self.logit_scale.exp() * (a * b).sum(-1)


PAIRS = ((0, 1), (0, 2), (1, 2))


def pairwise_kl(expert: torch.Tensor, proxy: torch.Tensor) -> torch.Tensor:
    """Mean over samples and the three pairs of KL(softmax(expert pair) ‖ softmax(proxy pair)).

    ``expert``, ``proxy``: ``[B, 3]`` scores of the triplet. Zero when the proxy's pairwise preferences (including
    their confidence) equal the expert's."""
    total = expert.new_zeros(())
    for i, j in PAIRS:
        p = torch.stack([expert[:, i], expert[:, j]], -1).softmax(-1)
        log_q = torch.stack([proxy[:, i], proxy[:, j]], -1).log_softmax(-1)
        total = total + (p * (p.clamp_min(1e-12).log() - log_q)).sum(-1).mean()
    return total / len(PAIRS)
