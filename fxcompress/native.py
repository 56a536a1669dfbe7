"""fxcompress's own CPU kernels (C, in ``fxcompress/csrc``): built on first use with the system C compiler.

Why: decoding a token with int8 or int4 weights is bound by how fast the
weights stream from memory, and no kernel in torch streams them at the
memory's rate for one activation row (``python tools/bench_kernels.py``
times each against these). The
kernels here are small C files, compiled once per source, compiler and flags
into ``$FXCOMPRESS_CACHE`` (default ``~/.cache/fxcompress``) and loaded with
:mod:`ctypes`; they take raw tensor pointers, so they run with no Python
between the call and the loop. Where they cannot be built or cannot run (no C
compiler, no AVX-512 VNNI), :func:`gemv_missing` says why and callers use
torch's kernels.

The library links ``libgomp.so.1``: in a process that has imported torch the
dynamic loader resolves that name to torch's own copy, so both share one
OpenMP thread pool.

:func:`huge_page_copy` holds a weight on 2 MiB pages where Linux allows it:
a kernel streaming hundreds of megabytes takes a TLB miss every 4 KiB on
ordinary pages, one every 2 MiB on huge ones.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["gemv_int8", "gemv_int4", "int4_codes", "gemv_missing", "GEMV_MAX_INPUTS", "INT4_CHUNK",
           "huge_page_copy"]

_SOURCE = Path(__file__).parent / "csrc" / "gemv.c"
_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
#: The most inputs a row may have: each of the kernel's 16 int32 lanes sums a 16th of the products, each below
#: 255 * 128.
GEMV_MAX_INPUTS = 16 * ((2**31 - 1) // (255 * 128))
_HUGE_PAGE = 2 << 20


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``tensor`` in a fresh anonymous mapping whose 2 MiB-aligned part Linux is asked to back
    with transparent huge pages (``madvise(MADV_HUGEPAGE)``, which THP's default ``madvise`` mode honours) before
    anything is written there. Same values, same bytes resident; only the page size differs. Where the advice
    does not exist or is refused, the pages stay ordinary.

    A fresh mapping, because an allocation from torch's allocator may reuse memory already touched on ordinary
    pages, which the advice does not change.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes < _HUGE_PAGE:
        return tensor.contiguous().clone()
    # private (a shared mapping is shmem, which THP's madvise mode leaves alone); the slack lets the data start on
    # a 2 MiB boundary and is never touched
    mapping = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % _HUGE_PAGE
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:  # whole huge pages only: advising the tail would make its last page resident in full
            mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // _HUGE_PAGE * _HUGE_PAGE)
        except OSError:
            pass
    # a storage of exactly the data (saving it writes no slack), which keeps the mapping alive
    copy = torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=offset)
    return copy.view(tensor.dtype).view(tensor.shape).copy_(tensor)


def _cache_dir() -> Path:
    return Path(os.environ.get("FXCOMPRESS_CACHE") or Path.home() / ".cache" / "fxcompress")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str) -> Path:
    """The shared library for this source, compiler and flags, compiled unless the cache holds it. Written
    to a temporary name and renamed, so processes building at once never load a half-written file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), compiler, version, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True,
                           check=True)
            built.replace(target)
    return target


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library, "") or (None, why it cannot run here), decided once per process."""
    if not getattr(torch.cpu, "_is_vnni_supported", lambda: False)():
        return None, "this CPU has no AVX-512 VNNI"
    return _load(_compiler())


def _load(compiler: str | None) -> tuple[ctypes.CDLL | None, str]:
    if compiler is None:
        return None, "no C compiler found (set CC, or install gcc)"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
    except subprocess.CalledProcessError as error:
        return None, f"{compiler} could not build {_SOURCE.name}: {error.stderr.strip()[-300:]}"
    except OSError as error:
        return None, f"{_SOURCE.name} could not be built or loaded: {error}"
    pointer, size, number = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    library.fxc_gemv_int8.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, size, number, number,
                                      number]
    library.fxc_gemv_int4.argtypes = [pointer, size, size, pointer, pointer, pointer, pointer, size, size, number,
                                      number, number]
    for function in (library.fxc_gemv_int8, library.fxc_gemv_int4):
        function.restype = ctypes.c_int
    return library, ""


def gemv_missing() -> str:
    """Why :func:`gemv_int8` and :func:`gemv_int4` cannot run in this process, or ``""`` when they can (the first
    call builds them)."""
    return _library()[1]


def _run(function, *arguments) -> None:
    if function(*arguments, torch.get_num_threads()):
        raise MemoryError(f"{function.__name__}: no memory for the activation digits")


def _function(name: str):
    """The library's ``fxc_<name>`` (a RuntimeError saying why where it cannot run)."""
    library, missing = _library()
    if library is None:
        raise RuntimeError(f"{name} cannot run here: {missing}")
    return getattr(library, f"fxc_{name}")


