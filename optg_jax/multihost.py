"""Multi-host data parallelism: several processes, one global mesh, each feeding its own rows.

The train step is the one of :mod:`optg_jax.parallel`: ``parallel.data_parallel(step, mesh)``
jitted over a mesh that spans the devices of *every* process. Each process runs the same program;
it starts the distributed runtime, builds the global mesh, replicates the same initial state and
feeds only its own part of each global batch. XLA all-reduces the gradient across processes, so the
optimizer, the mask refresh and its global top-k run on replicated values and every process ends
with the same masks, equal to a one-process run of the same global batches.

Run the script below once per process (here two processes on one machine, CPU devices and Gloo
collectives; on a GPU or TPU cluster ``initialize()`` without arguments detects the cluster)::

  # python train.py 0 & python train.py 1
  import sys
  import jax, numpy as np, optax, optg_jax as og
  from optg_jax import models, multihost, parallel, training

  multihost.initialize("localhost:12355", num_processes=2, process_id=int(sys.argv[1]),
                       local_device_count=2)            # before any other JAX call
  model = models.get_model("lenet300100")
  tx = optax.chain(og.mask_optimizer(0.9, 0.05, steps_per_epoch=5, total_epochs=2, ramp="budget"),
                   optax.sgd(0.05, momentum=0.9))
  mesh = multihost.global_mesh(batch_size=64)          # 4 devices over 2 processes
  rows = multihost.local_rows(64, mesh)                # this process's slice of a global batch
  state = training.init(model, tx, np.zeros((1, 28, 28, 1), np.float32), seed=0)
  state = parallel.replicate(state, mesh)              # same seed: same state in every process
  step = parallel.data_parallel(training.make_train_step(model, tx), mesh, donate_state=True)
  data = np.random.default_rng(0)                      # the same global batches everywhere
  for _ in range(10):
    images = data.random((64, 28, 28, 1), dtype=np.float32)
    labels = data.integers(0, 10, 64).astype(np.int32)
    state, loss = step(state, *multihost.global_batch((images[rows], labels[rows]), mesh))
  masks = jax.tree.map(np.asarray, og.get_masks(state.opt_state))  # replicated: readable here
  print(jax.process_index(), float(loss), og.sparsity_summary(masks).sparsity)

Each process needs only its own rows (``images[rows]``): a loader may read just those, e.g. with
grain's ``ShardByJaxProcess``. Outputs of the step are replicated, so ``np.asarray`` reads them
on every process; a batch-sharded array spans other processes' devices and is read with
``jax.experimental.multihost_utils.process_allgather``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from optg_jax import parallel

PyTree = Any


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None,
               cpu_collectives: str | None = None, **kwargs: Any) -> None:
  """Starts JAX's distributed runtime for this process; call it first, before any JAX work.

  A thin wrapper of :func:`jax.distributed.initialize` that also makes CPU devices usable across
  processes: it sets ``jax_cpu_collectives_implementation`` (Gloo unless JAX already has one, or
  ``cpu_collectives`` names another), which CPU backends need for cross-process all-reduces and
  which GPU and TPU backends ignore. Without arguments JAX detects the cluster (SLURM, Open MPI,
  Cloud TPU, ...).

  Args:
    coordinator_address: ``"host:port"`` of process 0, the coordinator; every process passes the
      same one.
    num_processes: number of processes taking part.
    process_id: this process's index, in ``[0, num_processes)``.
    local_device_count: CPU only: the number of CPU devices this process exposes (sets
      ``jax_num_cpu_devices``, like ``XLA_FLAGS=--xla_force_host_platform_device_count``).
    cpu_collectives: ``"gloo"`` or ``"mpi"``; default: JAX's setting, or ``"gloo"`` if unset.
    **kwargs: passed on to :func:`jax.distributed.initialize` (``local_device_ids``,
      ``initialization_timeout``, ...).

  Raises:
    ValueError: ``num_processes``, ``process_id`` or ``local_device_count`` out of range, or a
      ``coordinator_address`` that is not ``"host:port"``.
    RuntimeError: (from JAX) called twice, or after JAX has already started its backends.
  """
  if coordinator_address is not None:
    host, _, port = str(coordinator_address).rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"coordinator_address must be 'host:port', got {coordinator_address!r}")
  if num_processes is not None and (not _is_int(num_processes) or num_processes < 1):
    raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
  if process_id is not None:
    if not _is_int(process_id) or process_id < 0 or (
        num_processes is not None and process_id >= num_processes):
      raise ValueError(f"process_id must be an integer in [0, num_processes={num_processes}), "
                       f"got {process_id!r}")
  if local_device_count is not None:
    if not _is_int(local_device_count) or local_device_count < 1:
      raise ValueError(
          f"local_device_count must be a positive integer, got {local_device_count!r}")
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if cpu_collectives is not None or jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives or "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def global_mesh(batch_size: int | None = None, *, axis_name: str = parallel.DATA_AXIS,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A one-axis mesh over the devices of all processes, grouped by process.

  Each process's devices are contiguous on the mesh axis, process 0's first, so process ``p``
  holds the ``p``-th block of rows of every global batch (see :func:`local_rows`). Unlike
  :func:`parallel.local_mesh` it never drops devices: a process without a device on the mesh
  could not feed its rows.

  Args:
    batch_size: if given, the global batch size, checked to split evenly over the devices.
    axis_name: name of the data axis.
    devices: the devices to use; default ``jax.devices()`` (every process's).

  Raises:
    ValueError: ``batch_size`` is not a positive multiple of the number of devices.
  """
  devices = sorted(jax.devices() if devices is None else devices,
                   key=lambda d: (d.process_index, d.id))
  if batch_size is not None:
    _check_batch_size(batch_size, len(devices))
  return parallel.local_mesh(axis_name=axis_name, devices=devices)


