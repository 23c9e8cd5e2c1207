"""shapes-net: a small CNN that reads a shapes image back into labels, and the metrics built on it.

The network predicts, for each of the 3x3 grid cells, which object has its centre there (``empty`` or one of
8 colours x 3 shapes) and the object's size class. That is exactly what a caption of the grammar in
:mod:`.shapes` can say, so :func:`adherence` checks a generated image against its prompt, and the 256-d penultimate
features give :func:`fid_shapes`, a Fréchet distance in a feature space that knows the data.

A second, independent classifier, ``shapes-judge`` (:class:`ShapesJudge`: residual GroupNorm blocks, another seed
and other training images), has the same output contract; :data:`JUDGES` names both, and every function here that
takes ``net`` also takes a judge's name (``adherence(images, prompts, net="shapes-judge")``), so a model optimised
against shapes-net (a reward, :mod:`.reward`) can be checked by a classifier it never saw.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .shapes import COLOUR_NAMES, GRID, IMAGE_SIZE, SHAPES, SIZE_NAMES, PromptObject, parse_caption

NUM_CELLS = GRID * GRID
#: Cell classes: 0 = empty, then ``1 + colour_index * len(SHAPES) + shape_index``.
NUM_CLASSES = 1 + len(COLOUR_NAMES) * len(SHAPES)
FEATURE_DIM = 256
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATS_FILE = "real_stats.npz"


def class_index(colour: str, shape: str) -> int:
    """The cell class of a (colour, shape) pair."""
    return 1 + COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_labels(index: int) -> tuple[str, str] | None:
    """``(colour, shape)`` of a cell class, ``None`` for empty."""
    if index == 0:
        return None
    colour, shape = divmod(index - 1, len(SHAPES))
    return COLOUR_NAMES[colour], SHAPES[shape]


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """64x64 RGB → per-cell class logits ``[B, 9, 25]``, size logits ``[B, 9, 3]`` and features ``[B, 256]``."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _block(3, w, 2), _block(w, 3 * w // 2, 1),  # 32x32
            _block(3 * w // 2, 2 * w, 2), _block(2 * w, 2 * w, 1),  # 16x16
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),  # 8x8
        )
        self.pool = nn.AdaptiveAvgPool2d(GRID)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * NUM_CELLS, feature_dim), nn.ReLU(inplace=True))
        self.cls_head = nn.Linear(feature_dim + 4 * w * NUM_CELLS, NUM_CELLS * NUM_CLASSES)
        self.size_head = nn.Linear(feature_dim + 4 * w * NUM_CELLS, NUM_CELLS * len(SIZE_NAMES))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: float ``[B, 3, 64, 64]`` in [0, 1]."""
        x = self.body((images - 0.5) / 0.25)
        return _cell_outputs(self, self.pool(x).flatten(1))


def _cell_outputs(model: nn.Module, cells: torch.Tensor) -> dict[str, torch.Tensor]:
    """The classifiers' shared output contract from per-cell descriptors ``cells`` ``[B, D]``: features from
    ``model.embed``, and the class / size heads reading features and cells together."""
    features = model.embed(cells)
    both = torch.cat([features, cells], dim=1)
    batch = cells.shape[0]
    return {
        "cls": model.cls_head(both).view(batch, NUM_CELLS, NUM_CLASSES),
        "size": model.size_head(both).view(batch, NUM_CELLS, len(SIZE_NAMES)),
        "features": features,
    }


class _ResBlock(nn.Module):
    """Pre-activation residual block: GroupNorm → SiLU → conv ×2, plus the (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, groups: int = 8):
        super().__init__()
        pad = kernel // 2
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, kernel, 1, pad)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout), nn.Conv2d(cout, cout, kernel, 1, pad)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        return self.skip(x) + h


