"""GradientTransformations, one idea each (NamedTuple state, pure init/update)."""

from optax_lite.transforms.momentum import MomentumState, momentum
from optax_lite.transforms.orthogonalize import orthogonalize
from optax_lite.transforms.scaling import scale_by_shape
from optax_lite.transforms.lite import (Geometry, LeafDirections, LiteState, diagonal_geometry, lite_flat_boost, muon_geometry)
from optax_lite.transforms.row_normalize import row_normalize
from optax_lite.transforms.fisher_whiten import FisherWhitenState, fisher_whiten
