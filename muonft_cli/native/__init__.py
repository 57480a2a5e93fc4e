"""Native CPU kernels: building, caching and loading them, and the typed call into each.

Owns ``thin_muon.c`` — the whole Muon step of thin fp32 matrices (LoRA factors) in one pass per matrix
(momentum, Nesterov input, float64 Gram, the r×r iteration, apply), which torch has no fused op for — and
``gram_apply.c`` — a matrix's Gram operator on a thin block (XᵀX·V or XXᵀ·V, fp32, X streamed once or twice
as stored, bf16 or fp32) for `muonft diagnose`, where BLAS re-packs the big matrix for every skinny product —
and ``sym_mirror.c`` — the transposed copy of a symmetric product's blocks below the diagonal to the blocks
above, for Newton–Schulz on full matrices (`muonft_cli.optim.orthogonalize._sym_bmm`), where torch's strided
transpose copy is 5–9× slower — and the machinery around them:

* built on first use with the system C compiler (``$CC``, else ``cc``) at ``-O3 -march=native`` into
  ``$MUONFT_NATIVE_DIR`` (default ``$XDG_CACHE_HOME/muonft/native`` or ``~/.cache/muonft/native``), named
  by a hash of the source, the flags, the compiler's version and the CPU's flags (a different CPU or
  compiler builds its own copy); written to a temporary name and renamed, so concurrent processes
  (torchrun ranks) never load a half-written library;
* loaded with :mod:`ctypes`: plain C, no torch headers, so a build takes about a second and needs no ninja
  (``torch.utils.cpp_extension`` would compile the torch headers, ~1 min, and need ninja; this is why the
  kernel is not one);
* threaded with OpenMP, linked against ``libgomp.so.1``: loaded into a process that has imported torch
  (every caller has), it binds to the libgomp torch already loaded, so its matrices run on torch's own
  intra-op pool — whose workers still spin after the backward pass; threads of its own (as the first
  version started) fought them for the cores and made a step up to ~20 % slower right after torch work.
  Without libgomp to link it starts pthreads instead;
* optional: without a compiler, when the build fails, or with ``MUONFT_NATIVE=0``, :func:`thin_kernel`,
  :func:`gram_kernel` and :func:`mirror_kernel` return ``None`` and their callers run their torch paths (same
  math); :func:`status` says which and why.

No torch import here: callers pass raw pointers and sizes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from array import array
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

__all__ = ["GRAM_MAX_BLOCK", "GramKernel", "MAX_RANK", "MirrorKernel", "ThinKernel", "expected", "gram_kernel",
           "mirror_kernel", "planned_scratch_bytes", "status", "thin_kernel"]

_SOURCE = Path(__file__).with_name("thin_muon.c")
_GRAM_SOURCE = Path(__file__).with_name("gram_apply.c")
_MIRROR_SOURCE = Path(__file__).with_name("sym_mirror.c")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11")
# tried in order: this CPU's instructions and OpenMP threads; then without -march=native (a compiler that
# lacks it); then without OpenMP (no libgomp to link: the kernel starts its own pthreads)
_ATTEMPTS = (_FLAGS, tuple(f for f in _FLAGS if f != "-march=native"),
             tuple("-fopenmp-simd" if f == "-fopenmp" else f for f in _FLAGS if f != "-march=native"))
MAX_RANK = 64  # MAXR in thin_muon.c
_SUMS_BYTES = MAX_RANK * MAX_RANK * 8 * 8  # SV_BYTES in thin_muon.c: r×r vectors of ≤ 8 float64 lanes


def planned_scratch_bytes(max_numel: int, threads: int) -> int:
    """The scratch :meth:`ThinKernel.step` will ask for (≤ 64 B per thread over), without loading the kernel:
    per thread the largest matrix in fp32 and the wide Gram's vector sums (the memory plan uses this)."""
    return max(1, min(64, threads)) * (4 * max_numel + _SUMS_BYTES)


