"""What several test modules share: the one train step of the design, jitted, and child
processes under the default XLA flags."""

import os
import pathlib
import subprocess
import sys

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


def run_under_default_flags(script: str, *args: str, timeout: int = 900) -> None:
  """Runs ``python script *args`` in a child process under the default XLA flags: without the
  suite's ``--xla_backend_optimization_level=0`` (conftest.py), for tests whose numbers are
  pinned (recorded trajectories) or that spend their time running, not compiling."""
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_backend_optimization_level"))
  env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=os.pathsep.join(
      filter(None, [str(pathlib.Path(__file__).parent), os.environ.get("PYTHONPATH")])))
  result = subprocess.run([sys.executable, script, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
