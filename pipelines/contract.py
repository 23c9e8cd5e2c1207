"""Sampler contracts: a saved pipeline that carries the call defaults its weights were trained for.

A trained or distilled checkpoint is only right when sampled the way it was trained: number of steps, explicit
timesteps, guidance scale, negative prompt, resolution. Diffusers' pipeline classes hard-code their own defaults
(``FluxPipeline`` renders 1024x1024-style sizes from ``default_sample_size = 128``, ``PixArtAlphaPipeline`` rejects
any sample size outside its resolution bins), so a plain ``pipe("a prompt")`` on a small or distilled model
samples out of contract.

:func:`with_sampler_contract` derives, from a Diffusers pipeline class, a subclass that takes one more init
argument, ``sampler_contract`` (a dict of ``__call__`` arguments). It is stored in ``model_index.json`` the way
Stable Diffusion stores ``requires_safety_checker``, and every call fills the arguments the caller did not pass
from it. ``save_pretrained`` also writes :data:`LOADER_MODULE` ``.py`` next to ``model_index.json`` and names it
in ``_class_name``, which is how Diffusers finds a local custom pipeline class, so
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` returns the contract class; without
``trust_remote_code`` Diffusers refuses at once and names that argument.

A checkpoint whose weights were trained under a diffusion-accel method (a student distilled with block-sparse
attention) also stores that method's config, ``accel_methods`` (a list of ``MethodConfig.to_dict()`` dicts), in
``model_index.json``: the first call applies them (``diffusion_accel.apply``) unless methods are already attached,
and an ``apply(pipe, ...)`` of other methods attaches the stored ones too (a config of the same method overrides
the stored one). So the weights are never sampled without the method they were trained for, unless
``diffusion_accel.remove(pipe)`` asks for that explicitly.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

#: File (without ``.py``) that ``save_pretrained`` writes beside ``model_index.json`` so that Diffusers can import
#: the contract class; it only re-exports the class from this package.
LOADER_MODULE = "pipeline_with_contract"
CONTRACT_KEY = "sampler_contract"
METHODS_KEY = "accel_methods"
#: Instance flag set by ``diffusion_accel.remove``: the stored methods are not re-applied by the next call.
METHODS_REMOVED_ATTR = "_diffusion_accel_stored_methods_removed"


def _call_parameters(base: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(base.__call__).parameters)


def check_contract(base: type, contract: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``contract`` against ``base.__call__``; returns a plain-dict copy (JSON-serialisable)."""
    if contract is None:
        return {}
    if not isinstance(contract, dict):
        raise ValueError(f"sampler_contract must be a dict of {base.__name__}.__call__ arguments, got "
                         f"{type(contract).__name__}")
    params = _call_parameters(base)
    unknown = sorted(set(contract) - set(params) - {"self"})
    if unknown:
        raise ValueError(f"sampler_contract names arguments {unknown} that {base.__name__}.__call__ does not take; "
                         "keep only its call arguments (num_inference_steps, guidance_scale, height, ...)")
    try:
        json.dumps(contract)
    except TypeError as exc:
        raise ValueError(f"sampler_contract must be JSON-serialisable (numbers, strings, lists): {exc}") from exc
    return dict(contract)


