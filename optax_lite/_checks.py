"""Argument validation shared by every layer.

Each helper raises a ``ValueError`` (or ``TypeError``) that names the offending
parameter, so that bad hyperparameters fail at construction time instead of
turning into NaNs inside a jitted step.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp


def is_static_number(x: Any) -> bool:
  """True for Python / NumPy scalars whose value is known at trace time."""
  if callable(x):
    return False
  try:
    float(x)
  except (TypeError, ValueError):
    return False
  except Exception:  # a traced value: cannot be checked statically
    return False
  return True


def check_number(name: str, x: Any, *, low=None, high=None,
                 low_open=False, high_open=False, allow_schedule=False):
  """Checks that ``x`` lies in the given interval when it is a static number.

  Schedules (callables) pass when ``allow_schedule``; traced values pass
  unchecked (they come from ``inject_hyperparams``).
  """
  if callable(x):
    if allow_schedule:
      return
    raise TypeError(f'{name} must be a number, got a callable {x!r}.')
  if isinstance(x, bool):
    raise TypeError(f'{name} must be a number, got bool {x!r}.')
  if not is_static_number(x):
    if hasattr(x, 'shape') or hasattr(x, 'dtype'):
      return  # traced / array hyperparameter: checked at run time only
    raise TypeError(f'{name} must be a number, got {type(x).__name__}.')
  v = float(x)
  if math.isnan(v):
    raise ValueError(f'{name} must not be NaN.')
  if low is not None and (v < low or (low_open and v == low)):
    bracket = '(' if low_open else '['
    raise ValueError(f'{name} must be {">" if low_open else ">="} {low} '
                     f'(interval {bracket}{low}, {high}), got {x}.')
  if high is not None and (v > high or (high_open and v == high)):
    raise ValueError(f'{name} must be {"<" if high_open else "<="} {high}, '
                     f'got {x}.')


def check_decay(name: str, x: Any, *, allow_one: bool = False):
  """A decay rate in [0, 1) (or [0, 1] with ``allow_one``)."""
  check_number(name, x, low=0.0, high=1.0, high_open=not allow_one)


def check_positive(name: str, x: Any, *, allow_zero=False,
                   allow_schedule=False):
  check_number(name, x, low=0.0, low_open=not allow_zero,
               allow_schedule=allow_schedule)


def check_int(name: str, x: Any, *, low: int = 1):
  if hasattr(x, 'shape') and hasattr(x, 'dtype') and not isinstance(
      x, (int, float)):
    # An array or traced value, e.g. from optax.inject_hyperparams, which
    # turns every numeric argument into an array.
    raise TypeError(
        f'{name} is structural (an int fixed when the transform is built) and '
        f'cannot be an array or traced value; with optax.inject_hyperparams '
        f'pass static_args=({name!r},).')
  if isinstance(x, bool) or not isinstance(x, (int,)) and not (
      hasattr(x, '__index__') and not hasattr(x, 'shape')):
    raise TypeError(f'{name} must be an int, got {type(x).__name__} {x!r}.')
  if int(x) < low:
    raise ValueError(f'{name} must be >= {low}, got {x}.')


def _is_array_like(x: Any) -> bool:
  return (hasattr(x, 'shape') and hasattr(x, 'dtype')
          and not isinstance(x, (int, float)))


def check_structural(**values) -> None:
  """One ``TypeError`` naming *every* structural int given as an array.

  ``optax.inject_hyperparams`` turns each numeric argument into an array,
  but some ints decide shapes or Python control flow (``steps``,
  ``total_steps``, ...). Checking them together means one run tells the
  user the whole ``static_args`` tuple, not one name per run. ``None``
  (the default) always passes.
  """
  bad = tuple(k for k, v in values.items()
              if v is not None and _is_array_like(v))
  if bad:
    raise TypeError(
        f'{", ".join(bad)}: structural ints (fixed when the optimizer is '
        'built) cannot be arrays or traced values; with '
        f'optax.inject_hyperparams pass static_args={bad!r}.')


def dtype_argument(name: str, x: Any, *, allow_none: bool = False):
  """``jnp.dtype(x)`` for a dtype argument, which is structural (static).

  ``optax.inject_hyperparams`` treats every callable argument as a schedule,
  and a dtype class such as ``jnp.bfloat16`` is callable: it then arrives
  here as an array (of the hyperparameters' dtype, not the one meant).
  That is refused, naming the parameter; defaults are strings (not callable,
  so never injected).
  """
  if x is None and allow_none:
    return None
  if hasattr(x, 'shape') and not isinstance(x, (str, type, jnp.dtype)):
    raise TypeError(
        f'{name} is a dtype, fixed when the transform is built, and cannot '
        f'be an array or traced value; with optax.inject_hyperparams pass it '
        f"as a string (e.g. 'bfloat16': a dtype class is callable and is "
        f'taken for a schedule) or static_args=({name!r},).')
  try:
    dt = jnp.dtype(x)
  except TypeError as e:
    raise TypeError(f'{name} must be a dtype, got {x!r}.') from e
  # Every dtype argument is a state's or an iterate's: an integer one would
  # truncate the optimizer's statistics without a word.
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f'{name} must be a floating dtype, got {dt}.')
  return dt


def check_flag(name: str, x: Any) -> bool:
  """A structural on/off switch: a Python bool (not an array or tracer;
  a string such as ``"false"`` would read as true)."""
  if not isinstance(x, bool):
    raise TypeError(
        f'{name} must be a Python bool, got {type(x).__name__} {x!r} (with '
        f'optax.inject_hyperparams pass static_args=({name!r},)).')
  return x


def check_choice(name: str, x: Any, choices: Sequence[str]):
  if x not in choices:
    raise ValueError(f'{name} must be one of {tuple(choices)}, got {x!r}.')


def check_learning_rate(name: str, x: Any):
  """A learning rate: a non-negative float or an optax schedule."""
  check_number(name, x, low=0.0, allow_schedule=True)


def check_float_leaf(name: str, x: Any):
  """Rejects integer, boolean and complex leaves, with what to do instead."""
  dtype = getattr(x, 'dtype', None)
  if dtype is None:
    return
  if jnp.issubdtype(dtype, jnp.floating):
    return
  shape = getattr(x, 'shape', '?')
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(
        f'{name}: optax_lite\'s matrix methods are defined for real '
        f'matrices, got a complex leaf of dtype {dtype} and shape {shape}. '
        'Either store it as two real leaves (its real and imaginary parts, '
        'e.g. jnp.stack([z.real, z.imag])) or send it to AdamW, which '
        'handles complex leaves, with labels=: e.g. labels=lambda p: '
        "ol.label_params(p, overrides={'<path regex>': 'other'}).")
  raise TypeError(
      f'{name}: optax_lite transforms need floating-point leaves, got a '
      f'leaf of dtype {dtype} and shape {shape}. Integer and boolean leaves '
      'cannot be trained: mark them non-trainable (e.g. not an nnx.Param) '
      'or filter them out of the tree given to the optimizer.')


def check_float_tree(name: str, tree: Any) -> None:
  """:func:`check_float_leaf` on every leaf, naming the leaf's path.

  Python ``int``/``bool`` leaves count as integer leaves (``jnp.asarray``
  would make them int32 / bool arrays); Python floats pass, and so do
  complex leaves: AdamW takes them where the labels send them there, and
  the matrix methods refuse them leaf by leaf.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    where = f'{name}{jax.tree_util.keystr(path)}'
    if isinstance(leaf, (bool, int)) and not isinstance(leaf, float):
      raise TypeError(
          f'{where}: optax_lite transforms need floating-point leaves, got '
          f'a Python {type(leaf).__name__} ({leaf!r}). Integer and boolean '
          'leaves cannot be trained: mark them non-trainable (e.g. not an '
          'nnx.Param) or filter them out of the tree given to the optimizer.')
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.complexfloating):
      check_float_leaf(where, leaf)


