"""Our own decode kernels (`gemv.c`), built with the machine's C compiler at first use.

`pip install` compiles nothing: the first load that wants these kernels compiles `gemv.c` for this
CPU (`-march=native`) into the user cache, keyed by the source and the CPU, and later starts load
the cached library (no compiler needed then). With no compiler, a failed build or
`BIOGPT_NATIVE=0`, `library()` is None, `unavailable()` says why, and torch's kernels run instead.
OpenMP comes from the runtime torch already loaded (the same `libgomp.so.1`), so the two share one
pool of threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("gemv.c")
MAX_ROWS = 16  # rows a call multiplies; more (a prompt) go to torch's GEMM
BUILD_SECONDS = 300
_state: dict[str, object] = {}


def _flags(arch: str = "native") -> list[str]:
    """`arch`: the CPU to compile for (tests build older ISAs' paths too)."""
    flag = "-mcpu" if platform.machine().lower() in ("aarch64", "arm64") else "-march"
    return ["-O3", f"{flag}={arch}", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


@functools.cache
def version() -> str:
    """The kernels' identity (their source's digest): a timing of them holds for this version only."""
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _target() -> Path:
    """The cached library for this source, CPU and flags (a library built once stays valid whatever
    later happens to the compiler, so a start runs none)."""
    from ..linear import cache_dir, cpu_id

    key = "|".join([version(), cpu_id(), " ".join(_flags())])
    return cache_dir() / "native" / f"gemv-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(cc: str, target: Path, arch: str = "native") -> ctypes.CDLL:
    """Compile into a temporary file, then rename (a concurrent start never loads half a library),
    and load it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        start = time.perf_counter()
        run = subprocess.run([cc, *_flags(arch), str(SOURCE), "-o", str(out), "-lm"], capture_output=True,
                             text=True, timeout=BUILD_SECONDS)
        if run.returncode != 0:
            raise OSError(f"{Path(cc).name} failed: {(run.stderr.strip().splitlines() or ['no message'])[-1]}")
        os.replace(out, target)
        _state["built_seconds"] = time.perf_counter() - start
    return load(target)


def load(path: Path) -> ctypes.CDLL:
    """A built library with its functions' argument types declared (ctypes then converts fast)."""
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.f32_gemv.argtypes = [p, p, p, p, i, i, i, i, i]
    lib.q8_gemv.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
    lib.q4_gemv.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
    lib.attend.argtypes = [p, ctypes.c_long, ctypes.c_long, ctypes.c_long, p, p, ctypes.c_long, ctypes.c_long,
                           ctypes.c_long, p, p, i, i, i, i, i, ctypes.c_float, i]
    lib.gelu.argtypes = [p, p, ctypes.c_long, i]
    lib.quantize_rows.argtypes = [p, i, i, p, p, i]
    lib.q8_finish.argtypes = [p, p, p, p, p, i, i, i, i]
    lib.run_linears.argtypes = [p, i, p, p, i, i]
    lib.layer_norm.argtypes = [p, p, p, p, i, i, ctypes.c_float, i]
    lib.decode_layers.argtypes = [p, i, p, i, i, p, p, *[ctypes.c_long] * 4, i, p, i, i, ctypes.c_float, i]
    for f in (lib.f32_gemv, lib.q8_gemv, lib.q4_gemv, lib.attend, lib.gelu, lib.layer_norm, lib.decode_layers,
              lib.run_linears, lib.quantize_rows, lib.q8_finish):
        f.restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built first if need be; None where they cannot be (see `unavailable`)."""
    import torch  # noqa: F401  (its OpenMP runtime first: the library then links to that one)

    if os.environ.get("BIOGPT_NATIVE", "").strip() == "0":
        _state["why"] = "BIOGPT_NATIVE=0"
        return None
    try:
        target = _target()
        if target.is_file():
            return load(target)
        cc = compiler()
        if cc is None:
            _state["why"] = "no C compiler found (set CC)"
            return None
        return build(cc, target)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        _state["why"] = f"could not build {SOURCE.name}: {e}"
        return None


def unavailable() -> str | None:
    """Why `library()` is None (None when it is not)."""
    return None if library() is not None else str(_state.get("why", "unknown"))


def describe() -> str:
    """One line for `-v`: whether our kernels are in use and what their build cost this start."""
    if library() is None:
        return f"our CPU kernels are unavailable ({unavailable()}): torch's kernels run"
    built = _state.get("built_seconds")
    return "our CPU kernels " + (f"compiled for this CPU in {built:.1f} s (cached for later starts)"
                                 if built is not None else "loaded from the cache")
