"""A trained low-rank change of a frozen linear projection whose output is computed elsewhere.

An adapter initialised from a model's own projection ``W`` (PVA's parallel projections, RealCustom's DiT branch)
need not hold a trainable full-rank copy of ``W``: it reads ``W`` from the loaded model at run time and trains only

    Δ(x) = B · (A · x)        A: (rank, in), B: (out, rank), B = 0 at the start

so that ``W x + Δ(x)`` is exactly ``W x`` at step 0 (the adding of an exact zero changes no bit) and the adapter
holds ``rank · (in + out)`` numbers instead of ``in · out``. A starts as ``nn.Linear``'s (and LoRA's) Kaiming-uniform
weights, so the gradient of B is not zero at the start. The rank is read from the shapes; no scale factor
(LoRA's alpha / rank) is applied: the learning rate sets the step size.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class LowRankChange(nn.Module):
    """``x ↦ B·A·x`` with ``A`` = :attr:`down` ``(rank, in)`` and ``B`` = :attr:`up` ``(out, rank)``, B zero at the
    start; its state dict is ``{"down", "up"}``. Computed in the input's dtype and device (the parameters stay fp32,
    wherever their owner places them)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        if rank < 1:
            raise ValueError(f"a low-rank change needs rank >= 1, got {rank}")
        self.down = nn.Parameter(torch.empty(rank, in_features))
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # nn.Linear's default, as LoRA's A

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> "LowRankChange":
        """The change held by ``state`` (``down``, ``up``), its sizes and rank read from their shapes."""
        down, up = state["down"], state["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"not a low-rank change: down {tuple(down.shape)}, up {tuple(up.shape)} "
                             "(expected (rank, in) and (out, rank))")
        change = cls(down.shape[1], up.shape[0], down.shape[0])
        change.load_state_dict(dict(state), strict=True)
        return change

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The change ``B·A·x`` of the projection's output, ``(..., in) → (..., out)``."""
        return F.linear(F.linear(x, self.down.to(x)), self.up.to(x))

    def added_to(self, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``base + B·A·x``: the changed projection of ``x``, ``base`` its frozen output computed elsewhere."""
        return base + self(x)

    def weight_change(self) -> torch.Tensor:
        """``B·A`` ``(out, in)``, fp32: the change as a dense matrix (for a caller that needs the changed weight
        itself rather than its output)."""
        return self.up.float() @ self.down.float()
