"""The public API: ``apply``, ``remove``, ``accelerated``, ``stats``, ``list_methods``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .call_stats import format_stats
from .config import MethodConfig, parse_config, registered_methods
from .parallel import check_context_parallel
from .pipelines.adapters import find_adapter
from .session import SESSION_ATTR, AccelSession, sessions_on

ConfigSpec = MethodConfig | str | Path | Mapping[str, Any]


class AccelHandle:
    """What :func:`apply` returns: the attached configs, the last call's statistics and ``remove()``."""

    def __init__(self, session: AccelSession) -> None:
        self._session = session

    @property
    def session(self) -> AccelSession:
        """The :class:`~diffusion_accel.session.AccelSession` behind this handle: the attached method instances
        (``session.methods``), the step context of the running or last call (``session.context``), the hooked
        denoiser. For tools and tests that inspect a method's state; the public API itself needs none of it."""
        return self._session

    @property
    def configs(self) -> list[MethodConfig]:
        return list(self._session.configs)

    @property
    def family(self) -> str:
        return self._session.adapter.family

    def stats(self) -> dict[str, Any]:
        return _stats_of(self._session)

    def remove(self) -> None:
        if self._session.attached:
            remove(self._session.pipe)

    def __repr__(self) -> str:
        names = ", ".join(c.name for c in self._session.configs) or "no methods"
        return f"AccelHandle({self._session.adapter.family}: {names})"


def _session_of(pipe: Any) -> AccelSession | None:
    return getattr(pipe, "__dict__", {}).get(SESSION_ATTR)


def _check_pipeline(pipe: Any) -> None:
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise ValueError(
            f"diffusion_accel.apply expects a loaded diffusers DiffusionPipeline, got {type(pipe).__name__}. "
            "Load one with DiffusionPipeline.from_pretrained(...) or diffusion_accel.load_pipeline(...)."
        )


def _parse_all(configs: tuple[ConfigSpec, ...], options: dict[str, Any]) -> list[MethodConfig]:
    if options and len(configs) != 1:
        raise ValueError(
            "Keyword options such as apply(pipe, 'delta_cache', interval=2) need exactly one method; "
            "pass several methods as config objects or dicts instead."
        )
    parsed = [parse_config(spec, **options) for spec in configs]
    seen: dict[str, str] = {}
    for config in parsed:
        if config.name in seen:
            raise ValueError(f"Method {config.name!r} is given twice; pass each method once.")
        seen[config.name] = config.name
    groups: dict[str, str] = {}
    for config in parsed:
        group = config.exclusive_group
        if group is None:
            continue
        if group in groups:
            raise ValueError(
                f"Methods {groups[group]!r} and {config.name!r} cannot be combined (both are {group}); keep one."
            )
        groups[group] = config.name
    return parsed


def _check_shared_denoiser(pipe: Any, adapter: Any, parsed: list[MethodConfig]) -> None:
    """Refuse to share a denoiser with another pipeline's session when either side cannot be gated per pipeline."""
    others = [s for s in sessions_on(adapter.get_denoiser(pipe)) if s.pipe is not pipe]
    if not others:
        return
    exclusive = [c.name for c in parsed if not c.shares_denoiser]
    exclusive += [c.name for s in others for c in s.configs if not c.shares_denoiser]
    if exclusive:
        other = type(others[0].pipe).__name__
        raise ValueError(
            f"The {adapter.denoiser} is shared with another pipeline ({other}) that has diffusion-accel methods "
            f"attached, and {exclusive[0]} replaces the {adapter.denoiser}'s forward, so it cannot be limited to one "
            "pipeline. Call diffusion_accel.remove(<the other pipeline>) first, or give each pipeline its own "
            f"{adapter.denoiser}."
        )


