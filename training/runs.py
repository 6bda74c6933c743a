"""Where a trainer's runs live on disk, so that pressing Run again after an edit does what a user expects.

A *run* is one output name trained from one set of inputs and settings; its id is the ``loop.fingerprint`` of all
of them except the step count, the checkpoint interval and export-only choices. The rules:

- **More steps continue the run** from its furthest checkpoint; the same steps again find the run finished and
  only export. **Fewer steps** than the furthest checkpoint start from the nearest earlier checkpoint of the run
  (from scratch when there is none), which gives the same weights bit for bit (the loop is deterministic, see
  ``loop``); the further checkpoint is kept, so asking for its steps again finds it.
- **Any other change is another run** with checkpoints of its own. The files the earlier run exported under the
  same name are not overwritten: :func:`keep_earlier_exports` moves them to the next free numbered name,
  ``<name>_00001<suffix>`` (as SaveImage numbers its images), before the new run writes its files.

Checkpoints: ``<folder>/run-<id>.step-<n>.safetensors``; the folder is per output name. Exported files carry the
run id in their metadata (:data:`RUN_ID_KEY`), which is how a later run tells its own files from an earlier one's.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from .checkpoint import TrainingState, load_checkpoint, save_checkpoint

#: metadata key of every exported file: the id of the run that wrote it
RUN_ID_KEY = "training_run"
#: characters of the run id in checkpoint file names (64 bits: no two runs of one name collide in practice)
ID_LENGTH = 16
ARCHIVE_DIGITS = 5
_CHECKPOINT_NAME = re.compile(r"run-(?P<run>[0-9A-Za-z]+)\.step-(?P<step>\d+)\.safetensors")


class RunCheckpoints:
    """The checkpoints of one run (see the module docstring): where to resume a request for ``steps`` from, and
    where each new checkpoint goes. A checkpoint written replaces the one this object resumed from or wrote
    before, so a run keeps one file per point it was trained to and later extended from."""

    def __init__(self, folder: str | Path, run_id: str):
        self.folder = Path(folder)
        self.run_id = run_id
        self._superseded: Optional[Path] = None

    def _steps_saved(self) -> dict[int, Path]:
        if not self.folder.is_dir():
            return {}
        found = {}
        for path in self.folder.iterdir():
            match = _CHECKPOINT_NAME.fullmatch(path.name)
            if match and match["run"] == self.run_id[:ID_LENGTH]:
                found[int(match["step"])] = path
        return found

    def resume_point(self, steps: int) -> Optional[Path]:
        """The checkpoint of this run furthest along but not past ``steps``, or None (start from scratch)."""
        usable = [step for step in self._steps_saved() if step <= steps]
        return self._steps_saved()[max(usable)] if usable else None

    def load(self, steps: int) -> Optional[TrainingState]:
        path = self.resume_point(steps)
        if path is None:
            return None
        self._superseded = path
        return load_checkpoint(path, expected_fingerprint=self.run_id)

    def save(self, state: TrainingState) -> Path:
        path = self.folder / f"run-{self.run_id[:ID_LENGTH]}.step-{state.step}.safetensors"
        save_checkpoint(path, state)
        if self._superseded is not None and self._superseded != path:
            self._superseded.unlink(missing_ok=True)
        self._superseded = path
        return path


@dataclass(frozen=True)
class ExportedFile:
    """One kind of file a trainer exports for an output name: ``<folder>/<name><suffix><extension>``. A suffix
    holding ``{index}`` stands for a numbered family of files (one per training image, say)."""

    folder: Path
    suffix: str = ""
    extension: str = ".safetensors"

    def path(self, name: str, index: Optional[int] = None) -> Path:
        suffix = self.suffix.format(index=index) if index is not None else self.suffix
        return Path(self.folder) / f"{name}{suffix}{self.extension}"

    def existing(self, name: str) -> list[tuple[Path, Optional[int]]]:
        """The files of this kind that exist for ``name``, each with its index (None for an unnumbered kind)."""
        if "{index}" not in self.suffix:
            path = self.path(name)
            return [(path, None)] if path.is_file() else []
        before, _, after = self.suffix.partition("{index}")
        pattern = re.compile(re.escape(f"{name}{before}") + r"(\d+)" + re.escape(f"{after}{self.extension}"))
        folder = Path(self.folder)
        if not folder.is_dir():
            return []
        return [(folder / entry.name, int(match[1])) for entry in os.scandir(folder)
                if entry.is_file() and (match := pattern.fullmatch(entry.name))]


def run_of(path: Path) -> Optional[str]:
    """The run id an exported file records, or None (a file of another tool, an older version, or unreadable)."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get(RUN_ID_KEY)
    except Exception:  # any file that is not readable safetensors belongs to no run of ours
        return None


def keep_earlier_exports(name: str, files: list[ExportedFile], run_id: str) -> Optional[str]:
    """Before run ``run_id`` exports under ``name``: when any file it would write (or any numbered file of its
    kinds) already exists and was written by another run, move all of them to the first numbered name
    ``<name>_NNNNN`` under which none of them exists. Returns that name, or None when nothing was moved (no files
    yet, or files of this same run, which it updates)."""
    found = [(kind, path, index) for kind in files for path, index in kind.existing(name)]
    if all(run_of(path) == run_id for _, path, _ in found):
        return None
    number = 1
    while True:
        kept = f"{name}_{number:0{ARCHIVE_DIGITS}d}"
        if not any(kind.existing(kept) for kind in files):
            break
        number += 1
    for kind, path, index in found:
        os.replace(path, kind.path(kept, index))
    return kept


def without_steps(settings) -> dict:
    """A trainer's settings dataclass as run-id values: all fields but the step count (more steps continue a run)."""
    return {key: value for key, value in dataclasses.asdict(settings).items() if key != "steps"}
