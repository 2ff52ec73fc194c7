"""Every method trains the trajectory it was recorded on, up to float rounding across CPUs.

``tests/data/trajectories.npz`` holds, for each configuration below, the masks and params after
12 jitted steps and the decision margin of every mask selection on the way (see
:func:`_margin_hook`). It is written by ``python tests/test_trajectories.py --record [CONFIG ...]``
(all configurations, or only the named ones). A restructure of the methods must reproduce it; a
deliberate change of behaviour re-records the configurations it changes and says why in its
commit. The trajectories are recomputed in a child process under the default XLA flags (the
suite compiles without backend optimisations, see conftest.py), as users run them; an ISA flag
such as ``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` reaches the child.

XLA:CPU's float results differ across CPUs (vector widths, FMA, the order of reductions), so no
float is compared bit for bit:

* Params: ``|got − recorded| <= PARAMS_RTOL · max|recorded|`` per leaf. Recomputed on an
  AVX-512 AMD EPYC, under ``--xla_cpu_max_isa=AVX2`` and ``SSE4_2`` and at both optimisation
  levels, the params moved by at most 6.5e-7 of their leaf's largest value (8.4e-9 absolute on
  a bias of scale 0.02) from each other and from the recording; ``PARAMS_RTOL = 2e-5`` is 30
  times that. Changes of behaviour tried moved them by 150 to 20,000 times ``PARAMS_RTOL``: one
  swapped pair of mask entries by 1.6e-2 of the leaf's scale; OptG's score momentum 0.9 → 0.89 by
  3e-3 to 0.19 (1.5e-2 in ``optg_stacked``, whose masks did not change); GMP's power 3 → 2 by
  0.2 to 0.45 (``gmp_erk`` without a flip); the pruners handing down ``G`` instead of
  ``G ⊙ M`` by 1e-2 to 5e-2, masks unchanged. OptG's params see its scores only through the
  masks: a change of the scores too small to flip a mask is invisible here (``test_optg.py``
  checks the scores against float64 references).
* Masks: a mask entry flips across CPUs only when two scores of one selection pool (one kept,
  one dropped) are within the scores' float drift of each other. The recording keeps, for every
  selection, its margin: the smallest gap between a kept and a dropped score of a pool, over the
  pool's largest ``|score|``. Across the CPUs and flags above the scores moved by at most 3e-7
  of the largest ``|score|`` of their leaf (or stacked layer), so a gap moved by at most 6e-7 of
  its pool's scale, and a selection whose margin is at least ``NEAR_TIE = 1e-5`` (16 times that)
  decides the same way on any CPU; the recorded margins are all above 1e-4. In a
  configuration whose every margin is clear, no flip is allowed: a flip is a change of
  behaviour. The configurations are chosen clear of ties (OptG at sparsity 0.85: at 0.8 one
  selection had a margin of 6.7e-7), and :func:`record` warns about a near-tie. Only in a
  configuration with a recorded near-tie may each leaf's final mask differ in up to
  ``MAX_FLIPS = 2`` entries (one kept/dropped pair swapped per pool); the params downstream of a
  flip then differ by about 1e-2 of their scale, so they are only checked to within
  ``FLIPPED_RTOL = 0.1`` of it, which still catches a gross change.
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax.methods import selection as selection_lib

import helpers

DATA = pathlib.Path(__file__).parent / "data" / "trajectories.npz"
SPE, EPOCHS = 3, 4
STEPS = SPE * EPOCHS

PARAMS_RTOL = 2e-5
"""Params tolerance, a fraction of the leaf's largest ``|value|`` (module doc)."""
NEAR_TIE = 1e-5
"""A selection whose margin (kept − dropped score gap over the pool's largest ``|score|``) is
below this may decide otherwise on another CPU (module doc)."""
MAX_FLIPS = 2
"""Flipped entries allowed per leaf's final mask, only in a configuration with a near-tie."""
FLIPPED_RTOL = 0.1
"""Params tolerance (of the leaf's scale) once a near-tie flipped a mask."""

