"""OptG in 50 lines: a Flax model, the optax chain, the one train step, the sparsity summary.

  python examples/quickstart.py
"""

import flax.linen as nn
import jax
import numpy as np
import optax

import optg_jax as og
from optg_jax import data

EPOCHS, BATCH, SPARSITY = 40, 100, 0.98


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(300)(x))
    x = nn.relu(nn.Dense(100)(x))
    return nn.Dense(10)(x)


train, test = data.load_mnist_5k(seed=0)
model = MLP()
params = model.init(jax.random.key(0), train.images[:1])["params"]
spe = len(train.labels) // BATCH
lr = optax.cosine_decay_schedule(0.1, EPOCHS * spe)
tx = optax.chain(
    og.mask_optimizer(SPARSITY, lr, steps_per_epoch=spe, total_epochs=EPOCHS, ramp="auto"),
    optax.add_decayed_weights(5e-4),
    optax.sgd(lr, momentum=0.9),
)
opt_state = tx.init(params)


def loss_fn(w, images, labels):
  logits = model.apply({"params": w}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def train_step(params, opt_state, images, labels):
  w_eff = og.effective_params(params, opt_state)
  loss, grads = jax.value_and_grad(loss_fn)(w_eff, images, labels)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


rng = np.random.default_rng(0)
for epoch in range(EPOCHS):
  for idx in rng.permutation(len(train.labels))[:spe * BATCH].reshape(spe, BATCH):
    params, opt_state, loss = train_step(params, opt_state, train.images[idx], train.labels[idx])

shipped = og.final_params(params, opt_state)  # the final model: W ⊙ M, what a run ships
accuracy = np.mean(np.argmax(model.apply({"params": shipped}, test.images), -1) == test.labels)
summary = og.sparsity_summary(og.final_masks(params, opt_state))
for name, leaf in summary.leaves.items():
  print(f"{name:<20} kept {int(leaf.kept):>7} / {leaf.total:<7} sparsity {float(leaf.sparsity):.4f}")
print(f"total sparsity {float(summary.sparsity):.4f}, test accuracy {accuracy:.4f}")
