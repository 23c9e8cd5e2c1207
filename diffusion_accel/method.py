"""The runtime side of a method: what it attaches to a pipeline and how it resets between calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import MethodConfig
    from .session import AccelSession


class Method:
    """Base class of a method attached to a pipeline.

    A method registers its hooks through :meth:`AccelSession.register_hook`, so that the session removes them
    on :func:`diffusion_accel.remove` in reverse order; :meth:`detach` only undoes anything else it changed.
    """

    #: Hooks of Diffusers' own caches read ``CacheContext``; the session then sets one on pipelines that don't.
    uses_diffusers_cache_context: bool = False
    #: Methods on the denoiser itself run from outermost (low) to innermost (high) priority.
    priority: int = 50

    def __init__(self, config: MethodConfig) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def attach(self, session: AccelSession) -> None:
        raise NotImplementedError

    def detach(self, session: AccelSession) -> None:
        """Undo changes made outside :meth:`AccelSession.register_hook` (hooks themselves are removed for you)."""

    def on_call_begin(self, session: AccelSession) -> None:
        """Reset per-call state (every pipeline call starts fresh)."""

    def on_call_end(self, session: AccelSession) -> None:
        """Called after every pipeline call; may add entries to ``session.stats.extra``."""

    def on_stage_begin(self, session: AccelSession) -> None:
        """Called when the scheduler is re-timed within a call (a new resolution stage)."""
        self.on_call_begin(session)

    def wrap_call(self, session: AccelSession, call: Callable[..., Any], pipe: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one whole pipeline call: ``call(pipe, *args, **kwargs)``, or anything that re-shapes it.

        The extension point for methods that change the call itself rather than the denoiser's forwards (bottleneck
        sampling runs it once per resolution stage). The session chains every method's ``wrap_call`` in method
        order, each around the next, with the pipeline's own ``__call__`` innermost; ``session.call_args`` holds the
        bound arguments of the call. The default runs the call unchanged.
        """
        return call(pipe, *args, **kwargs)
