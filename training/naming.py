"""Safe names for files a trainer writes: user text never chooses a path outside its models folder."""
from __future__ import annotations

import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: longest name a user's text becomes; trainers append suffixes (``_new2``, ``_detex_kv``, ``_pose_9``) to it
MAX_NAME_LENGTH = 100
#: longest file stem :func:`output_path` writes: a user name plus its suffix is never cut, so the files of one
#: run never collide (well below the usual 255-byte file-name limit, temp-file prefixes included)
MAX_FILE_STEM = 200


def sanitize_name(name: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """A file-name stem made of ``[A-Za-z0-9._-]`` only, with no leading dots (no hidden files, no ``..``).

    Separators and other characters become ``_``; raises ValueError when nothing usable is left.
    """
    stem = _UNSAFE.sub("_", name.strip()).strip("._")[:max_length].strip("._")
    if not stem:
        raise ValueError(f"output name {name!r} has no usable characters; use letters, digits, '-', '_' or '.'")
    return stem


def output_path(folder: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """``<folder>/<sanitized name><suffix>``, checked to lie inside ``folder`` (whatever ``name`` holds)."""
    root = Path(folder).resolve()
    path = (root / f"{sanitize_name(name, MAX_FILE_STEM)}{suffix}").resolve()
    if path.parent != root:
        raise ValueError(f"output name {name!r} would leave the folder {root}")
    return path
