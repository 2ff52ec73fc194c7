"""A numeric argument given a string names itself in the error (``TypeError`` or ``ValueError``),
at construction, for every method constructor; ``_checks.number`` accepts every real scalar."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import _checks

# Each constructor with the fewest valid arguments, and its numeric arguments.
CONSTRUCTORS = {
    "mask_optimizer": (og.mask_optimizer,
                       dict(sparsity=0.5, learning_rate=0.1, steps_per_epoch=2, total_epochs=4,
                            ramp="budget"),
                       ("sparsity", "learning_rate", "steps_per_epoch", "total_epochs", "beta",
                        "momentum", "score_weight_decay", "min_density")),
    "gmp": (og.gmp, dict(sparsity=0.5, begin_step=0, end_step=4, frequency=2),
            ("sparsity", "begin_step", "end_step", "frequency", "initial_sparsity", "power",
             "min_density")),
    "magnitude": (og.magnitude, dict(sparsity=0.5), ("sparsity", "step", "min_density")),
    "snip": (og.snip, dict(sparsity=0.5), ("sparsity", "num_batches", "min_density")),
    "random_pruning": (og.random_pruning, dict(sparsity=0.5),
                       ("sparsity", "seed", "min_density")),
    "signed_supermask": (og.signed_supermask, dict(steps_per_epoch=2),
                         ("learning_rate", "weight_decay", "steps_per_epoch", "threshold",
                          "momentum", "seed")),
    "edge_popup": (og.edge_popup, dict(sparsity=0.5, learning_rate=0.1),
                   ("sparsity", "learning_rate", "weight_decay", "momentum", "seed",
                    "min_density")),
    "lottery_ticket": (og.lottery_ticket,
                       dict(levels=1, steps_per_level=2, inner=optax.sgd(0.1)),
                       ("levels", "steps_per_level", "rewind_step", "rate")),
    "continuous_sparsification": (og.continuous_sparsification,
                                  dict(inner=optax.sgd(0.1), steps_per_epoch=2, epochs=3),
                                  ("steps_per_epoch", "epochs", "num_rounds", "s0", "penalty",
                                   "final_temperature", "reset_temperature", "rewind_epoch",
                                   "ticket_epochs")),
    "rst": (og.rst, dict(sparsity=0.5), ("sparsity", "cycles", "seed", "granularity", "interval",
                                         "upper_limit", "stabilize")),
    "scored_pruner": (og.methods.pruner.scored_pruner,
                      dict(sparsity=0.5, refresh=og.schedules.in_window(0, 1)), ("sparsity",)),
}

CASES = [pytest.param(method, name, id=f"{method}-{name}")
         for method, (_, _, names) in CONSTRUCTORS.items() for name in names]


@pytest.mark.parametrize("method,name", CASES)
def test_a_string_names_its_argument(method, name):
  make, kwargs, _ = CONSTRUCTORS[method]
  with pytest.raises((TypeError, ValueError), match=rf"\b{name}\b"):
    make(**(kwargs | {name: "abc"}))


@pytest.mark.parametrize("value", [3, 0.5, np.int32(2), np.float32(0.5), jnp.float32(0.5),
                                   jnp.asarray(2), np.asarray(0.5)])
def test_number_accepts_real_scalars(value):
  assert _checks.number(value, "x") is value


@pytest.mark.parametrize("value", ["abc", "0.5", None, True, np.bool_(False), [0.5],
                                   jnp.ones(2), np.complex64(1), jnp.asarray(True)])
def test_number_refuses_the_rest_by_name(value):
  with pytest.raises(TypeError, match=r"^x must be a real number"):
    _checks.number(value, "x")


def test_number_integer_and_traced():
  assert _checks.number(np.int64(3), "n", integer=True) == 3
  for value in (2.0, np.float32(2), jnp.float32(2)):
    with pytest.raises(TypeError, match=r"^n must be an integer"):
      _checks.number(value, "n", integer=True)

  @jax.jit
  def traced(x):
    assert _checks.number(x, "lr") is x  # an inject_hyperparams hyperparameter inside jit
    with pytest.raises(TypeError, match=re.escape("static_args=('n', ...)")):
      _checks.number(x, "n", traced=False)
    return x

  traced(jnp.float32(0.5))


def test_sparsity_string_is_named():
  with pytest.raises(TypeError, match=r"^sparsity must be a real number, got 'abc'"):
    og.mask_optimizer(sparsity="abc", learning_rate=0.1, steps_per_epoch=2, total_epochs=4)
  with pytest.raises(TypeError, match=r"^overrides\['a'\] must be a real number"):
    og.Selection("uniform", overrides={"a": "0.5"})


@pytest.mark.parametrize("make,name", [
    (lambda v: og.schedules.polynomial(0.9, 0, 10, 1, power=v), "power"),
    (lambda v: og.schedules.polynomial(0.9, 0, v, 1), "end_step"),
    (lambda v: og.schedules.sigmoid(0.9, 10, 5, beta=v), "beta"),
    (lambda v: og.schedules.sigmoid_window_fraction(10, v, 6.0), "begin_epoch"),
    (lambda v: og.schedules.every_n_steps(v), "n"),
])
def test_a_string_names_its_schedule_argument(make, name):
  with pytest.raises(TypeError, match=rf"\b{name}\b"):
    make("abc")