def local_rows(batch_size: int, mesh: Mesh) -> slice:
  """The rows ``[start, stop)`` of a global batch of ``batch_size`` that this process feeds.

  Raises:
    ValueError: ``batch_size`` does not split evenly over ``mesh``, or this process's rows are not
      contiguous (a mesh not built by :func:`global_mesh`).
  """
  n = mesh.devices.size
  _check_batch_size(batch_size, n)
  index_map = parallel.batch_sharded(mesh).addressable_devices_indices_map((batch_size,))
  starts = sorted({index[0].start or 0 for index in index_map.values()})
  per_device = batch_size // n
  if not starts or starts != list(range(starts[0], starts[0] + per_device * len(starts),
                                        per_device)):
    raise ValueError("this process's devices are not contiguous on the mesh; build it with "
                     "multihost.global_mesh")
  return slice(starts[0], starts[-1] + per_device)


def global_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """Assembles a global batch from each process's part of it.

  Every process calls it with its own rows (:func:`local_rows`), the same number on each process:
  a leaf of shape ``(b, ...)`` on each of ``P`` processes becomes a global array ``(P·b, ...)``
  split over ``mesh``'s data axis, ``b / d`` rows on each of the process's ``d`` devices. With one
  process it is :func:`parallel.shard`.

  Raises:
    ValueError: this process has no device on ``mesh``, or a leaf (named by its path) is a scalar
      or its leading axis does not split over the process's devices.
  """
  sharding = parallel.batch_sharded(mesh)
  n_local = len(sharding.addressable_devices)
  if not n_local:
    raise ValueError(f"process {jax.process_index()} has no device on the mesh")

  def put(path, x):
    parallel._check_divisible(  # pylint: disable=protected-access
        path, x, n_local, "this process's ")
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree_util.tree_map_with_path(put, local_batch)


def _check_batch_size(batch_size: Any, n: int) -> None:
  if not _is_int(batch_size) or batch_size < 1 or batch_size % max(n, 1):
    raise ValueError(f"batch_size must be a positive multiple of the mesh's {n} devices, "
                     f"got {batch_size!r}")


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
