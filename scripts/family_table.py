"""Write the README's node x family table from the family adapters and the nodes' declarations
(nodes/family_support.py), with the display names ComfyUI registers: run it after adding a family or a node
(`.venv/bin/python scripts/family_table.py`); tests/test_node_contract.py checks the README holds this table."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import conftest  # noqa: E402,F401  (the pack importable, as in the tests)
from harness.comfy_env import boot_comfy, pack_module  # noqa: E402


def main() -> None:
    comfy = boot_comfy(require_pack=True)
    support = pack_module("nodes.family_support")
    names = {node: comfy.nodes.NODE_CLASS_MAPPINGS[node].GET_SCHEMA().display_name.removesuffix(" (personalization)")
             for node in support.SUPPORT}
    readme = ROOT / "README.md"
    lines = readme.read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("| node | id |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    lines[start:end] = support.family_table(names)
    readme.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