class ShapesJudge(nn.Module):
    """The independent judge: same contract as :class:`ShapesNet` (``cls [B, 9, 25]``, ``size [B, 9, 3]``,
    ``features [B, feature_dim]``), different design: a 4x4 patchify stem (stride 4, no BatchNorm anywhere),
    pre-activation residual blocks with GroupNorm/SiLU and 5x5 kernels at 16x16, average-pool downsampling, and
    per-cell average + max pooling to the 3x3 grid."""

    def __init__(self, width: int = 48, feature_dim: int = 192):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(3, w, 4, 4)  # 16x16 patches of 4x4 pixels
        self.stage1 = nn.Sequential(_ResBlock(w, w, kernel=5), _ResBlock(w, w, kernel=3))  # 16x16
        self.down = nn.AvgPool2d(2)
        self.stage2 = nn.Sequential(_ResBlock(w, 2 * w), _ResBlock(2 * w, 2 * w))  # 8x8
        self.norm = nn.GroupNorm(8, 2 * w)
        self.avg, self.max = nn.AdaptiveAvgPool2d(GRID), nn.AdaptiveMaxPool2d(GRID)
        cell_dim = 4 * w * NUM_CELLS
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(cell_dim, feature_dim), nn.SiLU())
        self.cls_head = nn.Linear(feature_dim + cell_dim, NUM_CELLS * NUM_CLASSES)
        self.size_head = nn.Linear(feature_dim + cell_dim, NUM_CELLS * len(SIZE_NAMES))
        self.width, self.feature_dim = width, feature_dim

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images``: float ``[B, 3, 64, 64]`` in [0, 1]."""
        x = self.stem(images * 2.0 - 1.0)
        x = self.stage2(self.down(self.stage1(x)))
        x = torch.nn.functional.silu(self.norm(x))
        return _cell_outputs(self, torch.cat([self.avg(x), self.max(x)], dim=1).flatten(1))


#: ``config["architecture"]`` → classifier class; a config without the key is a :class:`ShapesNet`.
ARCHITECTURES: dict[str, type[nn.Module]] = {"shapes-net": ShapesNet, "shapes-judge": ShapesJudge}


def architecture_of(model: nn.Module) -> str:
    """The registered architecture name of ``model``."""
    for name, cls in ARCHITECTURES.items():
        if type(model) is cls:
            return name
    raise ValueError(f"{type(model).__name__} is not a registered classifier architecture ({sorted(ARCHITECTURES)})")


def build_classifier(config: dict[str, Any]) -> nn.Module:
    """An untrained classifier of ``config["architecture"]`` (default ``"shapes-net"``) with the config's sizes."""
    name = config.get("architecture", "shapes-net")
    if name not in ARCHITECTURES:
        raise ValueError(f"Unknown classifier architecture {name!r} in config.json; known: "
                         f"{', '.join(sorted(ARCHITECTURES))}.")
    return ARCHITECTURES[name](width=config["width"], feature_dim=config["feature_dim"])


# ------------------------------------------------------------------------------------------------ loading
def assets_root() -> Path:
    """The installed data package ``diffusion_accel.assets`` (falls back to the repository's ``assets/``)."""
    from importlib.util import find_spec

    try:
        # the spec's search path, not importlib.resources.files(): ``assets/`` has no __init__.py, and for such a
        # namespace package files() returns a MultiplexedPath whose str() is not a path
        spec = find_spec("diffusion_accel.assets")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "assets"


def default_path() -> Path:
    """``assets/shapes-net`` inside the installed package."""
    return assets_root() / "shapes-net"


def judge_path(name: str) -> Path:
    """The shipped folder of judge ``name`` (a key of :data:`JUDGES`)."""
    if name not in JUDGES:
        raise ValueError(f"Unknown judge {name!r}; choose one of {', '.join(JUDGES)}.")
    return assets_root() / JUDGES[name]


