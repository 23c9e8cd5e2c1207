"""``python -m diffusion_accel.eval`` (and ``accelerate launch -m diffusion_accel.eval``): the eval command line."""

import sys

from .cli import main

sys.exit(main())