CONFIGS = {
    "optg": lambda: og.mask_optimizer(0.85, _lr, SPE, EPOCHS),
    "optg_nesterov_decay": lambda: og.mask_optimizer(0.85, _lr, SPE, EPOCHS, nesterov=True,
                                                     score_weight_decay=1e-3),
    "optg_uniform_exclude": lambda: og.mask_optimizer(0.7, _lr, SPE, EPOCHS,
                                                      distribution="uniform",
                                                      exclude=("dense1/kernel",)),
    "optg_stacked": lambda: og.mask_optimizer(0.75, _lr, SPE, EPOCHS, distribution="uniform",
                                              layer_axes={"stack": 0}),
    "gmp": lambda: og.gmp(0.9, 2, 8, 2),
    "gmp_erk": lambda: og.gmp(0.85, 1, 7, 3, distribution="erk"),
    "gmp_global_stacked": lambda: og.gmp(0.8, 0, 6, 3, distribution="global",
                                         layer_axes={"stack": 0}),
    "magnitude": lambda: og.magnitude(0.9),
    "magnitude_late_uniform": lambda: og.magnitude(0.6, step=4, distribution="uniform"),
    "snip": lambda: og.snip(0.9),
    "snip_two_uniform": lambda: og.snip(0.7, num_batches=2, distribution="uniform",
                                        overrides={"dense2": 0.3}),
    "random": lambda: og.random_pruning(0.8, seed=3),
}

MARGINS = "margins"
"""Key suffix of a configuration's margins: shape ``(STEPS + 1,)``, entry ``t`` the smallest
margin of the selections made for the forward pass of step ``t`` (at ``init`` for ``t = 0``,
else in the update of step ``t − 1``), ``inf`` where none was made."""


def _lr(t):
  return 0.1 * (1.0 + jnp.cos(jnp.pi * t / STEPS)) / 2


def _params():
  k = jax.random.split(jax.random.key(7), 4)
  return {"dense1": {"kernel": jax.random.normal(k[0], (12, 16)) / 3, "bias": jnp.zeros(16)},
          "dense2": {"kernel": jax.random.normal(k[1], (16, 8)) / 4, "bias": jnp.zeros(8)},
          "stack": jax.random.normal(k[2], (2, 8, 8)) / 3}


def _loss(p, t):
  k = jax.random.split(jax.random.key(1000 + t))
  x = jax.random.normal(k[0], (32, 12))
  y = jax.random.randint(k[1], (32,), 0, 8)
  h = jnp.tanh(x @ p["dense1"]["kernel"] + p["dense1"]["bias"])
  h = jnp.tanh(h @ p["dense2"]["kernel"] + p["dense2"]["bias"])
  logits = jnp.tanh(h @ p["stack"][0]) @ p["stack"][1]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _trajectory(method: optax.GradientTransformation, after=None) -> dict[str, np.ndarray]:
  """Masks and params after ``STEPS`` jitted steps; ``after(t)`` is called once the state for
  the forward pass of step ``t`` exists (after ``init`` for ``t = 0``)."""
  tx = optax.chain(method, optax.add_decayed_weights(5e-4), optax.sgd(_lr, momentum=0.9))
  params = _params()
  opt_state = tx.init(params)
  if after:
    after(0)
  step = helpers.jitted_step(tx, _loss)
  for t in range(STEPS):
    params, opt_state, _ = step(params, opt_state, t)
    if after:
      after(t + 1)
  out = {}
  for name, tree in (("params", params), ("masks", og.get_masks(opt_state))):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return out


def _all_trajectories(configs=CONFIGS) -> dict[str, np.ndarray]:
  arrays = {}
  for config in configs:
    for key, value in _trajectory(CONFIGS[config]()).items():
      arrays[f"{config}:{key}"] = value
  return arrays


def _pool_margin(scores: np.ndarray, kept: np.ndarray) -> float:
  """``(min kept score − max dropped score) / max|score|`` of one pool; ``inf`` when the pool
  keeps all or nothing (no decision), 0 for a tie broken by position."""
  scores, kept = np.asarray(scores, np.float64).ravel(), np.asarray(kept, bool).ravel()
  if kept.all() or not kept.any():
    return np.inf
  scale = np.abs(scores).max()
  return float((scores[kept].min() - scores[~kept].max()) / scale) if scale else 0.0