def save_shapes_net(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (with ``"architecture"``) to ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    if isinstance(model, ShapesNet):
        width = model.body[0][0].out_channels
    else:
        width = model.width
    config = {"architecture": architecture_of(model), "width": width,
              "feature_dim": model.embed[1].out_features, "image_size": IMAGE_SIZE,
              "colours": list(COLOUR_NAMES), "shapes": list(SHAPES),
              "sizes": list(SIZE_NAMES), "grid": GRID, **(extra or {})}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def load_shapes_net(path: str | Path | None = None) -> nn.Module:
    """Load the shipped classifier (``assets/shapes-net``) or one at ``path``, in eval mode; ``config.json``'s
    ``"architecture"`` (default ``"shapes-net"``) picks the class, so this loads a judge folder too."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else default_path()
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(
            f"No shapes-net weights at {weights}. Train them with `diffusion-accel testbed train shapes-net` "
            "(or `diffusion_accel.pipelines.testbed.train.train('shapes-net', output_dir)`)."
        )
    config = json.loads((path / CONFIG_FILE).read_text())
    model = build_classifier(config)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


#: The shipped classifiers by name (folders under ``assets/``): ``"shapes-net"`` is the metric everything reports,
#: ``"shapes-judge"`` the independent second opinion (other architecture, seed and training images). Pass a name as
#: ``net=`` to :func:`adherence`, :func:`verdicts_and_features`, :func:`detect` or :func:`run_net`.
JUDGES: dict[str, str] = {"shapes-net": "shapes-net", "shapes-judge": "shapes-judge"}


def load_judge(name: str = "shapes-judge") -> nn.Module:
    """A shipped classifier by name (see :data:`JUDGES`), in eval mode (cached: do not train it in place)."""
    return _cached_net(str(judge_path(name)))


@lru_cache(maxsize=4)
def _cached_net(path: str | None) -> nn.Module:
    return load_shapes_net(path)


def resolve_net(net: nn.Module | str | None) -> nn.Module:
    """``None`` → the shipped shapes-net, a name of :data:`JUDGES` → that classifier, a module → itself."""
    if net is None:
        return _cached_net(None)
    if isinstance(net, str):
        return load_judge(net)
    return net


# ------------------------------------------------------------------------------------------------ inference
def to_tensor(images: Any) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` arrays, a list of arrays or PIL images, or a float tensor → float ``[N, 3, 64, 64]``."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        if x.max() > 1.5:
            x = x / 255.0
    else:
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        batch = np.stack(arrays)
        if batch.dtype != np.uint8:
            batch = np.clip(np.round(batch * 255.0 if batch.max() <= 1.0 else batch), 0, 255).astype(np.uint8)
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x


@torch.no_grad()
def run_net(images: Any, net: nn.Module | str | None = None, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Classifier outputs for ``images`` (see :func:`to_tensor`), concatenated over batches."""
    net = resolve_net(net)
    x = to_tensor(images)
    outs = [net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


@dataclass(frozen=True)
class Detection:
    """One object the classifier sees."""

    colour: str
    shape: str
    position: int
    size: str


def detections_from(cls_logits: torch.Tensor, size_logits: torch.Tensor) -> list[list[Detection]]:
    """Per-image detections from per-cell logits ``[N, 9, 25]`` / ``[N, 9, 3]``."""
    cls = cls_logits.argmax(-1).tolist()
    size = size_logits.argmax(-1).tolist()
    result = []
    for row_cls, row_size in zip(cls, size, strict=True):
        dets = []
        for cell, (c, s) in enumerate(zip(row_cls, row_size, strict=True)):
            labels = class_labels(c)
            if labels is not None:
                dets.append(Detection(labels[0], labels[1], cell, SIZE_NAMES[s]))
        result.append(dets)
    return result


def detect(images: Any, net: nn.Module | str | None = None) -> list[list[Detection]]:
    """What the classifier sees in each image."""
    out = run_net(images, net)
    return detections_from(out["cls"], out["size"])


def matches_prompt(detections: Sequence[Detection], wanted: Sequence[PromptObject], check_size: bool = False) -> bool:
    """True when the detected objects are exactly the prompt's objects: same count, and a one-to-one assignment
    with equal colour and shape, equal cell where the prompt names a position (and equal size if ``check_size``)."""
    if len(detections) != len(wanted):
        return False

    def ok(d: Detection, w: PromptObject) -> bool:
        return (d.colour == w.colour and d.shape == w.shape and (w.position is None or d.position == w.position)
                and (not check_size or w.size is None or d.size == w.size))

    return any(all(ok(d, w) for d, w in zip(perm, wanted, strict=True))
               for perm in itertools.permutations(detections))


def adherence_per_image(images: Any, prompts: Sequence[str], net: nn.Module | str | None = None,
                        check_size: bool = False) -> list[bool]:
    """Per-image booleans: does the classified content match the prompt?"""
    prompts = list(prompts)
    dets = detect(images, net)
    if len(dets) != len(prompts):
        raise ValueError(f"{len(dets)} images but {len(prompts)} prompts")
    return [matches_prompt(d, parse_caption(p), check_size) for d, p in zip(dets, prompts, strict=True)]


def adherence(images: Any, prompts: Sequence[str], net: nn.Module | str | None = None, check_size: bool = False,
              return_per_image: bool = False) -> float | tuple[float, list[bool]]:
    """Fraction of ``images`` whose classified content matches its prompt (colour + shape of every object, and the
    grid cell where the prompt names a position; no extra objects). With ``return_per_image`` also the booleans."""
    flags = adherence_per_image(images, prompts, net, check_size)
    score = float(np.mean(flags)) if flags else float("nan")
    return (score, flags) if return_per_image else score


def verdicts_and_features(images: Any, prompts: Sequence[str], net: nn.Module | str | None = None,
                          check_size: bool = False) -> tuple[list[bool], np.ndarray]:
    """Per-image adherence verdicts and the 256-d features ``[N, 256]`` (float64) from one classifier pass: what a
    paired comparison (:mod:`diffusion_accel.eval.paired`) and a bootstrap of FID-shapes need."""
    prompts = list(prompts)
    out = run_net(images, net)
    dets = detections_from(out["cls"], out["size"])
    if len(dets) != len(prompts):
        raise ValueError(f"{len(dets)} images but {len(prompts)} prompts")
    flags = [matches_prompt(d, parse_caption(p), check_size) for d, p in zip(dets, prompts, strict=True)]
    return flags, out["features"].double().numpy()


# ------------------------------------------------------------------------------------------------ FID-shapes
def features(images: Any, net: nn.Module | str | None = None) -> np.ndarray:
    """Penultimate 256-d features ``[N, 256]`` (float64)."""
    return run_net(images, net)["features"].double().numpy()


def real_statistics(count: int = 2000, split: str = "val", net: nn.Module | str | None = None) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """``(mu, sigma)`` of the features of ``count`` real generator images of ``split``."""
    from diffusion_accel.eval.frechet import feature_statistics

    from .shapes import make_batch

    images, _ = make_batch(split, 0, count)
    return feature_statistics(features(images, net))


def save_real_statistics(path: str | Path | None = None, count: int = 2000) -> Path:
    """Compute and cache the real-image statistics as ``real_stats.npz`` next to the weights."""
    path = Path(path) if path is not None else default_path()
    mu, sigma = real_statistics(count, net=load_shapes_net(path))
    out = path / STATS_FILE
    np.savez(out, mu=mu, sigma=sigma, count=np.array(count))
    return out


def load_real_statistics(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The cached ``(mu, sigma)`` of real images (``assets/shapes-net/real_stats.npz``)."""
    path = Path(path) if path is not None else default_path()
    data = np.load(path / STATS_FILE)
    return data["mu"], data["sigma"]


def fid_shapes(images: Any, reference: Any = None, net: nn.Module | str | None = None) -> float:
    """Fréchet distance between shapes-net features of ``images`` and of the reference: real images (an array or
    list of images), a ``(mu, sigma)`` pair, a path to an ``.npz`` with ``mu``/``sigma``, or ``None`` for the
    cached real-image statistics."""
    from diffusion_accel.eval.frechet import feature_statistics, frechet_distance

    mu, sigma = feature_statistics(features(images, net))
    if reference is None:
        mu_r, sigma_r = load_real_statistics()
    elif isinstance(reference, (str, Path)):
        data = np.load(reference)
        mu_r, sigma_r = data["mu"], data["sigma"]
    elif isinstance(reference, tuple) and len(reference) == 2 and np.asarray(reference[0]).ndim == 1:
        mu_r, sigma_r = reference
    else:
        mu_r, sigma_r = feature_statistics(features(reference, net))
    return float(frechet_distance(mu, sigma, mu_r, sigma_r))
