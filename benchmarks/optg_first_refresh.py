"""Which weights OptG prunes at the first refresh of its ramp, and what removing them costs.

LeNet-300-100 on mnist5k with OptG's reference chain (``recipes.make_optimizer('optg', ...)``),
trained until the first epoch boundary whose refreshed mask removes any weight (or at least
``--min-removed``). At that point
(scores ``S = -Σ η_s G ⊙ W``, weights ``W``), for the ``m`` weights the refresh removes:

* median ``|W|`` of the removed weights against all prunable weights, and the share of them
  whose accumulated criterion says removal *lowers* the loss (``S < 0``, i.e. ``Σ η G·W > 0``);
* the same set under both selection rules (``'exact'`` here, ``'reference'``: the authors'
  ``S >= thr``), to tell the algorithm from this implementation;
* train loss and test accuracy of the network with those ``m`` weights removed, against the
  ``m`` smallest ``|W|`` and ``m`` random weights;
* the rank correlation of ``S`` with ``W_T² − W_{T−1}²``, the change over the last epoch
  (plain SGD gives ``ΔW = -η_w G``, so ``-η_s G·W = (η_s/η_w)·ΔW·W ≈ (η_s/η_w)·Δ(W²)/2``: the
  scores track the squared weights' movement, as in movement pruning, weighted by
  ``η_s/η_w = p(t)/P``, which on the ramp's tail grows about e-fold per epoch; weight decay and
  momentum make it approximate);
* per removed weight, the loss change measured by removing it alone against the first-order
  prediction ``-G_i·W_i`` at the current weights (``G`` over the whole training split), the
  criterion the scores accumulate.

Nothing is asserted; the numbers of ``benchmarks/README.md`` come from::

  python benchmarks/optg_first_refresh.py --ramp reference --epochs 40 --sparsity 0.98
  python benchmarks/optg_first_refresh.py --ramp reference --epochs 40 --sparsity 0.98 \
      --min-removed 30
  python benchmarks/optg_first_refresh.py --ramp budget --epochs 10 --sparsity 0.95
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optg_jax as og
from optg_jax import data
from optg_jax import models
from optg_jax import recipes
from optg_jax import training

BATCH = 100


def _flat(tree):
  """The prunable kernels of a LeNet tree, concatenated in ``tree_leaves`` order."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return np.concatenate([np.asarray(x, np.float64).ravel() for path, x in leaves
                         if jax.tree_util.keystr(path).endswith("['kernel']")])


