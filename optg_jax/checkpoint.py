"""Checkpoints of a training run with orbax: state, data position, counters, and metadata.

A checkpoint holds everything a run needs to continue exactly where it stopped: the train state
(any pytree of arrays: a linen :class:`optg_jax.training.TrainState`, an NNX
``{'params': nnx.State, 'opt_state': ...}``, a ``(params, opt_state)`` tuple; the optimizer state
carries the method's scores and masks), the epoch and step counters, the run's PRNG key, the
position of the grain data iterator, and a JSON dict of metadata (the run's configuration,
elapsed time)::

  mngr = checkpoint.manager(workdir / "checkpoints")
  checkpoint.save(mngr, checkpoint.Checkpoint(state, epoch, step, rng), iterator=it,
                  metadata={"config": config})
  ...
  ckpt, metadata = checkpoint.restore(mngr, target, iterator=it)  # latest step

Saving is asynchronous and atomic (orbax writes a temporary directory,
``<step>.orbax-checkpoint-tmp``, and renames it to ``<step>`` when complete, so a crash mid-save
never leaves a half-written step that reads as a checkpoint), and the manager keeps the last
``max_to_keep`` steps. Call ``mngr.wait_until_finished()`` (or ``mngr.close()``) before exiting.
The temporary directory of a save cut off before its commit (a SIGKILL, a preemption) is removed,
in one reported line, by :func:`restore_newest_good`.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optg_jax import _extras

_extras.require("optg_jax.checkpoint", "train", "orbax.checkpoint", "grain")

# pylint: disable=wrong-import-position
import grain  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402


PyTree = Any
PathLike = str | os.PathLike[str]


class Checkpoint(NamedTuple):
  """The arrays of a run's checkpoint.

  Attributes:
    state: the train state, any pytree of arrays (params, optimizer state with masks, ...).
    epoch: int32 scalar, epochs completed.
    step: int32 scalar, optimizer steps completed (the checkpoint's number in the manager).
    rng: uint32 key data (``jax.random.key_data``) of the run's PRNG key.
  """
  state: PyTree
  epoch: jax.Array
  step: jax.Array
  rng: jax.Array


def new(state: PyTree, seed: int) -> Checkpoint:
  """The checkpoint of a run that has not trained yet: epoch 0, step 0, key from ``seed``."""
  zero = jnp.zeros((), jnp.int32)
  return Checkpoint(state, zero, zero, jax.random.key_data(jax.random.key(seed)))


class Restored(NamedTuple):
  """What :func:`restore` returns: the ``checkpoint`` arrays and the saved ``metadata`` dict."""
  checkpoint: Checkpoint
  metadata: dict[str, Any]


def manager(directory: PathLike, *, max_to_keep: int = 3, async_save: bool = True
            ) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` in ``directory`` (created) that keeps the last steps.

  Args:
    directory: where the numbered step directories go.
    max_to_keep: how many of the latest checkpoints to keep (older ones are deleted).
    async_save: write in the background (``save`` returns once the arrays are copied).
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_step(directory: PathLike) -> int | None:
  """The newest complete step saved in ``directory``, or ``None`` (also when it does not exist)."""
  if not os.path.isdir(directory):
    return None
  return max(ocp.utils.checkpoint_steps(directory), default=None)


class CorruptCheckpointError(ValueError):
  """A checkpoint restored to arrays whose checksum differs from the one saved with them."""


@jax.jit
def _leaf_sums(tree: PyTree) -> list[jax.Array]:
  def one(x):
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
      words = x.astype(jnp.uint32)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
      words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * 2 + 1  # position-dependent, odd
    return jnp.sum(words * weights, dtype=jnp.uint32)
  return [one(x) for x in jax.tree.leaves(tree)]


def checksum(tree: PyTree) -> str:
  """A checksum of every array's bits (hex), computed on the device: one weighted sum mod
  2^32 per leaf, so a changed, zeroed or shifted byte shows."""
  return "-".join(f"{int(v):08x}" for v in jax.device_get(_leaf_sums(tree)))


def save(mngr: ocp.CheckpointManager, ckpt: Checkpoint, *,
         iterator: grain.DatasetIterator | None = None,
         metadata: dict[str, Any] | None = None) -> None:
  """Saves ``ckpt`` as step ``ckpt.step``, with the iterator's position and ``metadata``.

  The iterator's state is read now, so it may advance as soon as this returns. ``metadata``
  must be JSON-serialisable; the arrays' :func:`checksum` is added to it (``"checksum"``), and
  :func:`restore` verifies it.
  """
  metadata = {**(metadata or {}), "checksum": checksum(ckpt)}
  items = {"state": ocp.args.StandardSave(ckpt),
           "metadata": ocp.args.JsonSave(metadata)}
  if iterator is not None:
    items["iterator"] = grain.checkpoint.CheckpointSave(iterator)
  mngr.save(int(ckpt.step), args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, target: Checkpoint, *,
            iterator: grain.DatasetIterator | None = None, step: int | None = None) -> Restored:
  """Restores step ``step`` (default: the latest) into the structure, dtypes and shardings of
  ``target`` (arrays or ``jax.ShapeDtypeStruct``s, e.g. :func:`new` of a freshly built state;
  custom pytree nodes such as ``nnx.State`` come back as such), and moves ``iterator`` to the
  saved position.

  Raises:
    FileNotFoundError: the manager holds no checkpoint (or not ``step``).
    CorruptCheckpointError: the restored arrays do not match the checksum saved with them.
  """
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"no checkpoint{'' if step is None else f' {step}'} in "
                            f"{mngr.directory}")
  items = {"state": ocp.args.StandardRestore(target), "metadata": ocp.args.JsonRestore()}
  if iterator is not None:
    items["iterator"] = grain.checkpoint.CheckpointRestore(iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  ckpt, metadata = Checkpoint(*restored["state"]), dict(restored["metadata"] or {})
  if "checksum" in metadata and checksum(ckpt) != metadata["checksum"]:
    raise CorruptCheckpointError(f"checkpoint {step} in {mngr.directory}: its arrays do not "
                                 "match the checksum saved with them")
  return Restored(ckpt, metadata)


def restore_newest_good(mngr: ocp.CheckpointManager, target: Checkpoint, *,
                        iterator: grain.DatasetIterator | None = None,
                        report: Any = print) -> Restored:
  """:func:`restore` of the newest checkpoint that restores: a truncated or corrupted one
  (orbax or tensorstore raise on it, e.g. ``DATA_LOSS``) is reported in one line through
  ``report``, moved aside to ``corrupt-<step>`` in the same directory (kept for inspection,
  out of the manager's way) and the one before is tried.

  A save cut off before its commit left only its temporary directory
  (``<step>.orbax-checkpoint-tmp``, never read as a checkpoint): it is removed first, reported in
  one line.

  Raises:
    FileNotFoundError: no checkpoint at all, or none that restores (the last error chained).
  """
  _discard_uncommitted(mngr, report)
  error = None
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return restore(mngr, target, iterator=iterator, step=step)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read the step)
      error = e
      first_line = (str(e).strip().splitlines() or [""])[0][:160]
      aside = os.path.join(str(mngr.directory), f"corrupt-{step}")
      os.replace(os.path.join(str(mngr.directory), str(step)), aside)
      mngr.reload()
      report(f"checkpoint {step} cannot be restored ({type(e).__name__}: {first_line}); "
             f"moved to {aside}, trying the one before")
  raise FileNotFoundError(f"no checkpoint in {mngr.directory} restores") from error


_UNCOMMITTED = re.compile(r"(\d+)" + re.escape(ocp.path.step.TMP_DIR_SUFFIX))


def _discard_uncommitted(mngr: ocp.CheckpointManager, report: Any) -> None:
  """Removes the temporary directories of saves that never committed (once this manager's own
  saves have finished), each reported in one line."""
  mngr.wait_until_finished()
  directory = str(mngr.directory)
  for name in sorted(os.listdir(directory)):
    found = _UNCOMMITTED.match(name)
    if found is None or not os.path.isdir(os.path.join(directory, name)):
      continue
    shutil.rmtree(os.path.join(directory, name))
    report(f"checkpoint {found.group(1)} was cut off mid-save and never committed; removed "
           f"{os.path.join(directory, name)}")
