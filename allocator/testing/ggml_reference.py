"""ggml's own quantizers, built from the llama.cpp sources, to check ours bit for bit.

:func:`load_ggml_reference` finds ``ggml-quants.c`` (``$BITALLOC_GGML_SRC``, or the
``llama-cpp-python`` sdist that ``pip download --no-binary :all:`` fetches once into the cache
directory), compiles it with a C compiler into a shared library together with the four ggml
functions it links against (``ggml_row_size`` … from the struct sizes of ggml-common.h), and loads
it with ctypes. It is compiled with ``-ffp-contract=off``: x86-64 builds of ggml-base use no FMA
either; a build that contracts ``a*b + c`` into fused multiply-adds (e.g. on ARM) can differ in
the last bit of a sum and so, rarely, in a rounding decision.

Nothing here is imported by :mod:`allocator`; tests and ``benchmarks/ggml_quant.py`` use it and
skip (with :class:`ReferenceUnavailable`'s message) where the sources or a compiler are missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["GgmlReference", "ReferenceUnavailable", "load_ggml_reference"]

SDIST = "llama-cpp-python"

_STUBS = r"""
#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml.h"
#include <stdio.h>
#include <stdlib.h>
static size_t bytes_of(enum ggml_type t, int64_t *blck) {
    switch (t) {
        case GGML_TYPE_Q4_0: *blck = QK4_0; return sizeof(block_q4_0);
        case GGML_TYPE_Q4_1: *blck = QK4_1; return sizeof(block_q4_1);
        case GGML_TYPE_Q5_0: *blck = QK5_0; return sizeof(block_q5_0);
        case GGML_TYPE_Q5_1: *blck = QK5_1; return sizeof(block_q5_1);
        case GGML_TYPE_Q8_0: *blck = QK8_0; return sizeof(block_q8_0);
        case GGML_TYPE_Q2_K: *blck = QK_K; return sizeof(block_q2_K);
        case GGML_TYPE_Q3_K: *blck = QK_K; return sizeof(block_q3_K);
        case GGML_TYPE_Q4_K: *blck = QK_K; return sizeof(block_q4_K);
        case GGML_TYPE_Q5_K: *blck = QK_K; return sizeof(block_q5_K);
        case GGML_TYPE_Q6_K: *blck = QK_K; return sizeof(block_q6_K);
        case GGML_TYPE_IQ4_NL: *blck = QK4_NL; return sizeof(block_iq4_nl);
        default: fprintf(stderr, "ggml reference stub: type %d not supported\n", (int)t); abort();
    }
}
size_t ggml_type_size(enum ggml_type t) { int64_t b; return bytes_of(t, &b); }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { int64_t b; size_t s = bytes_of(t, &b); return s*ne/b; }
const char * ggml_type_name(enum ggml_type t) { (void)t; return "?"; }
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml abort %s:%d %s\n", file, line, fmt); abort();
}
"""


class ReferenceUnavailable(RuntimeError):
    """The llama.cpp sources or a C compiler are not available; the message says which."""


@dataclass(frozen=True)
class GgmlReference:
    """The compiled library and where its sources came from."""

    lib: ctypes.CDLL
    source: str

    def quantize(self, x: np.ndarray, ggml_type: str, importance: np.ndarray | None = None) -> np.ndarray:
        """ggml's ``quantize_<type>(src, dst, nrow, n_per_row, imatrix)`` → bytes [rows, row_size]."""
        from allocator.model.quant.ggml import block_of

        spec = block_of(ggml_type)
        src = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = src.shape
        dst = np.zeros((rows, cols // spec.block * spec.block_bytes), dtype=np.uint8)
        qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        fn = getattr(self.lib, f"quantize_{spec.name}")
        fn.restype = ctypes.c_size_t
        fn(
            src.ctypes.data_as(ctypes.c_void_p),
            dst.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_int64(rows),
            ctypes.c_int64(cols),
            None if qw is None else qw.ctypes.data_as(ctypes.c_void_p),
        )
        return dst


def _cache_dir() -> Path:
    base = os.environ.get("BITALLOC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bitalloc"
    )
    return Path(base) / "ggml-reference"


def _find_ggml_dir(root: Path) -> Path | None:
    for cand in sorted(root.rglob("ggml-quants.c")):
        if cand.parent.name == "src" and (cand.parent.parent / "include" / "ggml.h").exists():
            return cand.parent.parent
    return None


def _sources(cache: Path) -> Path:
    """The ggml directory (``include/``, ``src/``): $BITALLOC_GGML_SRC, the cache, or the sdist."""
    env = os.environ.get("BITALLOC_GGML_SRC")
    if env:
        found = _find_ggml_dir(Path(env))
        if found is None:
            raise ReferenceUnavailable(f"BITALLOC_GGML_SRC={env} holds no ggml/src/ggml-quants.c")
        return found
    unpacked = cache / "src"
    found = _find_ggml_dir(unpacked) if unpacked.exists() else None
    if found is not None:
        return found
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, SDIST]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as exc:
            raise ReferenceUnavailable(f"could not download the {SDIST} sdist ({exc})") from exc
        archives = list(Path(tmp).glob("*.tar.gz"))
        if not archives:
            raise ReferenceUnavailable(f"pip download of {SDIST} gave no .tar.gz sdist")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/ggml/" in m.name]
            tar.extractall(unpacked, members=members, filter="data")
    found = _find_ggml_dir(unpacked)
    if found is None:
        raise ReferenceUnavailable(f"the {SDIST} sdist has no vendor/llama.cpp/ggml/src/ggml-quants.c")
    return found


def load_ggml_reference() -> GgmlReference:
    """Build (once, cached by source hash) and load ggml's quantizers; raise ReferenceUnavailable."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise ReferenceUnavailable("no C compiler (cc, gcc or clang) on PATH")
    cache = _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    ggml = _sources(cache)
    quants = ggml / "src" / "ggml-quants.c"
    digest = hashlib.sha256(quants.read_bytes() + _STUBS.encode()).hexdigest()[:16]
    lib = cache / f"libggmlq-{digest}.so"
    if not lib.exists():
        stubs = cache / "stubs.c"
        stubs.write_text(_STUBS)
        tmp_lib = cache / f"libggmlq-{digest}.{os.getpid()}.so"
        cmd = [
            cc,
            "-O2",
            "-fPIC",
            "-shared",
            "-std=gnu11",
            "-ffp-contract=off",
            "-DNDEBUG",
            f"-I{ggml / 'include'}",
            f"-I{ggml / 'src'}",
            str(quants),
            str(stubs),
            "-o",
            str(tmp_lib),
            "-lm",
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise ReferenceUnavailable(f"compiling ggml-quants.c failed: {res.stderr.strip()[-300:]}")
        tmp_lib.replace(lib)
    return GgmlReference(lib=ctypes.CDLL(str(lib)), source=str(quants))
