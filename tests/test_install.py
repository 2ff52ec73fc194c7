"""The light install: the core needs only jax, optax, chex and numpy; what needs an extra says
which one, in one line."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

import optg_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("flax", "tensorflow", "tensorflow-datasets", "grain", "array-record",
         "orbax-checkpoint", "tensorstore", "tqdm", "matplotlib", "pytest", "hypothesis")


def _name(requirement: str) -> str:
  return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_core_dependencies_hold_none_of_the_heavy_ones():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  core = {_name(r) for r in project["dependencies"]}
  assert core == {"jax", "optax", "chex", "numpy"} and not core & set(HEAVY)
  extras = project["optional-dependencies"]
  assert {_name(r) for r in extras["flax"]} == {"flax"}
  assert "optg-jax[data,flax]" in extras["train"]
  assert {_name(r) for r in extras["data"]} == {"tensorflow-datasets", "grain", "array-record"}
  assert {_name(r) for r in extras["train"]} >= {"orbax-checkpoint", "tqdm", "matplotlib"}
  assert "optg-jax[train]" in extras["test"]
  assert {_name(r) for r in extras["test"]} >= {"pytest", "hypothesis"}
  assert "optg-jax[test]" in extras["all"]


# Runs in a fresh process in which the extras' packages cannot be imported, even where they are
# installed.
WITHOUT_EXTRAS = textwrap.dedent("""
    import sys

    BLOCKED = ("flax", "tensorflow", "tensorflow_datasets", "grain", "array_record", "orbax",
               "tensorstore", "tqdm", "matplotlib")

    class HideExtras:
      def __init__(self, finder):
        self.finder = finder

      def __getattr__(self, name):
        return getattr(self.finder, name)

      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          return None
        return self.finder.find_spec(name, path, target)

    sys.meta_path[:] = [HideExtras(f) for f in sys.meta_path]

    import jax, jax.numpy as jnp, optax
    import optg_jax as og
    from optg_jax import initializers, parallel, recipes, schedules

    params = {"fc1": {"kernel": jnp.ones((8, 6)), "bias": jnp.zeros(6)}}
    for head in (og.mask_optimizer(0.5, 0.1, steps_per_epoch=1, total_epochs=2),
                 og.gmp(0.5, 0, 4, 1), og.magnitude(0.5), og.snip(0.5), og.random_pruning(0.5)):
      tx = optax.chain(head, optax.sgd(0.1))
      state = tx.init(params)
      grads = jax.tree.map(jnp.ones_like, params)
      for _ in range(2):
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert int(og.sparsity_summary(og.get_masks(state)).kept) == 24
    recipes.make_optimizer("optg", 0.5, steps_per_epoch=1, epochs=2).init(params)
    for head in (og.signed_supermask(), og.edge_popup(0.5, 0.1)):
      state = head.init(params)
      updates, state = jax.jit(head.update)(grads, state, params)
    for module in ("optg_jax.models", "optg_jax.training", "optg_jax.report", "optg_jax.data",
                   "optg_jax.checkpoint"):
      try:
        __import__(module)
      except ImportError as e:
        print(f"{module}: {e}")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("loaded:", loaded)

    import runpy  # the main job, as `python examples/train.py` runs it
    sys.path.insert(0, EXAMPLES)
    sys.argv = ["train.py", "--workdir", "unused"]
    try:
      runpy.run_path(f"{EXAMPLES}/train.py", run_name="__main__")
    except SystemExit as e:
      print(e.code)
""")


def test_core_works_without_the_extras_and_the_rest_names_its_extra(tmp_path):
  package_root = pathlib.Path(optg_jax.__file__).parent.parent  # not resolved: keeps overlays
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(package_root), os.environ.get("PYTHONPATH")])))
  script = f"EXAMPLES = {str(ROOT / 'examples')!r}\n" + WITHOUT_EXTRAS
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=180, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  flax = [f"optg_jax.{m}: optg_jax.{m} needs the 'flax' extra: pip install 'optg-jax[flax]' "
          "(flax is not installed)" for m in ("models", "training", "report")]
  assert lines == flax + [
      "optg_jax.data: optg_jax.data needs the 'data' extra: pip install 'optg-jax[data]' "
      "(grain is not installed)",
      "optg_jax.checkpoint: optg_jax.checkpoint needs the 'train' extra: pip install "
      "'optg-jax[train]' (orbax.checkpoint is not installed)",
      "loaded: []",
      "train.py: error: optg_jax.checkpoint needs the 'train' extra: pip install "
      "'optg-jax[train]' (orbax.checkpoint is not installed)",
  ], result.stdout
