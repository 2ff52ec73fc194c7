"""OptG with a Flax NNX model: split the model, train its params with optg_jax, merge back.

  python examples/nnx_recipe.py

``nnx.split`` gives the graph, the ``nnx.Param`` state (an ``nnx.State`` pytree: what og prunes)
and the rest; the one train step merges the effective weights into the graph for the forward
pass. At the end ``nnx.update`` writes the final sparse weights into the model. (A model with
BatchNorm also returns its updated ``nnx.BatchStat`` state from the loss, as in linen.)
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
  """LeNet-300-100."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(784, 300, rngs=rngs)
    self.fc2 = nnx.Linear(300, 100, rngs=rngs)
    self.classifier = nnx.Linear(100, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.classifier(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def train(train_split: data.Split, *, epochs: int = 20, batch_size: int = 100,
          sparsity: float = 0.98, seed: int = 0):
  """Trains an :class:`MLP` with OptG; returns the sparse model, its params, opt state, masks."""
  model = MLP(nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # params: an nnx.State pytree
  spe = len(train_split.labels) // batch_size
  # OptG's reference chain: og.mask_optimizer, then weight decay, then SGD with momentum.
  tx = recipes.make_optimizer("optg", sparsity, steps_per_epoch=spe, epochs=epochs)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, images, labels):
    def loss_fn(w):
      logits = nnx.merge(graphdef, w, rest)(images)  # the model with the weights w
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    w_eff = og.effective_params(params, opt_state)  # W ⊙ M
    loss, grads = jax.value_and_grad(loss_fn)(w_eff)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    for idx in rng.permutation(len(train_split.labels))[:spe * batch_size].reshape(spe, -1):
      params, opt_state, _ = train_step(params, opt_state, train_split.images[idx],
                                        train_split.labels[idx])
  masks = og.final_masks(params, opt_state)  # OptG: the top scores at its target
  nnx.update(model, og.apply_masks(params, masks))  # the model now holds the sparse weights
  return model, params, opt_state, masks


def main():
  train_split, test_split = data.load_mnist_5k(seed=0)
  model, _, _, masks = train(train_split)
  accuracy = np.mean(np.argmax(model(test_split.images), -1) == test_split.labels)
  print(f"sparsity {float(og.sparsity_summary(masks).sparsity):.4f}, "
        f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
  main()
