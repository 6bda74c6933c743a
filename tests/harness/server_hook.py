"""ComfyUI's own server progress hook, installed in process.

The server (main.py ``hijack_progress``) installs a global progress-bar hook that raises ComfyUI's
InterruptProcessingException from inside ``ProgressBar.update`` when the user pressed Cancel. In-process tests
without it see interruptions only where the pack checks the flag itself. main.py cannot be imported by a test (it
parses the command line and starts work at import), so its ``hijack_progress`` is compiled from main.py's own
source, with main.py's own module-level imports as its globals.
"""
from __future__ import annotations

import ast
import contextlib
from typing import Optional

from .comfy_env import _StubServer, boot_comfy


def _main_function(name: str):
    """``name`` defined in the booted ComfyUI's main.py, compiled with main.py's module-level imports."""
    path = boot_comfy(require_pack=False).comfy_dir / "main.py"
    tree = ast.parse(path.read_text(), str(path))
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name)
    namespace: dict = {"__name__": "comfyui_main_for_tests"}
    exec(compile(ast.Module(body=[*imports, function], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


@contextlib.contextmanager
def server_progress_hook(cancel_at: Optional[int] = None):
    """The server's progress hook for the block; with ``cancel_at``, the user presses Cancel when a progress bar
    reaches that value (the hook then raises right there, as in the server)."""
    import comfy.model_management
    import comfy.utils

    previous = comfy.utils.PROGRESS_BAR_HOOK
    _main_function("hijack_progress")(_StubServer())
    server_hook = comfy.utils.PROGRESS_BAR_HOOK

    def press_cancel_then_report(value, total, *args, **kwargs):
        if value == cancel_at:
            comfy.model_management.interrupt_current_processing(True)
        return server_hook(value, total, *args, **kwargs)

    comfy.utils.set_progress_bar_global_hook(press_cancel_then_report)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