def apply(pipe: Any, *configs: ConfigSpec, **options: Any) -> AccelHandle:
    """Attach acceleration methods to a loaded Diffusers pipeline.

    Args:
        pipe: a loaded ``DiffusionPipeline`` of a supported family.
        *configs: method configs: objects, registered names (``"delta_cache"``), dicts with a ``"method"`` key or
            JSON/YAML file paths. No config attaches only the step context and statistics.
        **options: field overrides when exactly one method is given: ``apply(pipe, "delta_cache", interval=2)``.

    Returns:
        An :class:`AccelHandle`.

    Raises:
        ValueError: a config is invalid or does not fit the model. The message names the fix, and the pipeline is
            left exactly as it was (apply is atomic).
    """
    _check_pipeline(pipe)
    existing = _session_of(pipe)
    if existing is not None and getattr(existing, "from_stored_methods", False):
        existing.detach()  # attached by a call from the checkpoint's stored methods: this apply replaces it
        existing = None
    if existing is not None:
        names = ", ".join(c.name for c in existing.configs) or "no methods"
        raise ValueError(
            f"This pipeline already has diffusion-accel methods attached ({names}). Call "
            "diffusion_accel.remove(pipe) first, or pass every method to a single apply(...) call."
        )
    adapter = find_adapter(pipe)
    parsed = _with_stored_methods(pipe, _parse_all(configs, options))
    problems = [f"{c.name}: {reason}" for c in parsed if (reason := c.not_applicable_reason(adapter, pipe))]
    if problems:
        raise ValueError("Cannot apply to this pipeline: " + "; ".join(problems) + ".")
    _check_shared_denoiser(pipe, adapter, parsed)
    check_context_parallel(adapter.get_denoiser(pipe), [c.name for c in parsed])
    session = AccelSession(pipe, adapter, parsed)
    session.attach()  # rolls itself back on failure
    return AccelHandle(session)


def _with_stored_methods(pipe: Any, parsed: list[MethodConfig]) -> list[MethodConfig]:
    """``parsed`` plus the methods saved with the pipeline's weights (``pipelines.contract``) that it does not name:
    weights trained under a method (a sparse-attention student) keep it when other methods are applied."""
    from .pipelines.contract import stored_methods

    named = {c.name for c in parsed}
    stored = [parse_config(m) for m in stored_methods(pipe)]
    return parsed + [c for c in stored if c.name not in named]


def remove(pipe: Any) -> None:
    """Detach everything :func:`apply` attached; outputs are then bit-identical to a never-patched pipeline.

    On a pipeline loaded with stored methods (a student trained under sparse attention), this also stops its calls
    from re-applying them: an explicit request to sample it without."""
    from .pipelines.contract import METHODS_REMOVED_ATTR, stored_methods

    if stored_methods(pipe):  # also before its first call, when nothing is attached yet
        object.__setattr__(pipe, METHODS_REMOVED_ATTR, True)
        if _session_of(pipe) is None:
            return
    _detach(pipe)


def _detach(pipe: Any) -> None:
    session = _session_of(pipe)
    if session is None:
        raise ValueError("This pipeline has no diffusion-accel methods attached; nothing to remove.")
    session.detach()


@contextlib.contextmanager
def accelerated(pipe: Any, *configs: ConfigSpec, **options: Any) -> Iterator[AccelHandle]:
    """``with accelerated(pipe, "delta_cache"): pipe(...)``: apply on entry, remove on exit."""
    handle = apply(pipe, *configs, **options)
    try:
        yield handle
    finally:
        if _session_of(pipe) is not None:
            _detach(pipe)  # not an opt-out of stored methods: the next call re-applies them


class StatsDict(dict):
    """A dict that prints as a table."""

    def __str__(self) -> str:
        return format_stats(self)

    def table(self) -> str:
        return format_stats(self)


def _stats_of(session: AccelSession) -> StatsDict:
    record = session.last_stats
    if record is None:
        raise ValueError("No pipeline call has run since apply(); call the pipeline first, then stats(pipe).")
    out = StatsDict(record.to_dict())
    out["family"] = session.adapter.family
    return out


def stats(pipe: Any) -> StatsDict:
    """Statistics of the last pipeline call: NFE, blocks run/skipped per step, uncond rows skipped, time per step.

    ``print(stats(pipe))`` shows them as a table.
    """
    session = _session_of(pipe)
    if session is None:
        raise ValueError("stats() needs a pipeline patched with diffusion_accel.apply(pipe, ...).")
    return _stats_of(session)


def list_methods(pipe: Any = None) -> list[str]:
    """All registered method names, or, given a pipeline, those that apply to it with their default config."""
    methods = registered_methods()
    if pipe is None:
        return list(methods)
    adapter = find_adapter(pipe)
    names = []
    for name, cls in methods.items():
        try:
            config = cls()
        except (TypeError, ValueError):  # a method without a usable default config is not listed
            continue
        if config.not_applicable_reason(adapter, pipe) is None:
            names.append(name)
    return names
