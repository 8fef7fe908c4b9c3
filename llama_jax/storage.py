"""Where a run's files live: a local folder or a bucket (gs://bucket/path), through etils.epath.

On a TPU pod every host must see the same run directory, so `--workdir` and `data.data_dir`
may be buckets. A local path is made absolute (`~` expanded) as before; a bucket path is used
as given: os.path.abspath would turn gs://b/run into <cwd>/gs:/b/run, a different folder on
every host, so paths go through `resolve` and files through the functions here, never through
os.path.abspath / open() directly.

What an object store is not: it cannot append (a log is kept in memory and the whole object
rewritten, `RewrittenText`), it has no directories (a folder exists once an object is under
it; a "move" is copy + delete), no file locks and no memory maps (caches that need either are
built or read in a local copy, `local_copy_path`). Each object write replaces it whole, so a
reader never sees half of one. Only gs:// is supported: Orbax (tensorstore) and the
TensorBoard writer reach local paths and GCS, nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

from llama_jax import waiting
from llama_jax.errors import UserError

SCHEMES = ("gs",)  # what Orbax's tensorstore, gcsfs and tensorboardX all reach
_PROBE = ".llama_jax_write_check"


class StorageError(UserError, ValueError):
  """A path that cannot be used (unsupported scheme, missing bucket, no write permission).

  A ValueError too, so entry points that report ValueErrors as one line do so for it."""


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def scheme(path) -> str:
  return os.fspath(path).split("://", 1)[0] if is_remote(path) else ""


def resolve(path) -> str:
  """A local path absolute (`~` expanded); a bucket path as given, less a trailing '/'."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(base, *parts: str) -> str:
  return os.path.join(os.fspath(base), *parts)  # keeps gs:// intact (only abspath breaks it)


def bucket(path) -> str:
  """gs://bucket/a/b -> 'bucket'."""
  return os.fspath(path).split("://", 1)[1].split("/", 1)[0]


def check_scheme(path, what: str = "--workdir") -> None:
  if is_remote(path) and scheme(path) not in SCHEMES:
    raise StorageError(
        f"{what}={path}: the {scheme(path)}:// scheme is not supported here (Orbax checkpoints, "
        "the metric writers and the data caches reach local paths and gs://bucket/... only); "
        "use a local path or a gs:// bucket")


def check_bucket(path, what: str = "--workdir") -> None:
  """The bucket of a gs:// path exists (a local path: nothing to check)."""
  check_scheme(path, what)
  if not is_remote(path):
    return
  name = bucket(path)
  try:
    found = epath.Path(f"gs://{name}").exists()
  except Exception as e:  # noqa: BLE001 — no network, bad credentials: one line, not a trace
    raise StorageError(f"{what}={path}: cannot reach bucket gs://{name} ({_first_line(e)}); "
                       "check the network and the credentials (gcloud auth "
                       "application-default login)") from None
  if not found:
    raise StorageError(f"{what}={path}: bucket gs://{name} does not exist (or these credentials "
                       f"cannot see it); create it with `gcloud storage buckets create "
                       f"gs://{name}` or fix the path")


def check_writable(path, what: str = "--workdir") -> None:
  """`path` can hold files: an object written there can be deleted again (locally: the folder
  can be made and written). StorageError (one line) otherwise, naming a missing bucket as such.
  The write comes first: credentials allowed to write objects may not be allowed to read the
  bucket's own metadata."""
  check_scheme(path, what)
  path = resolve(path)
  # One probe per process and host: every process of a multi-host run writes checkpoints.
  probe = join(path, f"{_PROBE}.{os.uname().nodename}.{os.getpid()}")
  try:
    if not is_remote(path):
      os.makedirs(path, exist_ok=True)
    epath.Path(probe).write_bytes(b"")
    epath.Path(probe).unlink()
  except Exception as e:  # noqa: BLE001
    if is_remote(path):
      check_bucket(path, what)  # a missing bucket is the likeliest cause: say so
    fix = (f"give these credentials write access to gs://{bucket(path)} "
           "(roles/storage.objectUser) or pick another bucket" if is_remote(path)
           else "pick a folder you can write")
    raise StorageError(f"{what}={path} cannot be written ({_first_line(e)}); {fix}") from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


# ---------------------------------------------------------------------------- files


def exists(path) -> bool:
  return epath.Path(resolve(path)).exists()


def isdir(path) -> bool:
  return epath.Path(resolve(path)).is_dir()


def isfile(path) -> bool:
  p = epath.Path(resolve(path))
  return p.exists() and not p.is_dir()


def size(path) -> int | None:
  """Bytes of a file, None when there is none."""
  if not is_remote(path):
    return os.path.getsize(path) if os.path.isfile(path) else None
  p = epath.Path(path)
  return p.stat().length if p.exists() and not p.is_dir() else None


def read_bytes(path) -> bytes:
  return epath.Path(resolve(path)).read_bytes()


def read_text(path) -> str:
  return epath.Path(resolve(path)).read_text()