def _prunable_leaves(prunable, *trees):
  """Per prunable leaf, the tuple of its entries in ``trees`` (``None`` entries kept)."""
  flat = [jax.tree.leaves(jax.tree.map(lambda _, x: x, prunable, t, is_leaf=lambda x: x is None),
                          is_leaf=lambda x: x is None) for t in trees]
  return [entries for keep, *entries in zip(jax.tree.leaves(prunable), *flat) if keep]


@contextlib.contextmanager
def _margin_hook():
  """Inside, every :meth:`Selection.masks` call that runs (the top-k of every scored method: the
  pruners' selections and OptG's refreshes; jitted or not) appends its smallest pool margin
  (:func:`_pool_margin`) to the list this yields, through a host callback (call
  ``jax.effects_barrier`` before reading it). Pools: one for ``'global'``, else one per
  prunable leaf, or one per slice along its ``layer_axes`` axis."""
  margins = []
  original = selection_lib.Selection.masks

  def masks(self, scores, params, fraction, final_sparsity):
    out = original(self, scores, params, fraction, final_sparsity)
    if self.min_density or self.rule != "exact":
      raise NotImplementedError("margins of min_density or rule='reference' selections")
    prunable = self.prunable(params)
    leaves = _prunable_leaves(prunable, scores, out,
                              self._axes(params, prunable))  # pylint: disable=protected-access
    axes = [None if self.distribution == "global" else axis for _, _, axis in leaves]

    def host(scores, kept):
      pools = []
      for s, m, axis in zip(scores, kept, axes):
        pools += [(s, m)] if axis is None else zip(np.moveaxis(s, axis, 0),
                                                   np.moveaxis(m, axis, 0))
      if self.distribution == "global":
        pools = [(np.concatenate([np.ravel(s) for s, _ in pools]),
                  np.concatenate([np.ravel(m) for _, m in pools]))]
      margins.append(min(_pool_margin(s, m) for s, m in pools))

    jax.debug.callback(host, [s for s, _, _ in leaves], [m for _, m, _ in leaves])
    return out

  selection_lib.Selection.masks = masks
  try:
    yield margins
  finally:
    selection_lib.Selection.masks = original


