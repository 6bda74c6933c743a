"""What users and shared workflows rely on: frozen node ids and widget order, docs, tooltips, registry rules."""
import json
import re
import tomllib
from pathlib import Path

import pytest

from harness.comfy_env import pack_module, pack_node_ids

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(__file__).resolve().parent / "node_schema_snapshot.json"


def schema_of(comfy, node_id):
    return comfy.nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA()


def signature(schema) -> dict:
    """Inputs in the order the frontend lays out widgets (and saved workflows store their values): the
    required ones, then the optional ones; so a required input appended after optional ones is a reorder."""
    ordered = [i for i in schema.inputs if not i.optional] + [i for i in schema.inputs if i.optional]
    return {"inputs": [[i.id, str(i.get_io_type())] for i in ordered],
            "outputs": [str(o.get_io_type()) for o in schema.outputs]}


def test_frozen_nodes_keep_their_ids_and_only_append_inputs(comfy):
    """A renamed node or reordered widget breaks every saved workflow; new inputs may only be appended."""
    frozen = json.loads(SNAPSHOT.read_text())
    for node_id, expected in frozen.items():
        assert node_id in comfy.nodes.NODE_CLASS_MAPPINGS, f"node {node_id} was renamed or removed"
        live = signature(schema_of(comfy, node_id))
        assert live["inputs"][: len(expected["inputs"])] == expected["inputs"], f"{node_id}: inputs reordered"
        assert live["outputs"][: len(expected["outputs"])] == expected["outputs"], f"{node_id}: outputs changed"


def test_every_node_has_docs_tooltips_and_its_category(comfy):
    ids = pack_node_ids()
    assert ids
    for node_id in ids:
        schema = schema_of(comfy, node_id)
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node_id]
        assert (ROOT / "web" / "docs" / f"{node_id}.md").is_file(), f"web/docs/{node_id}.md missing"
        assert schema.category.startswith("personalization/"), node_id
        assert schema.description and cls.__doc__, f"{node_id}: description and docstring"
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{node_id}: {item.id or item.get_io_type()} has no tooltip"


TECHNIQUE_OF_CATEGORY = {"personalization/style_aligned": "StyleAligned", "personalization/realcustom": "RealCustom",
                         "personalization/pva": "PVA", "personalization/disendiff": "DisenDiff",
                         "personalization/detex": "DETEX"}


def test_display_names_follow_one_pattern(comfy):
    """'<technique> <role> (personalization)': the frontend's node search reads only the node id and the
    display name (ComfyUI 0.3.75 has no search aliases), so both words must be in the name, and the role
    holds the words users type for what the node is for (face, subject, concept...); its fuzzy search
    (threshold 0.3, distance 100) finds a word only if it starts within the first 30 characters, hence the
    short roles. tests/test_frontend.py runs the real search (PURPOSE_WORDS)."""
    for node_id in pack_node_ids():
        schema = schema_of(comfy, node_id)
        technique = TECHNIQUE_OF_CATEGORY[schema.category]
        match = re.fullmatch(rf"{technique} (\S.*) \(personalization\)", schema.display_name)
        assert match, f"{node_id}: display name {schema.display_name!r}"
        assert schema.display_name.index("personalization") <= 30, f"{node_id}: role too long for the search"


def readme_section(title: str) -> list[str]:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def test_readme_node_table_is_the_one_the_family_adapters_and_node_declarations_make(comfy):
    """The README's node x family table is nodes.family_support.family_table: a row per registered node (its display
    name without the common " (personalization)", its id), a column per family adapter, each cell what the node
    declares (the declarations the nodes check models against)."""
    support = pack_module("nodes.family_support")
    assert sorted(support.SUPPORT) == pack_node_ids(), "every registered node declares its families"
    names = {node: schema_of(comfy, node).display_name.removesuffix(" (personalization)") for node in support.SUPPORT}
    table = [line for line in readme_section("Nodes and model families") if line.startswith("|")]
    assert table == support.family_table(names)


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "docs/benchmarks.md", "docs/testing.md", "docs/outputs.md",
                                  "docs/families.md"])
def test_links_of_the_readme_and_its_pages_lead_somewhere(page):
    """Every relative link (and #anchor) of the README and the docs/ pages it links names a file (and heading)
    of the repository."""
    source = ROOT / page
    broken = []
    for target in re.findall(r"\]\(<?([^)>]+)>?\)", source.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (source.parent / path).resolve() if path else source
        if not linked.exists():
            broken.append(target)
        elif anchor and anchor not in {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}:
            broken.append(target)
    assert not broken, f"{page}: {broken}"


def test_pyproject_meets_registry_rules():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "comfyui" not in project["project"]["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["project"]["version"])
    comfy_section = project["tool"]["comfy"]
    for field in ("PublisherId", "DisplayName", "requires-comfyui"):
        assert comfy_section.get(field), field
    runtime = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert sorted(runtime) == sorted(project["project"]["dependencies"]), "requirements.txt mirrors pyproject"


@pytest.mark.parametrize("pattern", [r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"pip install", r"subprocess"])
def test_pack_code_has_no_forbidden_calls(pattern):
    sources = [ROOT / "__init__.py", *ROOT.glob("nodes/**/*.py"), *ROOT.glob("attention/**/*.py"),
               *ROOT.glob("training/**/*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in sources if re.search(pattern, p.read_text())]
    assert not offenders, f"{pattern} in {offenders}"


def test_pure_packages_never_import_comfyui():
    pattern = re.compile(r"^\s*(from|import)\s+(comfy\b|comfy_api|nodes\b|folder_paths|server\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in [*ROOT.glob("attention/**/*.py"), *ROOT.glob("training/**/*.py")]
                 if pattern.search(p.read_text())]
    assert not offenders