def _unflat(params, flat_keep):
  """Bool masks of ``params``' treedef from a flat keep vector over the kernels."""
  out, start = [], 0
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  for path, x in leaves:
    if jax.tree_util.keystr(path).endswith("['kernel']"):
      out.append(jnp.asarray(flat_keep[start:start + x.size].reshape(x.shape)))
      start += x.size
    else:
      out.append(jnp.ones((), bool))
  return jax.tree_util.tree_unflatten(treedef, out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ramp", default="reference", choices=og.methods.optg.RAMPS)
  parser.add_argument("--epochs", type=int, default=40)
  parser.add_argument("--sparsity", type=float, default=0.98)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min-removed", type=int, default=1,
                      help="study the first refresh removing at least this many weights")
  args = parser.parse_args()

  train, test = data.load_mnist_5k(seed=args.seed)
  spe = len(train.labels) // BATCH
  tx = recipes.make_optimizer("optg", args.sparsity, steps_per_epoch=spe, epochs=args.epochs,
                              seed=args.seed, ramp=args.ramp)
  model = models.get_model("lenet300100")
  # The ramp's fraction of P at each epoch start (the private helper og.mask_optimizer uses).
  fraction_of = og.methods.optg._ramp(args.ramp, spe, args.epochs, 1.0)
  n = 784 * 300 + 300 * 100 + 100 * 10
  first = next(e for e in range(args.epochs) if og.masks.keep_count(
      n, og.masks.ScaledSparsity(args.sparsity, fraction_of(jnp.int32((e + 1) * spe))))
               <= n - args.min_removed)
  # Train until the refresh at the end of epoch `first`, the first to remove that many weights.
  state = training.fit(model, tx, train, test, epochs=first + 1, batch_size=BATCH,
                       seed=args.seed).state
  found = {"epoch": first}
  params = state.params
  scores_tree = og.methods.base.find_state(state.opt_state).scores
  w, s = _flat(params), _flat(scores_tree)
  w0 = _flat(training.init(model, tx, train.images[:1], args.seed).params if first == 0 else
             training.fit(model, tx, train, test, epochs=first, batch_size=BATCH,
                          seed=args.seed).state.params)
  ranks = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable")
  keep = _flat(og.get_masks(state.opt_state)).astype(bool)
  removed = ~keep
  m = int(removed.sum())

  # The same refresh under the reference rule: S >= the (N - ceil(p·N))-th largest score, p the
  # scheduled sparsity at that step.
  step = (found["epoch"] + 1) * spe
  fraction = fraction_of(jnp.int32(step))
  reference = og.Selection(rule="reference").masks(scores_tree, params, fraction, args.sparsity)
  ref_removed = ~_flat(reference).astype(bool)

  def loss_fn(p):
    logits = model.apply({"params": p}, train.images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, train.labels).mean()

  loss_jit = jax.jit(loss_fn)
  accuracy = jax.jit(lambda p: jnp.mean(jnp.argmax(model.apply({"params": p}, test.images), -1)
                                        == test.labels))

  def without(flat_removed):
    p = og.apply_masks(params, _unflat(params, ~flat_removed))
    return float(loss_jit(p)), float(accuracy(p))

  rng = np.random.default_rng(args.seed)
  smallest = np.zeros_like(removed)
  smallest[np.argsort(np.abs(w), kind="stable")[:m]] = True
  random = np.zeros_like(removed)
  random[rng.choice(w.size, m, replace=False)] = True
  base_loss, base_acc = float(loss_jit(params)), float(accuracy(params))

  # First order against the measured change, one removed weight at a time.
  g = _flat(jax.jit(jax.grad(loss_fn))(params))
  idx = np.flatnonzero(removed)[:64]
  measured = []
  for i in idx:
    one = np.zeros_like(removed)
    one[i] = True
    measured.append(without(one)[0] - base_loss)
  predicted = -(g * w)[idx]

  result = {
      "ramp": args.ramp, "epochs": args.epochs, "sparsity": args.sparsity, "seed": args.seed,
      "first_refresh_after_epoch": found["epoch"], "removed": m, "N": int(w.size),
      "reference_rule_removed": int(ref_removed.sum()),
      "same_set_under_reference_rule": bool(np.array_equal(ref_removed, removed)),
      "exact_removed_within_reference_removed": bool(np.all(ref_removed[removed])),
      "median_abs_w_removed": float(np.median(np.abs(w[removed]))),
      "median_abs_w_all": float(np.median(np.abs(w))),
      "removed_with_negative_score": float(np.mean(s[removed] < 0)),
      "rank_corr_score_vs_last_epoch_w2_change": float(
          np.corrcoef(ranks(s), ranks(w**2 - w0**2))[0, 1]),
      "removed_shrunk_in_last_epoch": float(np.mean((w**2 - w0**2)[removed] < 0)),
      "removed_with_g_times_w_positive_now": float(np.mean((g * w)[removed] > 0)),
      "dense": {"train_loss": base_loss, "test_acc": base_acc},
      "without_removed_by_score": dict(zip(("train_loss", "test_acc"), without(removed))),
      "without_smallest_abs_w": dict(zip(("train_loss", "test_acc"), without(smallest))),
      "without_random": dict(zip(("train_loss", "test_acc"), without(random))),
      "one_at_a_time": {
          "weights": len(idx),
          "sum_predicted_first_order": float(np.sum(predicted)),
          "sum_measured": float(np.sum(measured)),
          "share_predicted_decrease": float(np.mean(predicted < 0)),
          "share_measured_increase": float(np.mean(np.asarray(measured) > 0)),
          "median_measured_over_predicted": float(np.median(np.asarray(measured) / predicted)),
      },
  }
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
