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


#: Resident size above which :func:`collect_dropped_models` collects: a module's cached models (~1-2 GiB)
#: plus one graph's worth of fresh loads stay below it.
COLLECT_ABOVE_BYTES = 2_500 * 2**20


def collect_dropped_models(limit: int = COLLECT_ABOVE_BYTES) -> None:
    """What ComfyUI's server does between prompts (``gc.collect`` after a prompt, ``cleanup_models``), when this
    process holds more than ``limit`` bytes. Every executed graph loads its own models, and ComfyUI's objects
    hold them in reference cycles that only a collection frees; the collector counts objects, not bytes, so a
    test running graph after graph would otherwise keep every graph's models (measured: 11.6 GiB in
    test_foreign_patches, ~1 GiB per demo copy)."""
    if resident_bytes() <= limit:
        return
    gc.collect()
    if "comfy.model_management" in sys.modules:
        sys.modules["comfy.model_management"].cleanup_models()
    trim_heap()


def trim_heap_above(limit: int = COLLECT_ABOVE_BYTES) -> None:
    """:func:`trim_heap` when this process holds more than ``limit`` bytes (conftest: after every test, so one
    test's freed tensors do not add to the next one's peak)."""
    if resident_bytes() > limit:
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
    """High-water mark of this process's resident set since the last :func:`reset_peak` (Linux's VmHWM;
    elsewhere getrusage's, since the start)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> None:
    """Start a new high-water mark at the current resident set (Linux: ``clear_refs`` 5), so each test module's
    own peak can be told apart; a no-op where the system does not offer it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
