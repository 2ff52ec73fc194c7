"""Compact export of sparse models: a small, checksummed file, loaded back dense or sparse.

A pruned model is stored as, per prunable leaf, its kept values and their positions (a bit-packed
mask or flat indices, whichever is smaller, each zlib-compressed where that pays); non-prunable
leaves as they are; and metadata (method, sparsity, model, versions). Core only: numpy + jax.

File layout (little-endian)::

  b"OPTGSPK1"                 8 bytes, magic and format version 1
  header_len                  8 bytes, uint64
  header                      header_len bytes, UTF-8 JSON (below)
  payload                     header["payload_size"] bytes, the leaves' blobs back to back
  sha256(header + payload)    32 bytes

The header is ``{"format": "optg_jax.compact", "version": 1, "library_version", "metadata",
"payload_size", "leaves": [...]}``; each leaf is ``{"path", "shape", "dtype", "kind"}`` with
``kind`` ``"dense"`` (blob ``values``: the whole array, C order) or ``"sparse"`` (``nnz``, blob
``values``: the kept values in C order; ``positions``: ``"bitmap"`` (``np.packbits`` of the flat
mask, big bit order) or ``"index"`` (sorted flat indices, ``index_dtype`` uint16/uint32/uint64),
blob ``positions``). A blob is ``[offset, stored_bytes, raw_bytes, zlib]``. Signed supermasks are
exported as ``W ⊙ S`` (the sign folded into the value): see :func:`compact_params`.

Loading: :func:`load` gives the dense params (exactly ``W ⊙ M``: kept values bit for bit, +0.0
elsewhere); :func:`load_sparse` gives 2-D prunable leaves as ``jax.experimental.sparse.BCOO`` (or
SciPy CSR) and densifies the rest (convolution kernels, stacked kernels); :func:`sparse_apply`
runs a Flax linen model on it. A truncated or altered file raises :class:`CompactFileError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optg_jax import _paths
from optg_jax.methods import base

PyTree = Any
MAGIC = b"OPTGSPK1"
FORMAT = "optg_jax.compact"
VERSION = 1
_DIGEST = 32


class CompactFileError(ValueError):
  """The file is not a complete, unaltered optg_jax compact file (truncated, corrupted, foreign)."""


# ------------------------------------------------------------------------------------------ save


def compact_params(params: PyTree, opt_state: Any, masks: PyTree | None = None
                   ) -> tuple[PyTree, PyTree]:
  """The deployed weights and their bool masks: ``(og.final_params(params, opt_state, M), M)``.

  ``M`` is ``masks`` or :func:`optg_jax.final_masks`; the weights are
  :func:`optg_jax.final_params` (``W ⊙ M``, with the signed supermask's signs and Continuous
  Sparsification's ticket scale folded into the values). Without a sparsity method in
  ``opt_state`` (dense training) the params are returned with all-keep masks.
  """
  if masks is None:
    masks = base.final_masks(params, opt_state)
  return base.final_params(params, opt_state, masks), masks


def _blob(raw: bytes, out: io.BytesIO) -> list:
  """Appends ``raw`` (zlib-compressed if that is smaller) to ``out``; its ``[offset, stored,
  raw, zlib]`` entry."""
  packed = zlib.compress(raw, 6)
  use_zlib = len(packed) < len(raw)
  data = packed if use_zlib else raw
  offset = out.tell()
  out.write(data)
  return [offset, len(data), len(raw), use_zlib]


def _index_dtype(n: int) -> np.dtype:
  """The smallest unsigned dtype holding flat indices ``0 .. n-1``."""
  for dt in (np.uint16, np.uint32):
    if n <= np.iinfo(dt).max + 1:
      return np.dtype(dt)
  return np.dtype(np.uint64)


def _positions(flat_mask: np.ndarray) -> tuple[str, bytes, str | None]:
  """The smaller of the bit-packed mask and the flat index list (compared after zlib)."""
  bitmap = np.packbits(flat_mask).tobytes()
  idx_dtype = _index_dtype(flat_mask.size)
  index = np.flatnonzero(flat_mask).astype(idx_dtype).tobytes()
  if len(zlib.compress(bitmap, 6)) <= len(zlib.compress(index, 6)):
    return "bitmap", bitmap, None
  return "index", index, idx_dtype.name


def _is_prunable(mask: Any) -> bool:
  """A mask leaf prunes its param unless it is the scalar all-keep ``True``."""
  m = np.asarray(mask)
  return not (m.ndim == 0 and bool(m))


def _leaf_entry(path: str, value: Any, mask: Any, out: io.BytesIO) -> dict:
  """Writes one leaf's blobs; returns its header entry."""
  arr = np.asarray(value)
  entry = {"path": path, "shape": list(arr.shape), "dtype": arr.dtype.name}
  if not _is_prunable(mask) or not np.issubdtype(arr.dtype, np.inexact):
    entry["kind"] = "dense"
    entry["values"] = _blob(np.ascontiguousarray(arr).tobytes(), out)
    return entry
  flat_mask = np.broadcast_to(np.asarray(mask) != 0, arr.shape).reshape(-1)
  kind, pos, idx_dtype = _positions(flat_mask)
  entry.update(kind="sparse", nnz=int(flat_mask.sum()), positions=kind)
  if idx_dtype:
    entry["index_dtype"] = idx_dtype
  entry["values"] = _blob(arr.reshape(-1)[flat_mask].tobytes(), out)
  entry["positions_blob"] = _blob(pos, out)
  return entry


def _flat_with_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
  """``(paths, leaves, treedef)``; paths as :func:`optg_jax._paths.path_str` writes them."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [_paths.path_str(p) for p, _ in with_path]
  if len(set(paths)) != len(paths):
    raise ValueError("params: two leaves share a path name; cannot export them by path")
  return paths, [leaf for _, leaf in with_path], treedef


def save(path: str | os.PathLike[str], params: PyTree, masks: PyTree, *,
         metadata: dict | None = None) -> dict:
  """Writes ``params ⊙ masks`` compactly to ``path`` (see the module docstring for the format).

  Args:
    path: the file to write.
    params: the deployed weights (e.g. the first element of :func:`compact_params`); any pytree
      (linen dicts, ``nnx.State``, stacked kernels).
    masks: bool (or int8 signed) masks with the params' treedef; a scalar ``True`` leaf is kept
      whole. Values outside the mask are not stored.
    metadata: JSON-serialisable extras (method, model name, ...); ``sparsity`` is added.

  Returns:
    ``{"bytes": file size, "dense_bytes": size of all leaves stored dense, "sparsity": pruned
    fraction of the prunable weights}``.
  """
  paths, leaves, treedef = _flat_with_paths(params)
  mask_leaves = treedef.flatten_up_to(masks)
  payload = io.BytesIO()
  entries = [_leaf_entry(p, v, m, payload) for p, v, m in zip(paths, leaves, mask_leaves)]
  pruned = [e for e in entries if e["kind"] == "sparse"]
  total = sum(int(np.prod(e["shape"])) for e in pruned)
  sparsity = 1.0 - sum(e["nnz"] for e in pruned) / total if total else 0.0
  header = {"format": FORMAT, "version": VERSION, "library_version": _library_version(),
            "metadata": {**(metadata or {}), "sparsity": sparsity},
            "payload_size": payload.tell(), "leaves": entries}
  body = _encode_header(header) + payload.getvalue()
  with open(path, "wb") as f:
    f.write(MAGIC + body + hashlib.sha256(body).digest())
  dense_bytes = sum(np.asarray(v).nbytes for v in leaves)
  return {"bytes": len(MAGIC) + len(body) + _DIGEST, "dense_bytes": dense_bytes,
          "sparsity": sparsity}


def _encode_header(header: dict) -> bytes:
  text = json.dumps(header, separators=(",", ":")).encode()
  return struct.pack("<Q", len(text)) + text


def _library_version() -> str:
  from optg_jax import __version__  # pylint: disable=import-outside-toplevel
  return __version__


# ------------------------------------------------------------------------------------------ read


def _read(path: str | os.PathLike[str]) -> tuple[dict, memoryview]:
  """Checks magic, length and SHA-256; returns ``(header, payload)``."""
  with open(path, "rb") as f:
    data = f.read()
  name = os.fspath(path)
  if not data.startswith(MAGIC):
    raise CompactFileError(f"{name}: not an optg_jax compact file (bad magic bytes)")
  if len(data) < len(MAGIC) + 8 + _DIGEST:
    raise CompactFileError(f"{name}: truncated ({len(data)} bytes)")
  body, digest = data[len(MAGIC):-_DIGEST], data[-_DIGEST:]
  (header_len,) = struct.unpack("<Q", body[:8])
  if 8 + header_len > len(body):
    raise CompactFileError(f"{name}: truncated (header of {header_len} bytes does not fit)")
  if hashlib.sha256(body).digest() != digest:
    raise CompactFileError(f"{name}: checksum mismatch (the file is truncated or corrupted)")
  header = json.loads(body[8:8 + header_len])
  if header.get("format") != FORMAT or header.get("version") != VERSION:
    raise CompactFileError(f"{name}: format {header.get('format')!r} version "
                           f"{header.get('version')!r}; this reader reads {FORMAT} {VERSION}")
  payload = memoryview(body)[8 + header_len:]
  if len(payload) != header["payload_size"]:
    raise CompactFileError(f"{name}: payload is {len(payload)} bytes, header says "
                           f"{header['payload_size']}")
  return header, payload


def read_metadata(path: str | os.PathLike[str]) -> dict:
  """The file's metadata (method, sparsity, model, ...) after checking the file."""
  header, _ = _read(path)
  return {**header["metadata"], "library_version": header["library_version"]}


def _unblob(payload: memoryview, blob: list) -> bytes:
  offset, stored, raw, use_zlib = blob
  data = bytes(payload[offset:offset + stored])
  data = zlib.decompress(data) if use_zlib else data
  if len(data) != raw:
    raise CompactFileError(f"blob at {offset}: {len(data)} bytes, expected {raw}")
  return data


def _flat_positions(entry: dict, payload: memoryview) -> np.ndarray:
  """The sorted flat indices of a sparse leaf's kept entries (int64)."""
  pos = _unblob(payload, entry["positions_blob"])
  size = int(np.prod(entry["shape"]))
  if entry["positions"] == "bitmap":
    bits = np.unpackbits(np.frombuffer(pos, np.uint8), count=size)
    return np.flatnonzero(bits)
  return np.frombuffer(pos, np.dtype(entry["index_dtype"])).astype(np.int64)


def _values(entry: dict, payload: memoryview) -> np.ndarray:
  return np.frombuffer(_unblob(payload, entry["values"]), jnp.dtype(entry["dtype"]))


def _dense_leaf(entry: dict, payload: memoryview) -> np.ndarray:
  """One leaf as a dense numpy array (zeros at pruned positions)."""
  values = _values(entry, payload)
  if entry["kind"] == "dense":
    return values.reshape(entry["shape"]).copy()
  out = np.zeros(int(np.prod(entry["shape"])), values.dtype)
  out[_flat_positions(entry, payload)] = values
  return out.reshape(entry["shape"])


def _assemble(leaves: dict[str, Any], like: PyTree | None) -> PyTree:
  """Puts ``{path: leaf}`` (arrays or sparse matrices, kept whole) into ``like``'s treedef, or
  into nested dicts split at ``/``."""
  if like is None:
    tree: dict = {}
    for path, leaf in leaves.items():
      *parents, last = path.split("/")
      node = tree
      for key in parents:
        node = node.setdefault(key, {})
      node[last] = leaf
    return tree
  paths, like_leaves, treedef = _flat_with_paths(like)
  missing = sorted(set(paths) ^ set(leaves))
  if missing:
    raise ValueError(f"like: its leaves and the file's differ at {missing[:5]}")
  for p, ref in zip(paths, like_leaves):
    if tuple(np.shape(ref)) != tuple(leaves[p].shape):
      raise ValueError(f"like: leaf {p!r} has shape {np.shape(ref)}, the file "
                       f"{tuple(leaves[p].shape)}")
  return jax.tree_util.tree_unflatten(treedef, [leaves[p] for p in paths])


def load(path: str | os.PathLike[str], like: PyTree | None = None) -> PyTree:
  """The dense params of a compact file: exactly ``params ⊙ masks`` as saved (numpy arrays).

  Args:
    path: a file written by :func:`save`.
    like: a pytree with the saved treedef (e.g. the model's params or ``nnx.State``, abstract
      leaves fine) to rebuild; ``None`` for nested dicts keyed by the path parts.

  Raises:
    CompactFileError: the file is truncated, corrupted or not a compact file.
    ValueError: ``like`` does not have the file's leaves and shapes.
  """
  header, payload = _read(path)
  leaves = {e["path"]: _dense_leaf(e, payload) for e in header["leaves"]}
  return _assemble(leaves, like)


# ---------------------------------------------------------------------------------- sparse form


def _bcoo_leaf(entry: dict, payload: memoryview):
  from jax.experimental import sparse  # pylint: disable=import-outside-toplevel
  values = _values(entry, payload)
  rows, cols = np.divmod(_flat_positions(entry, payload), entry["shape"][1])
  indices = np.stack([rows, cols], axis=1).astype(np.int32)
  return sparse.BCOO((jnp.asarray(values), jnp.asarray(indices)), shape=tuple(entry["shape"]),
                     indices_sorted=True, unique_indices=True)


def _csr_leaf(entry: dict, payload: memoryview):
  import scipy.sparse  # pylint: disable=import-outside-toplevel
  values = _values(entry, payload)
  rows, cols = np.divmod(_flat_positions(entry, payload), entry["shape"][1])
  return scipy.sparse.csr_array((values, (rows, cols)), shape=tuple(entry["shape"]))


_LAYOUTS = {"bcoo": _bcoo_leaf, "scipy_csr": _csr_leaf}


def load_sparse(path: str | os.PathLike[str], like: PyTree | None = None, *,
                layout: str = "bcoo") -> PyTree:
  """The params with each 2-D prunable leaf in a sparse ``layout``, every other leaf dense.

  ``"bcoo"``: ``jax.experimental.sparse.BCOO`` (jit-able, ``x @ W`` works); ``"scipy_csr"``:
  ``scipy.sparse.csr_array`` for CPU deployment outside jit. Convolution kernels, stacked kernels
  and non-prunable leaves are densified on load (the documented fallback), so any model runs.
  """
  if layout not in _LAYOUTS:
    raise ValueError(f"layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
  header, payload = _read(path)
  leaves = {}
  for e in header["leaves"]:
    sparse_2d = e["kind"] == "sparse" and len(e["shape"]) == 2
    leaves[e["path"]] = (_LAYOUTS[layout](e, payload) if sparse_2d else
                         jnp.asarray(_dense_leaf(e, payload)))
  return _assemble(leaves, like)


def is_sparse(leaf: Any) -> bool:
  """Whether ``leaf`` is one of :func:`load_sparse`'s sparse layouts."""
  from jax.experimental import sparse  # pylint: disable=import-outside-toplevel
  return isinstance(leaf, sparse.JAXSparse) or type(leaf).__module__.startswith("scipy.sparse")


def sparse_apply(model: Any, variables: PyTree, *args: Any, **kwargs: Any) -> Any:
  """``model.apply(variables, *args)`` for a Flax linen ``model`` whose ``variables`` hold BCOO
  kernels (from :func:`load_sparse`): every ``nn.Dense`` with a sparse kernel computes
  ``x @ W + b`` with the sparse ``W``; other layers run dense. Jit it like ``model.apply``.

  Needs the ``flax`` extra. (``jax.experimental.sparse.sparsify`` cannot trace linen's apply.)
  """
  from optg_jax import _extras  # pylint: disable=import-outside-toplevel
  _extras.require("optg_jax.export.sparse_apply", "flax", "flax")
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  kernels: dict[tuple, Any] = {}

  def strip(path, leaf):
    if is_sparse(leaf):
      kernels[tuple(_paths._key_name(k) for k in path[1:-1])] = leaf  # drop 'params', 'kernel'
      return None
    return leaf

  dense_vars = jax.tree_util.tree_map_with_path(strip, variables, is_leaf=is_sparse)

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    kernel = kernels.get(tuple(module.scope.path))
    if context.method_name != "__call__" or not isinstance(module, nn.Dense) or kernel is None:
      return next_fun(*call_args, **call_kwargs)
    (x,) = call_args
    y = (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])
    if module.use_bias:
      y = y + module.variables["params"]["bias"]
    return y

  with nn.intercept_methods(interceptor):
    return model.apply(_drop_none(dense_vars), *args, **kwargs)


def _drop_none(tree: Any) -> Any:
  """Nested dicts without their ``None`` values (the kernels :func:`sparse_apply` serves)."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _drop_none(v) for k, v in tree.items() if v is not None}
  return tree
