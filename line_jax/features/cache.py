"""Features of a (backbone, data set), extracted once and reused.

`python -m line_jax.fit`, `tune` and `evaluate` all need a training set's
features, and the network is by far the slowest stage (DenseNet-BC-100 on a
CPU: tens of images per second). So a set's features and labels are kept as
`.npy` files in a cache folder, `default_dir()` (`$LINE_JAX_CACHE`, else
`~/.cache/line_jax/features`), under a key that digests everything they
depend on:

* the backbone (`Backbone.key`): its module's description, every variable,
  the normalisation, the head it is cut at, and its preprocessing (crop
  size, resize size, channels, decoder);
* the records: an array source's pixels and labels (for a memory-mapped
  file over 4 GiB, its path, size and modification time), a folder's or an
  image list's file paths (and labels), sizes and modification times, a
  TFDS split's name, folder and length, and a subset's indices.

Change any of them and the key changes, so stale files are never read. A set
read with `skip_bad_images` (images that cannot be decoded dropped, listed
in the entry's `.json` and `CachedSet.skipped`) has a key of its own: a run
that does not skip never reads a set with images missing. The
batch size is not in the key: features extracted at another batch size agree
to float rounding, not always bit for bit. Each entry is three files:
`<key>.features.npy` (float32 `[n, features]`), `<key>.labels.npy` (int32
`[n]`, -1 where the set has none) and `<key>.json`, written last, so an
interrupted extraction is redone, never half read. Entries are read as
memmaps: memory holds one batch whatever the set's size. Remove the folder
to reclaim its space.

A cache folder holds nothing else: one holding a file line_jax did not write
is refused (`check_folder`), never written into. `refuse_foreign` is that
rule for every folder a run writes (fit's, evaluate's, tune's, train's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
from typing import Any

import jax
import numpy as np

from line_jax import resumable

ENV = "LINE_JAX_CACHE"
# An entry's files: `<key>.features.npy`, `<key>.labels.npy`, `<key>.json`.
_KEY = "[0-9a-f]" * 16
ENTRY_FILES = tuple(_KEY + suffix for suffix in (".features.npy", ".labels.npy", ".json"))


def default_dir() -> str:
  """`$LINE_JAX_CACHE`, else `~/.cache/line_jax/features` (not created here)."""
  return os.environ.get(ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "line_jax", "features")


@dataclasses.dataclass(frozen=True)
class CachedSet:
  """One set's features, memory-mapped.

  Attributes:
    features: float32 `[n, features]`.
    labels: int32 `[n]` (-1 where the set has none).
    seconds: wall time of the extraction, whenever it ran.
    cached: read back from an earlier run's files.
    skipped: the `line_jax.data.SkippedImage`s the extraction dropped
      (`skip_bad_images`), by index in the source read; their rows are not
      in `features`.
  """

  features: np.ndarray
  labels: np.ndarray
  seconds: float = 0.0
  cached: bool = False
  skipped: tuple = ()

  def __len__(self) -> int:
    return self.features.shape[0]

  def batches(self, batch_size: int = resumable.ROWS_PER_BATCH) -> resumable.StoredRows:
    """The re-iterable `(features, labels)` stream `fit_from_batches` takes
    (each pass reads the memmaps again instead of holding the set)."""
    return resumable.StoredRows(self.features, self.labels, batch_size)


def fingerprint(*parts: Any) -> str:
  """A short hex digest of arrays, pytrees of arrays and JSON-able values."""
  digest = hashlib.sha1()
  for part in parts:
    for leaf in jax.tree_util.tree_leaves(part):
      if isinstance(leaf, (np.ndarray, jax.Array)) or hasattr(leaf, "__array__"):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
      else:
        digest.update(json.dumps(leaf, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:16]


def temporary(path: str) -> str:
  """Where `path` is written before `os.replace` moves it in: `NAME.tmp`,
  or `STEM.tmp.png` for a figure (matplotlib picks the format by suffix)."""
  root, ext = os.path.splitext(path)
  return f"{root}.tmp{ext}" if ext == ".png" else path + ".tmp"


def _final(name: str) -> str:
  """The name a temporary file (`temporary`) becomes."""
  if name.endswith(".tmp"):
    return name[:-len(".tmp")]
  root, ext = os.path.splitext(name)
  return root[:-len(".tmp")] + ext if root.endswith(".tmp") else name


def refuse_foreign(folder: str | os.PathLike, owned: Sequence[str], *, what: str,
                   marks: Mapping[str, Callable[[Any], bool]] | None = None) -> None:
  """Raises unless `folder` holds only what line_jax writes there.

  Checked before a run writes (and before its long work), so that nothing a
  user keeps is replaced or deleted; a folder line_jax wrote is taken again
  (a resume, a re-run). A missing or empty folder passes.

  Args:
    folder: the folder a run writes.
    owned: glob patterns of the names it writes there; their temporary
      files (`temporary`) and anything inside them are its own too.
    what: how the message names the folder, e.g. "--out".
    marks: `{JSON file: check of its value}`: a folder holding more than
      temporary files must hold one of them, passing its check (a name
      alone, `table.md`, could be anyone's file).

  Raises:
    ValueError: naming the folder and the entries line_jax did not write, or
      the mark it lacks, or the file that stands where the folder belongs.
  """
  folder = os.fspath(folder)
  if not os.path.lexists(folder):
    return
  if not os.path.isdir(folder):
    raise ValueError(f"{what} {folder} is a file, not a folder; line_jax writes a folder "
                     "there and replaces no file of yours: choose another path")
  names = sorted(os.listdir(folder))
  foreign = [name for name in names
             if not any(fnmatch.fnmatchcase(n, p) for n in (name, _final(name)) for p in owned)]
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise ValueError(f"{what} {folder} holds {shown}, which line_jax did not write; it "
                     "writes only into a new or empty folder, or one holding its own "
                     "output: choose another folder or move those away")
  if marks and any(_final(name) == name for name in names) and not any(
      _marked(os.path.join(folder, name), check) for name, check in marks.items()):
    raise ValueError(f"{what} {folder} holds {', '.join(names[:5])} but no "
                     f"{' or '.join(marks)} of line_jax's, so these may be your files; "
                     "choose another folder or move them away")


def _marked(path: str, check: Callable[[Any], bool]) -> bool:
  """Whether the JSON file `path` exists and passes `check`."""
  try:
    with open(path) as f:
      return bool(check(json.load(f)))
  except (OSError, ValueError):  # Absent, a folder, unreadable, not JSON.
    return False


def check_folder(folder: str | os.PathLike) -> None:
  """Raises unless `folder` is a feature cache (or absent, or empty): no other files."""
  refuse_foreign(folder, ENTRY_FILES, what="feature cache folder")


def _check_key(key: str) -> None:
  if not isinstance(key, str) or not re.fullmatch("[0-9a-f]{16}", key):
    raise ValueError(f"cache key {key!r} is not 16 hex digits (`cache.key` or "
                     "`cache.fingerprint` makes one)")


def key(backbone_key: str, source: Sequence, *, skip_bad_images: bool = False) -> str | None:
  """The entry key of a backbone's (its `Backbone.key`) features of `source`,
  read with or without `skip_bad_images`; None where the source is of a kind
  this module cannot key (`source_key`)."""
  records = source_key(source)
  if records is None:
    return None
  # Only then, so that the keys of every set read without it stay as they were.
  extra = ["skip_bad_images"] if skip_bad_images else []
  return fingerprint(backbone_key, records, *extra)


def source_key(source: Sequence) -> Any | None:
  """What identifies a source's records (their content where it is cheap);
  None for a kind of source this module does not know (not cacheable)."""
  from line_jax import data  # pylint: disable=g-import-not-at-top

  if isinstance(source, data.Subset):
    inner = source_key(source.source)
    return None if inner is None else ["subset", inner, source.indices]
  if isinstance(source, data.ArraySource):
    return ["arrays", _array_key(source.images), source.labels]
  if isinstance(source, data.ImageFolderSource):
    return ["folder", os.path.abspath(source.root), list(source.paths), source.labels,
            [_file_key(p) for p in source.paths]]
  if isinstance(source, data.ImageListSource):
    # Absolute paths: `--data-dir ../data` and `/abs/data` are one set of files.
    paths = [os.path.abspath(p) for p in source.paths]
    return ["imglist", paths, source.labels, [_file_key(p) for p in paths]]
  if isinstance(source, data.TfdsSource):
    return ["tfds", source.name, source.split, source.data_dir, len(source)]
  return None


# Arrays up to this size are keyed by their bytes, memory-mapped or not, so
# the same pixels give the same key from a `.npy` folder and from memory.
# Larger memory-mapped files are keyed by path, size and time instead: hashing
# them would read them whole.
HASH_LIMIT_BYTES = 4 << 30


def _array_key(images: np.ndarray) -> Any:
  filename = getattr(images, "filename", None)
  if filename and images.nbytes > HASH_LIMIT_BYTES:
    return [_file_key(filename), images.shape, str(images.dtype), getattr(images, "offset", 0)]
  return images


def _file_key(path: str) -> list:
  stat = os.stat(path)
  return [os.fspath(path), stat.st_size, stat.st_mtime_ns]


def _paths(folder: str, key: str) -> dict[str, str]:
  return {"features": os.path.join(folder, f"{key}.features.npy"),
          "labels": os.path.join(folder, f"{key}.labels.npy"),
          "meta": os.path.join(folder, f"{key}.json")}


def lookup(folder: str | os.PathLike, key: str) -> CachedSet | None:
  """The entry `key` in `folder`, memory-mapped; None where it is absent or partial."""
  paths = _paths(os.fspath(folder), key)
  try:
    with open(paths["meta"]) as f:
      meta = json.load(f)
    arrays = {k: np.load(paths[k], mmap_mode="r", allow_pickle=False)
              for k in ("features", "labels")}
  except (OSError, ValueError):
    return None
  if meta.get("key") != key or any(a.shape[0] != meta.get("images") for a in arrays.values()):
    return None
  return CachedSet(**arrays, seconds=float(meta.get("seconds", 0.0)), cached=True,
                   skipped=_skipped_images(meta.get("skipped", ())))


def _skipped_images(records: Sequence) -> tuple:
  if not records:
    return ()
  from line_jax import data  # pylint: disable=g-import-not-at-top
  return tuple(data.SkippedImage(*r) for r in records)


def _write_meta(paths: dict[str, str], key: str, images: int, seconds: float,
                description: str, skipped: Sequence | None = None) -> None:
  meta = {"key": key, "images": images, "seconds": seconds, "description": description,
          "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
  if skipped is not None:  # Read with skip_bad_images: what it dropped, if anything.
    meta["skipped"] = [list(s) for s in skipped]
  tmp = temporary(paths["meta"])
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, paths["meta"])


def extract(
    backbone: Any,
    batches: Sequence[tuple[np.ndarray, np.ndarray]],
    num_images: int,
    *,
    folder: str | os.PathLike,
    key: str,
    description: str = "",
    progress: bool | str = True,
) -> CachedSet:
  """The entry `key`, read back, or made by running `backbone` over `batches`.

  Args:
    backbone: the `line_jax.features.Backbone` the features come from.
    batches: an iterable of `(images, labels)`, uint8 `[b, H, W, C]` and
      `[b]`, no batch larger than the first (the input pipeline's); run by
      the one dispatch-ahead loop (`iter_extract_batches`, one compilation).
      An `ImageBatches` with `skip_bad_images` gives fewer rows than
      `num_images`: the entry keeps the rows read and lists the rest in
      its `.json` (`CachedSet.skipped`).
    num_images: images in the stream (records, where images are skipped).
    folder: the cache folder (made if needed).
    key: the entry's key (`key(backbone.key, source)`).
    description: what the set is, kept in the entry's `.json`.
    progress: a progress bar (a string is its label).

  Returns:
    The `CachedSet`, memory-mapped; `cached` says whether it was read back.

  Raises:
    ValueError: for a key that `key` / `fingerprint` did not make, a
      folder holding files that are not cache entries (`check_folder`), or
      a stream that gave another number of rows (none, where every image
      was skipped).
  """
  folder = os.fspath(folder)
  _check_key(key)
  check_folder(folder)
  found = lookup(folder, key)
  if found is not None:
    return found
  os.makedirs(folder, exist_ok=True)
  paths = _paths(folder, key)
  start = time.perf_counter()
  out, row = None, 0
  label = (progress if isinstance(progress, str) else f"features: {description or key}"
           ) if progress else False
  # The pipeline's threads decode the next batches while the network runs.
  for _, feats, labels in backbone.run(batches, progress=label, total=num_images):
    valid = feats.shape[0]
    if out is None:
      out = {"features": _open(paths["features"], (num_images, feats.shape[1])),
             "labels": _open(paths["labels"], (num_images,), np.int32)}
    out["features"][row:row + valid] = feats
    out["labels"][row:row + valid] = np.asarray(labels)
    row += valid
  skipped = tuple(batches.skipped) if getattr(batches, "skip_bad_images", False) else None
  expected = num_images - len(skipped or ())
  if out is None:
    why = f": all {num_images} were skipped as undecodable" if skipped else ""
    raise ValueError(f"{description or key}: the stream gave no image{why}")
  if row != expected:
    why = f" ({num_images} less {len(skipped)} skipped)" if skipped else ""
    raise ValueError(f"{description or key}: the stream gave {row} images, "
                     f"expected {expected}{why}")
  for array in out.values():
    array.flush()
  del array  # No memory map may stay open on a file `cut_rows` truncates.
  if row < num_images:  # Images were skipped: the files keep the rows read.
    del out
    for kind in ("features", "labels"):
      resumable.cut_rows(paths[kind], row)
  _write_meta(paths, key, row, time.perf_counter() - start, description, skipped)
  return dataclasses.replace(lookup(folder, key), cached=False)


def publish(folder: str | os.PathLike, key: str, features_path: str, labels_path: str, *,
            seconds: float = 0.0, description: str = "",
            skipped: Sequence | None = None) -> CachedSet:
  """Adds finished `.npy` files (a fit's feature rows) to the cache as `key`.

  Hard-linked where the cache is on the same file system (no copy, and the
  fit's own files stay), copied elsewhere. `skipped`: the records a stream
  with `skip_bad_images` dropped (None: it skipped nothing by design).

  Raises:
    ValueError: for a key that `key` / `fingerprint` did not make, or a
      folder holding files that are not cache entries (`check_folder`).
  """
  folder = os.fspath(folder)
  _check_key(key)
  check_folder(folder)
  os.makedirs(folder, exist_ok=True)
  paths = _paths(folder, key)
  if os.path.exists(paths["meta"]):
    os.remove(paths["meta"])  # Stale until the new files are whole.
  for kind, src in (("features", features_path), ("labels", labels_path)):
    tmp = temporary(paths[kind])
    if os.path.exists(tmp):
      os.remove(tmp)
    try:
      os.link(src, tmp)
    except OSError:
      shutil.copyfile(src, tmp)
    os.replace(tmp, paths[kind])
  images = np.load(paths["features"], mmap_mode="r", allow_pickle=False).shape[0]
  _write_meta(paths, key, images, seconds, description, skipped)
  return lookup(folder, key)


def _open(path: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
  if os.path.exists(path):
    os.remove(path)  # A new inode: a published file may be linked to a fit's own.
  return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
