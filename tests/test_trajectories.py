"""Every method trains the same trajectory as the code it was recorded on.

``tests/data/trajectories.npz`` holds the masks and params after 12 jitted steps
of each configuration below, recorded with ``python tests/test_trajectories.py --record`` on the
code before the method building blocks existed (commit 31aa187). A restructure of the methods
must reproduce them bit for bit; a deliberate change of behaviour re-records them and says why
in its commit. They are recomputed in a child process under the default XLA flags (the suite
compiles without backend optimisations, see conftest.py), as users run them.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og

import helpers

DATA = pathlib.Path(__file__).parent / "data" / "trajectories.npz"
SPE, EPOCHS = 3, 4
STEPS = SPE * EPOCHS

CONFIGS = {
    "optg": lambda: og.mask_optimizer(0.8, _lr, SPE, EPOCHS),
    "optg_nesterov_decay": lambda: og.mask_optimizer(0.8, _lr, SPE, EPOCHS, nesterov=True,
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


def _trajectory(method: optax.GradientTransformation) -> dict[str, np.ndarray]:
  """Masks and params after ``STEPS`` jitted steps."""
  tx = optax.chain(method, optax.add_decayed_weights(5e-4), optax.sgd(_lr, momentum=0.9))
  params = _params()
  opt_state = tx.init(params)
  step = helpers.jitted_step(tx, _loss)
  for t in range(STEPS):
    params, opt_state, _ = step(params, opt_state, t)
  out = {}
  for name, tree in (("params", params), ("masks", og.get_masks(opt_state))):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  return out


def _all_trajectories() -> dict[str, np.ndarray]:
  arrays = {}
  for config, make in CONFIGS.items():
    for key, value in _trajectory(make()).items():
      arrays[f"{config}:{key}"] = value
  return arrays


def record() -> None:
  DATA.parent.mkdir(exist_ok=True)
  np.savez_compressed(DATA, **_all_trajectories())


@pytest.fixture(scope="module")
def recomputed(tmp_path_factory):
  """Every configuration's trajectory, computed in a child process under the default flags."""
  out = tmp_path_factory.mktemp("trajectories") / "now.npz"
  helpers.run_under_default_flags(__file__, "--compute", str(out))
  return dict(np.load(out))


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_trajectory_is_bit_identical_to_the_recorded_one(config, recomputed):
  recorded = np.load(DATA)
  expected = {k.split(":", 1)[1]: recorded[k] for k in recorded.files
              if k.startswith(config + ":")}
  got = {k.split(":", 1)[1]: v for k, v in recomputed.items() if k.startswith(config + ":")}
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=f"{config}: {key}")


def test_recorded_trajectories_are_not_trivial():
  recorded = np.load(DATA)
  for config in CONFIGS:
    kernel_mask = recorded[f"{config}:masks['dense2']['kernel']"]
    assert 0 < kernel_mask.sum() < kernel_mask.size, config


if __name__ == "__main__":
  if sys.argv[1:] == ["--record"]:
    record()
  elif len(sys.argv) == 3 and sys.argv[1] == "--compute":
    np.savez(sys.argv[2], **_all_trajectories())
  else:
    sys.exit("usage: python tests/test_trajectories.py --record | --compute OUT.npz")
