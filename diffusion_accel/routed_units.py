"""Hooks that let a cache router compute, reuse or mix the output of each routing unit.

One runtime serves inference (the ``harmonica`` / ``l2c`` methods, hard decisions) and router training (soft
mixing with differentiable scores), so the trained and the applied behaviour are the same code. A unit is a gated
branch of a block (its output is cached as returned, and the block re-applies the current step's gate) or a whole
block (its deviation h_out − h_in is cached and added to the current input, as Δ-DiT does, because a block's raw
output would discard the current step's input).

Modes, set by the driver before each denoiser forward:

* ``"fill"``: compute every unit and store its output (the first step; the papers' fixed router);
* ``"hard"``: ``compute[u]`` decides; a unit without a stored output for these rows computes;
* ``"soft"``: HarmoniCa's training relaxation: out = r·fresh + (1 − r)·cached with r = ``scores[u]`` (a tensor
  that carries the gradient to the router); the stored output is replaced by the (detached) mixed one where
  r > ``store_threshold``;
* ``"frozen"``: compute every unit and leave the store untouched (the full-compute reference of SDT).

A unit may have *feeders* (:data:`~diffusion_accel.pipelines.adapters.BRANCH_FEEDERS`): submodules whose outputs
only build the unit's input (Flux's single-stream ``proj_out`` is fed by ``attn`` and ``proj_mlp``). Where the unit
will be reused (hard mode, not computed, a stored output for these rows) they return a placeholder instead of
running, so reusing the branch saves its feeders' MACs too; in every other case they run as usual. The placeholder
is zero-width (:attr:`RoutedUnits.zero_width`), so whatever the block does between the feeders and the unit (Flux's
GELU on proj_mlp's output, the concatenation) runs on empty tensors at no cost and without a hook of its own; where
the blocks run compiled it has the real output's width instead, because a new shape recompiles the code between
the hooks (:func:`_placeholder`).

Stored outputs are kept per batch row key (:class:`~diffusion_accel.row_store.RowStore`), so CFG branches and
samples never read each other's cache.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook

from .blocks import BlockIO, add_deviation, deviation
from .diffusers_internals import HookRegistry, hook_registry
from .row_store import RowStore

MODES = ("fill", "hard", "soft", "frozen")


def is_whole_block(unit_name: str) -> bool:
    """``ModelAdapter.routing_units`` names a whole block ``<list>.<index>`` and a branch ``<list>.<index>.<name>``."""
    return unit_name.count(".") == 1


class _UnitHook(ModelHook):
    def __init__(self, runtime: RoutedUnits, index: int, whole_block: bool) -> None:
        super().__init__()
        self.runtime = runtime
        self.index = index
        self.whole_block = whole_block
        self.io: BlockIO | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.whole_block:
            self.io = BlockIO.for_module(module)
        return module

    # Not traced by Dynamo: the decision reads the step's schedule (Python state that changes every step), so under
    # regional compile each step would recompile this frame until Dynamo's recompile limit sends it back to eager
    # partway through the first call, and that call's float math would differ from every later one. Eager here, the
    # rest of the block stays compiled, and every call runs the same code.
    @torch.compiler.disable
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.runtime.unit_forward(self, args, kwargs)


class _FeederHook(ModelHook):
    """On a module that only feeds unit ``index``: skipped (placeholder) where that unit will be reused."""

    def __init__(self, runtime: RoutedUnits, index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.index = index
        #: Trailing size and dtype of the last real output (a tensor output only; ``None``: always run).
        self.last: tuple[int, torch.dtype] | None = None

    @torch.compiler.disable  # same reason as _UnitHook: the decision is per-step Python state
    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.last is not None and self.runtime.will_reuse(self.index):
            size, dtype = self.last
            return _placeholder(_first_tensor(args, kwargs), 0 if self.runtime.zero_width else size, dtype)
        output = self.fn_ref.original_forward(*args, **kwargs)
        self.last = (output.shape[-1], output.dtype) if isinstance(output, torch.Tensor) else None
        return output


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("a feeder module was called without a tensor input")


def _placeholder(like: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor with the leading dims of the feeder's input ``like`` and trailing size ``size``: the
    reused unit ignores its input, so the values never matter and no memory is written.

    ``size`` 0 (eager blocks) makes every op between the feeders and the unit free: with the real width, Flux's
    GELU and concatenation on the placeholder kept the flow speed tier at 0.838 of the MACs ratio end to end. The
    real width (compiled blocks) keeps the shapes a compiled block was traced with: a zero width would recompile
    Diffusers' hook wrapper frames, which every hooked module type already recompiles once, past Dynamo's limit.
    It is contiguous like a real output (not an expanded scalar), so the strides match too."""
    return torch.empty((*like.shape[:-1], size), dtype=dtype, device=like.device)


def _as_tuple(output: Any) -> tuple[tuple[torch.Tensor | None, ...], bool]:
    if isinstance(output, tuple):
        return tuple(output), True
    return (output,), False


def _mix(fresh: tuple, cached: tuple, r: torch.Tensor) -> tuple:
    return tuple(None if f is None or c is None else r * f + (1 - r) * c.to(f.dtype) for f, c in zip(fresh, cached,
                                                                                                      strict=True))


