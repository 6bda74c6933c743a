"""Exports of trained tensors to files STOCK ComfyUI nodes load (see specs/comfy_training_formats.md).

- Token embeddings: ``{"clip_l": [N, 768]}`` (+ ``"clip_g": [N, 1280]`` for SDXL), in
  ``models/embeddings``; used as ``embedding:<name>`` in stock CLIPTextEncode.
- Weight changes: ``<module>.diff`` (exact, strength scales it linearly) or a low-rank SVD LoRA
  (``lora_up``/``lora_down``/``alpha``), in ``models/loras``; loaded by stock LoraLoaderModelOnly.
  Module keys are ComfyUI's generic ``diffusion_model.<path>`` form (the state-dict key minus ``.weight``).

All files are safetensors written atomically with string metadata (method, tokens, steps...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

import torch

from .checkpoint import save_atomic

WEIGHT_SUFFIX = ".weight"


def embedding_tensors(clip_l: torch.Tensor, clip_g: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The embedding file's tensors: rows are consecutive tokens, one key per text encoder."""
    tensors = {"clip_l": _rows(clip_l, 768, "clip_l")}
    if clip_g is not None:
        tensors["clip_g"] = _rows(clip_g, 1280, "clip_g")
        if tensors["clip_g"].shape[0] != tensors["clip_l"].shape[0]:
            raise ValueError("clip_l and clip_g embeddings must have the same number of tokens")
    return tensors


def save_embedding(path: str | Path, clip_l: torch.Tensor, clip_g: Optional[torch.Tensor] = None,
                   metadata: Optional[dict[str, str]] = None) -> None:
    save_atomic(path, embedding_tensors(clip_l, clip_g), metadata)


def lora_key(weight_key: str) -> str:
    """``diffusion_model.<path>.weight`` → the generic LoRA module key ``diffusion_model.<path>``."""
    if not weight_key.endswith(WEIGHT_SUFFIX):
        raise ValueError(f"{weight_key!r} is not a weight key")
    return weight_key[:-len(WEIGHT_SUFFIX)]


def diff_lora_tensors(deltas: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Exact weight changes as ``<module>.diff`` keys (W += strength · diff when loaded)."""
    return {f"{lora_key(k)}.diff": d.detach().to(dtype) for k, d in deltas.items()}


def low_rank_lora_tensors(deltas: Mapping[str, torch.Tensor], rank: int,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Truncated-SVD LoRA of each weight change: ``up = U_r·S_r``, ``down = V_rᵀ``, ``alpha = r``
    (scale 1), Custom Diffusion's ``compress.py`` form in ComfyUI's key names."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    tensors = {}
    for key, delta in deltas.items():
        up, down = _truncated_svd(delta, rank)
        module = lora_key(key)
        tensors[f"{module}.lora_up.weight"] = up.to(dtype)
        tensors[f"{module}.lora_down.weight"] = down.to(dtype)
        tensors[f"{module}.alpha"] = torch.tensor(float(down.shape[0]))
    return tensors


def low_rank_deltas(deltas: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The weight changes a rank-``rank`` LoRA file of ``deltas`` applies (``up @ down``)."""
    return {key: (lambda up, down: (up @ down).view_as(delta))(*_truncated_svd(delta, rank))
            for key, delta in deltas.items()}


def _truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(delta.detach().float().flatten(1), full_matrices=False)
    r = min(rank, s.shape[0])
    return u[:, :r] * s[:r], vh[:r]


def save_lora(path: str | Path, deltas: Mapping[str, torch.Tensor], rank: int = 0,
              dtype: torch.dtype = torch.float32, metadata: Optional[dict[str, str]] = None) -> None:
    """Write weight changes for LoraLoaderModelOnly: exact ``.diff`` with ``rank`` 0, else low-rank."""
    tensors = diff_lora_tensors(deltas, dtype) if rank == 0 else low_rank_lora_tensors(deltas, rank, dtype)
    save_atomic(path, tensors, metadata)


def _rows(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    t = t.detach().float().reshape(-1, t.shape[-1])
    if t.shape[-1] != width:
        raise ValueError(f"{name} embeddings must be {width} wide, got {tuple(t.shape)}")
    return t.contiguous()
