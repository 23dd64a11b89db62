"""Test utilities: run the library's matmuls at an accelerator's precision.

On a CPU, XLA computes every float32 matrix product in full float32 whatever
``precision`` says, while a TPU's default is one bfloat16 pass and an NVIDIA
GPU's is TensorFloat-32. :func:`emulate_matmul_precision` lets CPU tests see
the accelerator's numerics::

  with optax_lite.testing.emulate_matmul_precision('bfloat16'):
    updates, state = jax.jit(tx.update)(grads, state, params)

Inside the context every ``optax_lite`` matrix product whose precision (see
:mod:`optax_lite.linalg.matmul` for the per-kernel policy) is not
``HIGHEST`` rounds its float32 inputs to the hardware's format — bfloat16
(8-bit significand) or TF32 (11-bit) — and accumulates in float32. It takes
effect under ``jax.jit``: the context also enters
``jax.default_matmul_precision(name)``, which is part of jit's cache key, so
functions jitted before the context are traced again inside it. Outside the
context nothing changes. Only the library's products are emulated, not the
products of the user's model.
"""

from __future__ import annotations

import contextlib

from optax_lite.linalg import matmul as _matmul

EMULATIONS = _matmul.EMULATIONS


@contextlib.contextmanager
def emulate_matmul_precision(name: str):
  """Context manager: ``name`` is ``"bfloat16"`` or ``"tensorfloat32"``.

  Raises:
    ValueError: any other ``name``.
  """
  if not isinstance(name, str) or name not in EMULATIONS:
    raise ValueError(f'name must be one of {EMULATIONS}, got {name!r}.')
  with _matmul.emulating(name):
    yield
