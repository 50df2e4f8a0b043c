"""Images to features: any network, one extraction loop, one cache.

`Backbone` carries a network, its variables, normalisation, head and
preprocessing; `Backbone.run` is the one jitted, dispatch-ahead extraction
loop, `Backbone.read` reads a set's features through `cache` (shared by
`fit`, `tune` and `evaluate`), and `Backbone.stream` gives the re-iterable
`(features, labels)` batches `Scorer.fit_from_batches` takes. `extract`,
`iter_extract` and `iter_extract_batches` are the same loop as functions of a
model and its variables.
"""

from line_jax.features import cache
from line_jax.features._backbone import Backbone
from line_jax.features._backbone import FeatureStream
from line_jax.features._backbone import TORCH_INPUTS
from line_jax.features._extract import BATCH_AXIS
from line_jax.features._extract import IMAGES_PER_CALL
from line_jax.features._extract import extract
from line_jax.features._extract import iter_extract
from line_jax.features._extract import iter_extract_batches
from line_jax.features._extract import network_outputs

__all__ = (
    "BATCH_AXIS",
    "Backbone",
    "FeatureStream",
    "IMAGES_PER_CALL",
    "TORCH_INPUTS",
    "cache",
    "extract",
    "iter_extract",
    "iter_extract_batches",
    "network_outputs",
)
