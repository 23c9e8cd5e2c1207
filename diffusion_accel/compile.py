"""Working under ``torch.compile``: regional compile, whole-model compile, and counting what Dynamo did.

Our hooks are Python control flow (a ``ContextVar`` gate, per-step cache decisions, statistics). Traced by Dynamo
they would break ``fullgraph=True`` and, worse, turn every cache decision into a guard and so a recompile. So they
always run eagerly and only the model's own compute is compiled:

* **Regional compile** (``denoiser.compile_repeated_blocks(...)`` or ``module.compile(...)``: Diffusers' recommended
  way) compiles a module's ``_call_impl``, which would trace the hook chain. Before every pipeline call the session
  *hoists* such a region: the module's ``__call__`` runs eagerly again and the part of its forward below our
  hooks (the block's own forward, with any hooks the user added before ours) is compiled with the user's own
  ``torch.compile`` settings. Cache decisions then never reach a graph: no recompiles, ``fullgraph=True`` holds.
  ``remove`` puts the user's compiled ``_call_impl`` back.
* **Whole-model compile** (``pipe.transformer = torch.compile(pipe.transformer)``): our code objects are marked
  for Dynamo to skip, so each hook is a graph break that runs eagerly, and the model code between hooks is
  compiled. The breaks are counted in ``stats(pipe)["compile"]``. ``fullgraph=True`` cannot hold there (our hooks
  sit inside the one graph it demands): the call is refused with a ``ValueError`` naming the fix (regional compile
  with ``fullgraph=True``, or ``fullgraph=False``) before Dynamo's own ``Unsupported`` error.

Where a Diffusers class leaves ``_repeated_blocks`` empty (PixArt, DiT, SD3, CogVideoX in 0.42.1) the family's
adapter supplies the block class names, so ``compile_repeated_blocks`` works on every family.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any

import torch

from .diffusers_internals import hook_fn_refs, hook_registry, repeated_blocks, set_repeated_blocks

if TYPE_CHECKING:
    from .pipelines.adapters import ModelAdapter


# ---------------------------------------------------------------------------------------------- repeated blocks
def ensure_repeated_blocks(denoiser: torch.nn.Module, adapter: ModelAdapter) -> bool:
    """Give ``denoiser`` the adapter's ``_repeated_blocks`` where its class has none; True if it was set here.

    Set on the instance only, so the Diffusers class (and other models of it) are left alone.
    """
    if repeated_blocks(denoiser) or not adapter.repeated_blocks:
        return False
    present = {type(m).__name__ for m in denoiser.modules()}
    names = [name for name in adapter.repeated_blocks if name in present]
    if not names:
        return False
    set_repeated_blocks(denoiser, names)
    return True


# ---------------------------------------------------------------------------------------------- eager hooks
_MARKED: set[str] = set()


def _code_objects(obj: Any, seen: set[int]) -> list[types.CodeType]:
    found: list[types.CodeType] = []
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        for part in (obj.fget, obj.fset, obj.fdel):
            if part is not None:
                found += _code_objects(part, seen)
        return found
    code = getattr(obj, "__code__", None)
    stack = [code] if isinstance(code, types.CodeType) else []
    while stack:
        code = stack.pop()
        if id(code) in seen:
            continue
        seen.add(id(code))
        found.append(code)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))  # closures, comprehensions
    return found


def mark_eager(module_name: str) -> None:
    """Tell Dynamo to run every function of ``module_name`` eagerly: a call from a traced frame is a graph break,
    and frames they call (the model's forwards) are compiled again. Idempotent."""
    if module_name in _MARKED:
        return
    # our own modules: import one not loaded yet (e.g. diffusion_accel.blocks before any block method ran), so that
    # what it defines is marked before a compiled frame can reach it
    module = importlib.import_module(module_name)
    from torch._dynamo.eval_frame import skip_code

    seen: set[int] = set()
    for value in list(vars(module).values()):
        if getattr(value, "__module__", None) != module_name:
            continue
        members = vars(value).values() if isinstance(value, type) else [value]
        for member in members:
            for code in _code_objects(member, seen):
                skip_code(code)
    _MARKED.add(module_name)


# ---------------------------------------------------------------------------------------------- regional compile
def _dynamo_context(compiled: Any) -> Any:
    """The ``torch.compile`` context (backend, fullgraph, mode, ...) a compiled callable was made with."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    return None


class HoistedRegion:
    """One compiled module whose compiled region was moved below our hooks."""

    def __init__(self, module: torch.nn.Module, ref: Any, attr: str, below: Any) -> None:
        self.module, self.ref, self.attr, self.below = module, ref, attr, below
        self.user_compiled: Any = None

    def hoist(self, compiled: Any, context: Any) -> None:
        self.user_compiled = compiled
        setattr(self.ref, self.attr, context(self.below))
        self.module._compiled_call_impl = None

    def restore(self) -> None:
        setattr(self.ref, self.attr, self.below)
        if self.user_compiled is not None and self.module._compiled_call_impl is None:
            self.module._compiled_call_impl = self.user_compiled


def _our_refs(module: torch.nn.Module, ours: set[int] | dict[int, str]) -> list[Any]:
    registry = hook_registry(module)
    return [ref for ref in (hook_fn_refs(registry) if registry is not None else []) if id(ref) in ours]


def hoist_compiled_regions(modules: list[torch.nn.Module], ours: dict[int, str],
                           hoisted: dict[int, HoistedRegion]) -> list[HoistedRegion]:
    """Move newly compiled regions of ``modules`` below the hooks whose ``fn_ref`` ids are keys of ``ours``.

    ``ours`` maps each hook to the method that owns it. ``hoisted`` holds the regions already moved (by module id)
    and is updated; returns the new ones.

    Raises:
        ValueError: a ``fullgraph=True`` region contains hooks of ours on its submodules (attention-level methods
            inside a compiled block): they cannot run eagerly inside one graph.
    """
    compiled_modules = []
    for module in modules:
        compiled = module.__dict__.get("_compiled_call_impl")
        context = None if compiled is None else _dynamo_context(compiled)
        if context is None:
            continue  # not compiled, or not by torch.compile: leave it (our hooks are then traced and break it)
        compiled_modules.append((module, compiled, context))
        if getattr(context, "fullgraph", False):
            inside = {(type(sub).__name__, ours[id(ref)]) for name, sub in module.named_modules() if name
                      for ref in _our_refs(sub, ours)}
            if inside:
                kinds = ", ".join(sorted({k for k, _ in inside}))
                methods = ", ".join(sorted({m for _, m in inside}))
                raise ValueError(
                    f"{methods} hooks the {kinds} modules inside {type(module).__name__}, which was compiled with "
                    "fullgraph=True as one graph; those hooks decide per step in Python and cannot run inside it. "
                    "Compile with fullgraph=False (compile_repeated_blocks(fullgraph=False): the hooks become "
                    "counted graph breaks), or use a block-level method (delta_cache, fbcache, magcache, dbcache)."
                )
    new = []
    for module, compiled, context in compiled_modules:  # checked all first: nothing is moved if one is refused
        refs = _our_refs(module, ours)
        if not refs:
            continue
        region = hoisted.get(id(module))
        if region is None:
            innermost = refs[0]
            attr = "original_forward" if innermost.original_forward is not None else "forward"
            region = HoistedRegion(module, innermost, attr, getattr(innermost, attr))
            hoisted[id(module)] = region
            new.append(region)
        region.hoist(compiled, context)
    return new


def runs_compiled(wrapper: Any, denoiser: torch.nn.Module) -> bool:
    """Whether ``denoiser`` (``wrapper`` is the pipeline's attribute) runs through ``torch.compile`` anywhere:
    ``torch.compile(model)``, ``model.compile()`` or a compiled submodule (``compile_repeated_blocks``)."""
    return wrapper is not denoiser or any(m.__dict__.get("_compiled_call_impl") is not None
                                          for m in denoiser.modules())


# ---------------------------------------------------------------------------------------------- whole model, fullgraph
def _fix(attr: str, undo: str) -> str:
    return (f"Compile the blocks instead: pipe.{attr}.compile_repeated_blocks(fullgraph=True) on the uncompiled "
            f"model ({undo}); fullgraph holds per block and our hooks run between the blocks (methods that hook "
            "attention inside the blocks: pab, taylorseer, fastercache, sparse_attention, need fullgraph=False "
            "there). Or compile the whole model with fullgraph=False: our hooks become graph breaks, counted in "
            "stats(pipe)['compile'].")


def whole_model_fullgraph_error(wrapper: Any, denoiser: torch.nn.Module, attr: str, methods: list[str]) -> str | None:
    """Why the denoiser cannot run: compiled whole with ``fullgraph=True`` (``torch.compile(model, fullgraph=True)``
    as ``wrapper``, or ``model.compile(fullgraph=True)``), which demands one graph for its entire forward, while our
    hooks on it and its blocks are Python decisions that must run eagerly. ``None`` if it is not so compiled."""
    contexts = []
    if wrapper is not denoiser and isinstance(wrapper, torch._dynamo.eval_frame.OptimizedModule):
        contexts.append(("torch.compile(pipe.{a}, fullgraph=True)", "pipe.{a} = pipe.{a}._orig_mod",
                         getattr(wrapper, "dynamo_ctx", None)))
    compiled = denoiser.__dict__.get("_compiled_call_impl")
    if compiled is not None:
        contexts.append(("pipe.{a}.compile(fullgraph=True)", "a model not compiled with .compile()",
                         _dynamo_context(compiled)))
    for how, undo, context in contexts:
        if getattr(context, "fullgraph", False):
            return (f"{', '.join(methods) or 'diffusion-accel'}: the {type(denoiser).__name__} was compiled whole "
                    f"with {how.format(a=attr)}, which demands one graph for its entire forward, but "
                    "diffusion-accel's hooks on it and on its blocks decide per step in Python and run outside any "
                    f"graph (Dynamo would stop with 'Unsupported'). {_fix(attr, undo.format(a=attr))}")
    return None


def dynamo_unsupported_error(exc: BaseException, attr: str, methods: list[str]) -> str | None:
    """The fix for Dynamo's ``Unsupported`` raised while tracing our hook code under ``fullgraph=True`` however the
    model was compiled (e.g. ``model.forward = torch.compile(model.forward, fullgraph=True)``); ``None`` if the
    error does not come from our code."""
    unsupported = getattr(getattr(torch, "_dynamo", None), "exc", None)
    unsupported = getattr(unsupported, "Unsupported", None)
    if unsupported is None or not isinstance(exc, unsupported) or "diffusion_accel" not in str(exc):
        return None
    return (f"{', '.join(methods) or 'diffusion-accel'}: torch.compile(fullgraph=True) reached diffusion-accel's "
            "hooks, which decide per step in Python and cannot be traced into one graph. "
            f"{_fix(attr, 'the model or forward as it was before torch.compile')}")


# ---------------------------------------------------------------------------------------------- counters
class DynamoCounter:
    """What Dynamo compiled between :meth:`start` and :meth:`stop` (process-wide: a call compiles on its thread)."""

    def start(self) -> None:
        from torch._dynamo.utils import counters, get_compilation_metrics

        self._breaks = int(sum(counters["graph_break"].values()))
        metrics = get_compilation_metrics()
        self._last = metrics[-1] if metrics else None

    def stop(self) -> dict[str, int]:
        from torch._dynamo.utils import counters, get_compilation_metrics

        metrics = list(get_compilation_metrics())
        if self._last is not None and any(m is self._last for m in metrics):
            metrics = metrics[next(i for i, m in enumerate(metrics) if m is self._last) + 1:]
        return {
            "frames_compiled": len(metrics),
            "recompiles": sum(1 for m in metrics if m.recompile_reason),
            "graph_breaks": int(sum(counters["graph_break"].values())) - self._breaks,
        }
