"""Named optimizers: chains of transforms, AdamW for non-matrix leaves."""

from optax_lite.optimizers.muon import muon
