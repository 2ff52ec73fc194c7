"""optg_jax: sparse neural network training for JAX/Flax/optax (OptG and its family)."""

from optg_jax import distributions
from optg_jax import masks
from optg_jax import methods
from optg_jax import parallel
from optg_jax import schedules
from optg_jax import select
from optg_jax.masks import apply_masks
from optg_jax.masks import sparsity_summary
from optg_jax.methods.base import effective_params
from optg_jax.methods.base import get_masks
from optg_jax.methods.final import final_masks
from optg_jax.methods.final import with_masks
from optg_jax.methods.magnitude import gmp
from optg_jax.methods.magnitude import magnitude
from optg_jax.methods.magnitude import random_pruning
from optg_jax.methods.magnitude import snip
from optg_jax.methods.optg import mask_optimizer

__version__ = "0.1.0"

__all__ = (
    "apply_masks",
    "distributions",
    "effective_params",
    "final_masks",
    "get_masks",
    "gmp",
    "magnitude",
    "mask_optimizer",
    "masks",
    "methods",
    "parallel",
    "random_pruning",
    "schedules",
    "select",
    "snip",
    "sparsity_summary",
    "with_masks",
)
