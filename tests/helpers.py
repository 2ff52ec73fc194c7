"""What several test modules share: the one train step of the design, jitted."""

import jax
import optax

import optg_jax as og


def jitted_step(tx: optax.GradientTransformation, loss):
  """``step(params, opt_state, t) -> (params, opt_state, grads)``: the gradient of
  ``loss(w_eff, t)`` at the effective weights, routed through ``tx``."""

  @jax.jit
  def step(params, opt_state, t):
    grads = jax.grad(loss)(og.effective_params(params, opt_state), t)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, grads

  return step
