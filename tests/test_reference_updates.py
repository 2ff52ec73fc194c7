"""The scored pruning baselines against float64 NumPy re-implementations of their updates.

``og.gmp``, ``og.magnitude``, ``og.snip`` and ``og.random_pruning`` are driven for several steps
on a tiny params tree with given params and gradients (float32, jitted updates), and compared,
step by step, with the method written out from ../shared/SPEC.md §2 and its docstring, in the
same process:

* which weights are kept: per pool (one per kernel for ``'uniform'``, all kernels for
  ``'global'``) exactly ``k = N − floor(p·N)`` of the highest scores, ties going to the earlier
  leaf (in the params' flatten order), then the lower flat index; biases never pruned;
* when: the mask the forward pass of step ``t`` uses is selected at ``init`` (``t = 0``) or in
  the update of step ``t − 1``, from the weights that update sees, on the method's schedule;
* what goes down the chain: ``G ⊙ M`` with the mask of the step's own forward pass (SNIP:
  already the new mask in its selecting update).

Masks are compared exactly: the scores are built without near-ties (distinct multiples of
1/64 times powers of two, exact in float32, so the float32 and float64 scores are the same
numbers; random pruning's drawn float32 scores are checked distinct), and every scheduled
count ``p·N`` is checked to be clear of an integer. One test builds exact ties on purpose, to
check the tie rule. Updates are compared with a float tolerance. Each method is called with
its documented default distribution where a case uses it, so the defaults are checked too.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optg_jax as og

SHAPES = {"a": {"kernel": (6, 5), "bias": (5,)}, "b": {"kernel": (5, 4), "bias": (4,)}}
STEPS = 9
KERNELS = [("a", "kernel"), ("b", "kernel")]  # the prunable leaves, in flatten order
N = sum(math.prod(SHAPES[name][leaf]) for name, leaf in KERNELS)


# ---------------------------------------------------------------------------------------------
# Inputs.


def _tree(make):
  """A params-shaped dict of ``make(path, shape)``."""
  return {name: {leaf: make((name, leaf), shape) for leaf, shape in leaves.items()}
          for name, leaves in SHAPES.items()}


def _split(flat):
  """A flat vector over the kernels (flatten order) as ``{path: array}``."""
  out, start = {}, 0
  for path in KERNELS:
    shape = SHAPES[path[0]][path[1]]
    out[path] = flat[start:start + math.prod(shape)].reshape(shape)
    start += math.prod(shape)
  return out


def _distinct(rng):
  """``N`` distinct magnitudes ``i/64``, ``i = 1..N`` shuffled, per kernel (exact in float32;
  neighbours 1/64 apart, 2% of the largest)."""
  return _split((rng.permutation(N) + 1) / 64.0)


def _params_seq(rng, magnitudes=None):
  """``STEPS`` params trees: kernels ``±`` tie-free magnitudes (new ones every step), biases
  random; ``magnitudes(rng)`` gives the kernels' magnitudes (default :func:`_distinct`)."""
  seq = []
  for _ in range(STEPS):
    mags = (magnitudes or _distinct)(rng)
    seq.append(_tree(lambda path, shape: (
        mags[path] * rng.choice([-1.0, 1.0], shape) if path in mags
        else rng.normal(size=shape)).astype(np.float32)))
  return seq


def _grads_seq(rng):
  return [_tree(lambda path, shape: rng.normal(size=shape).astype(np.float32))
          for _ in range(STEPS)]


def _as_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


def _pool(distribution, default):
  """``distribution=`` only where it is not the method's documented default, so that the
  defaults are checked too."""
  return {} if distribution == default else {"distribution": distribution}


# ---------------------------------------------------------------------------------------------
# The reference, in float64 NumPy.


def _keep_count(n: int, p) -> int:
  """``n − floor(p·n)``: ``p`` a :class:`Fraction` (a target read as its decimal, exact) or a
  float64 scheduled value, which must be clear of a whole count (the float32 and float64
  roundings of ``p·n`` then floor alike)."""
  if isinstance(p, Fraction):
    return n - math.floor(p * n)
  pruned = p * n
  assert pruned == 0 or abs(pruned - round(pruned)) > 1e-4, (p, n)  # no near-tie in counts
  return n - math.floor(pruned)


