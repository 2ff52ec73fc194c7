"""End to end on the embedded MNIST digits: LeNet-300-100, the reference chains, 3 seeds.

The runs train for minutes: they run in one child process under the default XLA flags (the
suite compiles without backend optimisations, which would run them slower; conftest.py).
"""

import json
import sys

import jax
import numpy as np
import pytest

from optg_jax import data
from optg_jax import models
from optg_jax import recipes
from optg_jax import training

import helpers

EPOCHS, BATCH, SEEDS = 20, 100, (0, 1, 2)


def _final_accuracy(method: str, sparsity: float, seed: int) -> float:
  """The main job's chains and presets (OptG's ramp 'auto': the budget ramp below 100 epochs):
  the test accuracy of the final model, what the compact file ships."""
  train, test = data.load_mnist_5k(seed=seed)
  options = {"ramp": "auto"} if method == "optg" else {}
  tx = recipes.make_optimizer(method, sparsity, steps_per_epoch=len(train.labels) // BATCH,
                              epochs=EPOCHS, seed=seed, **options)
  model = models.get_model("lenet300100")
  result = training.fit(model, tx, train, test, epochs=EPOCHS, batch_size=BATCH, seed=seed)
  final, _ = training.final_model(result.state)
  evaluate = jax.jit(training.make_eval_step(model))
  return int(evaluate(final, test.images, test.labels)) / len(test.labels)


def _accuracies(seeds=SEEDS) -> dict[str, list[float]]:
  """Per seed, each final model's test accuracy."""
  runs = {"dense": ("dense", 0.0), "optg_95": ("optg", 0.95), "optg_98": ("optg", 0.98),
          "snip_98": ("snip", 0.98)}
  return {key: [_final_accuracy(method, sparsity, seed) for seed in seeds]
          for key, (method, sparsity) in runs.items()}


@pytest.fixture(scope="module")
def accuracy(tmp_path_factory):
  out = tmp_path_factory.mktemp("end_to_end") / "accuracy.json"
  helpers.run_under_default_flags(__file__, str(out))
  return {key: float(np.mean(values)) for key, values in json.loads(out.read_text()).items()}


@pytest.mark.slow
def test_optg_stays_near_dense_at_95_and_98_percent(accuracy):
  """Means over seeds 0-2, with margins of 3.5 or more standard deviations of such a mean.

  Measured over seeds 0-4 (``python tests/test_end_to_end.py OUT.json 0,1,2,3,4``), final test
  accuracy per seed, the same as is and under ``XLA_FLAGS=--xla_cpu_max_isa=AVX2``;
  ``SSE4_2`` moved single seeds by up to 0.008:

  ========  =================================  ==================
  run       seeds 0-4                          mean of seeds 0-2
  ========  =================================  ==================
  dense     .955 .955 .949 .951 .947            .953 (SSE4_2 .952)
  optg_95   .948 .937 .943 .947 .938            .943 (SSE4_2 .943)
  optg_98   .942 .921 .941 .932 .927            .935 (SSE4_2 .933)
  snip_98   .918 .914 .908 .915 .912            .913
  ========  =================================  ==================

  Per-seed standard deviation 0.003 to 0.008, so at most about 0.006 for a difference of two
  3-seed means; the margins below are 0.021 or more. The comparison with SNIP (OptG ahead by
  0.007 to 0.033 per seed at 98%) is reported in the README, not asserted.
  """
  dense, optg_95, optg_98, snip_98 = (accuracy[k] for k in ("dense", "optg_95", "optg_98",
                                                            "snip_98"))
  print(f"dense {dense:.4f}  optg@95 {optg_95:.4f}  optg@98 {optg_98:.4f}  snip@98 {snip_98:.4f}")
  assert dense > 0.92  # a working dense baseline first: the comparisons below mean nothing without
  assert optg_95 >= dense - 0.035
  assert optg_98 >= dense - 0.05
  assert snip_98 > 0.88  # the baseline the README compares with trains too


if __name__ == "__main__":
  seeds = tuple(int(s) for s in sys.argv[2].split(",")) if len(sys.argv) > 2 else SEEDS
  with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(_accuracies(seeds), f)
