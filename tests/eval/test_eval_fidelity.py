"""Batched PSNR/SSIM and the 'local weights or skipped' rule for LPIPS, CLIP score and rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusion_accel.eval import fidelity
from diffusion_accel.eval.fidelity import clip_score, lpips, psnr, reward_score, ssim


def _batch(noise: int, seed: int = 0, n: int = 3, size: tuple[int, int] = (32, 24)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (n, *size, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, a.shape), 0, 255).astype(np.uint8)
    return a, b


def test_batches_average_per_image_scores():
    a, b = _batch(12)
    assert psnr(a, b) == pytest.approx(np.mean([psnr(x, y) for x, y in zip(a, b, strict=True)]), rel=1e-12)
    assert ssim(a, b) == pytest.approx(np.mean([ssim(x, y) for x, y in zip(a, b, strict=True)]), rel=1e-12)
    nchw = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255  # torch NCHW in [0, 1]
    assert psnr(nchw, b) == pytest.approx(psnr(a, b), rel=1e-6)
    assert ssim(nchw, b) == pytest.approx(ssim(a, b), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, b[:2])


def test_ssim_window_is_the_pinned_gaussian():
    """A change confined to the centre 1x1 pixel of a flat image affects SSIM only inside the 11x11 window."""
    flat = np.full((41, 41, 3), 128, np.uint8)
    spot = flat.copy()
    spot[20, 20] = 255
    valid = (41 - 10) ** 2  # pixels of the valid (unpadded) SSIM map
    touched = 11 * 11
    assert 1 - ssim(flat, spot) <= touched / valid + 1e-9
    assert ssim(flat, spot) < 1


def _lpips_files(tmp_path):
    model = fidelity.LPIPSAlex()
    torch.manual_seed(0)
    backbone = {f"features.{k}": v.clone() for k, v in model.net.features.state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(2, 2)  # ignored: only features.* are loaded
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(model.net.channels)}
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(heads, tmp_path / "alex.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex.pth"


def test_lpips_from_local_files_or_skipped(tmp_path):
    a, b = _batch(40, n=2, size=(64, 64))  # AlexNet needs ≥ 63 px
    skipped = lpips(a, b)
    assert skipped["value"] is None and skipped["skipped"] == fidelity.SKIPPED_NO_WEIGHTS
    backbone, heads = _lpips_files(tmp_path)
    same = lpips(a, a, backbone, heads)
    near = lpips(a, b, backbone, heads)
    far = lpips(a, 255 - a, backbone, heads)
    assert same["value"] == pytest.approx(0.0, abs=1e-7)
    assert 0 < near["value"] < far["value"] and near["n"] == 2


def test_clip_score_and_rewards_never_download():
    a, _ = _batch(0, n=2)
    assert clip_score(list(a), ["x", "y"])["skipped"] == fidelity.SKIPPED_NO_WEIGHTS
    assert reward_score(list(a), ["x", "y"], kind="imagereward")["skipped"] == fidelity.SKIPPED_NO_WEIGHTS
    with pytest.raises(NotImplementedError):
        reward_score(list(a), ["x", "y"], kind="hpsv2", weights="/local/hps.pt")
    assert "hpsv2" not in fidelity.SUPPORTED_REWARDS
    scored = reward_score(list(a), ["x", "y"], scorer=lambda images, prompts: [float(im.mean()) for im in images])
    assert scored["value"] == pytest.approx(float(np.mean([im.mean() for im in a])))
    with pytest.raises(ValueError, match="unknown reward"):
        reward_score(list(a), ["x", "y"], kind="nonsense")


def test_latent_psnr_uses_the_reference_range_as_peak():
    from diffusion_accel.eval.fidelity import latent_psnr

    ref = torch.tensor([[-2.0, 2.0], [0.0, 1.0]])  # range 4
    assert latent_psnr(ref.clone(), ref) == float("inf")
    noisy = ref + torch.tensor([[0.4, -0.4], [0.4, -0.4]])  # MSE 0.16
    assert latent_psnr(noisy, ref) == pytest.approx(10 * np.log10(16 / 0.16))
    assert np.isnan(latent_psnr(ref[:1], ref))
