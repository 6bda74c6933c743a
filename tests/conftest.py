"""Session fixtures for the pack's tests.

Importing this file must stay cheap and ComfyUI-free: pure-torch unit tests (attention/, training/) run
without booting ComfyUI. ComfyUI is booted lazily by the `comfy` / `stock_comfy` fixtures.

Two import names for the pack, on purpose:
- `personalization_nodes.*`: the repo imported through a symlink on sys.path, for unit tests of the
  pure-torch packages (no ComfyUI needed, so the pack's `__init__.py` must not import comfy at import time);
- `harness.comfy_env.pack_module("...")`: the same files as ComfyUI's loader imported them (under a
  path-derived name); use it when comparing with objects the registered nodes create.
"""
from __future__ import annotations

import atexit
import os
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent


def _put_pack_on_path() -> None:
    """Make `import personalization_nodes` resolve to this repo (whatever its folder is called)."""
    link_dir = Path(tempfile.mkdtemp(prefix="personalization_nodes_path_"))
    link = link_dir / "personalization_nodes"
    os.symlink(REPO_ROOT, link, target_is_directory=True)

    def cleanup():
        link.unlink(missing_ok=True)
        link_dir.rmdir()
    atexit.register(cleanup)
    sys.path.insert(0, str(link_dir))


if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))  # `import harness` under any --import-mode
_put_pack_on_path()


def pytest_configure(config):
    from harness.nightly import NIGHTLY
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", f"nightly: a deeper repeat of a check, run only with {NIGHTLY}=1 (the default "
                                       "run keeps every family's strength-0, written-out-formulation and workflow "
                                       "tests; docs/testing.md)")


def pytest_collection_modifyitems(config, items):
    from harness.nightly import NIGHTLY, nightly
    if nightly():
        return
    skip = pytest.mark.skip(reason=f"nightly check: run with {NIGHTLY}=1")
    for item in items:
        if "nightly" in item.keywords:
            item.add_marker(skip)


#: (peak resident bytes, test module) of the module with the highest peak so far
_PEAK: list[tuple[int, str]] = []
#: the test module running now
_MODULE: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Every model a test module loaded is let go when its last test is done (harness.memory), so the suite's
    resident memory is that of one module's families, not of all of them; each module's own peak is measured.
    Done here, not in a module fixture's teardown: until the protocol ends, the last test's arguments still
    hold the module's models."""
    from harness.memory import peak_resident_bytes, release_models, reset_peak, resident_bytes
    module = item.module.__name__
    if not _MODULE or _MODULE[0] != module:
        _MODULE[:] = [module]
        reset_peak()
    yield
    if nextitem is not None and nextitem.module is item.module:
        return
    peak = peak_resident_bytes()
    if not _PEAK or peak > _PEAK[0][0]:
        _PEAK[:] = [(peak, module)]
    release_models()
    if os.environ.get("PERSONALIZATION_TEST_MEMORY"):
        print(f"\n[memory] {module}: peak {peak / 2**30:.2f} GiB, resident after release "
              f"{resident_bytes() / 2**30:.2f} GiB", flush=True)


@pytest.fixture(autouse=True)
def trim_heap_after_test():
    """Freed tensors of a test go back to the system before the next test (measured: test_detex_nodes' peak
    5.4 GiB without, the attention-regulariser test adding 1.8 GiB on top of earlier tests' freed pages)."""
    yield
    from harness.memory import trim_heap_above
    trim_heap_above()


def pytest_sessionfinish(session, exitstatus):
    # before interpreter teardown, while ComfyUI's modules still exist for ModelPatcher.__del__
    if "harness.memory" in sys.modules:
        sys.modules["harness.memory"].release_models()


def pytest_terminal_summary(terminalreporter):
    from harness.memory import peak_resident_bytes
    peak, where = _PEAK[0] if _PEAK else (peak_resident_bytes(), "")
    where = f", reached in {where}" if where else ""
    terminalreporter.write_line(f"peak resident memory of the test process: {peak / 2**30:.2f} GiB{where}")


@pytest.fixture(scope="session")
def stock_comfy():
    """ComfyUI booted in-process on the CPU (see harness.comfy_env.boot_comfy); does not fail when our
    pack failed to import (for tests of stock behaviour and of the harness itself)."""
    from harness.comfy_env import boot_comfy
    return boot_comfy(require_pack=False)


@pytest.fixture(scope="session")
def comfy(stock_comfy):
    """ComfyUI booted with our pack loaded by its own loader; raises PackImportError (with ComfyUI's
    traceback) when the pack failed to import. `.nodes` is ComfyUI's `nodes` module."""
    from harness.comfy_env import boot_comfy
    return boot_comfy(require_pack=True)


@pytest.fixture(scope="module")
def sd15(stock_comfy):
    """(model, clip, vae) of the tiny random SD1.5 checkpoint, via stock CheckpointLoaderSimple.
    Shared by the module: clone() before patching."""
    from harness.checkpoints import load_sd15
    return load_sd15()


@pytest.fixture(scope="module")
def sdxl_model(stock_comfy):
    """ModelPatcher of a reduced random SDXL (comfy.model_base.SDXL); clone() before patching.
    Pair with harness.checkpoints.sdxl_conditioning()."""
    from harness.checkpoints import model_patcher
    return model_patcher("sdxl")
