"""Compact export: exact round trips for every method's masks, stacked kernels and nnx state;
sparse inference equal to the masked dense model; damaged files refused; the benchmark's quick
mode."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optg_jax as og
from optg_jax import export

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params():
  """Two dense layers with biases and a stacked kernel (3 layers of 16x16), 32-bit floats."""
  k = jax.random.split(jax.random.key(0), 3)
  return {"fc1": {"kernel": jax.random.normal(k[0], (30, 40)), "bias": jnp.ones(40)},
          "fc2": {"kernel": jax.random.normal(k[1], (40, 10)), "bias": jnp.zeros(10)},
          "blocks": {"kernel": jax.random.normal(k[2], (3, 16, 16))}}


def _grads(params):
  return jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)


METHODS = {
    "optg": lambda: og.mask_optimizer(0.9, 0.1, steps_per_epoch=1, total_epochs=1),
    "gmp": lambda: og.gmp(0.9, 0, 1, 1),
    "magnitude": lambda: og.magnitude(0.9),
    "snip": lambda: og.snip(0.9),
    "random": lambda: og.random_pruning(0.9, seed=3),
    "signed_supermask": lambda: og.signed_supermask(0.1),
    "edge_popup": lambda: og.edge_popup(0.9, 0.1),
}


def _trained(method, params):
  """``(params, opt_state)`` after two updates of ``method`` with fixed gradients."""
  tx = METHODS[method]()
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(_grads(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _assert_bitwise(tree_a, tree_b):
  leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_round_trip_is_bitwise_for_every_method(method, tmp_path):
  params, state = _trained(method, _params())
  values, masks = export.compact_params(params, state)
  info = export.save(tmp_path / "m.ospk", values, masks, metadata={"method": method})
  loaded = export.load(tmp_path / "m.ospk", like=params)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  _assert_bitwise(loaded, og.apply_masks(values, masks))
  meta = export.read_metadata(tmp_path / "m.ospk")
  assert meta["method"] == method
  assert meta["sparsity"] == pytest.approx(float(og.sparsity_summary(masks).sparsity))
  assert info["bytes"] == (tmp_path / "m.ospk").stat().st_size
  if method != "signed_supermask":  # its sparsity is learnt
    assert info["bytes"] < 0.35 * info["dense_bytes"]


def test_signed_supermask_exports_the_sign_folded_into_the_value(tmp_path):
  params, state = _trained("signed_supermask", _params())
  signs = og.methods.base.find_state(state).masks
  values, masks = export.compact_params(params, state)
  export.save(tmp_path / "s.ospk", values, masks)
  loaded = export.load(tmp_path / "s.ospk", like=params)
  kernel = np.asarray(params["fc1"]["kernel"]) * np.asarray(signs["fc1"]["kernel"])
  np.testing.assert_array_equal(loaded["fc1"]["kernel"], kernel)
  assert np.any(np.asarray(signs["fc1"]["kernel"]) == -1)


def test_stacked_kernel_round_trip_and_dense_load_without_template(tmp_path):
  params = _params()
  masks = jax.tree.map(lambda p: jnp.abs(p) > 1.5, params)
  export.save(tmp_path / "k.ospk", params, masks)
  loaded = export.load(tmp_path / "k.ospk")  # nested dicts from the paths
  _assert_bitwise(loaded, og.apply_masks(params, masks))
  assert loaded["blocks"]["kernel"].shape == (3, 16, 16)


def test_both_position_encodings_round_trip(tmp_path):
  """A dense-ish mask picks the bitmap, a very sparse one the index list; both exact."""
  w = jax.random.normal(jax.random.key(1), (64, 64))
  for threshold, encoding in ((0.5, "bitmap"), (3.0, "index")):
    m = jnp.abs(w) > threshold
    export.save(tmp_path / "e.ospk", {"w": w}, {"w": m})
    header, _ = export._read(tmp_path / "e.ospk")
    assert header["leaves"][0]["positions"] == encoding
    _assert_bitwise(export.load(tmp_path / "e.ospk"), {"w": jnp.where(m, w, 0.0)})


def test_nnx_state_round_trip(tmp_path):
  nnx = pytest.importorskip("flax.nnx")

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(20, 30, rngs=rngs)
      self.fc2 = nnx.Linear(30, 5, rngs=rngs)

  _, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
  params, state = _trained("magnitude", params)
  values, masks = export.compact_params(params, state)
  export.save(tmp_path / "n.ospk", values, masks)
  _, template = nnx.split(MLP(nnx.Rngs(7)), nnx.Param)
  loaded = export.load(tmp_path / "n.ospk", like=template)
  assert isinstance(loaded, nnx.State)
  _assert_bitwise(loaded, og.apply_masks(values, masks))


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic"])
def test_damaged_file_is_refused(damage, tmp_path):
  params = _params()
  masks = jax.tree.map(lambda p: jnp.abs(p) > 1.0, params)
  path = tmp_path / "d.ospk"
  export.save(path, params, masks)
  data = bytearray(path.read_bytes())
  if damage == "truncate":
    data = data[:len(data) - 100]
  elif damage == "flip":
    data[len(data) // 2] ^= 0x01
  else:
    data[:4] = b"PK\x03\x04"
  path.write_bytes(bytes(data))
  match = "magic" if damage == "magic" else "truncated|checksum"
  with pytest.raises(export.CompactFileError, match=match):
    export.load(path)
  with pytest.raises(export.CompactFileError):
    export.load_sparse(path)


def test_like_with_other_leaves_is_refused(tmp_path):
  params = _params()
  export.save(tmp_path / "l.ospk", params, jax.tree.map(lambda p: True, params))
  with pytest.raises(ValueError, match="fc3"):
    export.load(tmp_path / "l.ospk", like={**params, "fc3": {"kernel": jnp.zeros(2)}})


def test_sparse_apply_equals_the_masked_dense_model(tmp_path):
  pytest.importorskip("flax")
  from optg_jax import models  # pylint: disable=import-outside-toplevel  (the flax extra)
  model = models.get_model("lenet300100")
  x = jax.random.normal(jax.random.key(2), (8, 28, 28, 1))
  params = model.init(jax.random.key(0), x)["params"]
  values, masks = export.compact_params(params, og.magnitude(0.9).init(params))
  export.save(tmp_path / "lenet.ospk", values, masks)
  dense = model.apply({"params": export.load(tmp_path / "lenet.ospk", like=params)}, x)
  sparse_params = export.load_sparse(tmp_path / "lenet.ospk", like=params)
  first = sorted(sparse_params)[0]
  assert export.is_sparse(sparse_params[first]["kernel"]), first
  out = jax.jit(lambda p, x: export.sparse_apply(model, {"params": p}, x))(sparse_params, x)
  masked = model.apply({"params": og.apply_masks(values, masks)}, x)
  np.testing.assert_array_equal(dense, masked)
  scale = float(jnp.max(jnp.abs(dense)))
  np.testing.assert_allclose(out, dense, rtol=1e-5, atol=1e-5 * scale)
  assert float(jnp.max(jnp.abs(out - model.apply({"params": params}, x)))) > 1e-3 * scale


def test_scipy_csr_layout_matches_dense(tmp_path):
  w = jax.random.normal(jax.random.key(1), (50, 20))
  m = jnp.abs(w) > 1.0
  export.save(tmp_path / "c.ospk", {"w": w}, {"w": m})
  csr = export.load_sparse(tmp_path / "c.ospk", layout="scipy_csr")["w"]
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 50)))
  np.testing.assert_allclose(x @ csr, x @ np.where(m, w, 0.0), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="layout"):
    export.load_sparse(tmp_path / "c.ospk", layout="csc")


def test_benchmark_quick_mode_runs_and_writes_its_table(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_inference.py"),
                         "--quick", "--out", str(out)], capture_output=True, text=True,
                        timeout=300, check=False, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  rows = {r["sparsity"]: r for r in result["rows"]}
  assert set(rows) == {0.9, 0.99} and "| lenet300100 | 99% |" in proc.stdout
  assert rows[0.99]["size_ratio"] < 0.05 < rows[0.9]["size_ratio"]
  assert all(rows[0.9][f"{n}_b64_ms"] > 0 for n in ("dense", "bcoo", "jax_csr", "scipy_csr"))


def test_sparse_apply_runs_a_conv_net_with_batch_stats_through_the_dense_fallback(tmp_path):
  """ResNet-20: its convolution kernels are densified on load, its classifier runs on BCOO,
  its batch_stats are kept whole; outputs equal the masked dense model's."""
  pytest.importorskip("flax")
  from optg_jax import models  # pylint: disable=import-outside-toplevel  (the flax extra)
  model = models.get_model("resnet20", 10)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
  values, masks = export.compact_params(variables["params"],
                                        og.magnitude(0.9).init(variables["params"]))
  keep = {"params": masks, "batch_stats": jax.tree.map(lambda _: True, variables["batch_stats"])}
  export.save(tmp_path / "r.ospk", {**variables, "params": values}, keep)
  sparse_vars = export.load_sparse(tmp_path / "r.ospk", like=variables)
  leaves = jax.tree.leaves(sparse_vars, is_leaf=export.is_sparse)
  assert sum(map(export.is_sparse, leaves)) == 1  # the classifier; 4-D conv kernels dense
  out = export.sparse_apply(model, sparse_vars, x, train=False)
  masked = jax.jit(functools.partial(model.apply, train=False))(
      {**variables, "params": og.apply_masks(values, masks)}, x)
  scale = float(jnp.max(jnp.abs(masked)))
  np.testing.assert_allclose(out, masked, rtol=1e-5, atol=1e-5 * scale)
