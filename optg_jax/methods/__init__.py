"""Sparsity methods, one per file, each an optax ``GradientTransformation``, and the public
building blocks they are made of: :func:`~optg_jax.methods.pruner.scored_pruner` (masks from a
score of the weights), :func:`~optg_jax.methods.scores.trainable_scores` (supermask training),
:class:`~optg_jax.methods.selection.Selection` (pool, budget, top-k kind) and the state protocol
of :mod:`optg_jax.methods.base`."""

from optg_jax.methods import base
from optg_jax.methods import continuous_sparsification
from optg_jax.methods import edge_popup
from optg_jax.methods import gmp
from optg_jax.methods import lottery
from optg_jax.methods import magnitude
from optg_jax.methods import optg
from optg_jax.methods import pruner
from optg_jax.methods import random_pruning
from optg_jax.methods import rst
from optg_jax.methods import rounds
from optg_jax.methods import scores
from optg_jax.methods import selection
from optg_jax.methods import signed_supermask
from optg_jax.methods import snip
