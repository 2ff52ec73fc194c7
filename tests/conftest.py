"""Test session set-up: one persistent XLA compilation cache for the session.

Many tests compile the same programs (LeNet-300-100's train and eval steps, in the job and in
its child processes); caching them on disk for the session (the variables reach the child
processes too) saves minutes of the suite on 2 CPU cores. Results are unchanged: a cached
executable is the one the same program compiles to.
"""

import os
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="optg_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
