"""The rounds primitive: snapshot, round ends, exact rewind, fresh inner state, the loop hook."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax.methods import rounds as rounds_lib

SCHEDULE = optax.piecewise_constant_schedule(0.02, {4: 0.5, 7: 0.5})


def params0():
  k = jax.random.split(jax.random.key(3), 3)
  return {"a": {"kernel": jax.random.normal(k[0], (20, 10)), "bias": jnp.zeros(10)},
          "b": {"kernel": 0.01 * jax.random.normal(k[1], (10, 4)), "bias": jnp.zeros(4)}}


def inner_sgd(schedule=SCHEDULE):
  """The weights' chain of the reference: coupled decay, then SGD with momentum."""
  return optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(schedule, momentum=0.9))


def loss(p, t):
  x = jax.random.normal(jax.random.key(t), (8, 20))
  h = jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"])
  return jnp.sum((h @ p["b"]["kernel"] + p["b"]["bias"] - 1.0) ** 2)


GRAD = jax.jit(jax.grad(loss))


def make_step(tx, jit=True):
  """A train step with a fake BatchNorm statistic ``extra`` that the forward pass updates; the
  gradient is jitted alone either way, so ``jit=False`` runs only the optimizer eagerly."""

  def step(params, opt_state, extra, saved, t):
    grads = GRAD(og.effective_params(params, opt_state), t)
    extra = {"mean": 0.5 * extra["mean"] + t + 1.0}
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    synced = og.sync_rewind(params, opt_state, extra, saved)
    return synced[0], opt_state, synced[1], synced[2], params

  return jax.jit(step) if jit else step


def run_loop(tx, steps, jit=True):
  """Runs ``steps`` updates; returns one record per state: ``(params, opt_state, extra, saved,
  params straight from apply_updates)``, the first being the init."""
  params, extra = params0(), {"mean": jnp.zeros(3)}
  opt_state, saved = tx.init(params), extra
  step = make_step(tx, jit)
  trace = [(params, opt_state, extra, saved, params)]
  for t in range(steps):
    params, opt_state, extra, saved, applied = step(params, opt_state, extra, saved, t)
    trace.append((params, opt_state, extra, saved, applied))
  return trace


def bitwise_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def halve_masks(params, masks, round_index, aux):
  """A ``next_masks`` for the primitive's tests: keep the larger half of each kernel's survivors."""
  del round_index

  def one(w, m):
    if m.ndim == 0:
      return m
    score = jnp.where(m, jnp.abs(w), -jnp.inf)
    return og.select.topk_mask(score, jnp.sum(m) // 2)

  return jax.tree.map(one, params, masks), aux


def imp_like(k=2, length=8, num_rounds=3, **kwargs):
  lengths = (length,) + (length - k,) * (num_rounds - 1)
  return og.rounds(inner_sgd(), lengths, num_rounds, halve_masks, rewind_step=k, **kwargs)


def boundary_indices(trace):
  return [i for i, rec in enumerate(trace)
          if i and int(rounds_lib.rounds_state(rec[1]).event) != rounds_lib.NO_EVENT]


def test_round_ends_at_the_given_lengths():
  trace = run_loop(imp_like(k=2, length=8), 8 + 6 + 6 + 3)
  assert boundary_indices(trace) == [8, 14]
  last = rounds_lib.rounds_state(trace[-1][1])
  assert (int(last.round), int(last.round_step), int(last.count)) == (2, 9, 23)


@pytest.mark.parametrize("k", [0, 3])
def test_rewind_lands_on_the_snapshot_bitwise(k):
  trace = run_loop(imp_like(k=k), 8 + (8 - k) + 1)
  w_k = trace[k][0]
  for i in boundary_indices(trace):
    params, opt_state, _, _, applied = trace[i]
    state = rounds_lib.rounds_state(opt_state)
    assert bitwise_equal(state.snapshot, w_k)
    assert bitwise_equal(params, w_k)  # after og.sync_rewind: the snapshot itself
    # apply_updates alone lands within rounding of W_k (float addition cannot do better when
    # |W_k| << |W|); the kept weights the next forward pass sees are W_k ⊙ M either way.
    for got, want, w in zip(jax.tree.leaves(applied), jax.tree.leaves(w_k),
                            jax.tree.leaves(trace[i - 1][0])):
      ulp = np.finfo(np.float32).eps * np.maximum(np.abs(w), np.abs(want))
      assert np.all(np.abs(got - want) <= ulp)
    eff = og.effective_params(params, opt_state)
    assert bitwise_equal(eff, og.apply_masks(w_k, og.get_masks(opt_state)))


@pytest.mark.parametrize("k", [0, 3])
def test_inner_state_is_fresh_with_the_schedule_at_the_rewind_step(k):
  trace = run_loop(imp_like(k=k), 8 + 1)
  state = rounds_lib.rounds_state(trace[8][1])
  decay, (momentum, schedule) = state.inner_state
  fresh_decay, (fresh_momentum, _) = inner_sgd().init(trace[k][0])
  assert decay == fresh_decay
  assert bitwise_equal(momentum, fresh_momentum)
  assert int(schedule.count) == k
  # the first update of round 1 is a fresh optimizer's first update, its schedule offset by k
  params, opt_state, _, _, _ = trace[8]
  grads = jax.grad(loss)(og.effective_params(params, opt_state), 8)
  masked = og.apply_masks(grads, og.get_masks(opt_state))
  offset = inner_sgd(lambda c: SCHEDULE(c + k))
  want, _ = offset.update(masked, offset.init(params), params)
  got, _ = imp_like(k=k).update(grads, opt_state, params)
  assert bitwise_equal(got, og.apply_masks(want, og.get_masks(opt_state)))


def test_schedule_restart_and_kept_inner_state_without_rewind():
  """The Continuous-Sparsification shape: weights and momentum kept, the schedule restarts."""
  tx = og.rounds(inner_sgd(), 5, 3, halve_masks, rewind=False, reset_inner=False,
                 schedule_step=0)
  trace = run_loop(tx, 6)
  before, after = rounds_lib.rounds_state(trace[4][1]), rounds_lib.rounds_state(trace[5][1])
  assert after.snapshot is None and int(after.event) == rounds_lib.BOUNDARY
  assert int(after.inner_state[1][1].count) == 0 and int(before.inner_state[1][1].count) == 4
  assert not bitwise_equal(after.inner_state[1][0], inner_sgd().init(params0())[1][0])
  assert bitwise_equal(trace[5][0], trace[5][4])  # no rewind: the hook leaves the params alone


def test_masks_only_shrink_and_pruned_weights_stay():
  trace = run_loop(imp_like(k=2), 8 + 6 + 6 + 4)
  for (p0, s0, *_), (p1, s1, *_) in zip(trace, trace[1:]):
    m0, m1 = og.get_masks(s0), og.get_masks(s1)
    assert all(bool(jnp.all(b <= a)) for a, b in zip(jax.tree.leaves(m0), jax.tree.leaves(m1)))
    if int(rounds_lib.rounds_state(s1).event) == rounds_lib.NO_EVENT:
      for w0, w1, m in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(m0)):
        assert np.array_equal(np.where(m, 0, w0), np.where(m, 0, w1))
  kernel = og.get_masks(trace[-1][1])["a"]["kernel"]
  assert int(kernel.sum()) == 200 // 2 // 2