class RoutedUnits:
    """Unit hooks and their stores. :meth:`hooks` gives ``(module, hook)`` pairs for the session's
    ``register_hook`` (inference); :meth:`install` registers them directly (training)."""

    def __init__(self, units: list[tuple[str, torch.nn.Module]],
                 feeders: dict[str, list[tuple[str, torch.nn.Module]]] | None = None) -> None:
        self.names = [name for name, _ in units]
        #: ``(unit index, feeder module)`` for every feeder (``ModelAdapter.unit_feeders``).
        self.feeders = [(i, module) for i, name in enumerate(self.names) for _, module in (feeders or {}).get(name, [])]
        #: Unit name → its feeders' names (what ``measure_unit_macs_shares`` adds to the unit's MACs).
        self.feeder_names = {name: [n for n, _ in found] for name, found in (feeders or {}).items()}
        self.modules = [module for _, module in units]
        self.whole_block = [is_whole_block(name) for name in self.names]
        self.stores = [RowStore() for _ in units]
        self._tuple_output = [False] * len(units)
        self.mode = "fill"
        self.compute: list[bool] | None = None  # per unit, for "hard"
        self.keep: list[bool] | None = None  # per unit: store the output (a later step reuses it); None: always
        self.scores: torch.Tensor | None = None  # [U] for "soft"
        self.store_threshold = 0.1
        self.rows: list[tuple[str, int]] = []
        #: Feeders of a reused unit return zero-width placeholders (False: the real width; for compiled blocks).
        self.zero_width = True
        self.computed = 0
        self.reused = 0
        #: Which units computed since the last :meth:`set_step` (the schedule as executed).
        self.executed = [False] * len(units)
        self._installed: list[tuple[torch.nn.Module, str]] = []

    def __len__(self) -> int:
        return len(self.modules)

    @classmethod
    def for_pipeline(cls, adapter: Any, pipe: Any, attr: str | None = None) -> RoutedUnits:
        """The adapter's routing units of ``pipe`` (or its expert ``attr``) with their feeders."""
        return cls(adapter.routing_units(pipe, attr), adapter.unit_feeders(pipe, attr))

    def hooks(self) -> list[tuple[torch.nn.Module, ModelHook]]:
        units = [(m, _UnitHook(self, i, self.whole_block[i])) for i, m in enumerate(self.modules)]
        return units + [(m, _FeederHook(self, i)) for i, m in self.feeders]

    def install(self, name: str = "diffusion_accel.router_training") -> RoutedUnits:
        """Register the hooks directly (training); :meth:`uninstall` removes them."""
        for module, hook in self.hooks():
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
            self._installed.append((module, name))
        return self

    def uninstall(self) -> None:
        for module, name in reversed(self._installed):
            registry = hook_registry(module)
            if registry is not None:
                registry.remove_hook(name, recurse=False)
        self._installed.clear()

    def reset(self) -> None:
        for store in self.stores:
            store.clear()
        self.computed = self.reused = 0

    def set_step(self, mode: str, rows: list[tuple[str, int]], *, compute: list[bool] | None = None,
                 scores: torch.Tensor | None = None, keep: list[bool] | None = None) -> None:
        """The mode of the next forwards. ``compute`` (hard mode) and ``keep`` are per-unit Python lists (read
        once per unit and forward, so no tensor indexing on the hot path); ``keep[u]`` False skips storing an output
        no later step reuses."""
        if mode not in MODES:
            raise ValueError(f"unknown routing mode {mode!r}; one of {MODES}")
        self.mode, self.rows, self.compute, self.scores, self.keep = mode, list(rows), compute, scores, keep
        self.executed = [False] * len(self.modules)

    # ------------------------------------------------------------------ one unit
    def _value(self, hook: _UnitHook, args: tuple, kwargs: dict, output: Any) -> tuple:
        """What is cached: a branch's output, or a whole block's deviation h_out − h_in."""
        if not hook.whole_block:
            value, is_tuple = _as_tuple(output)
            self._tuple_output[hook.index] = is_tuple
            return value
        return deviation(hook.io.outputs(output), hook.io.inputs(args, kwargs))

    def _output(self, hook: _UnitHook, args: tuple, kwargs: dict, value: tuple) -> Any:
        if not hook.whole_block:
            return value if self._tuple_output[hook.index] else value[0]
        return hook.io.make_output(*add_deviation(hook.io.inputs(args, kwargs), value))

    def will_reuse(self, index: int) -> bool:
        """Whether unit ``index`` returns its stored output in the current forward (its feeders then need not run)."""
        return self.mode == "hard" and not self.compute[index] and self.stores[index].has(self.rows)

    def unit_forward(self, hook: _UnitHook, args: tuple, kwargs: dict) -> Any:
        index, store, rows = hook.index, self.stores[hook.index], self.rows
        if self.will_reuse(index):
            self.reused += 1
            return self._output(hook, args, kwargs, store.get(rows))
        output = hook.fn_ref.original_forward(*args, **kwargs)
        self.computed += 1
        self.executed[index] = True
        if self.mode == "frozen" or (self.keep is not None and not self.keep[index]):
            return output
        value = self._value(hook, args, kwargs, output)
        if self.mode == "soft" and store.has(rows):
            r = self.scores[index]
            value = _mix(value, store.get(rows), r)
            if float(r.detach()) > self.store_threshold:
                store.put(rows, tuple(None if v is None else v.detach() for v in value))
            return self._output(hook, args, kwargs, value)
        store.put(rows, tuple(None if v is None else v.detach() for v in value))
        return output
