"""How close LITE's two matmul-only sharp projectors are to the exact one.

Muon-LITE's sharp projector ``P`` (fan-in side of a ``(fan_in, fan_out)``
matrix ``M``) onto the singular vectors with ``σ > τ`` is built either on
the small side of the polar decomposition (``filter_route="small_side"``,
the library default) or as the LITE reference code does
(``filter_route="reference"``: ``T = ½(polar(M) + polar(M/τ − polar(M)))``,
``P = T Tᵀ``). Both use Polar Express (6 steps) in float32. For 24 Gaussian
matrices of several shapes, ``τ`` is put halfway (geometric mean) between
the ``d_s``-th and ``(d_s+1)``-th singular values, ``d_s`` the geometry's
target, and each ``P`` is compared with the SVD projector onto the top
``d_s`` singular vectors in the spectral norm.

  python benchmarks/lite_filter_accuracy.py

Prints the median, 90th percentile and worst error of each route (quoted
in the docstring of ``optax_lite.muon_geometry``). Seconds on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import optax_lite as ol
from optax_lite.linalg import matrix_view, subspace
from optax_lite.transforms.lite import sharp_dim

SHAPES = [(64, 64), (128, 64), (64, 128), (256, 64), (64, 256), (96, 160)]


def errors(route: str, seeds=(0, 1, 2, 3)) -> list[float]:
  geo = ol.muon_geometry(filter_route=route)
  out = []
  for seed in seeds:
    for shape in SHAPES:
      m = jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)
      s = np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)
      d_s = sharp_dim(0.1, *shape, 'reference')
      tau = float(np.sqrt(s[d_s - 1] * s[d_s]))
      view = matrix_view(shape)
      ratio = jnp.asarray([tau / float(jnp.linalg.norm(m))], jnp.float32)
      d = geo.directions(view, m, m, (ratio,), jnp.int32(1), False)
      eye = jnp.eye(shape[0], dtype=jnp.float32)[None]
      p = np.asarray((eye - d.flat(eye))[0], np.float64)
      exact = np.asarray(subspace.exact_sharp_projector(
          jnp.asarray(m, jnp.float32), d_s), np.float64)
      out.append(float(np.linalg.norm(p - exact, 2)))
  return out


def main():
  for route in ('small_side', 'reference'):
    e = errors(route)
    print(f'{route:>10}: n={len(e)} median {np.median(e):.2e} '
          f'90th percentile {np.percentile(e, 90):.2e} worst {max(e):.2e}')
  a, b = np.array(errors('small_side')), np.array(errors('reference'))
  print(f'small_side more accurate on {int(np.sum(a < b))} of {len(a)}')


if __name__ == '__main__':
  main()
