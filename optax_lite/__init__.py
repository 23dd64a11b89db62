"""optax_lite: matrix-aware optimizers as composable optax transforms.

Layers (each imports only the ones above it in this list):

1. ``optax_lite.linalg``      pure matrix functions (polar factor, filters…)
2. ``optax_lite.transforms``  one ``optax.GradientTransformation`` per idea
3. ``optax_lite.optimizers``  named optimizers (chains + AdamW for the rest)
"""

__version__ = '0.1.0'

from optax_lite.labels import LABELS, flax_matrix_dims, label_params
from optax_lite.linalg import MatrixDims, polar_factor
from optax_lite.transforms import (MomentumState, momentum, orthogonalize,
                                   scale_by_shape)
from optax_lite.optimizers import muon
# Further exports are appended below, one line per module.
from optax_lite.linalg.distributed import PolarSharding, sharded_init, sharded_polar, state_shardings
from optax_lite import linalg
from optax_lite.transforms.lite import (diagonal_geometry, lite_flat_boost,
                                        muon_geometry)
from optax_lite.optimizers.lite import (adamw_lite, beta2_ramp, chi_schedule,
                                        muon_lite)
from optax_lite.transforms.row_normalize import row_normalize
from optax_lite.transforms.fisher_whiten import FisherWhitenState, fisher_whiten
from optax_lite.optimizers.rmnp import rmnp
from optax_lite.optimizers.fismo import fismo
from optax_lite.linalg.diagnostics import condition_number, diagonal_dominance, leaf_diagonal_dominance
from optax_lite.transforms.lite_geometries import (row_norm_geometry,
                                                   soap_geometry)
from optax_lite.transforms.kron_precondition import ShampooState, SoapState, kron_precondition
from optax_lite.optimizers.kron import shampoo, soap
from optax_lite.optimizers.lite import fismo_lite, rmnp_lite, soap_lite
from optax_lite import testing
