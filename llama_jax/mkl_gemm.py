"""fp32 matrix products through Intel MKL on CPU, for `model.matmul='mkl'`.

Why: on a 2-core CPU, XLA:CPU's own GEMM kernels reach 76-86% of MKL's rate on the model's 2-D
products, and its batched attention products (32 x [128 x 64] x [64 x 512] on shape B) run on
one core at 90-160 GFLOP/s where MKL split over both reaches 230-270 (benchmarks/gemm_shapes.py,
docs/PERFORMANCE.md). Two thirds of a CPU train step is matrix products, so that gap was the
step's gap to PyTorch (which calls MKL).

How: `kernels/mkl_gemm.cc` is an XLA FFI custom call that runs MKL's sequential sgemm on parts of
the product scheduled on XLA's own intra-op thread pool, so MKL's threads never compete with
XLA's for the cores (numpy's OpenBLAS called with its own threads made the step 30% slower).
It is compiled once per jaxlib version with the system's C++ compiler against jaxlib's FFI
headers (cached in ~/.cache/llama_jax, or $LLAMA_JAX_CACHE), and finds MKL's runtime library
`libmkl_rt` in the Python environment (`pip install mkl`) or through $LLAMA_JAX_MKL_LIB.

`gemm(a, b, transpose_a, transpose_b)` is op(a) @ op(b) with a VJP made of the same products;
`require()` raises MklUnavailable, saying what is missing and what to do, before anything is
compiled. CPU, fp32 and one device only (ModelConfig and train.make_setup check the config).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "llama_jax_mkl_gemm"
# The outputs of the model's 2-D products carry this name, so that the `dots` remat policies can
# keep them as they keep XLA's dot outputs (a custom call is not a dot to jax.checkpoint).
OUTPUT_NAME = "mkl_gemm_out"
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "mkl_gemm.cc")
_MKL_THREADING_SEQUENTIAL = 1  # mkl.h: MKL_THREADING_SEQUENTIAL


class MklUnavailable(RuntimeError):
  """model.matmul='mkl' cannot run here; the message says why and what to do."""


def find_mkl_library() -> str | None:
  """Path of MKL's single dynamic library (libmkl_rt), or None."""
  if os.environ.get("LLAMA_JAX_MKL_LIB"):
    return os.environ["LLAMA_JAX_MKL_LIB"]
  prefixes = (sys.prefix, sys.base_prefix, "/usr", "/usr/local", "/opt/intel/oneapi/mkl/latest")
  for prefix in dict.fromkeys(prefixes):
    found = sorted(glob.glob(os.path.join(prefix, "lib*", "libmkl_rt.so*")))
    if found:
      return found[0]
  return None


def _compiler() -> str | None:
  found = (shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)
  return next(filter(None, found), None)


def _build(compiler: str) -> str:
  """Compiles kernels/mkl_gemm.cc (once per source, jaxlib version and compiler) and returns the
  shared library's path."""
  import jaxlib.version
  with open(_SOURCE, "rb") as f:
    key = f.read() + jaxlib.version.__version__.encode() + compiler.encode()
  key = hashlib.sha256(key).hexdigest()[:16]
  cache = (os.environ.get("LLAMA_JAX_CACHE")
           or os.path.join(os.path.expanduser("~"), ".cache", "llama_jax"))
  os.makedirs(cache, exist_ok=True)
  lib = os.path.join(cache, f"mkl_gemm_{key}.so")
  if not os.path.exists(lib):
    # Built under a temporary name and renamed, so that concurrent processes (pytest-xdist
    # workers) never load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-I", jax.ffi.include_dir(),
           _SOURCE, "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      os.unlink(tmp)
      raise MklUnavailable(f"model.matmul='mkl': compiling {_SOURCE} failed ({' '.join(cmd)}):\n"
                           f"{result.stderr[-2000:]}")
    os.replace(tmp, lib)
  return lib


def _locate() -> tuple[str, str]:
  """(libmkl_rt's path, a C++ compiler), or MklUnavailable saying which is missing."""
  mkl_path = find_mkl_library()
  if mkl_path is None:
    raise MklUnavailable("model.matmul='mkl' needs Intel MKL's libmkl_rt: pip install mkl "
                         "(pinned in requirements-test.txt) or point $LLAMA_JAX_MKL_LIB at it; "
                         "or set model.matmul='xla'")
  compiler = _compiler()
  if compiler is None:
    raise MklUnavailable("model.matmul='mkl' needs a C++ compiler (g++, c++ or clang++, or "
                         "$CXX) to build its XLA custom call once; install one, or set "
                         "model.matmul='xla'")
  return mkl_path, compiler


