"""The pack as users meet it: every workflows/*.json loaded by the REAL ComfyUI web frontend.

The test starts ComfyUI's own `main.py` (CPU, 127.0.0.1 only, a free port, the pinned
`comfyui-frontend-package`) with this pack loaded, opens it in Debian's headless chromium driven by
playwright-core (`tests/frontend/load_workflows.cjs`), loads each workflow with the frontend's
`app.loadGraphData` and converts it with its `app.graphToPrompt`, then asserts that the frontend found no
missing node type or model, that the server's validation (what POST /prompt checks, through the test-only
route in `tests/frontend/validate_only_route`, so nothing is executed) accepts the prompt, and that the
frontend's prompt equals what `harness.workflows.ui_to_api` (used by test_workflows.py) makes of it.
It also reads what a newcomer meets (tests/frontend/ui_checks.cjs): each graph's layout at the sizes the
frontend gives its nodes (no overlaps, one group per stage, notes that fit their text, a first view below
the frontend's bars with the note readable), the demo copies opened from the Workflows sidebar as users
open them, the node search, and the Templates browser's thumbnails.
Screenshots land in test-artifacts/frontend/<workflow>.png (whole graph), <workflow>.opened.png (the
view the workflow opens with), demo/<workflow>.png (a demo copy opened from the sidebar) and
templates_sorted_a_to_z.png (the Templates browser); the node sizes the frontend computed go to
test-artifacts/frontend/node_sizes.json for scripts/layout_workflows.py.

Setup: `bash scripts/setup_frontend_test.sh` (chromium + pinned playwright-core in .frontend-test/).
Skipped only where chromium or node is not installed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import checkpoints, dit, realcustom
from harness.comfy_env import PACK_LINK_NAME, comfy_dir, pack_node_ids
from harness.tiny_workflows import demo_assets, needs_newer_comfyui
from harness.workflows import load_ui_workflow, ui_to_api

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
DRIVER = REPO_ROOT / "tests" / "frontend" / "load_workflows.cjs"
VALIDATE_ROUTE_PLUGIN = REPO_ROOT / "tests" / "frontend" / "validate_only_route"
PLAYWRIGHT = REPO_ROOT / ".frontend-test" / "node_modules" / "playwright-core"
SCREENSHOTS = REPO_ROOT / "test-artifacts" / "frontend"
CHROMIUM = shutil.which("chromium")
NODE = shutil.which("node")

SERVER_START_TIMEOUT_S = 150
DRIVER_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or NODE is None,
                       reason="needs Debian's chromium and node: bash scripts/setup_frontend_test.sh"),
]

# Files the workflows name, provided under those names as links to the tiny checkpoints (the server only
# validates, so any file of the right kind does). Loader type -> (models folder, tiny file); the file
# names are the loader's first widget, or its first FILE_WIDGETS ones. A new loader in a workflow fails
# validation ("Value not in list") until it is added here.
MODEL_FILES = {
    "CheckpointLoaderSimple": ("checkpoints", checkpoints.sd15_checkpoint_path),
    "UNETLoader": ("diffusion_models", dit.sd35_path),
    "DualCLIPLoader": ("text_encoders", lambda: dit.text_encoder_path("clip_l")),
    "TripleCLIPLoader": ("text_encoders", lambda: dit.text_encoder_path("clip_l")),
    "CLIPLoader": ("text_encoders", lambda: dit.text_encoder_path("clip_l")),
    "VAELoader": ("vae", dit.vae_path),
    "ControlNetLoader": ("controlnet", checkpoints.sd15_controlnet_path),
    "LoraLoader": ("loras", checkpoints.sd15_lora_path),
    "LoraLoaderModelOnly": ("loras", checkpoints.sd15_lora_path),
    "CLIPVisionLoader": ("clip_vision", realcustom.vitl_clip_vision_path),
}
FILE_WIDGETS = {"DualCLIPLoader": 2, "TripleCLIPLoader": 3}
INPUT_IMAGE_NODES = {"LoadImage"}
# For readable screenshots: no first-run dialog (templates browser) over the graph, and text drawn at
# any zoom (fitting a wide graph zooms out past the level-of-detail threshold that hides widget text).
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
# The demo copies scripts/start_comfyui.sh writes where no checkpoint is installed, opened as users open
# them: from the Workflows sidebar.
DEMO_STEMS = [path.stem for path in WORKFLOWS if demo_assets().runs_on_demo_models(load_ui_workflow(path))]
# The smallest text a newcomer reads without zooming, in pixels on the screen.
READABLE_TEXT_PX = 11

# Negative controls, loaded after the real workflows in the same browser session: they show that a missing
# node type and a value the server refuses are really caught by the checks above.
CONTROL_IMAGE = "personalization_tests_control.png"
UNKNOWN_NODE_TYPE = "PersonalizationTestsNoSuchNode"
MISSING_MODEL = {"name": "personalization_tests_no_such_model.safetensors", "directory": "checkpoints",
                 "url": "https://huggingface.co/personalization-tests/none/resolve/main/no_such_model.safetensors"}


def _control_workflow(image: str, extra_nodes: tuple = ()) -> dict:
    """LoadImage -> SaveImage (+ extra nodes), in the UI format the frontend saves."""
    nodes = [
        {"id": 1, "type": "LoadImage", "pos": [0, 0], "size": [320, 320], "flags": {}, "order": 0, "mode": 0,
         "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                   {"name": "MASK", "type": "MASK", "links": None}],
         "properties": {}, "widgets_values": [image, "image"]},
        {"id": 2, "type": "SaveImage", "pos": [400, 0], "size": [320, 320], "flags": {}, "order": 1, "mode": 0,
         "inputs": [{"name": "images", "type": "IMAGE", "link": 1}], "outputs": [], "properties": {},
         "widgets_values": ["control"]},
        *extra_nodes,
    ]
    return {"last_node_id": len(nodes), "last_link_id": 1, "nodes": nodes, "links": [[1, 1, 0, 2, 0, "IMAGE"]],
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


CONTROLS = {
    "control_unknown_node": _control_workflow(CONTROL_IMAGE, (
        {"id": 3, "type": UNKNOWN_NODE_TYPE, "pos": [0, 400], "size": [320, 100], "flags": {}, "order": 2,
         "mode": 0, "inputs": [], "outputs": [], "properties": {}, "widgets_values": []},)),
    "control_missing_input_file": _control_workflow("personalization_tests_no_such_file.png", (
        {"id": 3, "type": "ImageScale", "pos": [0, 400], "size": [320, 160], "flags": {}, "order": 2, "mode": 0,
         "inputs": [{"name": "image", "type": "IMAGE", "link": None}],
         "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": None}], "properties": {},
         "widgets_values": ["no_such_method", 512, 512, "disabled"]},)),
    "control_missing_model": {**_control_workflow(CONTROL_IMAGE), "models": [MISSING_MODEL]},
}
# What a newcomer types into the node search: the pack's name finds every node, a technique's name the
# nodes of that technique (node ids by prefix), and what they want done the nodes for it (node ids). The
# frontend searches only a node's id and display name, so these words are in the display names (within
# their first 30 characters: test_node_contract.py).
TECHNIQUE_PREFIXES = {"StyleAligned": "SharedAttention", "RealCustom": ("RealCustom", "AdaptiveMaskGuidance"),
                      "PVA": ("PVA", "ParallelVisualAttention"), "DisenDiff": ("DisenDiff", "CalibratedCrossAttn"),
                      "DETEX": "DecoupledToken"}
PURPOSE_WORDS = {
    "face": {"PVALoader", "ParallelVisualAttention", "PVATextEncode", "PVAIdentityTune", "PVATrainer"},
    "identity": {"ParallelVisualAttention", "PVATextEncode", "PVAIdentityTune", "PVATrainer"},
    "inpaint": {"ParallelVisualAttention"},
    "style": {"SharedAttentionBatch", "SharedAttentionPromptBatch", "SharedAttentionInvertReference",
              "SharedAttentionApplyReference"},
    "subject": {"RealCustomEncodeReference", "AdaptiveMaskGuidance", "RealCustomTrainer", "DecoupledTokenMask",
                "DecoupledTokenTrainer", "DecoupledTokenPrompt"},
    "concept": {"DisenDiffTrainer"},
}
SEARCHES = ["personalization", *TECHNIQUE_PREFIXES, *PURPOSE_WORDS]
NODE_SIZES = SCREENSHOTS / "node_sizes.json"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post_json(url: str, payload: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def _build_base_directory(base: Path) -> None:
    """A ComfyUI --base-directory holding only this pack (+ the validate route), the files the workflows
    name and the demo copies, so neither a user's models nor their other custom nodes take part."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True)
    (custom_nodes / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (custom_nodes / "personalization_tests_validate_only_route").symlink_to(VALIDATE_ROUTE_PLUGIN,
                                                                             target_is_directory=True)
    (base / "models").mkdir()
    (base / "models" / "configs").symlink_to(comfy_dir() / "models" / "configs", target_is_directory=True)
    (base / "input").mkdir()
    Image.new("RGB", (64, 64), "gray").save(base / "input" / CONTROL_IMAGE)
    for path in WORKFLOWS:
        for node in load_ui_workflow(path)["nodes"]:
            values = node.get("widgets_values") or []
            if not values or not isinstance(values[0], str):
                continue
            if node["type"] in MODEL_FILES:
                folder, tiny_file = MODEL_FILES[node["type"]]
                for name in values[:FILE_WIDGETS.get(node["type"], 1)]:
                    link = base / "models" / folder / name
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.exists():
                        link.symlink_to(tiny_file())
            elif node["type"] in INPUT_IMAGE_NODES:
                pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(base / "input" / values[0])
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS))
    assets = demo_assets()
    assets.write_demo_copies(settings.parent / "workflows" / assets.DEMO_FOLDER, base / "input")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _pack_import_failure(log: str) -> str | None:
    lines = [line for line in log.splitlines()
             if PACK_LINK_NAME in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    return "\n".join(lines) or None


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory, comfy):
    """URL of a ComfyUI main.py started for this module and killed after it. (`comfy` only builds the
    tiny checkpoints if the cache lacks them, and converts the demo copies' widgets.)"""
    base = tmp_path_factory.mktemp("frontend_comfy_base")
    _build_base_directory(base)
    port = _free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    log_path = base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=comfy_dir(), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/system_stats", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {SERVER_START_TIMEOUT_S}s:\n"
                                f"{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
        log = log_path.read_text()
        failure = _pack_import_failure(log)
        assert failure is None, f"ComfyUI failed to import the pack:\n{failure}"
        # what a first start shows a user: no traceback, no "IMPORT FAILED" of ComfyUI's own nodes (their
        # requirements are installed: kornia, spandrel, torchaudio)
        assert "Traceback" not in log and "IMPORT FAILED" not in log, log[-4000:]
        yield url
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def frontend_report(comfy_server, tmp_path_factory):
    """What the browser saw for every workflow (one chromium session for all of them)."""
    if not (PLAYWRIGHT / "package.json").exists():
        pytest.fail(f"playwright-core is not installed in {PLAYWRIGHT.parent}: bash scripts/setup_frontend_test.sh")
    for stale in SCREENSHOTS.glob("**/*.png"):
        stale.unlink(missing_ok=True)
    work = tmp_path_factory.mktemp("frontend_driver")
    for name, workflow in CONTROLS.items():
        (work / f"{name}.json").write_text(json.dumps(workflow))
    loads = [(path.stem, path, SCREENSHOTS / f"{path.stem}.png") for path in WORKFLOWS]
    loads += [(name, work / f"{name}.json", SCREENSHOTS / "controls" / f"{name}.png") for name in CONTROLS]
    request = {
        "url": comfy_server, "playwright": str(PLAYWRIGHT), "chromium": CHROMIUM,
        "userDataDir": str(work / "chromium-profile"), "newcomerDataDir": str(work / "chromium-profile-newcomer"),
        "results": str(work / "results.json"),
        "searches": SEARCHES, "templateModule": PACK_LINK_NAME,
        "templatesScreenshot": str(SCREENSHOTS / "templates_sorted_a_to_z.png"),
        "workflows": [{"name": name, "path": str(path), "screenshot": str(shot)} for name, path, shot in loads],
        "demo": {"folder": demo_assets().DEMO_FOLDER,
                 "workflows": [{"name": stem, "screenshot": str(SCREENSHOTS / "demo" / f"{stem}.png")}
                               for stem in DEMO_STEMS]},
    }
    (work / "request.json").write_text(json.dumps(request))
    # Own process group, so a timeout also ends the chromium processes the driver started.
    driver = subprocess.Popen([NODE, str(DRIVER), str(work / "request.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        output, _ = driver.communicate(timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _stop(driver)
        pytest.fail(f"the browser driver did not finish within {DRIVER_TIMEOUT_S}s")
    assert driver.returncode == 0, f"the browser driver failed:\n{output[-6000:]}"
    report = json.loads((work / "results.json").read_text())
    report["workflows"] = {entry["name"]: entry for entry in report["workflows"]}
    # For scripts/layout_workflows.py: per workflow and node, the size the frontend computes (a note: the
    # height its text needs).
    NODE_SIZES.write_text(json.dumps({path.stem: {
        str(node["id"]): [node["minSize"][0], node.get("textHeight", node["minSize"][1])]
        for node in report["workflows"][path.stem]["layout"]["nodes"]} for path in WORKFLOWS}, indent=1))
    return report


def test_workflows_exist():
    assert WORKFLOWS, "no workflows/*.json to load"


def test_frontend_raised_no_uncaught_error(frontend_report):
    assert frontend_report["pageErrors"] == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_frontend_loads_workflow(comfy, comfy_server, frontend_report, path):
    if reason := needs_newer_comfyui(load_ui_workflow(path)):
        pytest.skip(reason)
    seen = frontend_report["workflows"][path.stem]
    assert Path(seen["screenshot"]).is_file()
    assert seen["missingNodeTypes"] == [] and seen["unregisteredTypes"] == [], \
        f"the frontend does not know these node types: {seen['missingNodeTypes'] or seen['unregisteredTypes']}"
    if seen["missingModels"] is not None:  # None: this frontend keeps its missing-model reporter private
        assert seen["missingModels"] == []
    assert seen["comboValuesNotOffered"] == [], "widget values the frontend does not offer as choices"
    assert seen["loadedNodeCount"] == seen["nodeCount"]

    verdict = _post_json(f"{comfy_server}/personalization-tests/validate", {"prompt": seen["prompt"]})
    assert verdict["ok"] and not verdict["node_errors"], \
        f"the server rejects the frontend's prompt: {json.dumps(verdict['error'])}\n" \
        f"{json.dumps(verdict['node_errors'], indent=1)}\n(a model file 'not in list'? add its loader to MODEL_FILES)"

    # test_workflows.py executes ui_to_api's conversion: it must be what the frontend sends.
    frontend_prompt = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
                       for node_id, node in seen["prompt"].items()}
    assert frontend_prompt == ui_to_api(load_ui_workflow(path))


def _overlap(a, b) -> bool:
    """Whether two [x, y, width, height] rectangles share any area."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(inner, outer) -> bool:
    return (outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2]
            and outer[1] <= inner[1] and inner[1] + inner[3] <= outer[1] + outer[3])


def _is_note(node) -> bool:
    return node["type"] in ("Note", "MarkdownNote")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_nodes_do_not_overlap_at_the_sizes_the_frontend_draws(frontend_report, path):
    """The frontend grows a node to its computed size (a LoadImage further, to show its picture): the
    saved sizes alone would not show what covers what."""
    nodes = frontend_report["workflows"][path.stem]["layout"]["nodes"]
    overlapping = [f"{a['title']} #{a['id']} / {b['title']} #{b['id']}"
                   for i, a in enumerate(nodes) for b in nodes[i + 1:] if _overlap(a["rect"], b["rect"])]
    assert overlapping == [], "scripts/layout_workflows.py lays the graphs out"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_node_sits_in_one_stage_group(frontend_report, path):
    layout = frontend_report["workflows"][path.stem]["layout"]
    groups = layout["groups"]
    assert [(a["title"], b["title"]) for i, a in enumerate(groups) for b in groups[i + 1:]
            if _overlap(a["rect"], b["rect"])] == []
    assert [group["title"] for group in groups if group["titleRight"] > group["rect"][2]] == [], \
        "group titles longer than their group"
    for node in layout["nodes"]:
        homes = [group["title"] for group in groups if _inside(node["rect"], group["rect"])]
        if _is_note(node):
            assert homes == [], f"the note #{node['id']} stands apart, left of the stages"
        else:
            assert len(homes) == 1, f"{node['title']} #{node['id']} is in the groups {homes}"


#: The frontend the example graphs are laid out for (scripts/layout_workflows.py measures node sizes, note
#: heights and bars on it): the one the pinned ComfyUI 0.3.75 requires.
LAYOUT_FRONTEND = "1.32.9"


def _skip_unless_layout_frontend():
    """Sizes, text heights and bars are the drawing of one frontend release; another draws its own."""
    from importlib.metadata import version
    running = version("comfyui-frontend-package")
    if running != LAYOUT_FRONTEND:
        pytest.skip(f"the graphs are laid out for frontend {LAYOUT_FRONTEND}; this ComfyUI serves {running}")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_a_read_me_note_explains_the_graph_and_fits_its_text(frontend_report, path):
    """The explanations are in a note the frontend shows (not extra.info, which it never shows): what the
    graph does and which models go where, readable without scrolling."""
    workflow = load_ui_workflow(path)
    assert "info" not in workflow.get("extra", {})
    notes = [node for node in frontend_report["workflows"][path.stem]["layout"]["nodes"] if _is_note(node)]
    assert len(notes) == 1
    text = next(n for n in workflow["nodes"] if n["id"] == notes[0]["id"])["widgets_values"][0]
    assert "## Models" in text and "models/" in text
    _skip_unless_layout_frontend()
    assert notes[0]["textHeight"] <= notes[0]["size"][1], "the note scrolls: give it the height of its text"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_the_saved_view_opens_on_the_note_below_the_frontends_bars_readable(frontend_report, path):
    """The view a workflow opens with from Templates (extra.ds: screen = (graph + offset) * scale) puts its
    top-left corner, the read-me note's title, right of the side bar and below the first-run banner, the tab
    bar, the floating workflow title and the Run bar, zoomed so that the note's text reads at first sight."""
    _skip_unless_layout_frontend()
    workflow = load_ui_workflow(path)
    view = workflow["extra"]["ds"]
    layout = frontend_report["workflows"][path.stem]["layout"]
    rects = [node["rect"] for node in layout["nodes"]] + [group["rect"] for group in layout["groups"]]
    left = (min(r[0] for r in rects) + view["offset"][0]) * view["scale"]
    top = (min(r[1] for r in rects) + view["offset"][1]) * view["scale"]
    bars = layout["overlays"]
    assert all(bars.values()), f"the frontend's bars were not found: {bars}"
    assert left >= bars["sideBar"]["right"]
    assert top >= max(bars[name]["bottom"] for name in ("tabBar", "workflowTitle", "runBar"))
    note = next(node for node in layout["nodes"] if _is_note(node))
    assert view["scale"] * note["fontSize"] >= READABLE_TEXT_PX, "the note's text on screen, in px"


@pytest.mark.parametrize("stem", DEMO_STEMS)
def test_a_demo_copy_opened_from_the_workflows_sidebar_shows_its_note_readable(frontend_report, stem):
    """Users open the demo copies from the Workflows sidebar (README), which stays open over the canvas: the
    demo copy's saved view shows its read-me note's title, its DEMO banner and all its text uncovered (not
    under the sidebar, the first-run banner, the tab bar, the floating title or the Run bar, nor out of the
    window), its text at a readable size, the note as tall as its text."""
    _skip_unless_layout_frontend()
    seen = frontend_report["demo"][stem]
    note = seen["note"]
    assert note["firstBlockText"].startswith("DEMO"), "the DEMO banner opens the note"
    assert note["covered"] == []
    assert note["scale"] * note["fontSize"] >= READABLE_TEXT_PX, "the note's text on screen, in px"
    drawn = next(node for node in seen["layout"]["nodes"] if _is_note(node))
    assert drawn["textHeight"] <= drawn["size"][1], "the note scrolls: demo_assets.NOTE_LINE_* under-estimate it"


def test_node_search_finds_every_node_by_pack_and_technique(comfy, frontend_report):
    found = frontend_report["search"]
    ours = set(pack_node_ids())
    assert len(ours) == 23
    assert ours <= set(found["personalization"]), sorted(ours - set(found["personalization"]))
    for technique, prefixes in TECHNIQUE_PREFIXES.items():
        expected = {node for node in ours if node.startswith(prefixes)}
        assert expected and expected <= set(found[technique]), (technique, sorted(expected - set(found[technique])))


def test_node_search_finds_the_nodes_for_what_users_want(comfy, frontend_report):
    """"face" finds PVA's nodes, "subject" RealCustom's and DETEX's, "concept" DisenDiff's trainer..."""
    found = frontend_report["search"]
    assert {word: sorted(nodes - set(found[word])) for word, nodes in PURPOSE_WORDS.items()} == \
        {word: [] for word in PURPOSE_WORDS}


def test_templates_browser_lists_every_workflow_with_its_thumbnail(frontend_report):
    """The browser lists the files of workflows/ by name (its title) and shows <name>.jpg beside them."""
    templates = frontend_report["templates"]
    assert sorted(templates["listed"][PACK_LINK_NAME]) == [path.stem for path in WORKFLOWS]
    for name, thumbnail in templates["thumbnails"].items():
        assert thumbnail["status"] == 200 and thumbnail["contentType"] == "image/jpeg", name
        assert thumbnail["size"] and min(thumbnail["size"]) >= 128, name


def test_templates_browser_shows_the_numbered_order_sorted_a_to_z(frontend_report):
    """The browser opens sorted "Newest", which for a custom node's templates (no date: the frontend reads
    only their file names) keeps the order the server lists the files in, the file system's; sorted A → Z,
    as the README says, the cards come in the numbered order."""
    templates = frontend_report["templates"]
    opened, sorted_a_to_z = templates["browsed"]["opened"], templates["browsed"]["sorted"]
    shown = [card["name"] for card in opened["cards"]]
    if sorted_a_to_z is None:
        # frontend 1.25 (ComfyUI 0.3.52's) has no Sort by: the cards it draws come in the server's order
        from importlib.metadata import version
        running = tuple(int(part) for part in version("comfyui-frontend-package").split("."))
        assert running < (1, 32), f"the Sort by control of frontend {running} went missing"
        assert shown and shown == templates["listed"][PACK_LINK_NAME][:len(shown)]
        return
    assert shown == templates["listed"][PACK_LINK_NAME], opened["sortBy"]
    assert [card["name"] for card in sorted_a_to_z["cards"]] == [path.stem for path in WORKFLOWS]


def test_controls_show_the_checks_catch_errors(comfy_server, frontend_report):
    unknown = frontend_report["workflows"]["control_unknown_node"]
    assert unknown["missingNodeTypes"] == [UNKNOWN_NODE_TYPE]
    assert unknown["unregisteredTypes"] == [UNKNOWN_NODE_TYPE]
    assert not _post_json(f"{comfy_server}/personalization-tests/validate", {"prompt": unknown["prompt"]})["ok"]

    missing_file = frontend_report["workflows"]["control_missing_input_file"]
    assert missing_file["missingNodeTypes"] == [] and missing_file["unregisteredTypes"] == []
    assert missing_file["comboValuesNotOffered"] == ['ImageScale #3 upscale_method="no_such_method"']
    verdict = _post_json(f"{comfy_server}/personalization-tests/validate", {"prompt": missing_file["prompt"]})
    assert not verdict["ok"]
    assert "personalization_tests_no_such_file.png" in json.dumps(verdict["node_errors"]["1"])

    declared = frontend_report["workflows"]["control_missing_model"]
    if declared["missingModels"] is not None:  # None: this frontend keeps its missing-model reporter private
        assert declared["missingModels"] == [f"{MISSING_MODEL['directory']}/{MISSING_MODEL['name']}"]
