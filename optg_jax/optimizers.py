"""Score optimizers the papers use that optax does not have as one transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class SGDWState(NamedTuple):
  """State of :func:`sgdw`: ``count`` (int32 scalar) and the Keras-form ``velocity``."""
  count: jax.Array
  velocity: PyTree


def _schedule(value: optax.ScalarOrSchedule):
  return value if callable(value) else (lambda _: value)


def sgdw(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = True,
) -> optax.GradientTransformation:
  """SGD with *decoupled* weight decay and Keras-form momentum (TensorFlow Addons' ``SGDW``).

  Per step ``t``, with ``η_t = learning_rate(t)`` and ``λ_t = weight_decay(t)``::

    v ← μ·v − η_t·g
    update = (μ·v − η_t·g if nesterov else v) − λ_t·params

  The decay is not scaled by the learning rate (``M ← M − λ_t·M``, Loshchilov & Hutter), and
  the learning rate sits inside the momentum (unlike ``optax.sgd``, which scales the trace): the
  two differ whenever ``η`` changes over time. This is the signed supermask's score optimizer
  (Koster et al. 2022), with ``η`` and ``λ`` both decayed as ``0.9^(t/(10·spe))``
  (``optax.exponential_decay(η0, 10·spe, 0.9)``).

  Args:
    learning_rate: ``η``, a float or an optax schedule of the step.
    weight_decay: ``λ``, a float or a schedule; decays the ``params`` passed to ``update``.
    momentum: ``μ``.
    nesterov: Nesterov momentum (the Keras form above).

  Returns:
    An ``optax.GradientTransformation`` with a :class:`SGDWState`; ``update`` needs ``params``.
  """
  lr, wd = _schedule(learning_rate), _schedule(weight_decay)

  def init_fn(params):
    return SGDWState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("sgdw needs the params for its decoupled weight decay")
    eta, decay = lr(state.count), wd(state.count)
    velocity = jax.tree.map(lambda v, g: momentum * v - eta * g, state.velocity, updates)
    step = (jax.tree.map(lambda v, g: momentum * v - eta * g, velocity, updates) if nesterov
            else velocity)
    updates = jax.tree.map(lambda s, p: s - decay * p, step, params)
    return updates, SGDWState(optax.safe_increment(state.count), velocity)

  return optax.GradientTransformation(init_fn, update_fn)

