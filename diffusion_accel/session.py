"""The hook engine: one :class:`AccelSession` per patched pipeline.

Everything is built on Diffusers' ``HookRegistry`` / ``ModelHook`` so that our hooks stack with Diffusers' own
(group offloading, layerwise casting, its caches). Two things Diffusers has no hook for are handled here:

* **Pipeline calls.** State must reset at every ``pipe(...)`` and we need the call's arguments (CFG scale,
  negative prompt). Python looks ``__call__`` up on the type, so an instance attribute cannot intercept it; the
  session swaps the pipeline's class for a same-named subclass whose ``__call__`` brackets the original, and
  restores the original class on removal.
* **Whose call it is.** Hooks live on the denoiser, which several pipelines may share (``from_pipe``,
  ``Cls(**pipe.components)``), but methods belong to one pipeline. The swapped ``__call__`` marks its session as
  the active one for the duration of the call, and every hook a session installs (its own, and those Diffusers'
  caches register for it) is *gated*: outside that session's calls it passes straight through to the forward it
  wraps. Several sessions on one denoiser each get their own hooks under distinct names.
* **The step context.** An outermost hook on the denoiser derives the sampling step from the timestep and the
  scheduler (see :mod:`diffusion_accel.context`), labels every batch row with its CFG branch and sample, and, for
  pipelines that never call ``cache_context`` (PixArt, SD3, ...), sets a Diffusers ``CacheContext`` so that
  Diffusers' caches work on them too.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from diffusers.hooks import ModelHook

from . import compile as _compile
from . import diffusers_internals as internals
from .batching import DenoiserIO
from .call_stats import CallStats, tensor_footprint
from .config import MethodConfig
from .context import StepContext, TimestepResolver
from .method import Method
from .parallel import check_context_parallel
from .pipelines.adapters import ModelAdapter
from .pipelines.contract import fill_contract_defaults

SESSION_ATTR = "_diffusion_accel_session"
_CONTEXT_HOOK = "diffusion_accel.context"
_BLOCK_COUNTER_HOOK = "diffusion_accel.block_counter"
_IO_HOOK = "diffusion_accel.denoiser_io"
#: Cache-context names under which pipelines run their CFG branches, one per pass or batched together
#: (``cache_context("cond_uncond")``); any other name is a pass of its own (see ``AccelSession._rows``).
_CFG_CONTEXTS = ("cond", "uncond", "cond_uncond")

#: The session whose pipeline call is running in this thread / task (``None`` outside patched calls).
_ACTIVE_SESSION: contextvars.ContextVar[AccelSession | None] = contextvars.ContextVar(
    "diffusion_accel_active_session", default=None)
#: Attached sessions per denoiser, in attach order (several pipelines can share one denoiser).
_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, list[AccelSession]] = weakref.WeakKeyDictionary()


def sessions_on(denoiser: torch.nn.Module) -> list[AccelSession]:
    """The attached sessions whose hooks are on ``denoiser``, oldest first."""
    return list(_SESSIONS.get(denoiser, ()))


def _gate(fn_ref: Any, is_active: Callable[[], bool]) -> None:
    """Make one registered hook act only while ``is_active()``; otherwise it passes straight through.

    Works on the hook's ``HookFunctionReference``, which the registry's rewritten forward reads at every call, so
    it gates Diffusers' own hooks as well as ours without knowing what they do.
    """
    pre, post = fn_ref.pre_forward, fn_ref.post_forward

    def pre_forward(module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return pre(module, *args, **kwargs) if is_active() else (args, kwargs)

    def post_forward(module: torch.nn.Module, output: Any) -> Any:
        return post(module, output) if is_active() else output

    fn_ref.pre_forward, fn_ref.post_forward = pre_forward, post_forward
    if fn_ref.original_forward is not None:  # a `new_forward` hook: bypass it, not only its pre/post
        hooked = fn_ref.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            if is_active():
                return hooked(*args, **kwargs)
            return fn_ref.original_forward(*args, **kwargs)

        fn_ref.forward = forward


def _input_of(fn_ref: Any) -> Callable[..., Any]:
    """The forward a hook wraps (what runs below it)."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


