"""OptG with a Flax NNX model with BatchNorm: split the model, train its params with optg_jax,
merge back.

  python examples/nnx_recipe.py

``nnx.split`` gives the graph, the ``nnx.Param`` state (an ``nnx.State`` pytree: what og prunes),
the ``nnx.BatchStat`` state (BatchNorm's running averages) and the rest. The one train step
merges the effective weights and the statistics into a *copy* of the model
(``nnx.merge(..., copy=True)``: inside ``jit`` the merged Variables then never alias the outer
ones, which Flax refuses with a ``TraceContextError``), runs it in training mode and returns the
updated statistics beside the loss, as a linen step returns ``batch_stats``. At the end
``nnx.update`` writes ``og.final_params`` (what a run ships) and the statistics into the model.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

import optg_jax as og
from optg_jax import data
from optg_jax import recipes


class MLP(nnx.Module):
  """LeNet-300-100 with BatchNorm after each hidden layer."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(784, 300, rngs=rngs)
    self.bn1 = nnx.BatchNorm(300, rngs=rngs)
    self.fc2 = nnx.Linear(300, 100, rngs=rngs)
    self.bn2 = nnx.BatchNorm(100, rngs=rngs)
    self.classifier = nnx.Linear(100, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nnx.relu(self.bn1(self.fc1(x)))
    return self.classifier(nnx.relu(self.bn2(self.fc2(x))))


def train(train_split: data.Split, *, epochs: int = 20, batch_size: int = 100,
          sparsity: float = 0.98, seed: int = 0):
  """Trains an :class:`MLP` with OptG; returns the sparse model (in eval mode), its params, opt
  state and final masks."""
  model = MLP(nnx.Rngs(seed))
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  spe = len(train_split.labels) // batch_size
  # OptG's reference chain: og.mask_optimizer, then weight decay, then SGD with momentum.
  tx = recipes.make_optimizer("optg", sparsity, steps_per_epoch=spe, epochs=epochs, ramp="auto")
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, stats, opt_state, images, labels):
    def loss_fn(w, stats):
      model = nnx.merge(graphdef, w, stats, rest, copy=True)  # the model with the weights w
      model.train()  # BatchNorm: the batch's moments, and its running averages updated
      logits = model(images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, nnx.state(model, nnx.BatchStat)

    w_eff = og.effective_params(params, opt_state)  # W ⊙ M
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(w_eff, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for idx in rng.permutation(len(train_split.labels))[:spe * batch_size].reshape(spe, -1):
      params, stats, opt_state, _ = train_step(params, stats, opt_state,
                                               train_split.images[idx], train_split.labels[idx])
  nnx.update(model, og.final_params(params, opt_state), stats)  # what the run ships
  model.eval()  # BatchNorm: the running averages
  return model, params, opt_state, og.final_masks(params, opt_state)


def main():
  train_split, test_split = data.load_mnist_5k(seed=0)
  model, _, _, masks = train(train_split)
  accuracy = np.mean(np.argmax(model(test_split.images), -1) == test_split.labels)
  print(f"sparsity {float(og.sparsity_summary(masks).sparsity):.4f}, "
        f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
  main()