def _margins(config: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """The margins of ``config``'s selections, step by step (see :data:`MARGINS`), and its
  trajectory as the hooked run computed it."""
  per_step = np.full(STEPS + 1, np.inf)
  with _margin_hook() as margins:

    def after(t):
      jax.effects_barrier()
      per_step[t] = min(margins, default=np.inf)
      margins.clear()

    hooked = _trajectory(CONFIGS[config](), after)
  return per_step, hooked


def record(configs=None) -> None:
  """Records ``configs`` (default: all; the others keep their recording) into :data:`DATA`."""
  configs = list(CONFIGS) if not configs else configs
  unknown = sorted(set(configs) - set(CONFIGS))
  if unknown:
    sys.exit(f"unknown configurations {unknown}; known: {sorted(CONFIGS)}")
  arrays = {}
  if DATA.exists() and set(configs) != set(CONFIGS):
    kept = set(CONFIGS) - set(configs)
    arrays = {k: v for k, v in np.load(DATA).items() if k.split(":", 1)[0] in kept}
  arrays.update(_all_trajectories(configs))
  for config in configs:
    margins, hooked = _margins(config)
    arrays[f"{config}:{MARGINS}"] = margins
    if margins.min() < NEAR_TIE:
      warnings.warn(
          f"{config}: the selection for step {int(margins.argmin())} has margin "
          f"{margins.min():.2g} < NEAR_TIE = {NEAR_TIE}: its masks may flip on another CPU, "
          "and the test then checks its params only to FLIPPED_RTOL; change the configuration "
          "(e.g. its sparsity) until every margin is clear", stacklevel=2)
    elif any(np.any(v != arrays[f"{config}:{k}"]) for k, v in hooked.items()
             if k.startswith("masks")):  # the hook only reads, so it decides the same
      warnings.warn(f"{config}: the masks of the run that measured the margins differ from "
                    "the recorded ones", stacklevel=2)
  DATA.parent.mkdir(exist_ok=True)
  np.savez_compressed(DATA, **arrays)


def compare(config: str, got: dict[str, np.ndarray], recorded: dict[str, np.ndarray]) -> None:
  """Asserts that ``got`` (``key -> array``, keys as recorded without the configuration) is
  ``config``'s recorded trajectory within the module's tolerances."""
  margins = recorded[MARGINS]
  recorded = {k: v for k, v in recorded.items() if k != MARGINS}
  assert sorted(got) == sorted(recorded)
  near_tie = margins.min() < NEAR_TIE
  flipped = False
  for key, want in recorded.items():
    assert got[key].dtype == want.dtype and got[key].shape == want.shape, key
    if key.startswith("masks"):
      flips = int(np.sum(got[key] != want))
      allowed = MAX_FLIPS if near_tie else 0
      assert flips <= allowed, (
          f"{config}: {key} differs in {flips} entries (allowed {allowed}; smallest recorded "
          f"margin {margins.min():.2g} at step {int(margins.argmin())})")
      flipped |= flips > 0
  for key, want in recorded.items():
    if key.startswith("params"):
      rtol = FLIPPED_RTOL if flipped else PARAMS_RTOL
      np.testing.assert_allclose(got[key], want, rtol=0, atol=rtol * np.abs(want).max(),
                                 err_msg=f"{config}: {key} (masks flipped: {flipped})")


def _of(config, arrays):
  return {k.split(":", 1)[1]: v for k, v in arrays.items() if k.split(":", 1)[0] == config}


@pytest.fixture(scope="module")
def recomputed(tmp_path_factory):
  """Every configuration's trajectory, computed in a child process under the default flags."""
  out = tmp_path_factory.mktemp("trajectories") / "now.npz"
  helpers.run_under_default_flags(__file__, "--compute", str(out))
  return dict(np.load(out))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_trajectory_matches_the_recorded_one_across_cpus(config, recomputed):
  compare(config, _of(config, recomputed), _of(config, dict(np.load(DATA))))


def test_recorded_trajectories_are_not_trivial():
  recorded = np.load(DATA)
  assert sorted({k.split(":", 1)[0] for k in recorded.files}) == sorted(CONFIGS)
  for config in CONFIGS:
    kernel_mask = recorded[f"{config}:masks['dense2']['kernel']"]
    assert 0 < kernel_mask.sum() < kernel_mask.size, config
    margins = recorded[f"{config}:{MARGINS}"]
    assert margins.shape == (STEPS + 1,) and np.isfinite(margins).any(), config  # it selected


def test_comparison_refuses_a_flip_unless_the_recording_has_a_near_tie():
  """:func:`compare` on the recording itself: a flipped mask entry, or params moved by a
  behaviour-sized amount, fail; only a near-tie recording allows a flip, and checks the params
  loosely then."""
  recorded = _of("gmp", dict(np.load(DATA)))
  assert recorded[MARGINS].min() >= NEAR_TIE
  same = {k: v for k, v in recorded.items() if k != MARGINS}
  compare("gmp", same, recorded)
  key = "masks['dense2']['kernel']"
  flipped = dict(same, **{key: recorded[key].copy()})
  flipped[key][0, 0] ^= True
  with pytest.raises(AssertionError, match="differs in 1 entries"):
    compare("gmp", flipped, recorded)
  near_tie = dict(recorded, **{MARGINS: np.where(np.isfinite(recorded[MARGINS]), 1e-7, np.inf)})
  compare("gmp", flipped, near_tie)
  moved = "params['dense2']['kernel']"
  for drift, fails in ((0.5 * PARAMS_RTOL, False), (2 * PARAMS_RTOL, True)):
    got = dict(same, **{moved: recorded[moved] + drift * np.abs(recorded[moved]).max()})
    with pytest.raises(AssertionError) if fails else contextlib.nullcontext():
      compare("gmp", got, recorded)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--record"]:
    record(sys.argv[2:])
  elif len(sys.argv) == 3 and sys.argv[1] == "--compute":
    np.savez(sys.argv[2], **_all_trajectories())
  else:
    sys.exit("usage: python tests/test_trajectories.py --record [CONFIG ...] | --compute OUT.npz")