def _top_k(scores: np.ndarray, k: int, ties_to_later: bool = False) -> np.ndarray:
  """The ``k`` highest of a flat float64 vector; ties to the lower index (a stable sort), or
  to the higher one with ``ties_to_later`` (only to show that the rule decides)."""
  keep = np.zeros(scores.size, bool)
  if ties_to_later:
    keep[scores.size - 1 - np.argsort(-scores[::-1], kind="stable")[:k]] = True
  else:
    keep[np.argsort(-scores, kind="stable")[:k]] = True
  return keep


def reference_masks(scores: dict, p, distribution: str, ties_to_later: bool = False) -> dict:
  """``{kernel path: bool mask}`` keeping ``N − floor(p·N)`` per pool: per kernel
  (``'uniform'``) or over all kernels in flatten order (``'global'``)."""
  if distribution == "uniform":
    return {path: _top_k(np.ravel(s), _keep_count(s.size, p), ties_to_later).reshape(s.shape)
            for path, s in scores.items()}
  assert distribution == "global"
  flat = np.concatenate([np.ravel(scores[path]) for path in KERNELS])
  return _split(_top_k(flat, _keep_count(flat.size, p), ties_to_later))


def _dense():
  return {path: np.ones(SHAPES[path[0]][path[1]], bool) for path in KERNELS}


def _kernels64(tree):
  return {path: np.asarray(tree[path[0]][path[1]], np.float64) for path in KERNELS}


def reference_update(grads: dict, masks: dict) -> dict:
  """``G ⊙ M`` in float64: kernels masked, biases handed down whole."""
  return _tree(lambda path, _: np.asarray(grads[path[0]][path[1]], np.float64)
               * (masks[path] if path in masks else 1.0))


def zhu_gupta(t: int, final: float, initial: float, begin: int, end: int, power: int = 3):
  """``p(t) = P + (p0 − P)(1 − (t − t0)/(t1 − t0))^power`` at a refresh step ``t`` (float64),
  the target itself (exactly, as a decimal :class:`Fraction`) from ``t1`` on."""
  if t >= end:
    return Fraction(repr(final))
  return final + (initial - final) * (1 - (t - begin) / (end - begin)) ** power


# ---------------------------------------------------------------------------------------------
# Driving a method and comparing.


def _drive(tx, params_seq, grads_seq):
  """``masks[t]`` (the forward pass of step ``t``, ``t = 0..STEPS``) and ``updates[t]``."""
  update = jax.jit(tx.update)
  state = tx.init(_as_jax(params_seq[0]))
  masks, updates = [og.get_masks(state)], []
  for params, grads in zip(params_seq, grads_seq):
    out, state = update(_as_jax(grads), state, _as_jax(params))
    updates.append(out)
    masks.append(og.get_masks(state))
  return masks, updates


def _compare(got_masks, got_updates, want_masks, want_updates):
  for t, (got, want) in enumerate(zip(got_masks, want_masks)):
    for path in KERNELS:
      np.testing.assert_array_equal(got[path[0]][path[1]], want[path],
                                    err_msg=f"mask of step {t}, {path}")
    for name in SHAPES:
      assert np.ndim(got[name]["bias"]) == 0 and bool(got[name]["bias"]), (t, name)
  for t, (got, want) in enumerate(zip(got_updates, want_updates)):
    for name, leaves in SHAPES.items():
      for leaf in leaves:
        np.testing.assert_allclose(np.asarray(got[name][leaf], np.float64), want[name][leaf],
                                   rtol=1e-6, atol=0, err_msg=f"update of step {t}, {name}/{leaf}")


def _check_the_pruned_stay_pruned(want_masks, want_updates):
  """The reference is not trivial: it prunes, and a pruned weight gets an exact 0."""
  assert 0 < sum(int(want_masks[-1][path].sum()) for path in KERNELS) < N
  last = want_updates[-1]
  for path in KERNELS:
    assert np.all(last[path[0]][path[1]][~want_masks[-1][path]] == 0.0)


# ---------------------------------------------------------------------------------------------
# The methods.


GMP_CASES = {
    # final, begin, end, frequency, initial, distribution
    "uniform": (0.8, 1, 7, 2, 0.0, "uniform"),
    "global_from_init": (0.7, 0, 6, 3, 0.25, "global"),
}


