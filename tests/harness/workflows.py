"""UI-format workflow -> API prompt, and in-process execution by ComfyUI's own validator and executor.

Why: `workflows/*.json` are saved by the frontend in UI format (what users load), while ComfyUI executes
API prompts. The frontend's `graphToPrompt` does this conversion in JavaScript; we redo the parts our
workflows use against the LIVE node definitions (INPUT_TYPES of V1 and V3 nodes), so a workflow whose
widget list no longer matches its nodes fails here instead of in a user's browser.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import uuid
from pathlib import Path
from typing import NamedTuple

from .comfy_env import _StubServer, boot_comfy
from .memory import collect_dropped_models

# Frontend-only node types: never sent to the backend.
FRONTEND_ONLY = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODE_MUTED, MODE_BYPASS = 2, 4
_PRIMITIVE = object()  # a link from a PrimitiveNode: the target widget already holds its value
_MISSING = object()


class NodeResult(NamedTuple):
    ui: dict | None  # what the history shows for the node, e.g. {"images": [{"filename", "subfolder", "type"}]}
    outputs: list  # raw output values: one list per output slot (one item unless the output is a list)


class WorkflowConversionError(ValueError):
    pass


class WorkflowValidationError(RuntimeError):
    pass


class WorkflowExecutionError(RuntimeError):
    """ComfyUI's execution_error (or execution_interrupted) report; ``report`` holds its fields as the server
    sends them to the frontend (node_id, node_type, exception_type, exception_message, traceback, ...)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def _widget_inputs(class_type: str, node_id) -> list[tuple[str, bool, int, object]]:
    """[(input name, is_widget, extra values after it, default)] in the order the frontend creates
    widgets; default is _MISSING when the spec gives none."""
    nodes = boot_comfy(require_pack=False).nodes
    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        raise WorkflowConversionError(f"node {node_id}: unknown node type {class_type!r} (not registered "
                                      "in this ComfyUI; a subgraph, or a pack that failed to load?)")
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            is_widget = (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not opts.get("forceInput")
            extra = 0
            if is_widget and (opts.get("control_after_generate")
                              or (kind == "INT" and name in ("seed", "noise_seed"))):
                extra += 1  # the frontend's control_after_generate value ("fixed", "randomize", ...)
            if is_widget and any(k.endswith("_upload") and v for k, v in opts.items()):
                extra += 1  # the upload button's value (LoadImage saves ["example.png", "image"])
            default = opts.get("default", kind[0] if isinstance(kind, (list, tuple)) and kind else _MISSING)
            out.append((name, is_widget, extra, default))
    return out


def _links(ui: dict) -> dict:
    """link id -> (from node, from slot, type); accepts list and object link forms."""
    table = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link.get("type"))
        else:
            table[link[0]] = (link[1], link[2], link[5] if len(link) > 5 else None)
    return table


def _resolve(link_id, nodes_by_id: dict, links: dict, seen=()):
    """Where a link's value really comes from: [str(node id), slot], _PRIMITIVE, or None (dropped)."""
    if link_id is None or link_id not in links or link_id in seen:
        return None
    seen = (*seen, link_id)
    src_id, slot, link_type = links[link_id]
    src = nodes_by_id.get(src_id)
    if src is None or src.get("mode") == MODE_MUTED:
        return None
    kind = src["type"]
    inputs = src.get("inputs") or []
    if kind == "Reroute":
        return _resolve(inputs[0].get("link") if inputs else None, nodes_by_id, links, seen)
    if kind == "PrimitiveNode":
        return _PRIMITIVE
    if kind in FRONTEND_ONLY:
        return None
    if src.get("mode") == MODE_BYPASS:
        # As the frontend: pass through the input at the same slot if its type matches, else the first
        # linked input of that type; nothing if none matches.
        if link_type in (None, "*"):
            outputs = src.get("outputs") or []
            link_type = outputs[slot].get("type") if slot < len(outputs) else None
        same = [inputs[slot]] if slot < len(inputs) else []
        for inp in same + inputs:
            if inp.get("type") == link_type and inp.get("link") is not None:
                return _resolve(inp["link"], nodes_by_id, links, seen)
        return None
    return [str(src_id), slot]


