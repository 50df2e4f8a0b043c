"""Feature-space OOD scorers behind one interface, by canonical name.

    scorer = line_jax.scorers.get("react")
    state = scorer.fit(train_features, train_labels, kernel, bias, percentile=90)
    scores = scorer.score(state, test_features)   # [batch], higher = more ID

Every scorer sees pooled penultimate features and the head (`kernel:
[features, classes]` in Flax layout, `bias: [classes]`), never the network;
ODIN, which needs the network, is `line_jax.odin`. `fit_from_batches` fits
the same state from an iterable of `(features, labels)` batches.
"""

from line_jax.scorers._common import HeadState
from line_jax.scorers._dice import DiceState
from line_jax.scorers._fdbd import FdbdState
from line_jax.scorers._gen import GenState
from line_jax.scorers._klm import KlmState
from line_jax.scorers._knn import KnnState
from line_jax.scorers._mahalanobis import MahalanobisState
from line_jax.scorers._nci import NciState
from line_jax.scorers._nnguide import NnguideState
from line_jax.scorers._react import ReactState
from line_jax.scorers._react_dice import ReactDiceState
from line_jax.scorers._quantile import TrainPercentile
from line_jax.scorers._registry import Scorer
from line_jax.scorers._registry import get
from line_jax.scorers._registry import names
from line_jax.scorers._registry import resolved_hparams
from line_jax.scorers._rmds import RmdsState
from line_jax.scorers._shaping import ShapingState
from line_jax.scorers._she import SheState
from line_jax.scorers._vim import VimState

__all__ = (
    "DiceState",
    "FdbdState",
    "GenState",
    "HeadState",
    "KlmState",
    "KnnState",
    "MahalanobisState",
    "NciState",
    "NnguideState",
    "ReactDiceState",
    "ReactState",
    "RmdsState",
    "Scorer",
    "TrainPercentile",
    "ShapingState",
    "SheState",
    "VimState",
    "get",
    "names",
    "resolved_hparams",
)
