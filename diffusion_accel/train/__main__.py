"""``python -m diffusion_accel.train`` / ``accelerate launch -m diffusion_accel.train``."""

import sys

from .cli import main

sys.exit(main())
