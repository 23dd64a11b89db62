"""optax_lite: matrix-aware optimizers as composable optax transforms.

Layers (each imports only the ones above it in this list):

1. ``optax_lite.linalg``      pure matrix functions (polar factor, filters…)
2. ``optax_lite.transforms``  one ``optax.GradientTransformation`` per idea
3. ``optax_lite.optimizers``  named optimizers (chains + AdamW for the rest)

The most used names of every layer are re-exported here (``ol.muon``,
``ol.orthogonalize``, ``ol.polar_factor``); the subpackages hold the rest.
"""

__version__ = '0.1.0'

# Subpackages and modules, reachable as attributes (``ol.linalg.polar_svd``).
from optax_lite import labels
from optax_lite import linalg
from optax_lite import optimizers
from optax_lite import testing
from optax_lite import transforms

# Parameter labelling: which leaves are matrices.
from optax_lite.labels import LABELS
from optax_lite.labels import flax_matrix_dims
from optax_lite.labels import label_params

# 1. linalg
from optax_lite.linalg import MatrixDims
from optax_lite.linalg import condition_number
from optax_lite.linalg import diagonal_dominance
from optax_lite.linalg import leaf_diagonal_dominance
from optax_lite.linalg import polar_factor
from optax_lite.linalg.distributed import PolarSharding
from optax_lite.linalg.distributed import sharded_init
from optax_lite.linalg.distributed import sharded_polar
from optax_lite.linalg.distributed import state_shardings

# 2. transforms
from optax_lite.transforms import FisherWhitenState
from optax_lite.transforms import HyperballState
from optax_lite.transforms import MomentumState
from optax_lite.transforms import NeuronNormalizeState
from optax_lite.transforms import ShampooState
from optax_lite.transforms import SoapState
from optax_lite.transforms import add_cautious_decayed_weights
from optax_lite.transforms import diagonal_geometry
from optax_lite.transforms import fisher_whiten
from optax_lite.transforms import hyperball_step
# The function; ``optax_lite.transforms.kron_precondition`` is its module.
from optax_lite.transforms.kron_precondition import kron_precondition
from optax_lite.transforms import lite_flat_boost
from optax_lite.transforms import momentum
from optax_lite.transforms import muon_geometry
from optax_lite.transforms import neuron_normalize
from optax_lite.transforms import normuon_geometry
from optax_lite.transforms import orthogonalize
from optax_lite.transforms import place_state
from optax_lite.transforms import portable_state
from optax_lite.transforms import qk_clip
from optax_lite.transforms import row_norm_geometry
from optax_lite.transforms import row_normalize
from optax_lite.transforms import scale_by_shampoo
from optax_lite.transforms import scale_by_shape
from optax_lite.transforms import scale_by_soap
from optax_lite.transforms import soap_geometry

# 3. named optimizers
from optax_lite.optimizers import adamw_lite
from optax_lite.optimizers import beta2_ramp
from optax_lite.optimizers import chi_schedule
from optax_lite.optimizers import fismo
from optax_lite.optimizers import fismo_lite
from optax_lite.optimizers import LiteSchedule
from optax_lite.optimizers import lite_schedule
from optax_lite.optimizers import muon
from optax_lite.optimizers import muon_lite
from optax_lite.optimizers import muonh
from optax_lite.optimizers import normuon
from optax_lite.optimizers import normuon_lite
from optax_lite.optimizers import rmnp
from optax_lite.optimizers import rmnp_lite
from optax_lite.optimizers import shampoo
from optax_lite.optimizers import soap
from optax_lite.optimizers import soap_lite

__all__ = (
    # labels
    'LABELS',
    'flax_matrix_dims',
    'label_params',
    # linalg
    'MatrixDims',
    'PolarSharding',
    'condition_number',
    'diagonal_dominance',
    'leaf_diagonal_dominance',
    'polar_factor',
    'sharded_init',
    'sharded_polar',
    'state_shardings',
    # transforms
    'FisherWhitenState',
    'HyperballState',
    'MomentumState',
    'NeuronNormalizeState',
    'ShampooState',
    'SoapState',
    'add_cautious_decayed_weights',
    'diagonal_geometry',
    'fisher_whiten',
    'hyperball_step',
    'kron_precondition',
    'lite_flat_boost',
    'momentum',
    'muon_geometry',
    'neuron_normalize',
    'normuon_geometry',
    'orthogonalize',
    'place_state',
    'portable_state',
    'qk_clip',
    'row_norm_geometry',
    'row_normalize',
    'scale_by_shampoo',
    'scale_by_shape',
    'scale_by_soap',
    'soap_geometry',
    # optimizers
    'adamw_lite',
    'beta2_ramp',
    'chi_schedule',
    'LiteSchedule',
    'lite_schedule',
    'fismo',
    'fismo_lite',
    'muon',
    'muon_lite',
    'muonh',
    'normuon',
    'normuon_lite',
    'rmnp',
    'rmnp_lite',
    'shampoo',
    'soap',
    'soap_lite',
)
