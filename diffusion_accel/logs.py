"""Third-party verbosity: the command line shows our progress and results; Diffusers', Transformers', cache-dit's
and PyTorch's chatter (loading bars, per-step progress bars, INFO lines, deprecation warnings) only with
``--verbose``.

Library users are not affected unless they call :func:`quiet_third_party` themselves: a library that silences
other libraries on import would hide warnings its users need.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

_STATE = {"quiet": False}
#: Packages whose warnings (deprecations, torchvision fallbacks, meshgrid notes) are hidden in quiet mode.
_NOISY_MODULES = r"(torch|diffusers|transformers|huggingface_hub|accelerate|cache_dit)(\.|$)"


def quiet_third_party() -> None:
    """Silence Diffusers, Transformers and cache-dit below ERROR, their progress bars, and third-party warnings;
    pipelines loaded afterwards through :func:`~diffusion_accel.load_pipeline` run without a progress bar."""
    _STATE["quiet"] = True
    # read at import time by these packages: set before they are first imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    warnings.filterwarnings("ignore", module=_NOISY_MODULES)
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    cache_dit_logger = sys.modules.get("cache_dit.logger")
    if cache_dit_logger is not None:  # imported before us: its handler already has the old level
        handler = getattr(cache_dit_logger, "_default_handler", None)
        if handler is not None:
            handler.setLevel(logging.ERROR)


def is_quiet() -> bool:
    """True after :func:`quiet_third_party` in this process."""
    return _STATE["quiet"]


def configure_pipeline(pipe: Any) -> Any:
    """Turn off ``pipe``'s per-step progress bar in quiet mode (Diffusers has no global switch for it)."""
    if is_quiet() and hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
