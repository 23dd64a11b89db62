"""GradientTransformations, one idea each (NamedTuple state, pure init/update)."""

from optax_lite.transforms.momentum import MomentumState, momentum
from optax_lite.transforms.orthogonalize import orthogonalize
from optax_lite.transforms.scaling import scale_by_shape
