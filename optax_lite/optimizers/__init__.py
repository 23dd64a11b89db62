"""Named optimizers: chains of transforms, AdamW for non-matrix leaves."""

from optax_lite.optimizers.fismo import fismo
from optax_lite.optimizers.kron import shampoo
from optax_lite.optimizers.kron import soap
from optax_lite.optimizers.lite import adamw_lite
from optax_lite.optimizers.lite import beta2_ramp
from optax_lite.optimizers.lite import chi_schedule
from optax_lite.optimizers.lite import fismo_lite
from optax_lite.optimizers.lite import muon_lite
from optax_lite.optimizers.lite import rmnp_lite
from optax_lite.optimizers.lite import soap_lite
from optax_lite.optimizers.lite_schedule import LiteSchedule
from optax_lite.optimizers.lite_schedule import lite_schedule
from optax_lite.optimizers.muon import muon
from optax_lite.optimizers.muonh import muonh
from optax_lite.optimizers.normuon import normuon
from optax_lite.optimizers.normuon import normuon_lite
from optax_lite.optimizers.rmnp import rmnp
