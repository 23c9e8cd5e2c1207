"""Built-in methods. Importing this package registers them by name."""

from . import (  # noqa: F401
    adaptive_guidance,
    bottleneck,
    cache_dit_peer,
    delta_cache,
    diffusers_caches,
    harmonica,
    linear_ag,
    sparse_attention,
)
