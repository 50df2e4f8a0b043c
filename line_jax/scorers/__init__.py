"""Feature-space OOD scorers behind one interface, by canonical name.

    scorer = line_jax.scorers.get("react")
    state = scorer.fit(train_features, train_labels, kernel, bias, percentile=90)
    scores = scorer.score(state, test_features)   # [batch], higher = more ID

Every scorer sees pooled penultimate features and the head (`kernel:
[features, classes]` in Flax layout, `bias: [classes]`), never the network;
ODIN, which needs the network, is `line_jax.odin`. `fit_from_batches` fits
the same state from an iterable of `(features, labels)` batches.
"""

from line_jax.scorers._ash import AshBState
from line_jax.scorers._ash import AshPState
from line_jax.scorers._ash import AshSState
from line_jax.scorers._common import HeadState
from line_jax.scorers._dice import DiceState
from line_jax.scorers._energy import EnergyState
from line_jax.scorers._entropy import EntropyState
from line_jax.scorers._fdbd import FdbdState
from line_jax.scorers._gen import GenState
from line_jax.scorers._gradnorm import GradNormState
from line_jax.scorers._klm import KlmState
from line_jax.scorers._knn import KnnState
from line_jax.scorers._mahalanobis import MahalanobisState
from line_jax.scorers._maxlogit import MaxLogitState
from line_jax.scorers._msp import MspState
from line_jax.scorers._nci import NciState
from line_jax.scorers._nnguide import NnguideState
from line_jax.scorers._quantile import TrainPercentile
from line_jax.scorers._react import ReactState
from line_jax.scorers._react_dice import ReactDiceState
from line_jax.scorers._registry import get
from line_jax.scorers._registry import name_of
from line_jax.scorers._registry import names
from line_jax.scorers._registry import resolved_hparams
from line_jax.scorers._registry import Scorer
from line_jax.scorers._rmds import RmdsState
from line_jax.scorers._scale import ScaleState
from line_jax.scorers._shaping import ShapingState
from line_jax.scorers._she import SheState
from line_jax.scorers._vim import VimState
from line_jax.scorers._weiper import WeiperState
from line_jax.scorers._openmax import OpenmaxState
from line_jax.scorers._relation import RelationState
from line_jax.scorers._cfood import CfoodState
from line_jax.scorers._optfs import OptfsState
from line_jax.scorers._caref import CarefState
from line_jax.scorers._caref import CadrefState
from line_jax.scorers._vra import VraState
from line_jax.scorers._temp_scaling import TempScalingState
from line_jax.scorers._residual import ResidualState
from line_jax.scorers._pnml import PnmlState
from line_jax.scorers._neco import NecoState
from line_jax.scorers._mcm import McmState
from line_jax.scorers._lts import LtsState

__all__ = (
    "AshBState",
    "AshPState",
    "AshSState",
    "DiceState",
    "EnergyState",
    "EntropyState",
    "FdbdState",
    "GenState",
    "GradNormState",
    "HeadState",
    "KlmState",
    "KnnState",
    "MahalanobisState",
    "MaxLogitState",
    "MspState",
    "NciState",
    "NnguideState",
    "ReactDiceState",
    "ReactState",
    "RmdsState",
    "ScaleState",
    "Scorer",
    "TrainPercentile",
    "ShapingState",
    "SheState",
    "VimState",
    "WeiperState",
    "OpenmaxState",
    "RelationState",
    "CfoodState",
    "OptfsState",
    "CarefState",
    "CadrefState",
    "VraState",
    "TempScalingState",
    "ResidualState",
    "PnmlState",
    "NecoState",
    "McmState",
    "LtsState",
    "get",
    "name_of",
    "names",
    "resolved_hparams",
)
