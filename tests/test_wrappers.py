"""Every registered method works inside optax's wrappers: ``optax.inject_hyperparams``,
``optax.MultiSteps`` and ``optax.apply_if_finite``.

Each method (small settings, a tiny MLP, ``STEPS`` jitted steps of the design's one train step)
runs once unwrapped, as the reference, and once per wrapper in the same process with the same
inputs. ``og.get_masks`` and ``og.effective_params`` must find the method's state through the
wrapper, and the wrapped run must give the reference's params, masks, effective params and
method state: masks and integer state exactly, floats to ``rtol=1e-5, atol=1e-7`` (a few float32
ulps). A wrapper only routes the same arithmetic on the same values, but the wrapped step is
another XLA program: with backend optimisations on (the users' default; the suite turns them off,
see conftest.py), XLA:CPU may fuse the chain's multiply-adds differently (``apply_if_finite``'s
select over the updates is enough to change it), which moves a parameter by one ulp after a
step. What a wrapper must leave unchanged (a micro-step, the NaN step) is checked exactly.

* ``inject_hyperparams`` wraps the method's constructor, its integer and structural arguments
  static and its float hyperparameters (where it has some) injected, i.e. traced;
* ``MultiSteps(every_k_schedule=2)`` wraps the whole chain and sees each batch twice: both
  micro-steps take the gradient at the same weights and masks, so the mean it hands the chain
  is the reference's gradient, and the first micro-step must leave everything unchanged;
* ``apply_if_finite`` wraps the whole chain and gets one extra step whose gradient has a NaN:
  that step must leave the params and the method's state unchanged, and the run then goes on
  as the reference.
"""

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import recipes

STEPS = 4
POISONED = 1  # apply_if_finite gets a NaN gradient before this step


def _weights_sgd():
  return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))


class Spec(NamedTuple):
  """How a registered method is built here.

  Attributes:
    factory: the method's constructor (what ``inject_hyperparams`` wraps).
    kwargs: its arguments: small settings whose masks change within ``STEPS`` steps.
    static: ``static_args`` of ``inject_hyperparams``: every numeric argument not injected.
    injected: the numeric arguments ``inject_hyperparams`` injects (traced inside jit).
    tail: the weights' optimizer follows the method (``False``: the method is the whole chain,
      frozen weights or its own inner optimizer).
  """
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  static: tuple[str, ...] = ()
  injected: tuple[str, ...] = ()
  tail: bool = True


SPECS = {
    "dense": Spec(optax.identity, {}),
    "optg": Spec(og.mask_optimizer, dict(sparsity=0.75, learning_rate=0.1, steps_per_epoch=1,
                                         total_epochs=STEPS, ramp="budget"),
                 static=("sparsity", "steps_per_epoch", "total_epochs", "beta",
                         "score_weight_decay"),
                 injected=("learning_rate", "momentum")),
    "gmp": Spec(og.gmp, dict(sparsity=0.75, begin_step=0, end_step=2, frequency=1),
                static=("sparsity", "begin_step", "end_step", "frequency", "initial_sparsity",
                        "power")),
    "magnitude": Spec(og.magnitude, dict(sparsity=0.75, step=1), static=("sparsity", "step")),
    "snip": Spec(og.snip, dict(sparsity=0.75, num_batches=2), static=("sparsity", "num_batches")),
    "random": Spec(og.random_pruning, dict(sparsity=0.75, seed=3), static=("sparsity",),
                   injected=("seed",)),
    "signed_supermask": Spec(og.signed_supermask,
                             dict(learning_rate=0.05, weight_decay=5e-4, steps_per_epoch=1),
                             static=("steps_per_epoch", "seed"),
                             injected=("learning_rate", "weight_decay", "threshold", "momentum"),
                             tail=False),
    "edge_popup": Spec(og.edge_popup, dict(sparsity=0.5, learning_rate=0.1),
                       static=("sparsity",),
                       injected=("learning_rate", "weight_decay", "momentum", "seed"),
                       tail=False),
    "lottery_ticket": Spec(og.lottery_ticket,
                           dict(levels=1, steps_per_level=2, inner=_weights_sgd()),
                           static=("levels", "steps_per_level", "rewind_step", "rate"),
                           tail=False),
    "continuous_sparsification": Spec(
        og.continuous_sparsification,
        dict(inner=_weights_sgd(), steps_per_epoch=1, epochs=2, num_rounds=1, rewind_epoch=0,
             penalty=1e-2, filter_fn=None),  # filter_fn: a callable would be read as a schedule
        static=("steps_per_epoch", "epochs", "num_rounds", "s0", "penalty", "final_temperature",
                "reset_temperature", "rewind_epoch"),
        tail=False),
    "rst": Spec(og.rst, dict(sparsity=0.5, granularity=0.5, interval=1, upper_limit=0.5,
                             stabilize=0),  # λ = 0.5, 1.0: the mask from step 2 on
                static=("sparsity", "cycles", "granularity", "interval", "upper_limit",
                        "stabilize"),
                injected=("seed",)),
}

WRAPPERS = ("inject_hyperparams", "multi_steps", "apply_if_finite")