def write_bytes(path, data: bytes) -> None:
  """Writes the whole file at once: locally through a temporary file and a rename, so a
  reader never sees it half-written; an object is replaced whole by its upload anyway."""
  path = resolve(path)
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_png(path, fig, dpi: int) -> None:
  """A matplotlib figure as a PNG: saved into memory, then one write_bytes (the path may be in
  a bucket, where savefig cannot write)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  write_bytes(path, buf.getvalue())


def forget_listings(path) -> None:
  """Drops what this process remembers of a bucket's listings (gcsfs caches them per process),
  so the next exists / listdir sees what other processes wrote since; nothing for a local
  path."""
  if is_remote(path):
    from etils.epath import backend
    backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()


def listdir(path) -> list[str]:
  p = epath.Path(resolve(path))
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def _files(root: epath.Path, rel: str = "") -> Iterator[str]:
  """Relative paths of the files under root (iterdir, not walk: on gs:// epath's walk yields
  paths without their scheme)."""
  for child in sorted(root.iterdir(), key=lambda c: c.name):
    name = f"{rel}{child.name}"
    if child.is_dir():
      yield from _files(child, name + "/")
    else:
      yield name


def copy_tree(src, dst, *, last: tuple[str, ...] = ()) -> None:
  """Copies every file under src to the same place under dst (either may be a bucket); the
  files named in `last` go last, so a reader that waits for them sees a complete copy."""
  src, dst = resolve(src), resolve(dst)
  names = list(_files(epath.Path(src)))
  for rel in sorted(names, key=lambda n: os.path.basename(n) in last):
    target = epath.Path(join(dst, rel))
    if not is_remote(dst):
      os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
    epath.Path(join(src, rel)).copy(target, overwrite=True)


def move_tree(src, dst) -> None:
  """Moves the folder src to dst (which must not exist yet)."""
  src, dst = resolve(src), resolve(dst)
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    return
  copy_tree(src, dst)  # an object store has no rename: copy, then delete
  epath.Path(src).rmtree()


def remove_tree(path) -> None:
  p = epath.Path(resolve(path))
  if p.exists():
    p.rmtree()


# ---------------------------------------------------------------------------- local copies


def local_cache_dir() -> str:
  """Where local copies of remote files go: $LLAMA_JAX_CACHE or ~/.cache/llama_jax."""
  return os.path.abspath(os.path.expanduser(
      os.environ.get("LLAMA_JAX_CACHE") or os.path.join(
          os.environ.get("XDG_CACHE_HOME") or "~/.cache", "llama_jax")))


def local_copy_path(path) -> str:
  """The local file standing for a remote one (gs://b/k -> CACHE/objects/gs/b/k); a local
  path is itself."""
  path = resolve(path)
  if not is_remote(path):
    return path
  return os.path.join(local_cache_dir(), "objects", scheme(path), path.split("://", 1)[1])


def download(src, local: str) -> None:
  """Copies a (remote) file to a local path, atomically."""
  os.makedirs(os.path.dirname(local), exist_ok=True)
  tmp = f"{local}.tmp{os.getpid()}"
  epath.Path(resolve(src)).copy(epath.Path(tmp), overwrite=True)
  os.replace(tmp, local)


def upload(local: str, dst) -> None:
  epath.Path(local).copy(epath.Path(resolve(dst)), overwrite=True)


@contextlib.contextmanager
def lock(root):
  """An exclusive file lock for building a cache under `root` once. A bucket has no locks:
  for one, the lock is a local file, so the processes of one host build it once (hosts that
  share a bucket build the same deterministic files and the last upload wins)."""
  root = resolve(root)
  if is_remote(root):
    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    path = os.path.join(local_cache_dir(), "locks", f"{digest}.lock")
  else:
    path = os.path.join(root, ".build.lock")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    try:  # free: no thread, no line
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      with waiting.announced(f"the lock {path}: another process on this host is building "
                             f"what {root} holds"):
        fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def local_staging(prefix: str = "llama_jax-") -> Iterator[str]:
  """A local temporary folder for files that are built locally and then copied to a bucket."""
  d = tempfile.mkdtemp(prefix=prefix)
  try:
    yield d
  finally:
    shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------- logs


class RewrittenText:
  """A text file that grows line by line, on a store that cannot append.

  The lines are kept in memory (starting from the object already there, so a resumed run keeps
  the earlier lines) and `flush` rewrites the whole object; the writer calls it after each
  checkpoint and at the end, so the object holds every line up to the newest checkpoint.
  Rewriting costs one upload of the whole log: ~100 bytes a line, 10,000 lines = 1 MB.
  """

  def __init__(self, path: str):
    self.path = resolve(path)
    p = epath.Path(self.path)
    self._text = [p.read_text()] if p.exists() else []
    if self._text and self._text[0] and not self._text[0].endswith("\n"):
      self._text[0] += "\n"
    self._dirty = False

  def write(self, text: str) -> None:
    self._text.append(text)
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      epath.Path(self.path).write_text("".join(self._text))
      self._dirty = False

  def close(self) -> None:
    self.flush()
