"""line_jax: LINe out-of-distribution detection in JAX, fused and jitted.

Every score in line_jax follows one convention: higher = more in-distribution.
"""

from line_jax import line
from line_jax import metrics
from line_jax import models
from line_jax import odin
from line_jax import scorers
from line_jax.io import load
from line_jax.io import save

__version__ = "0.1.0"
