"""Asks XLA for 8 host (CPU) devices; import it before JAX.

Shared by the 8-device benchmarks (``distributed.py``,
``distributed_polar.py``): importing this module defaults ``JAX_PLATFORMS``
to ``cpu`` and adds ``--xla_force_host_platform_device_count=8`` to
``XLA_FLAGS`` unless a device count is already set there. It must run before
``jax`` is first imported, so it imports nothing but ``os`` and ``sys``.

Not under pytest: a test module that imports a benchmark's helpers (e.g.
``distributed.collectives``) is imported at collection by every pytest
process, and the single-device run would otherwise get 8 devices (the
multi-device run sets its own ``XLA_FLAGS``).
"""

import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if ('pytest' not in sys.modules and 'xla_force_host_platform_device_count'
    not in os.environ.get('XLA_FLAGS', '')):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
