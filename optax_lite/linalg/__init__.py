"""Pure matrix functions (no optax): batched over leading dims, jit-safe."""

from optax_lite.linalg import distributed
from optax_lite.linalg import matmul  # the module: matmul.matmul, POLICY
from optax_lite.linalg.diagnostics import DiagonalDominance
from optax_lite.linalg.diagnostics import condition_number
from optax_lite.linalg.diagnostics import diagonal_dominance
from optax_lite.linalg.diagnostics import dominance_ratios
from optax_lite.linalg.diagnostics import leaf_diagonal_dominance
from optax_lite.linalg.eigenbasis import eigenbasis_init
from optax_lite.linalg.eigenbasis import eigenbasis_refresh
from optax_lite.linalg.eigenbasis import rayleigh_eigenvalues
from optax_lite.linalg.matrices import MatrixDims
from optax_lite.linalg.matrices import MatrixView
from optax_lite.linalg.matrices import default_dims
from optax_lite.linalg.matrices import fan_in_out
from optax_lite.linalg.matrices import matrix_view
from optax_lite.linalg.matrices import path_dims
from optax_lite.linalg.polar import METHODS as POLAR_METHODS
from optax_lite.linalg.polar import coefficients
from optax_lite.linalg.polar import newton_schulz
from optax_lite.linalg.polar import newton_schulz_gram
from optax_lite.linalg.polar import polar_factor
from optax_lite.linalg.polar import polar_svd
from optax_lite.linalg.roots import ROOT_METHODS
from optax_lite.linalg.roots import inverse_root
from optax_lite.linalg.roots import symmetrize
from optax_lite.linalg.subspace import adapt_threshold
from optax_lite.linalg.subspace import exact_sharp_projector
from optax_lite.linalg.subspace import sharp_projector
from optax_lite.linalg.subspace import soft_mask
from optax_lite.linalg.subspace import spectral_filter