def _spec(name: str) -> Spec:
  if name not in SPECS:
    pytest.fail(f"method {name!r} is registered but has no Spec in tests/test_wrappers.py")
  return SPECS[name]


def _chain(spec: Spec, head: optax.GradientTransformation) -> optax.GradientTransformation:
  return optax.chain(head, _weights_sgd()) if spec.tail else head


def _params():
  k = jax.random.split(jax.random.key(5), 2)
  return {"dense1": {"kernel": jax.random.normal(k[0], (6, 8)) / 2, "bias": jnp.zeros(8)},
          "dense2": {"kernel": jax.random.normal(k[1], (8, 4)) / 2, "bias": jnp.zeros(4)}}


def _loss(p, t):
  k = jax.random.split(jax.random.key(1000 + t))
  x = jax.random.normal(k[0], (16, 6))
  y = jax.random.randint(k[1], (16,), 0, 4)
  h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  logits = h @ p["dense2"]["kernel"] + p["dense2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _step(tx: optax.GradientTransformation):
  """The one train step, jitted; ``poison`` puts a NaN in one entry of the gradient."""

  @jax.jit
  def step(params, state, t, poison):
    grads = jax.grad(_loss)(og.effective_params(params, state), t)
    kernel = grads["dense1"]["kernel"]
    grads["dense1"]["kernel"] = kernel.at[0, 0].set(jnp.where(poison, jnp.nan, kernel[0, 0]))
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _view(params, state) -> dict[str, Any]:
  """What must match the reference: params, masks and effective params as found through any
  wrapper, and the method's own state (its type and arrays; its static configuration may hold
  closures made anew by each construction)."""
  method = og.methods.base.find_state(state) if og.methods.base.has_state(state) else None
  return {"params": params, "masks": og.get_masks(state, params),
          "effective": og.effective_params(params, state),
          "method": (type(method).__name__, jax.tree.leaves(method))}


def _assert_equal(got, expected, what, exact=True):
  """Equal trees; with ``exact=False`` float leaves to a few float32 ulps (see the module doc)."""
  got_leaves, got_def = jax.tree_util.tree_flatten(got)
  want_leaves, want_def = jax.tree_util.tree_flatten(expected)
  assert got_def == want_def, what
  for i, (a, b) in enumerate(zip(got_leaves, want_leaves)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}, leaf {i}"
    if exact or not np.issubdtype(a.dtype, np.floating):
      np.testing.assert_array_equal(a, b, err_msg=f"{what}, leaf {i}")
    else:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=f"{what}, leaf {i}")


@functools.lru_cache(maxsize=None)
def _reference(name: str) -> tuple[dict[str, Any], ...]:
  """The unwrapped method's views after init and after each of ``STEPS`` steps."""
  spec = _spec(name)
  tx = _chain(spec, spec.factory(**spec.kwargs))
  params, step = _params(), _step(tx)
  state = tx.init(params)
  views = [_view(params, state)]
  for t in range(STEPS):
    params, state = step(params, state, t, False)
    views.append(_view(params, state))
  return tuple(views)


@pytest.mark.parametrize("name", recipes.names())
def test_reference_runs_are_not_trivial(name):
  """The comparisons below would pass on a run where nothing happens: here something does."""
  views = _reference(name)
  first, last = views[0], views[-1]
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first["effective"]),
                                                    jax.tree.leaves(last["effective"]))]
  assert any(moved)
  kernels = [np.asarray(m) for m in jax.tree.leaves(last["masks"]) if np.ndim(m)]
  if name == "dense":
    assert all(m.all() for m in kernels)  # all-keep masks
  else:
    assert kernels and 0 < sum(m.sum() for m in kernels) < sum(m.size for m in kernels), name


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("name", recipes.names())
def test_wrapped_method_runs_as_unwrapped(name, wrapper):
  spec, expected = _spec(name), _reference(name)
  if wrapper == "inject_hyperparams":
    head = optax.inject_hyperparams(spec.factory, static_args=spec.static)(**spec.kwargs)
    tx = _chain(spec, head)
  elif wrapper == "multi_steps":
    tx = optax.MultiSteps(_chain(spec, spec.factory(**spec.kwargs)), every_k_schedule=2)
  else:
    tx = optax.apply_if_finite(_chain(spec, spec.factory(**spec.kwargs)),
                               max_consecutive_errors=2)
  params, step = _params(), _step(tx)
  state = tx.init(params)
  _assert_equal(_view(params, state), expected[0], "init", exact=False)
  if wrapper == "inject_hyperparams":
    hyperparams = state[0].hyperparams if spec.tail else state.hyperparams
    assert sorted(hyperparams) == sorted(spec.injected)
  for t in range(STEPS):
    if wrapper == "multi_steps":  # first micro-step: accumulates only
      before = _view(params, state)
      params, state = step(params, state, t, False)
      _assert_equal(_view(params, state), before, f"micro-step 0 of step {t}")
    if wrapper == "apply_if_finite" and t == POISONED:
      before = _view(params, state)
      params, state = step(params, state, t, True)
      _assert_equal(_view(params, state), before, "the NaN step")
      assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
    params, state = step(params, state, t, False)
    _assert_equal(_view(params, state), expected[t + 1], f"{wrapper}, step {t}", exact=False)
