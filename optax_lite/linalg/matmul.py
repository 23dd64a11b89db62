r"""The library's one matrix-product entry point and its precision policy.

Every matrix product in ``optax_lite`` goes through :func:`matmul`, which
names the *kernel* it belongs to. The kernel decides the precision used when
the caller (an optimizer's ``precision=`` argument) does not:

* ``"default"`` – the accelerator's default for float32 inputs: one
  bfloat16 pass on a TPU, TensorFloat-32 on a recent NVIDIA GPU, full float32
  on a CPU. Used where the measured error under emulation (below) is harmless.
* ``"float32"`` – ``jax.lax.Precision.HIGHEST``: full float32 everywhere.

Precision policy. The error columns are measured on CPU under
:func:`optax_lite.testing.emulate_matmul_precision` by
``benchmarks/precision_policy.py`` (``results/precision_policy_cpu.json``):
the relative Frobenius error of a representative computation when that
kernel *alone* runs at the accelerator default (all others in float32),
against the computation in float32. A ``float32`` kernel is never rounded,
so its error under the policy is zero; the columns say what it would cost.

================  =========  =======  =======  ===========================
kernel            precision  bf16     tf32     measured on
================  =========  =======  =======  ===========================
``polar``         default    1.1e-2   1.4e-3   Polar Express, cond 1e2
``lite_filter``   default    1.3e-2   2.2e-3   sharp projector ``P``
``lite_project``  default    1.5e-4   1.9e-5   muon_lite update (``P x``)
``whiten``        default    4.8e-3   6.0e-4   fismo update, cond 1e3
``inverse_root``  float32    8.6e-2   9.2e-3   Newton root, cond 1e3
``kron``          float32    1.2e-1   1.2e-1   soap update (rotations)
``eigenbasis``    float32    4.3e-2   2.6e-2   soap update (power step)
``diagnostics``   float32    –        –        diagnostics' Gram matrices
================  =========  =======  =======  ===========================

Why: each ``default`` kernel adds less error than the Newton–Schulz
iteration itself. The LITE filter's decisions survive one bfloat16 pass
(‖P‖²_F = 8.00 on a gapped spectrum with 8 sharp directions in float32 and
under both emulations; 9.95 vs 9.97 on a Gaussian matrix with τ between σ₁₀
and σ₁₁), and FISMO's whitening adds 0.3–0.5% to its update against the
polar factor's 1.7–2.2% (bfloat16). The inverse roots (8.6% for 30 Newton
iterations at bfloat16) and SOAP's rotations and eigenbasis (12% of SOAP's
update even at TF32) stay in float32.

The documentation page docs/precision.md has the whole-update errors.

Precision arguments: ``None`` follows the policy; any ``jax.lax.Precision``
(or its string names ``"default"``, ``"high"``, ``"highest"``,
``"bfloat16"``, ``"tensorfloat32"``, ``"float32"``) overrides it.

Emulation (CPU tests): XLA's CPU backend ignores the precision argument, so
:func:`optax_lite.testing.emulate_matmul_precision` enters
``jax.default_matmul_precision(name)`` (which is part of ``jax.jit``'s cache
key, so a function jitted before the context is traced again inside it) and
marks the thread as emulating ``name``. While both hold, :func:`matmul`
rounds the float32 inputs of products whose precision is not ``HIGHEST`` to
the hardware's input format and multiplies them at full precision with
float32 accumulation, as the hardware does:

* ``"bfloat16"`` (a TPU): ``DEFAULT`` → 8-bit significand (bfloat16);
  ``HIGH`` (three bfloat16 passes) → 16-bit significand.
* ``"tensorfloat32"`` (an NVIDIA GPU): ``DEFAULT`` and ``HIGH`` → 11-bit
  significand (TF32).

Inputs that are not float32 (bfloat16 Newton–Schulz, float64) are never
rounded. Caveat: a jitted function first traced under a *plain*
``jax.default_matmul_precision(name)`` context shares its cache entry with
the emulation of the same ``name`` (and vice versa); call
``jax.clear_caches()`` between the two if you mix them.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import jax.numpy as jnp

from optax_lite import _checks

P = jax.lax.Precision

# kernel -> precision used when the caller passes ``precision=None``.
POLICY: dict[str, Any] = {
    'polar': None,
    'lite_filter': None,
    'lite_project': None,
    'whiten': None,
    'inverse_root': P.HIGHEST,
    'kron': P.HIGHEST,
    'eigenbasis': P.HIGHEST,
    'diagnostics': P.HIGHEST,
}
KERNELS = tuple(POLICY)

EMULATIONS = ('bfloat16', 'tensorfloat32')
# Significand bits (with the implicit one) of the hardware's input format.
_BITS = {
    ('bfloat16', P.DEFAULT): 8,
    ('bfloat16', P.HIGH): 16,
    ('tensorfloat32', P.DEFAULT): 11,
    ('tensorfloat32', P.HIGH): 11,
}

_STATE = threading.local()


def _stack() -> list:
  if not hasattr(_STATE, 'stack'):
    _STATE.stack = []
  return _STATE.stack


def check_precision(name: str, precision) -> Any:
  """Validates a precision argument; returns it as ``None`` or a Precision.

  Tuples of two precisions and ``jax.lax.DotAlgorithmPreset`` values pass
  through unchanged (they are never emulated).
  """
  if precision is None or isinstance(precision, P):
    return precision
  if isinstance(precision, str):
    try:
      return P(precision)
    except ValueError:
      raise ValueError(
          f'{name} must be None, a jax.lax.Precision or one of "default", '
          f'"high", "highest", "bfloat16", "tensorfloat32", "float32"; got '
          f'{precision!r}.') from None
  if isinstance(precision, tuple) or 'DotAlgorithm' in type(precision).__name__:
    return precision
  raise TypeError(f'{name} must be None, a jax.lax.Precision or a string, '
                  f'got {type(precision).__name__}.')


def resolve(kernel: str, precision=None):
  """The precision a kernel's products use: ``precision`` or the policy."""
  _checks.check_choice('kernel', kernel, KERNELS)
  precision = check_precision('precision', precision)
  return POLICY[kernel] if precision is None else precision


