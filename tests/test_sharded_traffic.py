"""The fully sharded mask refresh moves counts and a sample between devices, never the scores.

A fast stand-in for the traffic check of the slow tests/test_mask_refresh.py (issue 20, item
7): a child process with 8 simulated CPU devices places a small conv-net score tree as
``parallel.fully_sharded`` places the state (``parallel.fsdp_shardings``: each leaf split along
its largest axis that 8 divides, here never the first), compiles the exact global top-k on it,
and reads from the compiled program (HLO) how many elements its collectives (all-gather,
all-to-all, collective-permute, reduce-scatter and all-reduce) hold per device. The search
all-reduces a few counts per pass and gathers its sample; reshaping a leaf split along a later
axis (``x.reshape(-1)``) would all-gather the whole leaf instead, and the masks would stay equal.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import optg_jax

DEVICES = 8
# Conv kernels split along an output or input channel axis (as fsdp_shardings splits them) and a
# classifier split along its second axis: 46,592 scores, above select's one-sort pool (8,192).
SHAPES = {"conv1": (3, 3, 8, 64), "conv2": (3, 3, 64, 64), "classifier": (10, 512)}
SPARSITY = 0.9

CHILD = textwrap.dedent("""
    import json
    import re
    import sys

    import jax
    import numpy as np
    from optg_jax import parallel, select
    from optg_jax.select import _sample

    COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter",
                   "all-reduce")
    shapes = {name: tuple(shape) for name, shape in json.loads(sys.argv[1]).items()}
    assert jax.device_count() == DEVICES, jax.devices()
    mesh = parallel.local_mesh()
    rng = np.random.default_rng(0)
    scores = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in shapes.items()}
    shardings = parallel.fsdp_shardings(scores, mesh)
    n = sum(x.size for x in scores.values())
    k = select.keep_count(n, SPARSITY)
    refresh = jax.jit(select.global_topk_masks, static_argnums=1, in_shardings=(shardings,),
                      out_shardings=shardings)
    placed = jax.device_put(scores, shardings)
    compiled = refresh.lower(placed, k).compile()
    moved = {op: 0 for op in COLLECTIVES}
    for line in compiled.as_text().splitlines():
      # `name = f32[3,3,8,64]{...} all-gather(...)`, or a tuple of results; async `-start` ops
      # hold their operands too, so only the results before the op's name are counted.
      m = re.search(r"=\\s*(.*?)\\s(" + "|".join(COLLECTIVES) + r")(-start)?\\(", line)
      if m:
        dims = re.findall(r"\\w+\\[([\\d,]*)\\]", m.group(1))
        moved[m.group(2)] += sum(int(np.prod([int(d) for d in s.split(",") if d]))
                                 for s in dims)
    got, want = compiled(placed), select.global_topk_masks(scores, k)
    print(json.dumps({
        "n": n,
        "specs": {name: list(s.spec) for name, s in shardings.items()},
        "largest_shard": max(x.addressable_shards[0].data.size for x in placed.values()),
        "sample": jax.eval_shape(lambda x: _sample.sample_keys(x, n),
                                 list(scores.values())).shape[0],
        "moved": moved,
        "same_masks": all(np.array_equal(got[name], want[name]) for name in want),
        "masks_sharded": all(got[name].sharding == shardings[name] for name in want)}))
""").replace("DEVICES", str(DEVICES)).replace("SPARSITY", repr(SPARSITY))


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
  """The child's report: shardings, sample size, elements moved per collective kind."""
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
  package_root = pathlib.Path(optg_jax.__file__).parent.parent  # not resolved: keeps overlays
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(package_root), env.get("PYTHONPATH")]))
  result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPES)], env=env,
                          capture_output=True, text=True, timeout=300,
                          cwd=tmp_path_factory.mktemp("traffic"))
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_leaf_is_split_along_a_later_axis(traffic):
  """The case the check needs: a leaf split along its first axis flattens without moving."""
  assert traffic["specs"] == {"conv1": [None, None, None, "data"],
                              "conv2": [None, None, "data", None],
                              "classifier": [None, "data"]}
  assert traffic["masks_sharded"]


def test_the_sharded_refresh_gives_the_one_device_masks(traffic):
  assert traffic["same_masks"]


def test_the_sharded_refresh_moves_counts_and_the_sample_not_the_scores(traffic):
  """Per device, every collective together holds at most twice the sample (the sample's
  per-leaf pieces, before thinning, and the counts' few scalars): far below one device's shard
  of the scores, let alone the 46,592 scores an all-gather of every leaf moves."""
  moved, sample, n = traffic["moved"], traffic["sample"], traffic["n"]
  assert 2 * sample < traffic["largest_shard"] < n  # else the bound below would prove nothing
  assert sum(moved.values()) <= 2 * sample, moved
  assert moved["all-to-all"] == moved["collective-permute"] == moved["reduce-scatter"] == 0, moved
  assert moved["all-reduce"] > 0, moved  # the counts: each device counted its own shard
