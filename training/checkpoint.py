"""Training checkpoints as safetensors, written atomically (temp file + rename), never pickle.

A checkpoint holds the trainable tensors, the optimizer state and the number of finished optimizer
steps. Tensors go in the safetensors body; everything else (step, optimizer hyper-parameters,
non-tensor state, the run's fingerprint) goes in the string metadata as JSON.
"""
from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PARAM_PREFIX = "param."
OPTIMIZER_PREFIX = "optimizer."
FORMAT = "personalization-training-checkpoint-v1"


class CheckpointMismatchError(ValueError):
    """A checkpoint exists for this output but was written by a run with other settings."""


@dataclass
class TrainingState:
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict
    fingerprint: str
    losses: list[float]


def save_atomic(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # safetensors writes 0600, unreadable to others on a shared machine: give the file a plain write's mode
        # (0666 less the umask), read from a file made so (reading the umask itself sets it, for every thread)
        tmp.unlink(missing_ok=True)
        tmp.touch(mode=0o666)
        mode = stat.S_IMODE(tmp.stat().st_mode)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: TrainingState) -> None:
    tensors = {PARAM_PREFIX + name: t for name, t in state.params.items()}
    optimizer_tensors, optimizer_meta = _split_optimizer_state(state.optimizer)
    tensors.update({OPTIMIZER_PREFIX + k: t for k, t in optimizer_tensors.items()})
    metadata = {"format": FORMAT, "step": str(state.step), "fingerprint": state.fingerprint,
                "optimizer": json.dumps(optimizer_meta), "losses": json.dumps(state.losses)}
    save_atomic(path, tensors, metadata)


def _open(path: str | Path):
    try:
        return safe_open(str(path), "pt")
    except Exception as error:  # safetensors raises its own SafetensorError for damaged headers
        raise CheckpointMismatchError(
            f"the training checkpoint {path} is not a readable safetensors file (damaged, truncated, or another "
            f"file under its name): {error}; delete it to start over") from error


def _check_format(path, metadata: dict) -> None:
    if metadata.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not a training checkpoint of this pack; delete the file to start over")


def load_checkpoint(path: str | Path, expected_fingerprint: Optional[str] = None) -> TrainingState:
    """Read a checkpoint; with ``expected_fingerprint`` refuse one written by a different run."""
    with _open(path) as f:
        metadata = f.metadata() or {}
        _check_format(path, metadata)
        if expected_fingerprint is not None and metadata["fingerprint"] != expected_fingerprint:
            raise CheckpointMismatchError(
                f"{path} was written by a training run with different inputs or settings (a renamed file?); "
                "delete it to start over")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise CheckpointMismatchError(f"the training checkpoint {path} holds NaN or infinite values ({bad[0]}); the run "
                                      "that wrote it diverged: delete it and train with a lower learning rate")
    params = {k[len(PARAM_PREFIX):]: t for k, t in tensors.items() if k.startswith(PARAM_PREFIX)}
    optimizer_tensors = {k[len(OPTIMIZER_PREFIX):]: t for k, t in tensors.items() if k.startswith(OPTIMIZER_PREFIX)}
    optimizer = _join_optimizer_state(optimizer_tensors, json.loads(metadata["optimizer"]))
    return TrainingState(int(metadata["step"]), params, optimizer, metadata["fingerprint"],
                         json.loads(metadata.get("losses", "[]")))


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` → (flat tensors ``state.<param>.<key>``, JSON-able rest)."""
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"state.{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}