def resolve(x: Any | Callable[[Any], Any], count) -> Any:
  """Evaluates a ``ScalarOrSchedule`` at ``count``."""
  return x(count) if callable(x) else x


def require_static(why: str = 'it decides the shapes of the optimizer '
                   'state (init under jit)', **values) -> None:
  """Raises a ``TypeError`` naming ``static_args`` for every traced value
  among ``values`` (hyperparameters that must be known when tracing)."""
  traced = tuple(k for k, v in values.items()
                 if isinstance(v, jax.core.Tracer))
  if traced:
    raise TypeError(
        f'{", ".join(traced)}: got a traced value, but {why}. '
        'optax.inject_hyperparams turns every numeric argument into a '
        f'traced hyperparameter: pass static_args={traced!r} to it.')


def int_hyperparameter(name: str, x, low: int):
  """An integer hyperparameter, checked where its value is known.

  A Python int, or a concrete integer scalar array (what
  ``optax.inject_hyperparams`` turns every numeric argument into), is checked
  (``>= low``) and returned as an int; a traced integer (injected under
  ``jit``) is returned as is; a traced non-integer is a ``TypeError``.
  """
  if isinstance(x, jax.core.Tracer):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f'{name} must be an int, got a traced {x.dtype}.')
    return x
  if (hasattr(x, 'shape') and x.shape == ()
      and jnp.issubdtype(x.dtype, jnp.integer)):
    x = int(x)
  check_int(name, x, low=low)
  return int(x)
