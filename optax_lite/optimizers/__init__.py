"""Named optimizers: chains of transforms, AdamW for non-matrix leaves."""

from optax_lite.optimizers.muon import muon
from optax_lite.optimizers.lite import adamw_lite, beta2_ramp, chi_schedule, muon_lite
from optax_lite.optimizers.rmnp import rmnp
from optax_lite.optimizers.fismo import fismo
from optax_lite.optimizers.kron import shampoo, soap
from optax_lite.optimizers.lite import fismo_lite, rmnp_lite, soap_lite
