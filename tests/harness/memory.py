"""What the test process holds, and letting go of it between test modules.

The suite runs in one process on a shared 2-core, 24 GB machine and must stay under 6 GB resident. Every
tiny model family is built or loaded lazily by the harness functions decorated with :func:`model_cache`, and
:func:`release_models` (run by conftest after every test module and at the end of the session) drops them,
unloads what ComfyUI's model manager still holds and hands the freed heap back to the system: glibc keeps
freed memory of a process mapped (its arenas), so without ``malloc_trim`` the resident set only grows.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource
import sys

_CLEARS: list = []


def model_cache(build):
    """``functools.cache`` for harness functions returning models; :func:`release_models` clears it."""
    cached = functools.cache(build)
    _CLEARS.append(cached.cache_clear)
    return cached


def release_models() -> None:
    """Drop every cached model, unload ComfyUI's loaded models, collect, and return freed heap to the system."""
    for clear in _CLEARS:
        clear()
    if "comfy.model_management" in sys.modules:
        model_management = sys.modules["comfy.model_management"]
        model_management.unload_all_models()
        model_management.soft_empty_cache()
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc's malloc_trim): most weights are under glibc's mmap
    threshold, so they live in the heap, and freeing them leaves the pages mapped (measured: ~1 GiB kept after
    five runs of a tiny SD1.5 graph, ~700 MB after releasing SD3.5 and the VAE)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:  # not glibc (e.g. musl or macOS): nothing to trim
        return
    libc = ctypes.CDLL(libc_name)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def peak_resident_bytes() -> int:
    """High-water mark of this process's resident set (Linux reports kibibytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
