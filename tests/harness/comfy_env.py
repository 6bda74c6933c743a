"""Boot the real ComfyUI in-process, on the CPU, with this pack loaded by ComfyUI's own loader.

Why in-process: node and execution tests need ComfyUI's real `nodes`, `comfy.*` and executor, and
starting `main.py` costs ~45 s; importing the modules and running `nodes.init_extra_nodes` (what
`main.start_comfyui` does) costs a few seconds.

Why here and not in conftest: pure-torch unit tests must not pay for (or depend on) ComfyUI, so nothing
in this module is imported by conftest at import time; fixtures call `boot_comfy()` lazily.
"""
from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import shutil
import sys
import tempfile
import traceback
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "personalization_nodes"
DEFAULT_CACHE = Path.home() / ".cache" / "personalization_nodes_tests"

# Folder kinds that stay where ComfyUI put them: `custom_nodes` holds our pack link, `configs` holds the
# yaml files ComfyUI ships for the legacy CheckpointLoader.
_KEEP_FOLDERS = {"custom_nodes", "configs"}

_ENV: types.SimpleNamespace | None = None


class PackImportError(RuntimeError):
    """Our pack failed to load inside ComfyUI (ComfyUI itself only logs this and carries on)."""


class _StubServer:
    """What `execution.PromptExecutor` and progress hooks need from `server.PromptServer`, minus the
    web server: no client is connected (`client_id=None`), so every message is dropped."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.supports = []
        self.messages: list[tuple[str, object]] = []
        try:  # custom nodes sometimes register routes at import time: give them a table that goes nowhere
            from aiohttp import web
            self.routes = web.RouteTableDef()
        except ImportError:  # pragma: no cover - aiohttp is a ComfyUI requirement
            self.routes = None

    def send_sync(self, event, data, sid=None):
        if event in ("execution_error", "execution_interrupted"):
            self.messages.append((event, data))

    def send_progress_text(self, text, node_id, sid=None):
        pass

    def queue_updated(self):
        pass


def repo_root() -> Path:
    return REPO_ROOT


def comfy_dir() -> Path:
    """The ComfyUI checkout under test: $COMFYUI_PATH, else the one `scripts/setup_env.sh` builds."""
    return Path(os.environ.get("COMFYUI_PATH") or REPO_ROOT / ".comfyui").resolve()


def cache_dir() -> Path:
    """Where generated tiny models live between sessions ($PERSONALIZATION_TEST_CACHE)."""
    path = Path(os.environ.get("PERSONALIZATION_TEST_CACHE") or DEFAULT_CACHE).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    return cache_dir() / "models"


def _pack_link(custom_nodes: Path) -> Path:
    """The entry of ComfyUI's custom_nodes folder that points at this repository."""
    for entry in sorted(custom_nodes.iterdir()):
        if entry.is_dir() and entry.resolve() == REPO_ROOT:
            return entry
    raise RuntimeError(
        f"{custom_nodes} has no link to {REPO_ROOT}; run `bash scripts/setup_env.sh` "
        f"(or `ln -s {REPO_ROOT} {custom_nodes / PACK_LINK_NAME}`)")


def _redirect_folders(folder_paths, run_dir: Path) -> None:
    """Point model folders at the persistent cache and output/input/temp/user at a fresh run dir, so
    tests never read a user's models nor litter the ComfyUI checkout."""
    old_models = os.path.abspath(folder_paths.models_dir)
    new_models = str(models_dir())
    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        if name in _KEEP_FOLDERS:
            continue
        moved = []
        for p in paths:
            p = os.path.abspath(p)
            if os.path.commonpath([p, old_models]) == old_models:
                moved.append(os.path.join(new_models, os.path.relpath(p, old_models)))
        folder_paths.folder_names_and_paths[name] = (moved or [os.path.join(new_models, name)], exts)
    folder_paths.models_dir = new_models
    for name in ("checkpoints", "controlnet", "loras", "embeddings", "vae"):
        os.makedirs(os.path.join(new_models, name), exist_ok=True)
    for kind in ("output", "input", "temp", "user"):
        os.makedirs(run_dir / kind, exist_ok=True)
    folder_paths.set_output_directory(str(run_dir / "output"))
    folder_paths.set_input_directory(str(run_dir / "input"))
    folder_paths.set_temp_directory(str(run_dir / "temp"))
    folder_paths.set_user_directory(str(run_dir / "user"))
    folder_paths.filename_list_cache.clear()


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _entrypoint_traceback(module) -> str:
    """ComfyUI logs only str(e) when comfy_entrypoint() raises; re-run it to get the traceback."""
    async def run():
        entry = module.comfy_entrypoint
        ext = await entry() if asyncio.iscoroutinefunction(entry) else entry()
        for node_cls in await ext.get_node_list():
            node_cls.GET_SCHEMA()
    try:
        asyncio.run(run())
    except Exception:
        return traceback.format_exc()
    return ""


