"""diffusion-accel: make Hugging Face Diffusers pipelines faster with one call.

>>> import diffusion_accel as da
>>> pipe = da.load_pipeline("tiny:pixart_alpha")
>>> handle = da.apply(pipe, "fbcache", threshold=0.1)
>>> image = pipe("a red circle", num_inference_steps=4, height=32, width=32).images[0]
>>> print(da.stats(pipe))  # NFE, blocks run per step, time per step
>>> da.remove(pipe)        # outputs are bit-identical to the untouched pipeline again
"""

from .api import AccelHandle, accelerated, apply, list_methods, remove, stats
from .config import MethodConfig, get_config_class, parse_config, register_method, registered_methods
from .context import StepContext
from .loading import load_pipeline
from .method import Method
from .pipelines.adapters import ModelAdapter, find_adapter, register_adapter

__version__ = "0.1.0"

__all__ = [
    "AccelHandle",
    "Method",
    "MethodConfig",
    "ModelAdapter",
    "StepContext",
    "accelerated",
    "apply",
    "find_adapter",
    "get_config_class",
    "list_methods",
    "load_pipeline",
    "parse_config",
    "register_adapter",
    "register_method",
    "registered_methods",
    "remove",
    "stats",
]
