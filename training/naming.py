"""Names of the files a trainer writes: user text never chooses a path outside its models folder, and two
different names never become one file.

A name is a file stem AND an ``embedding:<name>_new1`` word of a prompt, so it may hold letters and digits of any
script, ``-``, ``_`` and ``.`` (not first or last, no ``..``), and nothing else: no spaces (they end a prompt
word), no path separators. Any other name is refused with a usable suggestion rather than cleaned silently
(cleaning made ``evil/dd1`` and ``evil_dd1`` the same file, and ``évil名`` ``vil``).
"""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

#: ``\w`` of a str pattern = ``str.isalnum()`` letters and digits of every script, and ``_``
_NAME = re.compile(r"[\w.-]+")
_NOT_NAME = re.compile(r"[^\w.-]+")
#: a stretch of punctuation holding something a name may not hold (``/../``), replaced as a whole in suggestions
_UNUSABLE_STRETCH = re.compile(r"[^\w-]*[^\w.-][^\w-]*")
#: longest name a user's text may be, in UTF-8 bytes as file systems count them; trainers append suffixes
#: (``_new2``, ``_detex_kv``, ``_pose_9``) to it
MAX_NAME_BYTES = 100
#: longest file stem :func:`output_path` writes: a user name plus its suffix is never cut, so the files of one
#: run never collide (well below the usual 255-byte file-name limit, temp-file prefixes included)
MAX_FILE_STEM_BYTES = 200
_RULE = ("a name becomes a file name and an embedding:<name> word of prompts, so it may hold only letters and digits "
         "(any script), '-', '_' and '.' (not first or last, no '..')")


def checked_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``name`` without its surrounding spaces, when it is a valid name (see the module docstring) of at most
    ``max_bytes`` UTF-8 bytes; else ValueError saying what is wrong and suggesting a valid name."""
    stem = name.strip()
    problem = _problem(stem, max_bytes)
    if problem is None:
        return stem
    suggestion = _suggestion(stem, max_bytes)
    raise ValueError(f"output name {name!r} {problem}; {_RULE}, up to {max_bytes} bytes"
                     + (f"; try {suggestion!r}" if suggestion else "") + ".")


def _problem(stem: str, max_bytes: int) -> str | None:
    if not stem:
        return "is empty"
    if not _NAME.fullmatch(stem):
        return f"holds {''.join(dict.fromkeys(''.join(_NOT_NAME.findall(stem))))!r}"
    if stem[0] == "." or stem[-1] == "." or ".." in stem:
        return "starts or ends with '.' or holds '..'"
    size = len(stem.encode("utf-8"))
    if size > max_bytes:
        return f"is {size} bytes long (UTF-8)"
    return None


def _suggestion(stem: str, max_bytes: int) -> str:
    """A valid name close to ``stem`` ("" when nothing of it is usable)."""
    cleaned = _UNUSABLE_STRETCH.sub("_", unicodedata.normalize("NFC", stem))
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip("._")
    cleaned = cleaned.encode("utf-8")[:max_bytes].decode("utf-8", "ignore").strip("._")
    return cleaned if _problem(cleaned, max_bytes) is None else ""


def output_path(folder: str | Path, name: str, suffix: str = ".safetensors") -> Path:
    """``<folder>/<name><suffix>`` for a valid ``name``, checked to lie inside ``folder``."""
    root = Path(folder).resolve()
    path = (root / f"{checked_name(name, MAX_FILE_STEM_BYTES)}{suffix}").resolve()
    if path.parent != root:
        raise ValueError(f"output name {name!r} would leave the folder {root}")
    return path
