"""Method configs: one validated dataclass per method, registered by name.

Every acceleration method is described by a :class:`MethodConfig` subclass. Configs validate on construction
(``ValueError`` naming the fix), serialise with :meth:`MethodConfig.to_dict` / :meth:`MethodConfig.from_dict`, load
from JSON or YAML files, and build the runtime :class:`~diffusion_accel.method.Method` that attaches hooks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .method import Method
    from .pipelines.adapters import ModelAdapter

_REGISTRY: dict[str, type[MethodConfig]] = {}


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method config.

    Subclasses are dataclasses that set ``name`` (the registry key), implement :meth:`validate` and
    :meth:`build`, and may refine :meth:`not_applicable_reason`.
    """

    name: ClassVar[str] = ""
    #: Families this method supports; ``None`` means every family with a transformer block list. Built-in methods
    #: derive it from adapter facts (``pipelines.adapters.families_where``) rather than listing names.
    families: ClassVar[tuple[str, ...] | None] = None
    #: One line for ``list-methods`` and the README table.
    summary: ClassVar[str] = ""
    #: False for a method that replaces the denoiser's ``forward`` instead of registering hooks: it cannot be gated
    #: per pipeline, so no other pipeline sharing the denoiser may have methods attached at the same time.
    shares_denoiser: ClassVar[bool] = True
    #: Methods in the same group cannot be combined in one ``apply`` (``apply`` refuses the second, naming both),
    #: nor held by two pipelines sharing a denoiser where the group says so: ``"diffusers_cache"`` is the group of
    #: caches that take Diffusers' one cache slot per model. ``None``: combines with anything.
    exclusive_group: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` (naming the fix) if a field is out of range."""

    def not_applicable_reason(self, adapter: ModelAdapter, pipe: Any) -> str | None:
        """Why this method cannot run on ``pipe`` (``None`` if it can). Must not modify the pipeline."""
        why = self.unsupported_reason(adapter)
        if why:
            return why
        if self.families is not None and adapter.family not in self.families:
            return f"{self.name} supports the families {', '.join(self.families)}, not {adapter.family}"
        if self.families is None and not adapter.block_lists:
            return f"{self.name} needs a transformer block list and {adapter.family} has none"
        if adapter.block_lists and not adapter.get_blocks(pipe):
            lists = ", ".join(adapter.block_lists)
            return f"{self.name} needs transformer blocks and this {adapter.denoiser}'s {lists} is empty"
        return None

    def unsupported_reason(self, adapter: ModelAdapter) -> str | None:
        """The adapter's own word that this method cannot run on its family (``unsupported_methods``); overrides
        of :meth:`not_applicable_reason` that do not call the base must check it first."""
        why = adapter.unsupported_methods.get(self.name)
        return f"{self.name} does not run on {adapter.family}: {why}" if why else None

    def build(self) -> Method:
        raise NotImplementedError(f"{type(self).__name__}.build is not implemented")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        data = dict(data)
        name = data.pop("method", cls.name or None)
        target = get_config_class(name) if cls is MethodConfig else cls
        if cls is not MethodConfig and name not in (None, cls.name):
            raise ValueError(f"Config is for method {name!r}, not {cls.name!r}.")
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown option(s) {unknown} for method {target.name!r}. Valid options: {sorted(known)}."
            )
        for f in dataclasses.fields(target):  # JSON/YAML give lists where the dataclass wants tuples
            if f.name in data and isinstance(data[f.name], list) and "tuple" in str(f.type):
                data[f.name] = tuple(data[f.name])
        return target(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> MethodConfig:
        """Load a config from a ``.json``, ``.yaml`` or ``.yml`` file holding ``{"method": name, ...}``."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"Config file {str(path)!r} does not exist.")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ValueError(f"Config file {str(path)!r} must end in .json, .yaml or .yml.")
        if not isinstance(data, Mapping):
            raise ValueError(f"Config file {str(path)!r} must hold a mapping with a 'method' key.")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: register a :class:`MethodConfig` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a non-empty class attribute `name`.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def registered_methods() -> dict[str, type[MethodConfig]]:
    from . import methods  # noqa: F401  (importing registers the built-in methods)

    return dict(sorted(_REGISTRY.items()))


def get_config_class(name: str | None) -> type[MethodConfig]:
    methods = registered_methods()
    if name not in methods:
        raise ValueError(f"Unknown method {name!r}. Registered methods: {', '.join(methods)}.")
    return methods[name]


def parse_config(spec: MethodConfig | str | Path | Mapping[str, Any], **overrides: Any) -> MethodConfig:
    """Turn a config object, a method name, a JSON/YAML path or a dict into a validated :class:`MethodConfig`."""
    if isinstance(spec, MethodConfig):
        return spec.replace(**overrides) if overrides else spec
    if isinstance(spec, Mapping):
        return MethodConfig.from_dict({**spec, **overrides})
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if text.endswith((".json", ".yaml", ".yml")):
            config = MethodConfig.from_file(text)
            return config.replace(**overrides) if overrides else config
        return MethodConfig.from_dict({"method": text, **overrides})
    raise ValueError(
        f"Cannot use {type(spec).__name__} as a method config: pass a MethodConfig, a method name, "
        "a dict with a 'method' key, or a .json/.yaml path."
    )


def parse_key_value(text: str, what: str = "option") -> tuple[str, Any]:
    """``"key=value"`` → ``("key", value)``, the one parser behind ``--set``, ``--call`` and bench method options.

    The value is read as YAML (``0.1`` → float, ``[1, 2]`` → list, ``true`` → bool, anything else a string); the key
    is stripped and ``-`` becomes ``_`` (``--set num-cached-blocks=4`` names the field ``num_cached_blocks``).
    Raises ValueError naming ``what`` (the flag or place the text came from) when there is no ``=``.
    """
    import yaml

    if "=" not in text:
        raise ValueError(f"{what} expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().replace("-", "_"), yaml.safe_load(value)


def parse_key_values(items: list[str] | None, what: str = "option") -> dict[str, Any]:
    """Several ``key=value`` texts (a repeatable flag's values) → one dict; see :func:`parse_key_value`."""
    return dict(parse_key_value(item, what) for item in items or [])
