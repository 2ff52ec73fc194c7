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

Two more modes run the same step:

* **Fully sharded** (FSDP-style, :func:`fully_sharded`): every array of the state (params,
  BatchNorm statistics, scores, masks, momenta) is split along its largest axis that the mesh
  size divides (:func:`fsdp_shardings`; scalars and indivisible arrays stay replicated), so
  each device holds about ``1/n`` of the state. XLA gathers the weights for the forward pass and
  reduce-scatters the gradients; the mask refresh's exact global top-k runs on the sharded
  scores: its passes are elementwise kernels followed by sums, so every device counts its own
  shard and only the per-leaf counts are all-reduced, never the scores (only the sample of at
  most 65,536 scores that seeds the search is gathered).
* **pmap** (:func:`pmapped`), for code bases built on ``jax.pmap``: the state carries a leading
  device axis (:func:`replicate_for_pmap`), each batch is split into ``(n, B/n, ...)``, and the
  step is built with ``training.make_train_step(model, tx, axis_name=parallel.DATA_AXIS)`` so
  that it averages the gradients (and BatchNorm statistics) over the devices.

::

  mesh = parallel.local_mesh(256)
  step = parallel.fully_sharded(training.make_train_step(model, tx), mesh, state)
  state = parallel.shard_state(state, mesh)
  state, loss = step(state, images, labels)

  step = parallel.pmapped(training.make_train_step(model, tx, axis_name=parallel.DATA_AXIS))
  state = parallel.replicate_for_pmap(state)
  state, loss = step(state, images, labels)      # loss: (n,), equal on every device
  state = parallel.unreplicate(state)

All modes give the masks of one device and its params up to the summation order of the
gradient (tested on 8 simulated devices for every method).

The mesh spans this process's devices (one host); for several processes see
:mod:`optg_jax.multihost` (``initialize``, ``global_mesh``, ``global_batch``), which reuses
``data_parallel`` and ``replicate`` unchanged.
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
  return _put_copies(tree, replicated(mesh))


def _put_copies(tree: PyTree, shardings: Any) -> PyTree:
  return jax.device_put(jax.tree.map(jnp.copy, tree), shardings)


def _check_divisible(path: Any, x: Any, n: int, devices: str = "") -> None:
  """Raises unless the batch leaf ``x`` at ``path`` splits over ``n`` devices (``devices``
  names them in the message: ``"this process's "``)."""
  if np.ndim(x) == 0 or np.shape(x)[0] % n:
    raise ValueError(f"batch leaf {jax.tree_util.keystr(path)!r} of shape {np.shape(x)} "
                     f"cannot be split over {devices}{n} devices")


def shard(batch: PyTree, mesh: Mesh) -> PyTree:
  """Splits every leaf's leading axis ``(B, ...)`` over ``mesh``, ``B/n`` rows per device.

  Raises:
    ValueError: a leaf's leading axis is not divisible by the number of devices.
  """
  n = mesh.devices.size

  def put(path, x):
    _check_divisible(path, x, n)
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
  return _jitted_step(fn, mesh, replicated(mesh), replicated(mesh), donate_state)


def _jitted_step(fn: Callable[..., Any], mesh: Mesh, state_sharding: Any, out_sharding: Any,
                 donate_state: bool) -> Callable[..., Any]:
  """``jax.jit`` of ``fn(state, *batch)``, each batch argument split over ``mesh``."""
  jitted = jax.jit(lambda state, batch: fn(state, *batch),
                   in_shardings=(state_sharding, batch_sharded(mesh)),
                   out_shardings=out_sharding, donate_argnums=(0,) if donate_state else ())
  return lambda state, *batch: jitted(state, batch)


def _largest_divisible_axis(shape: tuple[int, ...], n: int) -> int | None:
  """The largest axis of ``shape`` that ``n`` divides (the first of equal ones), or ``None``."""
  axes = [a for a, size in enumerate(shape) if size % n == 0 and size >= n]
  return max(axes, key=lambda a: (shape[a], -a)) if axes else None


def fsdp_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
  """A ``NamedSharding`` per leaf of ``tree``: split along its largest axis that the mesh's
  first axis divides (for a ``(784, 300)`` kernel on 8 devices, ``(98, 300)`` each; for a
  ``(3, 3, 64, 128)`` conv, the 128 output channels), replicated for scalars and for arrays with
  no such axis."""
  n, name = mesh.shape[mesh.axis_names[0]], mesh.axis_names[0]

  def one(x):
    shape = np.shape(x)
    axis = _largest_divisible_axis(shape, n)
    if axis is None:
      return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(*(name if a == axis else None
                                               for a in range(len(shape)))))

  return jax.tree.map(one, tree)


def shard_state(state: PyTree, mesh: Mesh) -> PyTree:
  """Places ``state`` as :func:`fsdp_shardings` says (copies first, as :func:`replicate`)."""
  return _put_copies(state, fsdp_shardings(state, mesh))


def fully_sharded(fn: Callable[..., Any], mesh: Mesh, state: PyTree, *,
                  donate_state: bool = False, returns_state: bool = True) -> Callable[..., Any]:
  """Jits ``fn(state, *batch)`` with ``state`` sharded by :func:`fsdp_shardings` and each batch
  argument split on its leading axis over ``mesh``.

  ``state`` (arrays or ``jax.ShapeDtypeStruct``) fixes the shardings. With ``returns_state``,
  ``fn`` returns ``(state, outputs)``: the state comes back sharded the same way, ``outputs``
  replicated (a train step); otherwise every output is replicated (an eval step).
  """
  shardings = fsdp_shardings(state, mesh)
  out = (shardings, replicated(mesh)) if returns_state else replicated(mesh)
  return _jitted_step(fn, mesh, shardings, out, donate_state)


def replicate_for_pmap(tree: PyTree, devices: Sequence[jax.Device] | None = None) -> PyTree:
  """``tree`` with a leading device axis, one copy per device (``jax.local_devices()``), the
  input of a :func:`pmapped` step."""
  devices = list(jax.local_devices() if devices is None else devices)
  stacked = NamedSharding(Mesh(np.asarray(devices), ("devices",)), PartitionSpec("devices"))

  def put(x):
    x = np.asarray(x)
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), stacked)

  return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """The first device's copy of a :func:`pmapped` state (drops the leading device axis)."""
  return jax.tree.map(lambda x: x[0], tree)


def pmapped(fn: Callable[..., Any], *, axis_name: str = DATA_AXIS, donate_state: bool = False,
            devices: Sequence[jax.Device] | None = None) -> Callable[..., Any]:
  """``jax.pmap`` of ``fn(state, *batch)`` over ``devices`` (``jax.local_devices()``).

  The wrapper splits each batch argument ``(B, ...)`` into ``(n, B/n, ...)``; ``state`` carries
  a leading device axis (:func:`replicate_for_pmap`) and so does every output. ``fn`` must reduce
  over ``axis_name`` itself: ``training.make_train_step(model, tx, axis_name=axis_name)`` averages
  the gradients, loss and BatchNorm statistics, so that every device applies one update.

  Raises:
    ValueError: a batch leaf's leading axis is not divisible by the number of devices.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  n = len(devices)
  mapped = jax.pmap(fn, axis_name=axis_name, devices=devices,
                    donate_argnums=(0,) if donate_state else ())

  def split(path, x):
    _check_divisible(path, x, n)
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return lambda state, *batch: mapped(state, *jax.tree_util.tree_map_with_path(split, batch))
