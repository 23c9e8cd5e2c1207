"""Training options: the flags of Diffusers' training examples, a recipe's own flags, and config files.

One :class:`TrainOptions` serves every recipe. Its field names are the command-line flags of Diffusers'
``examples/`` trainers (``--output_dir --train_batch_size --learning_rate ...``), so a user who knows those scripts
knows these. A recipe adds its own fields by subclassing (:class:`~diffusion_accel.train.recipe.Recipe.options_class`).
A YAML or JSON file passed with ``--config`` sets any field; flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = ("none", "tensorboard", "wandb")


@dataclass
class TrainOptions:
    """What every recipe takes. ``train_batch_size`` is per process, as in Diffusers' examples: the global batch is
    ``train_batch_size × num_processes × gradient_accumulation_steps``, and a 2-process run with half the per-process
    batch sees exactly the samples (and noise) of a 1-process run."""

    pretrained_teacher_model: str = field(default="testbed:pixart", metadata={
        "help": "teacher pipeline: a folder, a Hub id already in the local cache, or testbed:<name> / tiny:<family>"})
    output_dir: str = field(default="", metadata={"help": "where checkpoints, validation grids and the trained "
                                                          "pipeline go (required)"})
    seed: int = field(default=0, metadata={"help": "seeds the data stream, the noise and the initialisation"})
    max_train_steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    train_batch_size: int = field(default=16, metadata={"help": "samples per process per micro-step"})
    learning_rate: float = 1e-5
    lr_scheduler: str = field(default="constant", metadata={"choices": LR_SCHEDULERS})
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = field(default="no", metadata={"choices": ("no", "fp16", "bf16")})
    checkpointing_steps: int = field(default=500, metadata={"help": "save a resumable checkpoint-<step>/ every N "
                                                                    "steps (0: only at the end)"})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "keep at most N checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint folder, or 'latest'"})
    validation_steps: int = field(default=200, metadata={"help": "write a validation image grid every N steps "
                                                                  "(0: only at the end)"})
    report_to: str = field(default="none", metadata={"choices": TRACKERS})
    logging_dir: str = "logs"
    num_train_samples: int = field(default=4096, metadata={"help": "shapes-set training images, pre-encoded "
                                                                  "once (your folder: --max_train_samples)"})
    dataloader_seed_offset: int = field(default=200_000, metadata={
        "help": "testbed data: index of the first training image (the teacher saw indices below this)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "replace a previous run of this recipe in --output_dir (never a folder that is not a run)"})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the fix for values no recipe can use."""
        if not self.output_dir:
            raise ValueError("--output_dir is required: the folder that will hold checkpoints and the trained "
                             "pipeline.")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_train_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("--checkpoints_total_limit must be >= 1 (or left out to keep every checkpoint).")
        for f in fields(self):  # every field with choices: argparse checks flags, this checks config-file values too
            if "choices" in f.metadata:
                _check_choice(f.name, getattr(self, f.name), f.metadata["choices"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name} {value!r} is not one of {', '.join(choices)}.")


@functools.cache
def _type_hints(owner: type) -> dict[str, Any]:
    return typing.get_type_hints(owner)


def _field_type(f: dataclasses.Field, owner: type) -> Any:
    return _type_hints(owner)[f.name]


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(python type, optional) of a field annotation such as ``int``, ``str | None``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, options_class: type[TrainOptions]) -> None:
    """One ``--<field>`` flag per field of ``options_class``; defaults are left unset (``SUPPRESS``) so that a
    config file's values survive unless a flag is given."""
    parser.add_argument("--config", help="a YAML or JSON file of options, or a shipped preset's name "
                                          f"({', '.join(presets())}); flags given here win over it")
    for f in fields(options_class):
        tp, _ = _scalar_type(_field_type(f, options_class))
        choices = f.metadata.get("choices")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        if tp is bool:
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=tp, choices=choices, default=argparse.SUPPRESS, help=help_text)


PRESETS_DIR = Path(__file__).with_name("presets")


def presets() -> list[str]:
    """Names of the shipped recipe files (``--config <name>``): the recipes of the shipped students."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (``.yaml``/``.yml``) or JSON file of options, or the name of a shipped preset, as a dict."""
    path = Path(path)
    if not path.is_file() and str(path) in presets():
        path = PRESETS_DIR / f"{path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file (shipped presets: {', '.join(presets())}).")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of option names to values.")
    return data


def build_options(options_class: type[TrainOptions], values: dict[str, Any]) -> TrainOptions:
    """``options_class(**values)`` with a clear error for unknown names and values of the wrong type."""
    known = {f.name: f for f in fields(options_class)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for this recipe; its options are: {', '.join(sorted(known))}.")
    converted = {}
    for name, value in values.items():
        tp, optional = _scalar_type(_field_type(known[name], options_class))
        if value is None and optional:
            converted[name] = None
            continue
        if tp is bool and not isinstance(value, bool):
            raise ValueError(f"option {name}={value!r}: expected true or false")
        try:
            converted[name] = value if isinstance(value, tp) else tp(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"option {name}={value!r}: expected {tp.__name__}") from exc
    options = options_class(**converted)
    options.validate()
    return options


def parse_options(options_class: type[TrainOptions], argv: list[str], prog: str) -> TrainOptions:
    """Options from ``argv`` (after the recipe name) and an optional ``--config`` file."""
    parser = argparse.ArgumentParser(prog=prog, description=options_class.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, options_class)
    given = vars(parser.parse_args(argv))
    config_path = given.pop("config", None)
    values = load_config_file(config_path) if config_path else {}
    values.update(given)
    return build_options(options_class, values)
