"""Sparsity methods, one per file, each an optax ``GradientTransformation``."""

from optg_jax.methods import base
from optg_jax.methods import final
from optg_jax.methods import magnitude
from optg_jax.methods import optg