@pytest.mark.parametrize("case", sorted(GMP_CASES))
def test_gmp_matches_the_reference(case):
  """Scores ``|W_t|`` at the refreshes ``t0, t0 + Δt, …, t1``, the count of the cubic schedule
  at the refreshed step; the mask holds between refreshes and after ``t1``."""
  final, begin, end, freq, initial, distribution = GMP_CASES[case]
  rng = np.random.default_rng(0)
  params_seq, grads_seq = _params_seq(rng), _grads_seq(rng)
  tx = og.gmp(final, begin, end, freq, initial_sparsity=initial,
              **_pool(distribution, "uniform"))
  refreshes = set(range(begin, end + 1, freq))
  assert end in refreshes and max(refreshes) < STEPS  # the target is reached within the run

  def select(t, weights):
    return reference_masks({k: np.abs(w) for k, w in _kernels64(weights).items()},
                           zhu_gupta(t, final, initial, begin, end), distribution)

  want_masks = [select(0, params_seq[0]) if 0 in refreshes else _dense()]
  want_updates = []
  for t in range(STEPS):
    want_updates.append(reference_update(grads_seq[t], want_masks[t]))
    want_masks.append(select(t + 1, params_seq[t]) if t + 1 in refreshes else want_masks[t])
  _check_the_pruned_stay_pruned(want_masks, want_updates)
  assert len({tuple(np.concatenate([m[p].ravel() for p in KERNELS])) for m in want_masks}) > 2
  _compare(*_drive(tx, params_seq, grads_seq), want_masks, want_updates)


@pytest.mark.parametrize("step,distribution", [(0, "global"), (3, "uniform")])
def test_magnitude_matches_the_reference(step, distribution):
  """One selection at ``step`` from the weights of that moment (at init for 0, else those the
  update of ``step − 1`` sees) at the target, dense before, frozen after."""
  final = 0.6
  rng = np.random.default_rng(1)
  params_seq, grads_seq = _params_seq(rng), _grads_seq(rng)
  tx = og.magnitude(final, step=step, **_pool(distribution, "global"))
  seen = params_seq[max(step - 1, 0)]
  chosen = reference_masks({k: np.abs(w) for k, w in _kernels64(seen).items()},
                           Fraction(repr(final)), distribution)
  want_masks = [chosen if t >= step else _dense() for t in range(STEPS + 1)]
  want_updates = [reference_update(g, m) for g, m in zip(grads_seq, want_masks)]
  _check_the_pruned_stay_pruned(want_masks, want_updates)
  _compare(*_drive(tx, params_seq, grads_seq), want_masks, want_updates)


def _snip_inputs(rng, num_batches):
  """Params and gradients whose saliency ``|(Σ_{t<nb} G_t) ⊙ W_{nb−1}|`` is tie-free and exact
  in float32: ``W_{nb−1} = ±2^e`` (``e`` in −2..0), ``Σ G_t = ±m/|W|`` with distinct ``m``
  (:func:`_distinct`), the ``G_t`` dyadic."""
  params_seq, grads_seq = _params_seq(rng), _grads_seq(rng)
  w = {path: rng.choice([-1.0, 1.0], s.shape) * 2.0 ** rng.integers(-2, 1, s.shape)
       for path, s in _kernels64(params_seq[0]).items()}
  total = {path: rng.choice([-1.0, 1.0], m.shape) * m / np.abs(w[path])
           for path, m in _distinct(rng).items()}
  for path in KERNELS:
    name, leaf = path
    params_seq[num_batches - 1][name][leaf] = w[path].astype(np.float32)
    rest = total[path].copy()
    for t in range(num_batches - 1):
      part = rng.integers(-16, 17, rest.shape) / 32.0
      grads_seq[t][name][leaf] = part.astype(np.float32)
      rest -= part
    grads_seq[num_batches - 1][name][leaf] = rest.astype(np.float32)
  saliency = {path: np.abs(total[path] * w[path]) for path in KERNELS}
  return params_seq, grads_seq, saliency


@pytest.mark.parametrize("num_batches,distribution", [(1, "global"), (2, "global"),
                                                      (2, "uniform")])
def test_snip_matches_the_reference(num_batches, distribution):
  """Saliency ``|(Σ_{t<nb} G_t) ⊙ W_{nb−1}|``, selected at the target in the update of step
  ``nb − 1``, whose gradient it already masks; dense before, frozen after."""
  final = 0.75
  rng = np.random.default_rng(2)
  params_seq, grads_seq, saliency = _snip_inputs(rng, num_batches)
  tx = og.snip(final, num_batches=num_batches, **_pool(distribution, "global"))
  chosen = reference_masks(saliency, Fraction(repr(final)), distribution)
  want_masks = [chosen if t >= num_batches else _dense() for t in range(STEPS + 1)]
  want_updates = [reference_update(g, chosen if t >= num_batches - 1 else _dense())
                  for t, g in enumerate(grads_seq)]
  _check_the_pruned_stay_pruned(want_masks, want_updates)
  _compare(*_drive(tx, params_seq, grads_seq), want_masks, want_updates)