def _pack_load_error(pack_path: str, records) -> str | None:
    """Why our pack did not load (ComfyUI's logged messages plus a traceback), or None if it did."""
    if not (REPO_ROOT / "__init__.py").exists():
        logging.getLogger(__name__).warning("pack has no __init__.py yet; no pack nodes registered")
        return None
    mentions = [r.getMessage() for r in records if pack_path in r.getMessage()]
    module = sys.modules.get(pack_path.replace(".", "_x_"))
    if not mentions and module is not None:
        return None
    detail = "\n".join(mentions) or "(ComfyUI logged nothing about it)"
    if module is not None and hasattr(module, "comfy_entrypoint"):
        detail += "\n" + _entrypoint_traceback(module)
    return f"ComfyUI failed to load the pack from {pack_path}:\n{detail}"


def boot_comfy(require_pack: bool = True, cpu: bool = True) -> types.SimpleNamespace:
    """Import and initialise ComfyUI once per process; return a namespace of its modules and paths.

    Raises PackImportError when our pack failed to load (on every call, not only the first), unless
    `require_pack=False`; then the reason is in `.pack_error`. A repo without `__init__.py` yet counts as
    loaded with no nodes.

    Mirrors `main.py`: args with defaults plus `--cpu`, custom paths, hook_breaker around
    `nodes.init_extra_nodes`. Custom nodes are limited to our pack with ComfyUI's own
    `--disable-all-custom-nodes --whitelist-custom-nodes` switches so a user's other packs
    (when COMFYUI_PATH points at a real install) cannot break or slow the tests. API nodes are skipped.
    ``cpu=False`` (benchmarks) lets ComfyUI use a GPU when one is there; only the first call's choice counts.
    """
    global _ENV
    if _ENV is None:
        _ENV = _boot(cpu)
    if require_pack and _ENV.pack_error:
        raise PackImportError(_ENV.pack_error)
    return _ENV


def _boot(cpu: bool) -> types.SimpleNamespace:
    """The once-per-process part of boot_comfy()."""
    cdir = comfy_dir()
    if not (cdir / "comfy" / "model_management.py").exists():
        raise RuntimeError(f"no ComfyUI at {cdir}; run `bash scripts/setup_env.sh` or set COMFYUI_PATH")
    link = _pack_link(cdir / "custom_nodes")
    if str(cdir) not in sys.path:
        sys.path.insert(0, str(cdir))

    from comfy.cli_args import args  # parses an empty argv: comfy.options.args_parsing stays False
    if "comfy.model_management" not in sys.modules:
        args.cpu = cpu  # must precede comfy.model_management: a CUDA torch build would look for a driver
    args.disable_all_custom_nodes = True
    args.whitelist_custom_nodes = [link.name]
    args.disable_api_nodes = True
    import comfy.model_management as mm
    if cpu and mm.cpu_state != mm.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before boot_comfy() without --cpu")

    import folder_paths
    # As main.py: ComfyUI's `utils` package must be imported before `nodes` puts comfy/ (which has a
    # utils.py) first on sys.path, or `server` later fails on `utils.install_util`.
    import utils.extra_config  # noqa: F401
    run_dir = Path(tempfile.mkdtemp(prefix="personalization_comfy_run_"))
    atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    _redirect_folders(folder_paths, run_dir)

    import execution  # noqa: F401  (imports nodes and the executor, as main.py does)
    import hook_breaker_ac10a0
    import nodes
    import server
    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer.instance = _StubServer()

    capture = _Capture()
    logging.getLogger().addHandler(capture)
    loop = asyncio.new_event_loop()
    try:
        hook_breaker_ac10a0.save_functions()
        loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        hook_breaker_ac10a0.restore_functions()
    finally:
        loop.close()
        logging.getLogger().removeHandler(capture)
    return types.SimpleNamespace(
        nodes=nodes, execution=execution, folder_paths=folder_paths, server=server,
        comfy_dir=cdir, pack_link=link, pack_module_name=str(link).replace(".", "_x_"),
        cache_dir=cache_dir(), models_dir=models_dir(), run_dir=run_dir,
        import_warnings=[r.getMessage() for r in capture.records],
        pack_error=_pack_load_error(str(link), capture.records),
    )


def pack_node_ids() -> list[str]:
    """Node ids registered by our pack (module path under the pack link), sorted; [] before boot."""
    if _ENV is None:
        return []
    nodes = _ENV.nodes
    ours = f"custom_nodes.{_ENV.pack_link.name}"
    found = []
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == ours or _ENV.pack_module_name in cls.__module__:
            found.append(node_id)
    return sorted(found)


def pack_module(name: str = ""):
    """The pack's module `name` (e.g. "attention.dispatch") as ComfyUI loaded it.

    ComfyUI imports the pack under a path-derived name, not `personalization_nodes`, so objects made by
    the registered nodes are instances of these modules' classes, not of `personalization_nodes.*`.
    """
    env = boot_comfy()
    full = env.pack_module_name + (f".{name}" if name else "")
    return importlib.import_module(full)
