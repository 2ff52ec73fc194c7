"""Data parallelism over the local devices: one jitted step, the batch split on a mesh axis.

``data_parallel(step, mesh)`` jits any ``step(state, *batch) -> outputs`` (for example
:func:`optg_jax.training.make_train_step`) with the state replicated on every device of a
``jax.sharding.Mesh`` and each batch argument split along its leading axis over the mesh's data
axis; every output comes back replicated. XLA partitions the forward and backward pass and
all-reduces the gradient, so the optimizer, the mask refresh and its global top-k run on
replicated values: the masks are identical on every device, and equal to a one-device run up to
the summation order of the gradient. The same code runs on one device, on all the GPUs of a
host, and on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``::

  mesh = parallel.local_mesh(batch_size=256)
  step = parallel.data_parallel(training.make_train_step(model, tx), mesh, donate_state=True)
  state = parallel.replicate(state, mesh)
  state, loss = step(state, images, labels)   # images (256, H, W, C), labels (256,)

The mesh spans this process's devices (one host). Multi-host training builds a mesh over
``jax.devices()`` after ``jax.distributed.initialize()`` and feeds each process's part of the
batch with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

PyTree = Any

DATA_AXIS = "data"


def local_mesh(batch_size: int | None = None, *, axis_name: str = DATA_AXIS,
               devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over this process's devices.

  Args:
    batch_size: if given, the mesh takes the largest number of devices that divides it (a batch
      of 100 on 8 devices runs on 5), so every device gets an equal share of each batch.
    axis_name: name of the data axis.
    devices: the devices to use; default ``jax.local_devices()``.

  Raises:
    ValueError: ``batch_size`` is not a positive integer, or ``devices`` is empty.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise ValueError("devices must not be empty")
  n = len(devices)
  if batch_size is not None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = max(d for d in range(1, n + 1) if batch_size % d == 0)
  return Mesh(np.asarray(devices[:n]), (axis_name,))


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy on every device of ``mesh``."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """The sharding that splits the leading (batch) axis over the mesh's first axis."""
  return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Copies every array leaf of ``tree`` to all devices of ``mesh``.

  Copies each leaf first: ``device_put`` maps a buffer that appears twice in a tree (OptG's
  initial scores and momentum) to one output buffer, which a step with ``donate_state`` could
  not take twice.
  """
  return jax.device_put(jax.tree.map(jnp.copy, tree), replicated(mesh))


def shard(batch: PyTree, mesh: Mesh) -> PyTree:
  """Splits every leaf's leading axis ``(B, ...)`` over ``mesh``, ``B/n`` rows per device.

  Raises:
    ValueError: a leaf's leading axis is not divisible by the number of devices.
  """
  n = mesh.devices.size

  def put(path, x):
    if np.ndim(x) == 0 or np.shape(x)[0] % n:
      raise ValueError(f"batch leaf {jax.tree_util.keystr(path)!r} of shape {np.shape(x)} "
                       f"cannot be split over {n} devices")
    return jax.device_put(x, batch_sharded(mesh))

  return jax.tree_util.tree_map_with_path(put, batch)


def data_parallel(fn: Callable[..., Any], mesh: Mesh, *, donate_state: bool = False
                  ) -> Callable[..., Any]:
  """Jits ``fn(state, *batch)``: ``state`` replicated, each ``batch`` argument split on its
  leading axis over ``mesh``, every output replicated.

  Inputs that are not yet placed (NumPy batches, a state from ``init``) are moved by the jitted
  function itself. With ``donate_state`` the input state's buffers are reused for the output
  (pass the state on, never reuse the one given).
  """
  jitted = jax.jit(lambda state, batch: fn(state, *batch),
                   in_shardings=(replicated(mesh), batch_sharded(mesh)),
                   out_shardings=replicated(mesh),
                   donate_argnums=(0,) if donate_state else ())
  return lambda state, *batch: jitted(state, batch)