@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_random_pruning_matches_the_reference(distribution):
  """Scores ``U[0, 1)``, leaf ``i`` of the params (biases counted) drawn from
  ``split(key(seed), #leaves)[i]`` as documented; selected at init at the target, frozen."""
  final, seed = 0.6, 5
  rng = np.random.default_rng(3)
  params_seq, grads_seq = _params_seq(rng), _grads_seq(rng)
  leaves, treedef = jax.tree.flatten(_as_jax(params_seq[0]))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  drawn = jax.tree.unflatten(treedef, [jax.random.uniform(k, np.shape(p))
                                       for k, p in zip(keys, leaves)])
  scores = _kernels64(drawn)
  flat = np.concatenate([s.ravel() for s in scores.values()])
  assert np.unique(flat).size == N  # no ties among the drawn scores
  chosen = reference_masks(scores, Fraction(repr(final)), distribution)
  want_masks = [chosen] * (STEPS + 1)
  want_updates = [reference_update(g, chosen) for g in grads_seq]
  _check_the_pruned_stay_pruned(want_masks, want_updates)
  tx = og.random_pruning(final, seed=seed, **_pool(distribution, "uniform"))
  _compare(*_drive(tx, params_seq, grads_seq), want_masks, want_updates)


@pytest.mark.parametrize("distribution", ["global", "uniform"])
def test_exact_ties_go_to_the_earlier_leaf_then_the_lower_index(distribution):
  """Magnitudes in {1/4, 1/2, 3/4} (many exact ties at every threshold): the reference's
  stable order (leaf in flatten order, then flat index) decides, and the count stays exact."""
  final = 0.5
  rng = np.random.default_rng(4)

  def coarse(rng):
    return {path: rng.integers(1, 4, SHAPES[path[0]][path[1]]) / 4.0 for path in KERNELS}

  params_seq, grads_seq = _params_seq(rng, coarse), _grads_seq(rng)
  tx = og.magnitude(final, distribution=distribution)
  scores = {k: np.abs(w) for k, w in _kernels64(params_seq[0]).items()}
  chosen = reference_masks(scores, Fraction(repr(final)), distribution)
  kept = sum(int(m.sum()) for m in chosen.values())
  assert kept == (N - math.floor(final * N) if distribution == "global" else
                  sum(m.size - math.floor(final * m.size) for m in chosen.values()))
  want_masks = [chosen] * (STEPS + 1)
  want_updates = [reference_update(g, chosen) for g in grads_seq]
  _compare(*_drive(tx, params_seq, grads_seq), want_masks, want_updates)
  backwards = reference_masks(scores, Fraction(repr(final)), distribution, ties_to_later=True)
  assert any(np.any(chosen[p] != backwards[p]) for p in KERNELS)  # the tie rule decides
  if distribution == "global":  # the tie at the threshold spans both leaves: a's lowest first
    thr = min(scores[p][chosen[p]].min() for p in KERNELS)
    (tied_a, kept_a), (tied_b, kept_b) = ((np.ravel(scores[p]) == thr, np.ravel(chosen[p]))
                                          for p in KERNELS)
    assert tied_b.any() and not kept_b[tied_b].any()
    assert kept_a[tied_a][0] and np.all(np.diff(kept_a[tied_a].astype(int)) <= 0)


def test_gmp_reaches_its_target_when_the_window_is_off_the_refresh_grid():
  """``end_step − begin_step`` not a multiple of ``frequency``: the mask is still refreshed at
  ``end_step`` (the docstring's "inclusive"), so the run ends at exactly ``k = N − floor(P·N)``."""
  params = {"w": jnp.arange(1.0, 101.0).reshape(10, 10)}
  tx = og.gmp(0.8, 1, 6, 2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  kept = []
  for _ in range(8):
    _, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
    kept.append(int(og.get_masks(state)["w"].sum()))
  assert kept[-1] == 100 - math.floor(0.8 * 100), kept
  assert kept[5] == 20 and kept[4] > 20  # selected in the update of step 5, for step 6