def ui_to_api(ui_workflow: dict) -> dict:
    """Convert a frontend-saved workflow to an API prompt {node id: {"class_type", "inputs"}}.

    Widget values map in order onto the node's widget inputs (required, then optional), skipping the
    control_after_generate value after seeds and the upload value after upload combos; widgets missing
    at the end (appended to the node after the workflow was saved) take their default; a widget input
    with a link takes the link (unless it comes from a PrimitiveNode, whose value the widget holds).
    Muted nodes are dropped, bypassed ones passed through, Reroutes followed, Notes ignored.
    """
    nodes_by_id = {n["id"]: n for n in ui_workflow["nodes"]}
    links = _links(ui_workflow)
    api = {}
    for node_id in sorted(nodes_by_id, key=lambda i: (str(type(i)), i)):
        node = nodes_by_id[node_id]
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        link_of = {inp["name"]: inp.get("link") for inp in node.get("inputs") or []}
        values = node.get("widgets_values") or []
        by_name = values if isinstance(values, dict) else None
        position = 0
        inputs = {}
        for name, is_widget, extra, default in _widget_inputs(kind, node_id):
            source = _resolve(link_of.get(name), nodes_by_id, links)
            linked = source not in (None, _PRIMITIVE)
            if is_widget:
                if by_name is not None:
                    value = by_name.get(name, default)
                elif position < len(values):
                    value = values[position]
                    position += 1 + extra
                else:  # saved before this widget was appended: the frontend shows its default, so do we
                    value = default
                if not linked and value is _MISSING:
                    raise WorkflowConversionError(
                        f"node {node_id} ({kind}): widgets_values {values!r} has no value for widget {name!r}")
                inputs[name] = source if linked else value
            elif linked:
                inputs[name] = source
        if by_name is None and position < len(values):
            raise WorkflowConversionError(
                f"node {node_id} ({kind}): {len(values) - position} widget value(s) left over "
                f"({values[position:]!r}); the workflow does not match the node's current inputs")
        api[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return api


def set_ui_widgets(node: dict, values: dict) -> None:
    """Set widget inputs of a UI-format node by name, where the frontend stores them in widgets_values
    (required, then optional; a seed's control value and an upload value after their widget)."""
    stored = node.get("widgets_values") or []
    position = 0
    for name, is_widget, extra, _ in _widget_inputs(node["type"], node["id"]):
        if not is_widget:
            continue
        if name in values:
            if position >= len(stored):
                raise WorkflowConversionError(f"node {node['id']} ({node['type']}): no stored value for {name!r}")
            stored[position] = values[name]
        position += 1 + extra
    unknown = set(values) - {name for name, is_widget, _, _ in _widget_inputs(node["type"], node["id"]) if is_widget}
    if unknown:
        raise WorkflowConversionError(f"node {node['id']} ({node['type']}) has no widgets {sorted(unknown)}")


def new_executor():
    """A PromptExecutor with ComfyUI's default (classic) output cache, to reuse across prompts like the server does.

    Built as that ComfyUI's own main.py builds it with default arguments: newer ones take
    `cache_args={"lru", "ram"}`, older ones `cache_size` (the LRU size alone)."""
    execution = boot_comfy(require_pack=False).execution
    accepts = inspect.signature(execution.PromptExecutor).parameters
    cache = {"cache_args": {"lru": 0, "ram": 0}} if "cache_args" in accepts else {"cache_size": 0}
    return execution.PromptExecutor(_StubServer(), cache_type=execution.CacheType.CLASSIC, **cache)


def _cached_outputs(entry) -> list:
    """A node's raw outputs from the executor's output cache: newer ComfyUI caches a CacheEntry(ui, outputs),
    older ones the outputs list itself."""
    return entry.outputs if hasattr(entry, "outputs") else entry


def execute_workflow(api_prompt: dict, extra_data: dict | None = None, executor=None) -> dict:
    """Validate with execution.validate_prompt and run with execution.PromptExecutor, in-process (a fresh
    executor unless one is given, so cached runs can be tested).

    Returns {node id: NodeResult(ui, outputs)} for every node that ran. Raises WorkflowValidationError / WorkflowExecutionError with
    ComfyUI's messages.
    """
    env = boot_comfy(require_pack=False)
    collect_dropped_models()  # what the server does between prompts: earlier graphs' models go
    execution = env.execution
    prompt_id = uuid.uuid4().hex
    ok, error, good_outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, api_prompt, None))
    if not ok:
        lines = [f"{error['message']}: {error['details']}"]
        for nid, err in node_errors.items():
            for reason in err["errors"]:
                lines.append(f"  node {nid} ({err['class_type']}): {reason['message']}: {reason['details']}")
        raise WorkflowValidationError("\n".join(lines))
    executor = executor or new_executor()
    executor.execute(api_prompt, prompt_id, dict(extra_data or {}), good_outputs)
    for event, data in executor.status_messages:
        if event in ("execution_error", "execution_interrupted"):
            raise WorkflowExecutionError(
                f"{event} in node {data.get('node_id')} ({data.get('node_type')}): "
                f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                + "".join(data.get("traceback") or []), data)
    ui = executor.history_result["outputs"]
    results = {}
    for node_id in api_prompt:
        entry = executor.caches.outputs.get(node_id)
        if entry is not None:
            results[node_id] = NodeResult(ui.get(node_id), _cached_outputs(entry))
    return results


def saved_image_paths(entry) -> list[Path]:
    """Files named in a node result's ui["images"] (SaveImage -> output dir, PreviewImage -> temp)."""
    folder_paths = boot_comfy(require_pack=False).folder_paths
    paths = []
    for image in (entry.ui or {}).get("images", []):
        base = folder_paths.get_directory_by_type(image.get("type", "output"))
        paths.append(Path(os.path.join(base, image.get("subfolder", ""), image["filename"])))
    return paths


def load_ui_workflow(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