@contextlib.contextmanager
def relinked_hook_chains(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Remove hooks inside this block from anywhere in a chain, not only from its top.

    ``HookRegistry.remove_hook`` re-links the next hook by overwriting its ``forward``; when that next hook has a
    ``new_forward`` this drops the hook itself from the chain and leaves its ``original_forward`` pointing at the
    removed one. Several sessions on one denoiser (or a user's ``disable_cache()`` under our hooks) remove hooks
    that are not on top, so this records every chain before the block and rebuilds the chains whose hooks changed.
    """
    saved = []
    for module in modules:
        registry = internals.hook_registry(module)
        if registry is None or not internals.hook_fn_refs(registry):
            continue
        refs = internals.hook_fn_refs(registry)
        # What each hook's rewritten forward is: the input of the next hook, or the module's forward for the top one.
        wrappers = [_input_of(ref) for ref in refs[1:]] + [module.forward]
        links = {id(ref): (wrapper, ref.forward if ref.original_forward is not None else None)
                 for ref, wrapper in zip(refs, wrappers, strict=True)}
        saved.append((module, registry, refs, _input_of(refs[0]), links))
    yield
    for module, registry, refs, below, links in saved:
        remaining = internals.hook_fn_refs(registry)
        if remaining == refs or any(id(ref) not in links for ref in remaining):
            continue  # unchanged, or hooks were added meanwhile: leave the registry's own linking alone
        for ref in remaining:
            wrapper, hooked = links[id(ref)]
            if hooked is not None:
                ref.forward, ref.original_forward = hooked, below
            else:
                ref.forward = below
            below = wrapper
        module.forward = below


class NonFiniteOutputError(FloatingPointError):
    """The denoiser returned NaN or inf while methods were attached; the call stops instead of caching it."""


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor)), None)
    sample = getattr(output, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


class _NoState(internals.BaseState):
    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class DenoiserContextHook(ModelHook):
    """Outermost hook on the denoiser: computes the :class:`StepContext`, records NFE and time per step.

    It is stateful only so that Diffusers' ``cache_context`` reaches its ``StateManager`` and tells us which
    separate CFG pass ("cond"/"uncond") is running.
    """

    _is_stateful = True

    def __init__(self, session: AccelSession) -> None:
        super().__init__()
        self.session = session
        self.state_manager = internals.StateManager(_NoState)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.session.run_forward(self.fn_ref.original_forward, module, args, kwargs,
                                        internals.current_cache_context(self.state_manager))


class DenoiserIOHook(ModelHook):
    """Innermost hook on the denoiser: gives the forward its own conventions back (per-sample lists, the output's
    sign) after the methods' hooks, which see batched tensors of the prediction (:class:`DenoiserIO`)."""

    def __init__(self, io: DenoiserIO) -> None:
        super().__init__()
        self.io = io

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self.io.to_denoiser(args, kwargs)
        return self.io.output_to_methods(self.fn_ref.original_forward(*args, **kwargs))


class BlockCounterHook(ModelHook):
    """Innermost hook on every transformer block: counts blocks that actually ran."""

    def __init__(self, session: AccelSession, index: int) -> None:
        super().__init__()
        self.session = session
        self.index = index

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        self.session.stats.record_block_run(self.index)
        return args, kwargs


@functools.cache
def _accelerated_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` runs inside the pipeline's session."""
    original_call = cls.__call__

    @functools.wraps(original_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        session = self.__dict__.get(SESSION_ATTR)
        if session is None:
            return original_call(self, *args, **kwargs)
        return session.run_call(original_call, self, args, kwargs)

    return type(cls.__name__, (cls,), {
        "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "_diffusion_accel_original_class": cls,
    })


class AccelSession:
    """The methods attached to one pipeline, their hooks, the step context and the call statistics."""

    def __init__(self, pipe: Any, adapter: ModelAdapter, configs: list[MethodConfig], *,
                 expert: str | None = None, owner: AccelSession | None = None) -> None:
        self.pipe = pipe
        self.adapter = adapter
        self.configs = configs
        #: The denoiser attribute this session hooks: the adapter's ``denoiser``, or one of its ``experts`` for the
        #: sessions an owner creates so that each expert has its own method instances (and so its own caches).
        self.expert = expert or adapter.denoiser
        self.owner = owner
        self.methods: list[Method] = [config.build() for config in configs]
        self.context = StepContext()
        # One resolver per pipeline call: every expert's forwards count in the same schedule and stages
        self.resolver = owner.resolver if owner is not None else TimestepResolver(adapter.timestep_scale,
                                                                                  adapter.timestep_offset)
        self.expert_sessions: list[AccelSession] = [] if owner is not None else [
            AccelSession(pipe, adapter, configs, expert=name, owner=self) for name in adapter.experts]
        self.stats = CallStats(methods=[m.name for m in self.methods])
        self.last_stats: CallStats | None = None
        self.call_args: dict[str, Any] = {}
        # Everything attach() did, undone in reverse order by detach(): hooks wrap each other, so the outermost
        # must come off first (Diffusers' HookRegistry does not re-link a `new_forward` hook's original_forward).
        self._undo: list[Callable[[], None]] = []
        self._original_class: type | None = None
        self._snapshot: dict[int, tuple[bool, bool]] = {}
        self._timestep_position: int | None = None
        params = list(inspect.signature(type(self.denoiser).forward).parameters)[1:]
        #: The denoiser's call as methods see it (batched tensors of the prediction), built from the adapter.
        self.io = DenoiserIO(params, adapter.per_sample_lists, adapter.output_sign)
        self._set_diffusers_context = any(m.uses_diffusers_cache_context for m in self.methods)
        self._gated: set[int] = set()
        self._owners: dict[int, str] = {}  # hook fn_ref id -> the method that registered it ("session": ours)
        self._hoisted: dict[int, _compile.HoistedRegion] = {}
        self._top_forward: Any = None
        self._dynamo = _compile.DynamoCounter()
        self.compile_totals = {"frames_compiled": 0, "recompiles": 0, "graph_breaks": 0}
        #: True when a call attached this session from the methods stored with the weights (pipelines.contract):
        #: an explicit ``apply`` then replaces it instead of refusing.
        self.from_stored_methods = False
        self.attached = False

    # ------------------------------------------------------------------ properties
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.adapter.get_denoiser(self.pipe, self.expert)

    @property
    def blocks(self) -> list[torch.nn.Module]:
        return self.adapter.get_blocks(self.pipe, self.expert)

    def runs_compiled(self) -> bool:
        """Whether the denoiser runs through ``torch.compile`` anywhere: wrapped or ``.compile()``-d whole, or by
        region (``compile_repeated_blocks``; regions moved below our hooks included)."""
        return bool(self._hoisted) or _compile.runs_compiled(getattr(self.pipe, self.expert, None), self.denoiser)

    @property
    def call_sessions(self) -> list[AccelSession]:
        """This session and its experts' sessions: everything one pipeline call drives."""
        return [self, *self.expert_sessions]

    # ------------------------------------------------------------------ hooks
    def is_active(self) -> bool:
        """Whether this session's pipeline call is running (its hooks act only then)."""
        return _ACTIVE_SESSION.get() is (self.owner or self)

    def register_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> str:
        """Register ``hook`` on ``module``, gated to this session's calls; :meth:`detach` removes it again.

        Returns the name it was registered under: ``name``, or ``name#2``, ... where another session sharing the
        denoiser already holds ``name`` on this module.
        """
        registry = internals.HookRegistry.check_if_exists_or_initialize(module)
        unique, n = name, 1
        while unique in registry.hooks:
            n += 1
            unique = f"{name}#{n}"
        registry.register_hook(hook, unique)
        newest = internals.hook_fn_refs(registry)[-1]
        self._gated.add(id(newest))
        _gate(newest, self.is_active)
        self._undo.append(functools.partial(self._remove_hook, module, unique))
        internals.HookRegistry.check_if_exists_or_initialize(self.denoiser).invalidate_child_registries_cache()
        return unique

    @staticmethod
    def _remove_hook(module: torch.nn.Module, name: str) -> None:
        registry = internals.hook_registry(module)
        if registry is not None:
            with relinked_hook_chains([module]):
                registry.remove_hook(name, recurse=False)

    def _hook_refs(self) -> dict[int, Any]:
        refs = {}
        for module in self.denoiser.modules():
            registry = internals.hook_registry(module)
            if registry is not None:
                refs.update((id(ref), ref) for ref in internals.hook_fn_refs(registry))
        return refs

    def _attach_method(self, method: Method) -> None:
        """Attach one method and gate the hooks it registered other than through :meth:`register_hook`."""
        before = self._hook_refs()
        self._undo.append(functools.partial(self._detach_method, method))
        method.attach(self)
        for key, ref in self._hook_refs().items():
            if key not in before:
                self._owners[key] = method.name
            if key not in before and key not in self._gated:
                self._gated.add(key)
                _gate(ref, self.is_active)

    def _detach_method(self, method: Method) -> None:
        with relinked_hook_chains(list(self.denoiser.modules())):
            method.detach(self)

    def _take_snapshot(self) -> None:
        """Record which modules had a hook registry / instance ``forward`` before any session attached."""
        current = {id(m): (internals.has_hook_registry(m), "forward" in m.__dict__) for m in self.denoiser.modules()}
        others = [s for s in sessions_on(self.denoiser) if s is not self]
        # Sessions sharing the denoiser saw it before our hooks: their record is the untouched state.
        self._snapshot = {**current, **others[0]._snapshot} if others else current

    def _restore_snapshot(self) -> None:
        """Drop hook registries and instance ``forward`` attributes that did not exist before we attached."""
        for module in self.denoiser.modules():
            had_registry, had_forward = self._snapshot.get(id(module), (False, False))
            registry = internals.hook_registry(module)
            if registry is not None and registry.hooks:
                continue  # hooks that are not ours are still there: leave the module alone
            forward = module.__dict__.get("forward")
            if not had_forward and forward is not None and getattr(forward, "__self__", None) is module:
                del module.forward  # HookRegistry leaves the original bound method as an instance attribute
            if registry is not None and not had_registry:
                internals.drop_hook_registry(module)
        registry = internals.hook_registry(self.denoiser)
        if registry is not None:
            registry.invalidate_child_registries_cache()

    def attach(self) -> None:
        """Attach every method, then the context hook (outermost), on the denoiser and on every expert; then
        intercept pipeline calls."""
        try:
            self._attach_hooks()
            for session in self.expert_sessions:
                session._attach_hooks()
            self._original_class = type(self.pipe)
            object.__setattr__(self.pipe, SESSION_ATTR, self)
            object.__setattr__(self.pipe, "__class__", _accelerated_class(self._original_class))
        except Exception:
            self.detach()
            raise
        self.attached = True

    def _attach_hooks(self) -> None:
        """This session's hooks on its denoiser; on failure :meth:`attach` detaches whatever was registered."""
        self._take_snapshot()
        _SESSIONS.setdefault(self.denoiser, []).append(self)
        self.attached = True  # from here on detach() has something to undo
        self._keep_hooks_eager()
        if _compile.ensure_repeated_blocks(self.denoiser, self.adapter):
            denoiser = self.denoiser
            self._undo.append(lambda: internals.drop_repeated_blocks(denoiser))
        for index, block in enumerate(self.blocks):
            self.register_hook(block, BlockCounterHook(self, index), _BLOCK_COUNTER_HOOK)
        if not self.io.identity:  # registered before the methods' hooks, so it sits below them
            self.register_hook(self.denoiser, DenoiserIOHook(self.io), _IO_HOOK)
        for method in sorted(self.methods, key=lambda m: -m.priority):
            self._attach_method(method)
        self.register_hook(self.denoiser, DenoiserContextHook(self), _CONTEXT_HOOK)
        self._top_forward = self.denoiser.__dict__.get("forward")

    def detach(self) -> None:
        """Remove every hook and change, leaving the pipeline exactly as before :meth:`attach`.

        Other sessions sharing the denoiser keep working: hooks are unlinked from wherever they sit in a chain.
        """
        if self._original_class is not None:
            object.__setattr__(self.pipe, "__class__", self._original_class)
            self._original_class = None
        if SESSION_ATTR in self.pipe.__dict__ and self.owner is None:
            object.__delattr__(self.pipe, SESSION_ATTR)
        errors: list[BaseException] = []
        for session in reversed(self.expert_sessions):
            if session.attached:
                try:
                    session.detach()
                except Exception as exc:
                    errors.append(exc)
        while self._undo:
            try:
                self._undo.pop()()
            except Exception as exc:  # keep going: the pipeline must be restored as far as possible
                errors.append(exc)
        self._gated.clear()
        self._owners.clear()
        self._restore_snapshot()
        sessions = _SESSIONS.get(self.denoiser, [])
        if self in sessions:
            sessions.remove(self)
        if not sessions:
            _SESSIONS.pop(self.denoiser, None)
        self.attached = False
        if errors:
            raise errors[0]

    def _relink_after_accelerate(self) -> None:
        """Put our denoiser hooks back on top after ``enable_model_cpu_offload`` re-hooked the denoiser.

        Every pipeline call ends in ``maybe_free_model_hooks``, which removes accelerate's hook (restoring the forward
        it wrapped, from below our hooks) and adds a fresh one: our denoiser-level hooks fall out of the chain. The
        accelerate wrapper our chain calls reads the module's current ``_hf_hook`` / ``_old_forward``, so relinking
        our top forward restores the order the user set up: our hooks outside, the offload hook inside.
        """
        denoiser = self.denoiser
        current = denoiser.__dict__.get("forward")
        if current is self._top_forward or self._top_forward is None:
            return
        func = getattr(current, "func", None)
        if getattr(func, "__module__", "") == "accelerate.hooks" and hasattr(denoiser, "_hf_hook"):
            denoiser.forward = self._top_forward
        else:  # hooks added or removed by someone else since (another session): that is the chain now
            self._top_forward = current

    # ------------------------------------------------------------------ torch.compile
    def _keep_hooks_eager(self) -> None:
        """Our hook code runs eagerly under a whole-model ``torch.compile`` (see :mod:`diffusion_accel.compile`)."""
        names = {__name__, "diffusion_accel.call_stats", "diffusion_accel.context", "diffusion_accel.blocks",
                 "diffusion_accel.row_store", "diffusion_accel.batching"}
        names.update(type(method).__module__ for method in self.methods)
        for name in sorted(names):
            _compile.mark_eager(name)

    def _hoist_compiled_regions(self) -> None:
        """Move regions compiled since the last call (``compile_repeated_blocks`` after apply) below our hooks."""
        owners = {key: self._owners.get(key, "diffusion_accel") for key in self._gated}
        new = _compile.hoist_compiled_regions(list(self.denoiser.modules()), owners, self._hoisted)
        self._undo.extend(region.restore for region in new)

    def _compile_report(self, counts: dict[str, int]) -> dict[str, Any]:
        for key, value in counts.items():
            self.compile_totals[key] += value
        wrapper = getattr(self.pipe, self.adapter.denoiser, None)
        return {
            "regions": len(self._hoisted),
            "whole_model": wrapper is not self.denoiser or self.denoiser.__dict__.get("_compiled_call_impl") is not None
            or id(self.denoiser) in self._hoisted,
            **counts,
            "since_apply": dict(self.compile_totals),
        }

    # ------------------------------------------------------------------ pipeline calls
    def run_call(self, original_call: Callable[..., Any], pipe: Any, args: tuple, kwargs: dict) -> Any:
        # methods must see the arguments the call really runs with, a checkpoint's sampler contract included
        kwargs = fill_contract_defaults(pipe, args, kwargs)
        try:
            bound = inspect.signature(original_call).bind(pipe, *args, **kwargs)
            bound.apply_defaults()
            call_args = dict(bound.arguments)
            call_args.update(call_args.pop("kwargs", {}) or {})
        except TypeError:
            return original_call(pipe, *args, **kwargs)  # let the pipeline raise its own error

        def relinked_call(*call_args_: Any, **call_kwargs: Any) -> Any:
            for session in self.call_sessions:  # also between the calls a method makes per stage
                session._relink_after_accelerate()
            return original_call(*call_args_, **call_kwargs)

        call = relinked_call
        for method in self.methods:  # methods that re-shape the whole call (bottleneck stages) wrap it
            call = functools.partial(method.wrap_call, self, call)
        token = _ACTIVE_SESSION.set(self)
        try:
            check_context_parallel(self.denoiser, [m.name for m in self.methods])  # enabled after apply
            for session in self.call_sessions:  # before anything moves: a refused call leaves the model as it was
                attr = session.expert
                reason = _compile.whole_model_fullgraph_error(getattr(pipe, attr, None), session.denoiser, attr,
                                                              [m.name for m in session.methods])
                if reason:
                    raise ValueError(reason)
            for session in self.call_sessions:
                session._hoist_compiled_regions()
            self._dynamo.start()
            for session in self.call_sessions:
                session.begin_call(call_args)
            try:
                return call(pipe, *args, **kwargs)
            except Exception as exc:
                reason = _compile.dynamo_unsupported_error(exc, self.adapter.denoiser, [m.name for m in self.methods])
                if reason:
                    raise ValueError(reason) from exc
                raise
            finally:
                self.stats.extra["compile"] = self._compile_report(self._dynamo.stop())
                for session in reversed(self.call_sessions):
                    session.end_call()
        finally:
            _ACTIVE_SESSION.reset(token)

    def begin_call(self, call_args: dict[str, Any]) -> None:
        """Reset per-call state. An expert's session shares its owner's step context, resolver and statistics (its
        owner begins first), so steps, stages and counts cover every expert of the call."""
        self.call_args = call_args
        if self.owner is not None:
            self.context, self.stats = self.owner.context, self.owner.stats
        else:
            previous = self.context.call_index
            self.context = StepContext(call_index=previous + 1, cfg_mode=self.adapter.cfg_mode(call_args))
            self.resolver.reset()
            self.stats = CallStats(methods=[m.name for m in self.methods])
        internals.HookRegistry.check_if_exists_or_initialize(self.denoiser).reset_stateful_hooks(recurse=True)
        for method in self.methods:
            method.on_call_begin(self)

    def end_call(self) -> None:
        for method in self.methods:
            method.on_call_end(self)
        if self.owner is not None:
            return  # the owner (ending last) finishes the shared statistics
        self._note_cache_memory()
        self.stats.finish()
        self.last_stats = self.stats

    def _note_cache_memory(self) -> None:
        """Keep the largest cache footprint seen in this call (Diffusers' caches empty theirs when a call ends)."""
        memory = self.cache_memory()
        seen = self.stats.extra.get("cache_memory")
        if seen is None or memory["bytes"] > seen["bytes"]:
            self.stats.extra["cache_memory"] = memory

    def cache_memory(self) -> dict[str, Any]:
        """Bytes held by the methods and their hooks (Diffusers' cache states included), by dtype."""
        roots: list[Any] = list(self.methods)
        for module in self.denoiser.modules():
            registry = internals.hook_registry(module)
            if registry is not None:
                roots += [hook for hook in registry.hooks.values() if id(hook.fn_ref) in self._gated]
        return tensor_footprint(roots, skip_types=(AccelSession, StepContext))

    def _check_finite(self, output: Any) -> None:
        """A NaN/inf from the denoiser must not enter a cache and be reused for steps: stop the call, say where."""
        tensor = _first_tensor(output)
        if tensor is None or not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            return
        ctx = self.context
        where = {"stage": ctx.stage, "step": ctx.step_index, "num_steps": ctx.num_steps, "branch": ctx.branch}
        self.stats.extra["non_finite"] = where
        methods = ", ".join(m.name for m in self.methods) or "none (statistics only)"
        raise NonFiniteOutputError(
            f"The {self.adapter.denoiser} returned NaN/inf at step {ctx.step_index} of {ctx.num_steps} "
            f"({ctx.branch} pass, {tensor.dtype}) with diffusion-accel methods {methods} attached. The call was "
            "stopped so that no cache stores or reuses it. If the pipeline without methods gives finite output, "
            "report it with the method config; if not, it comes from the model: in float16, overflowing "
            "activations are common: try bfloat16."
        )

    # ------------------------------------------------------------------ denoiser forwards
    def _timestep_argument(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        name = self.adapter.timestep_argument
        if name in kwargs:
            return kwargs[name]
        if self._timestep_position is None:
            params = list(inspect.signature(type(module).forward).parameters)[1:]
            self._timestep_position = params.index(name) if name in params else -1
        if 0 <= self._timestep_position < len(args):
            return args[self._timestep_position]
        return None

    def _rows(self, batch: int, branch_name: str | None) -> tuple[str, list[tuple[str, int]]]:
        mode = self.context.cfg_mode
        # A pass in a cache context of its own (LTX-2's spatio-temporal and modality-isolation guidance, a guider's
        # "pred_cond"/"pred_uncond") computes something else than the CFG branches: its rows are keyed by its name,
        # so that per-row caches never hand one pass's state to another.
        own_pass = branch_name is not None and branch_name not in _CFG_CONTEXTS
        # A batched-CFG pipeline can also run cond-only forwards of just its samples within the call (Z-Image past
        # cfg_truncation): a batch the size of the samples already seen is one of those.
        cond_only = 0 < self.context.num_samples == batch
        if mode == "batched" and batch % 2 == 0 and not cond_only and not own_pass:
            half = batch // 2
            first, second = ("uncond", "cond") if self.adapter.uncond_first else ("cond", "uncond")
            return "batched", [(first, i) for i in range(half)] + [(second, i) for i in range(half)]
        branch = branch_name if branch_name in ("cond", "uncond") else "cond"
        key = branch_name if own_pass else branch
        return branch, [(key, i) for i in range(batch)]

    def run_forward(self, forward: Callable[..., Any], module: torch.nn.Module, args: tuple, kwargs: dict,
                    diffusers_context: internals.CacheContext | None) -> Any:
        ctx = self.context
        scheduler = getattr(self.pipe, "scheduler", None)
        step, num_steps, timestep, new_schedule = self.resolver.resolve(
            scheduler, self._timestep_argument(module, args, kwargs)
        )
        if new_schedule and self.resolver.schedules_seen > 1:
            ctx.stage += 1
            for session in (self.owner or self).call_sessions:
                for method in session.methods:
                    method.on_stage_begin(session)
        if diffusers_context is not None and diffusers_context.step_index is not None:
            step = int(diffusers_context.step_index)
            num_steps = int(diffusers_context.num_inference_steps or num_steps)
        args, kwargs = self.io.to_methods(args, kwargs)
        hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        batch = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) else 0
        ctx.step_index, ctx.num_steps, ctx.timestep = step, num_steps, timestep
        ctx.sigma = self.resolver.sigma_at(scheduler, step)
        ctx.branch, ctx.rows = self._rows(batch, diffusers_context.name if diffusers_context else None)
        ctx.num_samples = max(ctx.num_samples, 1 + max((s for _, s in ctx.rows), default=-1))
        self.stats.begin_forward(ctx.stage, step, timestep, batch, len(self.blocks))

        set_context = self._set_diffusers_context and diffusers_context is None
        if set_context:
            internals.set_cache_context(module, internals.CacheContext(
                ctx.branch, step_index=step, num_inference_steps=num_steps, timestep=timestep, sigma=ctx.sigma,
            ))
        try:
            output = forward(*args, **kwargs)
            self._check_finite(output)
            if step < 3:  # caches reach their size on the first full steps; walking them every step costs time
                self._note_cache_memory()
            return self.io.output_to_pipeline(output)
        finally:
            if set_context:
                internals.set_cache_context(module, None)
            self.stats.end_forward()
