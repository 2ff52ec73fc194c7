"""Load the compact model a run shipped and evaluate it on the test split.

  python examples/infer.py --workdir DIR            # dense weights from the compact file
  python examples/infer.py --workdir DIR --sparse   # Dense layers on BCOO kernels, rest dense

The main job (examples/main.py) writes ``DIR/model.ospk`` (``og.export``) at the end of every run.
This script rebuilds the model and test split from ``DIR/config.json``, loads the file (its
SHA-256 is checked; a damaged file is refused), and prints the test accuracy (the training
summary's figure) and the file size beside the dense checkpoint's.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # configs/, train.py

# pylint: disable=wrong-import-position
import train

import optg_jax as og


def _dir_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _latest_checkpoint_bytes(workdir: pathlib.Path) -> int | None:
  """Bytes on disk of the newest step in ``workdir/checkpoints`` (params + optimizer state)."""
  steps = [p for p in (workdir / "checkpoints").glob("*") if p.is_dir() and p.name.isdigit()]
  return _dir_bytes(max(steps, key=lambda p: int(p.name))) if steps else None


def accuracy(apply_fn, variables, test_it) -> float:
  """Fraction of the test split whose argmax of ``apply_fn(variables, images)`` is the label."""
  step = jax.jit(lambda v, x, y: jnp.sum(jnp.argmax(apply_fn(v, x), -1) == y))
  test_it.set_state({"step": 0})
  correct = total = 0
  for batch in test_it:
    correct += int(step(variables, batch["image"], batch["label"]))
    total += len(batch["label"])
  return correct / total


def evaluate(workdir: pathlib.Path, *, sparse: bool = False, data_dir: str | None = None
             ) -> dict:
  """Loads ``workdir``'s compact model and returns its ``test_accuracy`` and file sizes."""
  cfg = train.Config.from_json(json.loads((workdir / "config.json").read_text()))
  setup = train.build(cfg, data_dir)
  model = setup.model
  template = jax.eval_shape(lambda: model.init(jax.random.key(0), setup.sample, train=False))
  path = workdir / train.COMPACT_MODEL
  if sparse:
    variables = og.export.load_sparse(path, like=template)
    apply_fn = lambda v, x: og.export.sparse_apply(model, v, x, train=False)
  else:
    variables = og.export.load(path, like=template)
    apply_fn = lambda v, x: model.apply(v, x, train=False)
  dense_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(template))
  return {"test_accuracy": accuracy(apply_fn, variables, setup.test_it),
          "compact_bytes": path.stat().st_size, "dense_bytes": dense_bytes,
          "checkpoint_bytes": _latest_checkpoint_bytes(workdir),
          "metadata": og.export.read_metadata(path)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, type=pathlib.Path)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--sparse", action="store_true",
                      help="run Dense layers on BCOO kernels (others densified on load)")
  args = parser.parse_args(argv)
  try:
    r = evaluate(args.workdir, sparse=args.sparse, data_dir=args.data_dir)
  except (og.export.CompactFileError, FileNotFoundError, train.UsageError) as e:
    print(f"infer.py: error: {e}", file=sys.stderr)
    return 2
  meta = r["metadata"]
  ckpt = r["checkpoint_bytes"]
  print(f"{meta.get('model')} {meta.get('method')} at {meta['sparsity']:.2%} sparsity "
        f"({'sparse' if args.sparse else 'dense'} inference)")
  print(f"test accuracy {100 * r['test_accuracy']:.2f}%")
  print(f"compact file {r['compact_bytes'] / 1e6:.3f} MB; dense params "
        f"{r['dense_bytes'] / 1e6:.3f} MB ({r['compact_bytes'] / r['dense_bytes']:.1%}); "
        f"dense checkpoint " + ("n/a" if ckpt is None else f"{ckpt / 1e6:.3f} MB"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
