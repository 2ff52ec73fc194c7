"""Continuous Sparsification (Savarese, Silva, Maire, NeurIPS 2020), as a policy of :func:`rounds`.

Each masked kernel ``W`` has a logit ``s`` (init ``s0``) and the forward pass uses ``W ⊙ m`` with
the soft mask ``m = σ(β·s)/σ(s0)``, exactly 1 at the start. Given ``G = dL/d(W ⊙ m)``, every step

* hands ``G ⊙ m`` (the exact chain rule into ``W``) to the weights' optimizer ``inner``;
* trains the logits with their own optimizer on the exact gradient through the sigmoid of the
  loss plus the penalty ``λ·Σ m`` over all masked entries (a smooth L0 surrogate; the
  transformation adds it, the user's loss stays plain):
  ``dL/ds = β·σ'(β s)/σ(s0) ⊙ (G ⊙ W + λ)``;
* sets the temperature of the next step: ``β_e = β_T^(e/(E−1))`` in epoch ``e`` of its round.

The search runs ``R`` rounds of ``E`` epochs. Between rounds the weights and the optimizers'
buffers carry on, both learning-rate schedules restart (the optimizers' step counters go back to
0), the temperature restarts at 1 and the logits are reset to ``s ← min(β_reset·s, s0)``. Then
the ticket: the binary mask ``[s > 0]`` (times ``1/σ(s0)``, as the code does: ``ticket_scale``),
every weight rewound to its value at the start of epoch ``rewind_epoch`` of round 0, and a
fresh ``inner`` trains the ticket with the mask frozen. The training loop rewinds the BatchNorm
statistics with :func:`optg_jax.sync_rewind`.

Reference: github.com/lolemacs/continuous-sparsification (``main.py``, ``layers.py``); SPEC §3.
Where the released code and the paper differ the default follows the code: ``β_reset = 1``
(the code resets the temperature before calling ``prune``; the paper's intent is ``β_T``), and
the ticket mask is scaled by ``1/σ(s0)``. One deviation, for exactness: the mask is computed as
``σ(β s)/σ(s0)`` (a division) rather than ``c·σ(β s)`` with ``c = 1/σ(s0)`` rounded to a float,
so that it is exactly 1 at the start for any ``s0``.

CS does not target a sparsity: ``s0`` (higher: denser), ``λ`` (higher: sparser) and ``β_T``
steer it; ``og.get_masks`` and ``og.final_masks`` give the ticket ``[s > 0]`` it would cut now
(``og.get_masks`` right after a reset, where the reset logits give an empty ``[s > 0]`` for
``s0 <= 0``: the ticket the boundary just cut).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optg_jax import _checks
from optg_jax import masks as masks_lib
from optg_jax.methods import _trees
from optg_jax.methods import base
from optg_jax.methods import rounds as rounds_lib
from optg_jax.methods.selection import Selection

PyTree = Any


class CSAux(NamedTuple):
  """The policy's arrays in :attr:`RoundsState.aux`: the float32 ``logits`` (per masked leaf,
  ``None`` elsewhere), their optimizer's ``logit_state``, and ``cut``: the bool ticket
  ``[s > 0]`` the last round boundary cut, before the reset (all-keep before the first), which
  ``og.get_masks`` reports right after a reset, when ``[s > 0]`` of the reset logits is empty
  for ``s0 <= 0``."""
  logits: PyTree
  logit_state: optax.OptState
  cut: PyTree


def spatial_convs(path: str, leaf: Any) -> bool:
  """The reference's masked layers: conv kernels (``ndim >= 3``) with a spatial extent larger
  than 1 (every 3×3 conv, the stem included); not 1×1 shortcuts, not dense layers."""
  del path
  shape = np.shape(leaf)
  return len(shape) >= 3 and math.prod(shape[:-2]) > 1


def temperature(epoch: Any, epochs: int, final_temperature: float) -> jax.Array:
  """``β_e = β_T^(e/(E−1))`` for epoch ``e`` of a round of ``E`` epochs (``β_T`` for ``E = 1``)."""
  frac = jnp.asarray(epoch, jnp.float32) / max(epochs - 1, 1) if epochs > 1 else 1.0
  return jnp.power(jnp.float32(final_temperature), frac)


def soft_mask(logits: jax.Array, beta: Any, s0: float) -> jax.Array:
  """``σ(β·s)/σ(s0)``: exactly 1 at ``s = s0``, ``β = 1``."""
  return jax.nn.sigmoid(beta * logits) / jax.nn.sigmoid(jnp.float32(s0))


def _ticket(logits: PyTree, params: PyTree) -> PyTree:
  return _trees.fill_true(_trees.map_prunable(lambda s: s > 0, logits), params)


def continuous_sparsification(
    inner: optax.GradientTransformation,
    steps_per_epoch: int,
    epochs: int,
    *,
    logit_optimizer: optax.GradientTransformation | None = None,
    num_rounds: int = 3,
    s0: float = 0.0,
    penalty: float = 1e-8,
    final_temperature: float = 200.0,
    reset_temperature: float = 1.0,
    rewind_epoch: int = 2,
    ticket: bool = True,
    ticket_epochs: int | None = None,
    ticket_scale: bool = True,
    exclude: Iterable[str] = (),
    filter_fn: Callable[[str, Any], bool] | None = spatial_convs,
) -> optax.GradientTransformation:
  """Continuous Sparsification: ``num_rounds`` rounds of soft-mask search, then the ticket.

  The whole chain: ``inner`` is the weights' optimizer (the reference:
  ``optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(sched, 0.9, nesterov=True))`` with
  ``sched = piecewise_constant(0.1, {56·spe: 0.1, 71·spe: 0.1})`` for ``E = 85``)::

    tx = og.continuous_sparsification(inner, steps_per_epoch=spe, epochs=85,
                                      logit_optimizer=optax.sgd(sched, 0.9, nesterov=True))
    grads = jax.grad(loss)(og.effective_params(params, opt_state), batch)  # W ⊙ m
    updates, opt_state = tx.update(grads, opt_state, params)

  Args:
    inner: the weights' optimizer; its step counters restart each round (schedules restart),
      its buffers carry on between search rounds, and a fresh one trains the ticket.
    steps_per_epoch: optimizer steps per epoch (the temperature changes once per epoch).
    epochs: ``E``, epochs per search round.
    logit_optimizer: the logits' optimizer (default ``optax.sgd(0.1, momentum=0.9,
      nesterov=True)``; the reference adds the weights' step schedule), restarted like
      ``inner``'s schedules each round, never reset.
    num_rounds: ``R >= 1`` search rounds.
    s0: initial logit (higher: denser ticket).
    penalty: ``λ`` of ``λ·Σ m`` (higher: sparser ticket).
    final_temperature: ``β_T``, the temperature of a round's last epoch.
    reset_temperature: ``β_reset`` of the reset ``s ← min(β_reset·s, s0)`` between rounds: 1 in
      the released code (a removed weight's logit stays small and can come back), ``β_T`` in
      the paper's intent (removed weights stay removed).
    rewind_epoch: the ticket's weights are those at the start of this epoch of round 0.
    ticket: train the ticket after the search (``False``: the run ends after round ``R``, and
      ``og.final_masks`` gives ``[s > 0]``).
    ticket_epochs: epochs of the ticket's training (default ``E``).
    ticket_scale: the ticket's mask is ``[s > 0]/σ(s0)``, as the code (×2 at ``s0 = 0``);
      ``False``: ``[s > 0]``.
    exclude: path regexes of kernels not masked.
    filter_fn: which kernels are masked; default :func:`spatial_convs`, the reference's (3×3
      convs; not 1×1 shortcuts or the classifier). ``None``: every kernel (``ndim >= 2``), for
      models without convolutions.

  Returns:
    A :func:`~optg_jax.methods.rounds.rounds` transformation of
    ``R·E + (E_ticket if ticket else 0)`` epochs (:func:`total_epochs`).

  Raises:
    ValueError: a bad count or epoch; at ``init``, no kernel to mask.
  """
  for name, value, low in (("steps_per_epoch", steps_per_epoch, 1), ("epochs", epochs, 1),
                           ("num_rounds", num_rounds, 1), ("rewind_epoch", rewind_epoch, 0),
                           ("ticket_epochs", epochs if ticket_epochs is None else ticket_epochs,
                            1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  for name, value in (("s0", s0), ("penalty", penalty), ("final_temperature", final_temperature),
                      ("reset_temperature", reset_temperature)):
    _checks.number(value, name, traced=False)
  if rewind_epoch >= epochs:
    raise ValueError(f"rewind_epoch must be < epochs ({epochs}), got {rewind_epoch}")
  if not penalty >= 0 or not final_temperature > 0 or not reset_temperature > 0:
    raise ValueError("penalty must be >= 0, final_temperature and reset_temperature > 0")
  spe, search = int(steps_per_epoch), int(num_rounds)
  logit_tx = logit_optimizer or optax.sgd(0.1, momentum=0.9, nesterov=True)
  selection = Selection(exclude=tuple(exclude), filter_fn=filter_fn)
  with jax.ensure_compile_time_eval():  # a Python float, also when built inside jit
    scale = 1.0 / float(jax.nn.sigmoid(jnp.float32(s0))) if ticket_scale else 1.0

  def soft(logits, params, round_step):
    beta = temperature(round_step // spe, epochs, final_temperature)
    return _trees.fill_true(_trees.map_prunable(lambda s: soft_mask(s, beta, s0), logits),
                            params)

  def initial_logits(params, prunable):
    return _trees.map_prunable(lambda z: z + jnp.float32(s0), _trees.zeros(params, prunable))

  def init_aux(params, prunable):
    logits = initial_logits(params, prunable)
    return CSAux(logits, logit_tx.init(logits), masks_lib.all_keep(params, prunable))

  def init_masks(params, prunable):
    return soft(initial_logits(params, prunable), params, 0)

  def search_step(grads, state, params):
    logits, logit_state, cut = state.aux
    beta = temperature(state.round_step // spe, epochs, final_temperature)
    logit_grads = _trees.map_prunable(  # dL/dm = G ⊙ W, plus the penalty's λ
        lambda s, g, w: jax.vjp(lambda x: soft_mask(x, beta, s0), s)[1](g * w + penalty)[0],
        logits, grads, params)
    updates, logit_state = logit_tx.update(logit_grads, logit_state, logits)
    logits = optax.apply_updates(logits, updates)
    masks = soft(logits, params, state.round_step + 1)
    return base.masked(grads, state.masks), masks, CSAux(logits, logit_state, cut)

  def step_fn(grads, state, params):
    if not ticket:
      return search_step(grads, state, params)
    return jax.lax.cond(state.round < search, search_step, rounds_lib.mask_grads,
                        grads, state, params)

  def next_masks(params, masks, boundary, aux):
    del masks
    logits, logit_state, _ = aux
    cut = _ticket(logits, params)
    to_ticket = boundary == search - 1
    reset = _trees.map_prunable(lambda s: jnp.minimum(reset_temperature * s, s0), logits)
    logits = rounds_lib.pick(to_ticket, logits, reset)
    logit_state = rounds_lib.set_counts(logit_state, 0)
    ticket_masks = _values(_ticket(logits, params))
    return (rounds_lib.pick(to_ticket, ticket_masks, soft(logits, params, 0)),
            CSAux(logits, logit_state, cut))

  def masks_view(state):
    """``[s > 0]``; right after a reset between search rounds, the ticket the boundary cut."""
    just_reset = (state.round_step == 0) & (state.round > 0) & (state.round < search)
    return rounds_lib.pick(just_reset, state.aux.cut, _ticket(state.aux.logits, state.masks))

  def _values(bool_masks):
    return jax.tree.map(lambda m: m if m.ndim == 0 else jnp.where(m, scale, 0.0).astype(
        jnp.float32), bool_masks)

  lengths = [epochs * spe] * search + ([(ticket_epochs or epochs) * spe] if ticket else [])
  boundaries = len(lengths) - 1
  last_is_ticket = [ticket and i == search - 1 for i in range(boundaries)]
  tx = rounds_lib.rounds(
      inner, lengths, len(lengths), next_masks, rewind_step=rewind_epoch * spe,
      rewind=last_is_ticket, reset_inner=last_is_ticket, schedule_step=0, mask_updates=False,
      selection=selection, init_masks=init_masks, init_aux=init_aux, step_fn=step_fn,
      masks_view=masks_view,
      final_masks=_final_masks, mask_values=lambda state, m: _values(m))

  def init_fn(params):
    try:
      return tx.init(params)
    except ValueError as e:
      if filter_fn is not spatial_convs or "no prunable leaves" not in str(e):
        raise
      raise ValueError("continuous_sparsification: no kernel to mask; the default filter_fn "
                       "masks spatial convs only (the reference); pass filter_fn=None to mask "
                       "every kernel of a model without convolutions") from None

  return optax.GradientTransformation(init_fn, tx.update)


def _final_masks(state: rounds_lib.RoundsState, params: PyTree, sparsity: float | None):
  if sparsity is not None:
    raise ValueError("final_masks: Continuous Sparsification does not select at a sparsity; "
                     "its ticket is [s > 0] (steer it with s0 and penalty)")
  return _ticket(state.aux.logits, params)


def total_epochs(epochs: int, num_rounds: int = 3, ticket: bool = True,
                 ticket_epochs: int | None = None) -> int:
  """Epochs of a whole run: ``R·E`` of search plus the ticket's training."""
  return num_rounds * epochs + ((ticket_epochs or epochs) if ticket else 0)