@contextlib.contextmanager
def emulating(name: str):
  """Marks this thread as emulating ``name`` (see the module doc)."""
  _checks.check_choice('name', name, EMULATIONS)
  stack = _stack()
  stack.append(name)
  try:
    with jax.default_matmul_precision(name):
      yield
  finally:
    stack.pop()


def active_emulation() -> str | None:
  """The emulated format at trace time, or ``None`` (no emulation)."""
  stack = _stack()
  if not stack:
    return None
  name = stack[-1]
  # The config check keeps a trace consistent with its jit cache key.
  if jax.config.jax_default_matmul_precision != name:
    return None
  return name


def round_significand(x: jax.Array, bits: int) -> jax.Array:
  """Rounds float32 ``x`` to ``bits`` significand bits (nearest, ties even).

  ``bits=8`` gives bfloat16's values, ``bits=11`` TensorFloat-32's. The
  exponent range stays float32's. Inf and NaN pass through.
  """
  if x.dtype != jnp.float32:
    raise TypeError(f'x must be float32, got {x.dtype}.')
  drop = 24 - int(bits)
  if drop <= 0:
    return x
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  half = jnp.uint32((1 << (drop - 1)) - 1)
  odd = (u >> drop) & jnp.uint32(1)
  r = (u + half + odd) & jnp.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
  out = jax.lax.bitcast_convert_type(r, jnp.float32)
  return jnp.where(jnp.isfinite(x), out, x)


def _emulated_bits(precision) -> int | None:
  name = active_emulation()
  if name is None:
    return None
  if precision is None:
    precision = P.DEFAULT
  if not isinstance(precision, P) or precision == P.HIGHEST:
    return None
  return _BITS[(name, precision)]


def matmul(a: jax.Array, b: jax.Array, *, kernel: str, precision=None,
           preferred_element_type=None) -> jax.Array:
  """``a @ b`` (``jnp.matmul`` semantics) at the precision of ``kernel``.

  Args:
    a, b: arrays, batched over leading dims as ``jnp.matmul``.
    kernel: one of :data:`KERNELS`; selects the policy's precision.
    precision: ``None`` (the policy) or an override.
    preferred_element_type: accumulation/output dtype (e.g. float32 for
      bfloat16 inputs), as ``jnp.matmul``.
  """
  precision = resolve(kernel, precision)
  bits = _emulated_bits(precision)
  if bits is not None:
    if a.dtype == jnp.float32:
      a = round_significand(a, bits)
    if b.dtype == jnp.float32:
      b = round_significand(b, bits)
    precision = P.HIGHEST
  return jnp.matmul(a, b, precision=precision,
                    preferred_element_type=preferred_element_type)