@functools.cache
def _register() -> None:
  mkl_path, compiler = _locate()
  mkl = ctypes.CDLL(mkl_path)
  # One thread per MKL call: the parallelism comes from XLA's thread pool (kernels/mkl_gemm.cc).
  mkl.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
  kernel = ctypes.CDLL(_build(compiler))
  kernel.llama_jax_set_sgemm(ctypes.cast(mkl.cblas_sgemm, ctypes.c_void_p))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(kernel.LlamaJaxMklGemm), platform="cpu")


def require() -> None:
  """Raises MklUnavailable (saying why and what to do) unless gemm() can run here."""
  if jax.default_backend() != "cpu":
    raise MklUnavailable(f"model.matmul='mkl' runs on CPU only, jax's backend here is "
                         f"{jax.default_backend()!r}; set model.matmul='xla'")
  _register()


def _rows(x, window):
  """(begin, count) of a [begin, end) window of x's second-to-last axis (a window of None, or an
  end of None, reaches to the axis's end)."""
  begin, end = (0, None) if window is None else window
  end = x.shape[-2] if end is None else end
  if not 0 <= begin <= end <= x.shape[-2]:
    raise ValueError(f"row window {window} is outside an operand of shape {x.shape}")
  return begin, end - begin


def product(a, b, transpose_a: bool = False, transpose_b: bool = False, *, a_rows=None,
            b_rows=None):
  """op(a') @ op(b'), where a' is the row window a_rows = (begin, end) of a's second-to-last axis
  (all of it when None; end None: to the end), likewise b'; the windows are read in place, not copied. No VJP: for use
  inside a custom VJP (llama_jax.attention's blockwise backward pass); `gemm` differentiates."""
  if a.dtype != jnp.float32 or b.dtype != jnp.float32:
    raise TypeError(f"mkl_gemm is fp32 only, got {a.dtype} and {b.dtype}")
  require()
  (a0, am), (b0, bm) = _rows(a, a_rows), _rows(b, b_rows)
  m, k = (a.shape[-1], am) if transpose_a else (am, a.shape[-1])
  n, kb = (bm, b.shape[-1]) if transpose_b else (b.shape[-1], bm)
  if k != kb or a.shape[:-2] != b.shape[:-2]:
    raise ValueError(f"mkl_gemm: op(a) is [{m}, {k}] and op(b) [{kb}, {n}] (batch {a.shape[:-2]} "
                     f"and {b.shape[:-2]}); the contracted sizes and the batches must match")
  out = jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), jnp.float32)
  # vmap adds the same leading axis to both operands: a batch of products, which the kernel runs.
  return jax.ffi.ffi_call(TARGET, out, vmap_method="broadcast_all")(
      a, b, transpose_a=transpose_a, transpose_b=transpose_b, a_row_begin=np.int64(a0),
      a_rows=np.int64(am), b_row_begin=np.int64(b0), b_rows=np.int64(bm))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def gemm(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False):
  """op(a) @ op(b) for fp32 [..., m, k] (or [..., k, m] transposed) and [..., k, n] (or
  [..., n, k]) with the same leading batch axes; op transposes the last two axes."""
  return product(a, b, transpose_a, transpose_b)


def _gemm_fwd(a, b, transpose_a, transpose_b):
  return gemm(a, b, transpose_a, transpose_b), (a, b)


def _gemm_bwd(transpose_a, transpose_b, residuals, dc):
  """With A = op(a), B = op(b), C = A B: dA = dC B^T and dB = A^T dC, each written as one
  product of the stored operands (a transposed operand's gradient is the transposed product)."""
  a, b = residuals
  ta, tb = transpose_a, transpose_b
  da = product(b, dc, tb, True) if ta else product(dc, b, False, not tb)
  db = product(dc, a, True, ta) if tb else product(a, dc, not ta, False)
  return da, db


gemm.defvjp(_gemm_fwd, _gemm_bwd)
