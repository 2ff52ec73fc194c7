"""Prune LeNet-300-100 on the embedded MNIST digits with optg_jax's core primitives.

Trains the dense network, then prunes it gradually (Zhu & Gupta cubic schedule, global exact
magnitude top-k, mask refreshed every epoch) while it keeps training, and prints dense vs sparse
test accuracy with the final per-layer sparsity. Runs on CPU in about a minute:

  python examples/prune_mnist.py --sparsity 0.98
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optg_jax as og
from optg_jax import data
from optg_jax import models


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sparsity", type=float, default=0.98)
  parser.add_argument("--dense-epochs", type=int, default=10)
  parser.add_argument("--prune-epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if not 0.0 <= args.sparsity < 1.0:
    parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
  if args.dense_epochs < 1 or args.prune_epochs < 1 or args.batch_size < 1:
    parser.error("--dense-epochs, --prune-epochs and --batch-size must be positive")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  train, test = data.load_mnist_5k(seed=args.seed)
  model = models.LeNet300100()
  params = model.init(jax.random.key(args.seed), train.images[:1])
  prunable = og.masks.prunable_tree(params)
  masks = og.masks.all_keep(params, prunable)

  spe = len(train.labels) // args.batch_size
  begin = args.dense_epochs * spe
  end = begin + (args.prune_epochs // 2) * spe
  target = og.schedules.polynomial(args.sparsity, begin, end, frequency=spe)
  total_steps = (args.dense_epochs + args.prune_epochs) * spe
  tx = optax.sgd(optax.cosine_decay_schedule(0.1, total_steps), momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(p, images, labels):
    logits = model.apply(p, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(params, opt_state, masks, images, labels):
    loss, grads = jax.value_and_grad(loss_fn)(og.apply_masks(params, masks), images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return og.apply_masks(optax.apply_updates(params, updates), masks), opt_state, loss

  @jax.jit
  def refresh(params, step):
    scores = jax.tree.map(jnp.abs, params)
    return og.masks.global_masks(scores, prunable, target(step))

  @jax.jit
  def accuracy(params, masks):
    logits = model.apply(og.apply_masks(params, masks), test.images)
    return jnp.mean(jnp.argmax(logits, -1) == test.labels)

  rng = np.random.default_rng(args.seed)
  start, step, dense_acc = time.perf_counter(), 0, None
  for epoch in range(args.dense_epochs + args.prune_epochs):
    if epoch >= args.dense_epochs:
      masks = refresh(params, step)
    order = rng.permutation(len(train.labels))
    for b in range(spe):
      idx = order[b * args.batch_size:(b + 1) * args.batch_size]
      params, opt_state, loss = train_step(params, opt_state, masks, train.images[idx],
                                           train.labels[idx])
      step += 1
    summary = og.sparsity_summary(masks)
    acc = float(accuracy(params, masks))
    if epoch == args.dense_epochs - 1:
      dense_acc = acc
    print(f"epoch {epoch + 1:3d}  loss {float(loss):.4f}  test acc {acc:.4f}  "
          f"sparsity {float(summary.sparsity):.4f}", flush=True)

  summary = og.sparsity_summary(masks)
  print(f"\n{'layer':<28}{'kept':>9}{'total':>9}{'sparsity':>10}")
  for name, leaf in summary.leaves.items():
    print(f"{name:<28}{int(leaf.kept):>9}{leaf.total:>9}{float(leaf.sparsity):>10.4f}")
  print(f"{'all prunable':<28}{int(summary.kept):>9}{summary.total:>9}"
        f"{float(summary.sparsity):>10.4f}")
  print(f"\ndense test accuracy  {dense_acc:.4f}\nsparse test accuracy {acc:.4f} at "
        f"{float(summary.sparsity):.2%} sparsity  ({time.perf_counter() - start:.0f} s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
