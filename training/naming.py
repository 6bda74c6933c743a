"""Safe names for files a trainer writes: user text never chooses a path outside its models folder."""
from __future__ import annotations

import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120


def sanitize_name(name: str) -> str:
    """A file-name stem made of ``[A-Za-z0-9._-]`` only, with no leading dots (no hidden files, no ``..``).

    Separators and other characters become ``_``; raises ValueError when nothing usable is left.
    """
    stem = _UNSAFE.sub("_", name.strip()).strip("._")[:MAX_NAME_LENGTH].strip("._")
    if not stem:
        raise ValueError(f"output name {name!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return stem


def output_path(folder: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """``<folder>/<sanitized name><suffix>``, checked to lie inside ``folder`` (whatever ``name`` holds)."""
    root = Path(folder).resolve()
    path = (root / f"{sanitize_name(name)}{suffix}").resolve()
    if path.parent != root:
        raise ValueError(f"output name {name!r} would leave the folder {root}")
    return path
