"""Comparing tensors: the same bits (what "unchanged" means), or equal within a relative tolerance; the
stored weights of a module as a checkpoint holds them."""
from __future__ import annotations

import torch


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality. torch.equal never calls NaN equal, and weights a checkpoint does not hold (SD1.5's
    unused CLIP-L text_projection) stay uninitialised memory that may read as NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().reshape(-1).contiguous().view(torch.uint8), b.detach().reshape(-1).contiguous().view(torch.uint8))


def changed_keys(before: dict, after: dict) -> list:
    """Sorted keys of ``before`` whose tensors differ bitwise in ``after``."""
    return sorted(k for k in before if not same_bits(before[k], after[k]))


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to ``rel`` of ``b``'s largest magnitude (at least 1): the same computation in another batch
    layout, where kernels may sum in another order."""
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1.0)


def unpatched_state(module: torch.nn.Module) -> dict:
    """The module's stored weights with no model patches applied: ComfyUI patches shared modules in place
    while some clone is loaded (e.g. a LoRA clone an earlier test sampled), so unload everything first."""
    import comfy.model_management

    comfy.model_management.unload_all_models()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖: how much ``a`` moved away from ``b``."""
    return ((a - b).norm() / b.norm()).item()