def gemv_int8(x: torch.Tensor, weight: torch.Tensor, row_sums: torch.Tensor, scales: torch.Tensor,
              digits: int) -> torch.Tensor:
    """``x @ (weight * scales[:, None]).T`` for a few rows of ``x`` (``M x K``, float32 or bfloat16, contiguous),
    an int8 ``weight`` (``N x K``, contiguous), its ``row_sums`` (``weight.sum(1)`` in int32) and ``scales`` in
    ``x``'s dtype; the result has ``x``'s dtype.

    Each row is written as ``digits`` (2 or 3) bytes of fixed point relative to its largest magnitude (see
    ``csrc/gemv_int8.c``) and multiplied exactly in integers, so the result is within ``2**(-8 * digits + 1)``
    of that magnitude per input, plus float rounding. Every row streams the whole weight: for many rows use a
    GEMM. Call only where :func:`gemv_missing` is empty.
    """
    rows, columns = x.shape
    y = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    _run(_function("gemv_int8"), x.data_ptr(), rows, columns, weight.data_ptr(), row_sums.data_ptr(), scales.data_ptr(),
         y.data_ptr(), weight.shape[0], digits, _DTYPES[x.dtype])
    return y


#: :func:`gemv_int4`'s column chunk: its inputs must be a multiple of this, its groups a multiple of half of it.
INT4_CHUNK = 128


def int4_codes(q: torch.Tensor) -> torch.Tensor:
    """Codes ``q`` (``N x K`` integers 0..15, ``K`` a multiple of :data:`INT4_CHUNK`) in :func:`gemv_int4`'s layout:
    ``N x K/2`` bytes, each chunk of 128 columns as 64 bytes whose byte ``j`` holds column ``j`` in its low nibble
    and column ``64 + j`` in its high one (a mask and a shift unpack 128 codes)."""
    chunks = q.to(torch.uint8).view(q.shape[0], -1, 2, INT4_CHUNK // 2)
    return (chunks[:, :, 0] | chunks[:, :, 1] << 4).reshape(q.shape[0], -1).contiguous()


def gemv_int4(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int,
              digits: int) -> torch.Tensor:
    """``x @ W.T`` for a few rows of ``x`` (``M x K``, float32 or bfloat16, contiguous) and the int4 weight
    ``W[n, k] = q[n, k] * scales[n, g] + biases[n, g]`` (``g = k // group_size``; ``codes`` from
    :func:`int4_codes`, ``scales`` and ``biases`` ``N x K/group_size`` in ``x``'s dtype, contiguous).

    As :func:`gemv_int8`, each row is written as ``digits`` bytes of fixed point and multiplied exactly in
    integers, group by group. Needs ``K`` a multiple of :data:`INT4_CHUNK` and ``group_size`` a multiple of
    half of it that divides ``K``.
    """
    rows, columns = x.shape
    y = torch.empty(rows, codes.shape[0], dtype=x.dtype)
    _run(_function("gemv_int4"), x.data_ptr(), rows, columns, codes.data_ptr(), scales.data_ptr(), biases.data_ptr(),
         y.data_ptr(), codes.shape[0], group_size, digits, _DTYPES[x.dtype])
    return y
