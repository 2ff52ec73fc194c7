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

Saving is asynchronous and atomic (orbax writes a temporary directory and renames it when
complete, so a crash never leaves a half-written step behind), and the manager keeps the last
``max_to_keep`` steps. Call ``mngr.wait_until_finished()`` (or ``mngr.close()``) before exiting.
"""

from __future__ import annotations

import os
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


def save(mngr: ocp.CheckpointManager, ckpt: Checkpoint, *,
         iterator: grain.DatasetIterator | None = None,
         metadata: dict[str, Any] | None = None) -> None:
  """Saves ``ckpt`` as step ``ckpt.step``, with the iterator's position and ``metadata``.

  The iterator's state is read now, so it may advance as soon as this returns. ``metadata``
  must be JSON-serialisable.
  """
  items = {"state": ocp.args.StandardSave(ckpt),
           "metadata": ocp.args.JsonSave(metadata or {})}
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
  """
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"no checkpoint{'' if step is None else f' {step}'} in "
                            f"{mngr.directory}")
  items = {"state": ocp.args.StandardRestore(target), "metadata": ocp.args.JsonRestore()}
  if iterator is not None:
    items["iterator"] = grain.checkpoint.CheckpointRestore(iterator)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return Restored(Checkpoint(*restored["state"]), dict(restored["metadata"] or {}))
