"""Continuous Sparsification: the soft mask, the temperature, the penalty's gradient, the reset and
the ticket, each checked numerically against its definition (SPEC §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax.methods import continuous_sparsification as cs
from optg_jax.methods import rounds as rounds_lib
from test_rounds import GRAD, bitwise_equal, inner_sgd, loss, params0, run_loop

SPE, E, ROUNDS, REWIND = 2, 3, 2, 1
BETA_T = 30.0


def make(**kwargs):
  options = dict(num_rounds=ROUNDS, rewind_epoch=REWIND, filter_fn=None, penalty=1e-2,
                 final_temperature=BETA_T, logit_optimizer=optax.sgd(0.05, momentum=0.9,
                                                                     nesterov=True))
  options.update(kwargs)
  return og.continuous_sparsification(inner_sgd(), SPE, E, **options)


def steps_of(**kwargs):
  return cs.total_epochs(E, kwargs.get("num_rounds", ROUNDS), kwargs.get("ticket", True)) * SPE


def state(record):
  return rounds_lib.rounds_state(record[1])


def kernels(tree):
  return [tree["a"]["kernel"], tree["b"]["kernel"]]


@pytest.fixture(scope="module")
def trace():
  return run_loop(make(), steps_of())


@pytest.mark.parametrize("s0", [0.0, 0.3, -0.2])
def test_mask_is_exactly_one_at_step_0(s0):
  st = make(s0=s0).init(params0())
  for m in kernels(st.masks):
    assert m.dtype == jnp.float32 and np.all(np.asarray(m) == 1.0)
  assert bitwise_equal(og.effective_params(params0(), st), params0())


def test_temperature_follows_the_schedule_and_restarts_each_round(trace):
  assert float(cs.temperature(0, 85, 200.0)) == 1.0
  np.testing.assert_allclose(float(cs.temperature(1, 85, 200.0)), 200 ** (1 / 84), rtol=1e-6)
  assert float(cs.temperature(84, 85, 200.0)) == pytest.approx(200.0, rel=1e-6)
  for t, record in enumerate(trace[:ROUNDS * E * SPE]):
    st = state(record)
    assert int(st.round) == t // (E * SPE) and int(st.round_step) == t % (E * SPE)
    beta = BETA_T ** ((t % (E * SPE)) // SPE / (E - 1))
    for m, s in zip(kernels(st.masks), kernels(st.aux.logits)):
      np.testing.assert_allclose(m, jax.nn.sigmoid(beta * s) / 0.5, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("with_loss", [False, True])
def test_logit_gradient_is_autodiff_of_loss_plus_penalty(with_loss):
  lam, beta_t = 0.3, 7.0
  tx = og.continuous_sparsification(optax.sgd(0.0), SPE, E, filter_fn=None, penalty=lam,
                                    final_temperature=beta_t, s0=0.1,
                                    logit_optimizer=optax.sgd(1.0))
  params = params0()
  st = tx.init(params)
  for t in range(SPE + 1):  # into epoch 1, where β ≠ 1
    grads = GRAD(og.effective_params(params, st), t)
    grads = grads if with_loss else jax.tree.map(jnp.zeros_like, grads)
    before = st.aux.logits
    _, st = tx.update(grads, st, params)
  beta = beta_t ** (1 / (E - 1))

  def objective(logits):
    masks = {k: {"kernel": cs.soft_mask(logits[k]["kernel"], beta, 0.1), "bias": 1.0}
             for k in ("a", "b")}
    penalty = lam * sum(jnp.sum(m["kernel"]) for m in masks.values())
    data = loss(jax.tree.map(lambda w, m: w * m, params, masks), SPE) if with_loss else 0.0
    return data + penalty

  want = jax.grad(objective)(before)
  for new, old, g in zip(kernels(st.aux.logits), kernels(before), kernels(want)):
    np.testing.assert_allclose(old - new, g, rtol=2e-5, atol=1e-7)


def test_weights_get_the_chain_rule_through_the_mask():
  """The weights' update is ``−G ⊙ m`` (``G`` taken at ``W ⊙ m``): autodiff of the loss through
  the mask.

  The two sides come from different programs, so they agree up to the float32 rounding of each
  leaf's largest entries, not entry by entry: within ``16·eps32·max|g|`` per leaf (on one CPU an
  entry of 0.0302 was 7.2e-7 off in a leaf reaching 4.2, 1.4 of ``eps32·max|g|``). Leaving the
  mask factor out (0.75 on every kernel entry here) is off by a quarter of ``max|g|``, which
  the tolerance refuses (checked on ``G`` itself below).
  """
  tx = og.continuous_sparsification(optax.sgd(1.0), SPE, E, filter_fn=None, s0=0.5)
  params = params0()
  st = tx.init(params)
  st = st._replace(masks=jax.tree.map(lambda m: m * 0.75 if m.ndim else m, st.masks))
  grads = GRAD(og.effective_params(params, st), 0)
  updates, _ = tx.update(grads, st, params)
  want = jax.grad(lambda w: loss(jax.tree.map(lambda x, m: x * m, w, st.masks), 0))(params)
  for u, g, g_eff, m in zip(*(jax.tree.leaves(t) for t in (updates, want, grads, st.masks))):
    atol = 16 * np.finfo(np.float32).eps * np.abs(g).max()
    np.testing.assert_allclose(-u, g, rtol=0, atol=atol)
    if np.ndim(m):  # a masked kernel: G without the mask factor is out of tolerance
      assert np.abs(np.asarray(g_eff) - g).max() > 1000 * atol


@pytest.mark.parametrize("reset_temperature", [1.0, BETA_T])
def test_reset_between_rounds(reset_temperature):
  end = E * SPE
  one_round = run_loop(make(num_rounds=1, ticket=False), end)
  two = run_loop(make(reset_temperature=reset_temperature), end)
  pre_reset = state(one_round[end]).aux.logits
  after = state(two[end])
  assert int(after.round) == 1 and int(after.round_step) == 0
  for s, s_pre in zip(kernels(after.aux.logits), kernels(pre_reset)):
    s, s_pre = np.asarray(s), np.asarray(s_pre)  # two programs: equal up to float rounding
    np.testing.assert_allclose(s, np.minimum(reset_temperature * s_pre, 0.0), rtol=2e-5,
                               atol=1e-7)
    clamped = s_pre > 1e-3
    assert np.all(s[clamped] == 0.0)
  pre = np.concatenate([np.ravel(s) for s in kernels(pre_reset)])
  assert np.any(pre > 1e-3) and np.any(pre < -1e-3)  # both sides of s0 are exercised
  for m, s in zip(kernels(after.masks), kernels(after.aux.logits)):  # β back to 1
    np.testing.assert_allclose(m, jax.nn.sigmoid(s) / 0.5, rtol=1e-6)
  for w2, w1, w0 in zip(jax.tree.leaves(two[end][0]), jax.tree.leaves(one_round[end][0]),
                        jax.tree.leaves(params0())):  # weights carry on, not rewound
    np.testing.assert_allclose(w2, w1, rtol=1e-5, atol=1e-6)
    assert not np.allclose(w2, w0)
  counted = lambda x: "count" in getattr(x, "_fields", ())
  counts = [x.count for x in jax.tree.leaves(after.inner_state, is_leaf=counted) if counted(x)]
  assert counts and all(int(c) == 0 for c in counts)  # the schedule restarts


def test_ticket_rewinds_to_the_snapshot_with_a_fresh_optimizer(trace):
  start = ROUNDS * E * SPE
  search_end, ticket_start = state(trace[start - 1]), trace[start]
  st = state(ticket_start)
  assert int(st.event) == rounds_lib.REWOUND and int(st.round) == ROUNDS
  snapshot = trace[REWIND * SPE][0]  # the weights at the start of epoch REWIND of round 0
  assert bitwise_equal(ticket_start[0], snapshot)
  assert bitwise_equal(ticket_start[2], trace[REWIND * SPE][2])  # the loop's BN statistics
  assert bitwise_equal(st.inner_state, inner_sgd().init(snapshot))
  logits = st.aux.logits
  assert not bitwise_equal(logits, search_end.aux.logits)  # the last search step moved them
  for m, s in zip(kernels(st.masks), kernels(logits)):
    assert np.array_equal(m, np.where(np.asarray(s) > 0, 2.0, 0.0).astype(np.float32))
  for record in trace[start:]:  # the mask and the logits stay frozen
    assert bitwise_equal(state(record).masks, st.masks)
    assert bitwise_equal(state(record).aux.logits, logits)
  final = og.final_masks(trace[-1][0], trace[-1][1])
  for m, s in zip(kernels(final), kernels(logits)):
    assert m.dtype == jnp.bool_ and np.array_equal(m, np.asarray(s) > 0)
  kept = sum(int(np.sum(m)) for m in kernels(final))
  assert 0 < kept < 240


def test_with_final_masks_the_forward_pass_is_the_ticket(trace):
  params, opt_state = trace[-1][0], trace[-1][1]
  final = og.with_masks(opt_state, og.final_masks(params, opt_state))
  assert bitwise_equal(og.effective_params(params, final), og.effective_params(params, opt_state))
  unscaled = run_loop(make(ticket_scale=False), steps_of())[-1]
  for m in kernels(state(unscaled).masks):
    assert set(np.unique(np.asarray(m))) <= {0.0, 1.0}


def test_jit_and_eager_agree():
  steps = E * SPE + 2
  a, b = run_loop(make(), steps), run_loop(make(), steps, jit=False)
  for x, y in zip(jax.tree.leaves((a[-1][0], state(a[-1]))),
                  jax.tree.leaves((b[-1][0], state(b[-1])))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)  # β up to 30 amplifies rounding


def test_default_masks_spatial_convs_only():
  conv = {"stem": {"kernel": jnp.ones((3, 3, 3, 16))}, "short": {"kernel": jnp.ones((1, 1, 16, 32))},
          "fc": {"kernel": jnp.ones((64, 10)), "bias": jnp.zeros(10)}}
  st = og.continuous_sparsification(optax.sgd(0.1), SPE, E).init(conv)
  assert st.aux.logits["stem"]["kernel"].shape == (3, 3, 3, 16)
  assert st.aux.logits["short"]["kernel"] is None and st.aux.logits["fc"]["kernel"] is None
  with pytest.raises(ValueError, match="filter_fn=None"):
    og.continuous_sparsification(optax.sgd(0.1), SPE, E).init(params0())


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs"), (dict(num_rounds=0), "num_rounds"),
    (dict(rewind_epoch=3), "rewind_epoch"), (dict(steps_per_epoch=1.5), "steps_per_epoch"),
    (dict(penalty=-1.0), "penalty"), (dict(ticket_epochs=0), "ticket_epochs")])
def test_bad_arguments_are_refused(kwargs, match):
  args = dict(steps_per_epoch=SPE, epochs=E)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    og.continuous_sparsification(optax.sgd(0.1), **args)


def test_final_masks_refuse_a_sparsity(trace):
  with pytest.raises(ValueError, match="s0"):
    og.final_masks(trace[-1][0], trace[-1][1], sparsity=0.5)


def test_get_masks_right_after_a_reset_is_the_ticket_the_boundary_cut(trace):
  """At the first step of round 2 the reset logits (``min(s, s0)``, s0 = 0) give an empty
  ``[s > 0]``; ``og.get_masks`` then reports the ticket ``[s > 0]`` of the logits before the
  reset, and ``[s > 0]`` again once the round trains."""
  end = E * SPE
  after, later = trace[end], trace[end + 1]
  assert int(state(after).round) == 1 and int(state(after).round_step) == 0
  assert all(not (np.asarray(s) > 0).any() for s in kernels(state(after).aux.logits))
  pre_reset = state(run_loop(make(num_rounds=1, ticket=False), end)[end]).aux.logits
  cut = og.get_masks(after[1])
  for m, s in zip(kernels(cut), kernels(pre_reset)):
    s = np.asarray(s)  # another program: equal up to float rounding, so skip near-zero logits
    clear = np.abs(s) > 1e-4
    np.testing.assert_array_equal(np.asarray(m)[clear], (s > 0)[clear])
  summary = og.sparsity_summary(cut)
  assert 0 < int(summary.kept) < summary.total  # not the 100% of an empty [s > 0]
  for m, s in zip(kernels(og.get_masks(later[1])), kernels(state(later).aux.logits)):
    np.testing.assert_array_equal(m, np.asarray(s) > 0)
