"""Test session set-up: one persistent XLA compilation cache for the session, and XLA's
backend optimisations off.

Many tests compile the same programs (LeNet-300-100's train and eval steps, in the job and in
its child processes); caching them on disk for the session (the variables reach the child
processes too) saves minutes of the suite on 2 CPU cores. Results are unchanged: a cached
executable is the one the same program compiles to.

Most of the suite's time goes to compiling (every method's step with its exact top-k), not to
running: ``--xla_backend_optimization_level=0`` (:data:`FAST_COMPILE`) compiles about a third
faster on CPU. It changes how fast programs run and may reorder float arithmetic, not what they
compute: tests that compare two runs compare runs made under the same flags, and the recorded
trajectories (``test_trajectories.py``) are recomputed under the default flags users run with.
Set an optimization level in ``XLA_FLAGS`` to override it.
"""

import os
import tempfile

FAST_COMPILE = "--xla_backend_optimization_level=0"

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_COMPILE]))

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="optg_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# The longest files start first, so that the two xdist workers (one file at a time) do not end
# with one of them running a long file alone; the others keep their order.
_LONGEST_FIRST = ("test_parallel.py", "test_train.py", "test_end_to_end.py",
                  "test_trajectories.py", "test_train_rounds.py", "test_export.py",
                  "test_mask_refresh.py", "test_faults.py", "test_multihost.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file
