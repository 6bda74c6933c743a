"""Test-only ComfyUI extension, loaded by tests/test_frontend.py into the server it starts (never part of
the pack): POST /personalization-tests/validate runs the check that POST /prompt runs first
(`execution.validate_prompt`) and answers with its result WITHOUT queueing the prompt, so a workflow at its
real sizes is validated by the server without being executed on the CPU."""
import uuid

import execution
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}  # ComfyUI loads a custom node folder only when it declares node mappings


@PromptServer.instance.routes.post("/personalization-tests/validate")
async def validate_without_queueing(request):
    body = await request.json()
    ok, error, outputs, node_errors = await execution.validate_prompt(uuid.uuid4().hex, body["prompt"], None)
    return web.json_response({"ok": ok, "error": error, "outputs": list(outputs), "node_errors": node_errors})
