"""optg_jax: sparse neural network training for JAX/Flax/optax (OptG and its family)."""

from optg_jax import distributions
from optg_jax import export
from optg_jax import initializers
from optg_jax import masks
from optg_jax import methods
from optg_jax import multihost
from optg_jax import optimizers
from optg_jax import parallel
from optg_jax import schedules
from optg_jax import select
from optg_jax.masks import apply_masks
from optg_jax.masks import sparsity_summary
from optg_jax.methods.base import effective_params
from optg_jax.methods.base import final_masks
from optg_jax.methods.base import final_params
from optg_jax.methods.base import get_masks
from optg_jax.methods.base import has_state
from optg_jax.methods.base import register_state
from optg_jax.methods.base import with_masks
from optg_jax.methods.continuous_sparsification import continuous_sparsification
from optg_jax.methods.edge_popup import edge_popup
from optg_jax.methods.gmp import gmp
from optg_jax.methods.lottery import lottery_ticket
from optg_jax.methods.magnitude import magnitude
from optg_jax.methods.optg import mask_optimizer
from optg_jax.methods.optg import optg
from optg_jax.methods.pruner import scored_pruner
from optg_jax.methods.random_pruning import random_pruning
from optg_jax.methods.rst import rst
from optg_jax.methods.rounds import rounds
from optg_jax.methods.rounds import sync_rewind
from optg_jax.methods.scores import trainable_scores
from optg_jax.methods.selection import Selection
from optg_jax.methods.signed_supermask import signed_supermask
from optg_jax.methods.snip import snip

__version__ = "0.1.0"

__all__ = (
    "Selection",
    "apply_masks",
    "continuous_sparsification",
    "distributions",
    "edge_popup",
    "effective_params",
    "export",
    "final_masks",
    "final_params",
    "get_masks",
    "gmp",
    "has_state",
    "initializers",
    "lottery_ticket",
    "magnitude",
    "mask_optimizer",
    "masks",
    "methods",
    "multihost",
    "optg",
    "optimizers",
    "parallel",
    "random_pruning",
    "register_state",
    "rst",
    "rounds",
    "schedules",
    "scored_pruner",
    "select",
    "signed_supermask",
    "snip",
    "sparsity_summary",
    "sync_rewind",
    "trainable_scores",
    "with_masks",
)
