"""Pure matrix functions (no optax): batched over leading dims, jit-safe."""

from optax_lite.linalg.matrices import (MatrixDims, MatrixView, default_dims,
                                        fan_in_out, matrix_view)
from optax_lite.linalg.polar import (METHODS as POLAR_METHODS, coefficients,
                                     newton_schulz, polar_factor, polar_svd)
from optax_lite.linalg.roots import ROOT_METHODS, inverse_root, symmetrize
from optax_lite.linalg.subspace import (adapt_threshold, exact_sharp_projector, sharp_projector, soft_mask, spectral_filter)
from optax_lite.linalg import distributed
from optax_lite.linalg.diagnostics import (DiagonalDominance, condition_number, diagonal_dominance, dominance_ratios, leaf_diagonal_dominance)
from optax_lite.linalg.eigenbasis import eigenbasis_init, eigenbasis_refresh, rayleigh_eigenvalues
from optax_lite.linalg import matmul  # the module: matmul.matmul, POLICY