def test_jitted_and_eager_runs_agree_bitwise():
  """Plain SGD inside: XLA fuses optax's momentum ``g + μ·t`` into one FMA under jit (a rounding
  of its own), so the comparison isolates the rounds logic: masks, snapshot, rewind, hook."""
  tx = og.rounds(optax.sgd(SCHEDULE), (4, 3, 3), 3, halve_masks, rewind_step=1)
  steps = 4 + 3 + 2
  jitted, eager = run_loop(tx, steps), run_loop(tx, steps, jit=False)
  for a, b in zip(jitted, eager):
    assert bitwise_equal(a[:4], b[:4])


@pytest.mark.parametrize("k", [0, 3])
def test_batch_stats_hook_restores_the_statistics_of_the_rewind_step(k):
  trace = run_loop(imp_like(k=k), 8 + (8 - k) + 2)
  stats_k = trace[k][2]  # what the forward pass of step k starts from
  assert bitwise_equal(trace[k][3], stats_k)
  for i in boundary_indices(trace):
    assert bitwise_equal(trace[i][2], stats_k)
    assert not bitwise_equal(trace[i - 1][2], stats_k)
  # between rewinds the statistics move on as the loop computes them
  assert float(trace[-1][2]["mean"][0]) == 0.5 * float(trace[-2][2]["mean"][0]) + len(trace) - 1


def test_hook_is_identity_without_rounds():
  params, extra = params0(), {"mean": jnp.ones(2)}
  out = og.sync_rewind(params, optax.sgd(0.1).init(params), extra, extra)
  assert out[0] is params and out[1] is extra


def test_works_inside_a_chain_with_the_state_protocol():
  tx = optax.chain(optax.clip_by_global_norm(10.0), imp_like(k=1))
  trace = run_loop(tx, 9)
  params, opt_state = trace[-1][:2]
  masks = og.get_masks(opt_state)
  assert int(masks["a"]["kernel"].sum()) == 100 and masks["a"]["bias"].shape == ()
  assert bitwise_equal(og.final_masks(params, opt_state), masks)
  with pytest.raises(ValueError, match="sparsity"):
    og.final_masks(params, opt_state, sparsity=0.9)
  ones = jax.tree.map(lambda m: jnp.ones_like(m), masks)
  assert bitwise_equal(og.effective_params(params, og.with_masks(opt_state, ones)), params)


def test_wrapped_method_state_is_refused():
  """The inner chain must not hold another sparsity method: the rounds state is the method."""
  tx = og.rounds(og.magnitude(0.5), 4, 2, halve_masks)
  with pytest.raises(ValueError, match="inner holds a sparsity method"):
    tx.init(params0())


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps_per_round=0), "steps_per_round"),
    (dict(steps_per_round=(4, 4, 4)), "one entry per round"),
    (dict(num_rounds=0), "num_rounds"),
    (dict(rewind_step=4), "rewind_step"),
    (dict(rewind=(True, False)), "one entry per round boundary"),
    (dict(schedule_step=-1), "schedule_step"),
])
def test_bad_arguments(kwargs, match):
  args = dict(steps_per_round=4, num_rounds=2) | kwargs
  with pytest.raises(ValueError, match=match):
    og.rounds(inner_sgd(), args.pop("steps_per_round"), args.pop("num_rounds"), halve_masks,
              **args)


def test_resume_from_host_copies_mid_round_is_bitwise():
  """A checkpoint is the state's arrays: restoring numpy copies just before a boundary and
  running on ends where the uninterrupted run does."""
  tx = imp_like(k=2)
  trace = run_loop(tx, 10)
  params, opt_state, extra, saved, _ = jax.tree.map(np.asarray, trace[7])
  step = make_step(tx)
  for t in range(7, 10):
    params, opt_state, extra, saved, _ = step(params, opt_state, extra, saved, t)
  assert bitwise_equal((params, opt_state, extra, saved), trace[10][:4])