def check_methods(methods: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Validate stored method configs (each must parse as a registered method); returns plain-dict copies."""
    if methods is None:
        return None
    if not isinstance(methods, list) or not all(isinstance(m, dict) and "method" in m for m in methods):
        raise ValueError(f"{METHODS_KEY} must be a list of method config dicts with a 'method' key (as "
                         "MethodConfig.to_dict() writes them)")
    from ..config import MethodConfig

    for m in methods:
        MethodConfig.from_dict(m)  # raises, naming the bad option
    return [dict(m) for m in methods]


def stored_methods(pipe: Any) -> list[dict[str, Any]]:
    """The method configs saved with ``pipe``'s weights (``[]`` for a pipeline without)."""
    config = getattr(pipe, "config", None)
    methods = getattr(config, METHODS_KEY, None) if config is not None else None
    return [dict(m) for m in methods or []]


def contract_of(pipe: Any) -> dict[str, Any]:
    """The sampler contract of ``pipe`` (``{}`` for a pipeline without one)."""
    config = getattr(pipe, "config", None)
    contract = getattr(config, CONTRACT_KEY, None) if config is not None else None
    return dict(contract or {})


def fill_contract_defaults(pipe: Any, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus every contract argument that the call does not pass, by keyword or by position."""
    contract = contract_of(pipe)
    if not contract:
        return kwargs
    call = type(pipe).__call__
    positional = inspect.signature(call).bind_partial(pipe, *args).arguments if args else {}
    return {**{k: v for k, v in contract.items() if k not in kwargs and k not in positional}, **kwargs}


def loader_source(class_name: str) -> str:
    """The whole text of the loader module for contract class ``class_name``."""
    return (
        '"""Loads the pipeline class that applies this checkpoint\'s sampler contract (diffusion-accel)."""\n'
        f"from diffusion_accel.pipelines.contract import {class_name}  # noqa: F401\n"
    )


def _write_loader(folder: Path, class_name: str) -> None:
    """Point ``model_index.json`` at the loader module (Diffusers' local custom-pipeline convention)."""
    (folder / f"{LOADER_MODULE}.py").write_text(loader_source(class_name))
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [LOADER_MODULE, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def is_own_contract_folder(folder: str | Path) -> bool:
    """True when ``folder``'s ``model_index.json`` names a contract class of this package through a loader file
    whose text is exactly :func:`loader_source`'s. Diffusers executes that file on loading (hence its
    ``trust_remote_code``); when it is ours, running it only imports our own class, so it is safe to allow."""
    folder = Path(folder)
    index_path, loader = folder / "model_index.json", folder / f"{LOADER_MODULE}.py"
    if not (index_path.is_file() and loader.is_file()):
        return False
    class_name = json.loads(index_path.read_text()).get("_class_name")
    if not (isinstance(class_name, list) and len(class_name) == 2 and class_name[0] == LOADER_MODULE):
        return False
    try:
        __getattr__(class_name[1])
    except AttributeError:
        return False
    return loader.read_text() == loader_source(class_name[1])


@functools.cache
def with_sampler_contract(base: type) -> type:
    """The subclass of Diffusers pipeline class ``base`` that applies a sampler contract (see module docstring).

    Its name is ``<base name>WithContract``, importable from this module by that name.
    Adapters match it through ``base`` (they walk the class's MRO)."""
    base_init = inspect.signature(base.__init__)
    base_call = base.__call__

    def __init__(self: Any, *args: Any, sampler_contract: dict[str, Any] | None = None,
                 accel_methods: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self.register_to_config(**{CONTRACT_KEY: check_contract(base, sampler_contract)})
        if accel_methods:  # registered only when present: other checkpoints' model_index.json stays as it was
            self.register_to_config(**{METHODS_KEY: check_methods(accel_methods)})

    # Diffusers reads the component names from the __init__ signature (DiffusionPipeline._get_signature_keys)
    params = [p for p in base_init.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    params.append(inspect.Parameter(CONTRACT_KEY, inspect.Parameter.KEYWORD_ONLY, default=None))
    params.append(inspect.Parameter(METHODS_KEY, inspect.Parameter.KEYWORD_ONLY, default=None))
    __init__.__signature__ = base_init.replace(parameters=params)

    @functools.wraps(base_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _apply_stored_methods(self):  # the pipeline's class changed: the call goes through the session now
            return type(self).__call__(self, *args, **kwargs)
        return base_call(self, *args, **fill_contract_defaults(self, args, kwargs))

    def save_pretrained(self: Any, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        base.save_pretrained(self, save_directory, *args, **kwargs)
        _write_loader(Path(save_directory), type(self)._contract_class_name)

    name = f"{base.__name__}WithContract"
    return type(name, (base,), {
        "__init__": __init__, "__call__": __call__, "save_pretrained": save_pretrained,
        "__module__": __name__, "__qualname__": name, "__doc__": (
            f"``{base.__name__}`` whose calls default to the ``sampler_contract`` saved with the checkpoint."),
        "_contract_class_name": name, "_contract_base": base,
    })


def _apply_stored_methods(pipe: Any) -> bool:
    """Attach the stored methods before a call when nothing is attached and no ``remove`` opted out; True if it
    attached them."""
    if not stored_methods(pipe) or pipe.__dict__.get(METHODS_REMOVED_ATTR):
        return False
    from ..session import SESSION_ATTR

    if pipe.__dict__.get(SESSION_ATTR) is not None:
        return False
    from ..api import apply

    apply(pipe).session.from_stored_methods = True  # apply() adds the stored configs itself; a later apply
    return True  # of the user's own methods replaces this session (and keeps the stored methods)


def pipeline_class(pipe: Any) -> type:
    """The Diffusers pipeline class of ``pipe``: the base of a contract class, else ``type(pipe)``."""
    return getattr(type(pipe), "_contract_base", type(pipe))


def __getattr__(name: str) -> type:
    """``<Diffusers pipeline class>WithContract`` (e.g. ``FluxPipelineWithContract``), created on first access, so
    that the loader module saved with a checkpoint can import it by name."""
    if name.endswith("WithContract"):
        import diffusers

        base = getattr(diffusers, name[: -len("WithContract")], None)
        if isinstance(base, type) and issubclass(base, diffusers.DiffusionPipeline):
            return with_sampler_contract(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