def _cache_dir() -> Path:
    env = os.environ.get("MUONFT_NATIVE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "muonft" / "native"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


class ThinKernel:
    """The loaded ``muonft_thin_step``: :meth:`step` runs it on matrices described by raw pointers."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        fn = lib.muonft_thin_step
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_int64]
        size = lib.muonft_thin_scratch_bytes
        size.restype, size.argtypes = ctypes.c_int64, [ctypes.c_int64]
        omp = lib.muonft_thin_openmp
        omp.restype, omp.argtypes = ctypes.c_int, []
        self._fn, self._size, self._lib, self.path = fn, size, lib, path
        #: how matrices are spread over threads: ``"OpenMP"`` (the pool of the libgomp torch loaded) or
        #: ``"pthreads"`` (built without OpenMP)
        self.threading = "OpenMP" if omp() else "pthreads"

    def scratch_bytes(self, max_numel: int, threads: int) -> int:
        """Bytes of scratch :meth:`step` needs for matrices of at most ``max_numel`` elements."""
        return int(self._size(int(max_numel))) * max(1, min(64, int(threads)))

    def step(self, wp: array, gp: array, mp: array, shapes: array, scal: array,
             coeffs: Sequence[tuple[float, float, float]], norm_scale: float, norm_eps: float, threads: int,
             scratch: int, scratch_size: int) -> None:
        """One Muon step of ``len(shapes) // 2`` thin fp32 matrices, in place.

        ``wp``, ``gp``, ``mp``: int64 data pointers of each matrix's W, G and M (contiguous fp32,
        row-major); ``shapes``: int64
        (rows, cols) per matrix; ``scal``: float64 (beta, nesterov, coef, keep) per matrix, the update being
        ``M ← G + βM``, ``W ← keep·W + coef·(Q X)``; ``coeffs``: the Gram iteration's (a, b, c) per step;
        ``scratch``: the address of ``scratch_size`` ≥ :meth:`scratch_bytes` bytes, 64-byte aligned.
        Raises ``ValueError`` before touching any matrix when it cannot run.
        """
        n = len(shapes) // 2
        if not len(wp) == len(gp) == len(mp) == n or len(scal) != 4 * n:
            raise ValueError("thin kernel: pointers, shapes and scal disagree on the number of matrices")
        flat = array("d", [float(v) for abc in coeffs for v in abc])
        rc = self._fn(n, wp.buffer_info()[0], gp.buffer_info()[0], mp.buffer_info()[0], shapes.buffer_info()[0],
                      scal.buffer_info()[0],
                      len(coeffs), flat.buffer_info()[0] if len(flat) else None, float(norm_scale),
                      float(norm_eps), int(threads), scratch, int(scratch_size))
        if rc == 3:
            raise ValueError("thin kernel: scratch too small or not 64-byte aligned")
        if rc:
            raise ValueError(f"thin kernel: a matrix is empty or has min(rows, cols) > {MAX_RANK}")


GRAM_MAX_BLOCK = 32  # BMAX in gram_apply.c: columns per call, a multiple of 8


class GramKernel:
    """The loaded ``muonft_gram_apply``: :meth:`apply` runs it on one matrix and one block of vectors."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        fn = lib.muonft_gram_apply
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                       ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        size = lib.muonft_gram_apply_scratch
        size.restype, size.argtypes = ctypes.c_int64, [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        self._fn, self._size, self._lib, self.path = fn, size, lib, path

    def scratch_floats(self, m: int, n: int, b: int) -> int:
        """fp32 elements of scratch :meth:`apply` needs for an m×n matrix and b columns."""
        return int(self._size(int(m), int(n), int(b)))

    def apply(self, x: int, bf16: bool, m: int, n: int, v: int, b: int, out: int, scratch: int) -> None:
        """``out = XᵀX·V`` (m ≥ n; V, out n×b) or ``XXᵀ·V`` (m < n; V, out m×b), fp32 products and sums.

        ``x``: address of X (m×n row-major, bf16 when ``bf16`` else fp32); ``v``, ``out``: addresses of
        row-major fp32 blocks, ``b`` ∈ {8, 16, 24, 32} columns; ``scratch``: :meth:`scratch_floats` fp32
        elements. Raises ``ValueError`` (nothing written) for another ``b`` or an empty X."""
        if self._fn(x, int(bool(bf16)), int(m), int(n), v, int(b), out, scratch):
            raise ValueError(f"gram kernel: b must be 8, 16, 24 or 32 and X non-empty (got {m}x{n}, b={b})")


class MirrorKernel:
    """The loaded ``muonft_sym_mirror``: :meth:`mirror` runs it on a stack of square matrices."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        fn = lib.muonft_sym_mirror
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int]
        self._fn, self._lib, self.path = fn, lib, path

    def mirror(self, base: int, elsize: int, b: int, n: int, s: int, threads: int) -> None:
        """Every block above the diagonal of the grid of s×s blocks becomes its mirror's transpose, in place.

        ``base``: address of ``b`` contiguous row-major n×n matrices of ``elsize``-byte elements (2: bf16 or
        fp16; 4: fp32); ``s`` divides ``n``; ``threads``: OpenMP threads. Raises ``ValueError`` (nothing
        written) for another element size or an ``s`` that does not divide ``n``."""
        if self._fn(base, int(elsize), int(b), int(n), int(s), max(1, int(threads))):
            raise ValueError(f"mirror kernel: element size must be 2 or 4 and s must divide n "
                             f"(got {elsize}, n={n}, s={s})")


_STATUS: dict[str, str] = {}


def _build(source: Path = _SOURCE, flags: Sequence[str] = _FLAGS,
           attempts: Sequence[Sequence[str]] = _ATTEMPTS) -> Path:
    """Compile ``source`` into the cache (or reuse it); returns the library's path."""
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    text = source.read_bytes()
    digest = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(),
                                        platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    out_dir = _cache_dir()
    lib = out_dir / f"{source.stem}-{digest}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        for attempt in attempts:
            proc = subprocess.run([cc, *attempt, "-o", tmp, str(source), "-lm", "-lpthread"],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                break
        else:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"{cc} failed: {last[0]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load(name: str, cls: type, source: Path, flags: Sequence[str], attempts: Sequence[Sequence[str]]):
    """Build (or reuse) and load one kernel, recording in ``_STATUS[name]`` what happened; ``None`` when it is
    disabled or cannot be built or loaded."""
    if _disabled():
        _STATUS[name] = "disabled (MUONFT_NATIVE=0)"
        return None
    try:
        path = _build(source, flags, attempts)
        kernel = cls(ctypes.CDLL(str(path)), path)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _STATUS[name] = f"unavailable: {exc}"
        return None
    _STATUS[name] = f"loaded from {path}"
    return kernel


@lru_cache(maxsize=1)
def thin_kernel() -> ThinKernel | None:
    """The thin-matrix kernel, built and loaded once per process; ``None`` when unavailable (see
    :func:`status`)."""
    kernel = _load("thin", ThinKernel, _SOURCE, _FLAGS, _ATTEMPTS)
    if kernel is not None:
        _STATUS["thin"] += f" ({kernel.threading} threads)"
    return kernel


# one thread per call (diagnose runs a matrix per core): no OpenMP
_GRAM_FLAGS = tuple(f for f in _FLAGS if f != "-fopenmp") + ("-fopenmp-simd",)
_GRAM_ATTEMPTS = (_GRAM_FLAGS, tuple(f for f in _GRAM_FLAGS if f != "-march=native"))


@lru_cache(maxsize=1)
def gram_kernel() -> GramKernel | None:
    """The Gram-operator kernel for `muonft diagnose`, built and loaded once per process; ``None`` when
    unavailable (see :func:`status`)."""
    return _load("gram", GramKernel, _GRAM_SOURCE, _GRAM_FLAGS, _GRAM_ATTEMPTS)


@lru_cache(maxsize=1)
def mirror_kernel() -> MirrorKernel | None:
    """The symmetric-product mirror kernel, built and loaded once per process; ``None`` when unavailable (see
    :func:`status`)."""
    return _load("mirror", MirrorKernel, _MIRROR_SOURCE, _FLAGS, _ATTEMPTS)


def _disabled() -> bool:
    return os.environ.get("MUONFT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def expected() -> bool:
    """Whether :func:`thin_kernel` will (or did) load, judged without compiling anything: loaded already, or
    not tried yet, not disabled and a C compiler on PATH (the memory plan uses this)."""
    if "thin" in _STATUS:
        return _STATUS["thin"].startswith("loaded")
    return not _disabled() and shutil.which(os.environ.get("CC") or "cc") is not None


def status(build: bool = True) -> dict[str, str]:
    """Whether each kernel is loaded, and why not: ``"loaded from PATH"``, ``"disabled (MUONFT_NATIVE=0)"``
    or ``"unavailable: REASON"``; with ``build=False`` a kernel not tried yet in this process is
    ``"not used"`` (nothing is compiled)."""
    if build:
        thin_kernel()
        gram_kernel()
        mirror_kernel()
    return {name: _STATUS.get(name, "not used") for name in ("thin", "gram", "mirror")}
