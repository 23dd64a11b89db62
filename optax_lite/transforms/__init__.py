"""GradientTransformations, one idea each (NamedTuple state, pure init/update)."""

from optax_lite.transforms.momentum import MomentumState, momentum
from optax_lite.transforms.orthogonalize import orthogonalize
from optax_lite.transforms.scaling import scale_by_shape
from optax_lite.transforms.lite import (Geometry, LeafDirections, LiteState, diagonal_geometry, lite_flat_boost, muon_geometry)
from optax_lite.transforms.row_normalize import row_normalize
from optax_lite.transforms.fisher_whiten import FisherWhitenState, fisher_whiten
from optax_lite.transforms.lite_geometries import row_norm_geometry, soap_geometry
from optax_lite.transforms.kron_precondition import (ShampooState, SoapDirection, SoapLeaf, SoapState, kron_precondition, rotate, rotate_back, scale_by_shampoo, scale_by_soap, soap_direction, soap_init_bases, soap_leaf_update, soap_refresh_bases, update_factors)
