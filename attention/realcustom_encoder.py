"""The released RealCustom model's image features (bytedance/RealCustom ``ShallowDeepPatchfySiglipDinoEncoder``).

The reference (squashed to 768², bilinear) is seen as one global view (768 → 384, bilinear with
``align_corners=True``) and four local views: the 768 image split into its 2×2 polyphase components
(``b c (h hp) (w wp) -> (b hp wp) c h w``: every second pixel, four offsets), NOT four crops. Each view
goes through SigLIP-so400m/14-384 and DINOv2-L/14 with 4 registers, both read at their penultimate
block (patch tokens only, no final norm), 729 tokens each; the two are concatenated channel-wise
(SigLIP first, 2176 channels). The local tokens are interleaved token by token over the four views
(``(b hp wp) l c -> b (l hp wp) c``, 2916 tokens). Every view passes through an 8-bit image first
(torchvision ``ToPILImage`` truncates ``x·255``) before each backbone's own normalisation.

:class:`RegisterViT` is DINOv2 with registers in timm's parameter names (``vit_large_patch14_reg4_dinov2``:
patch embedding, class token, register tokens, patch-only position embedding resampled to the input grid
(bicubic, antialiased, as timm does when it loads the 518-px weights at 384), pre-norm blocks with layer
scale). ComfyUI's own DINOv2 has no register tokens, hence this module.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

#: torchvision/timm ImageNet statistics (DINOv2's normalisation)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REFERENCE_SIZE, VIEW_SIZE, POLYPHASE = 768, 384, 2
HEAD_DIM = 64
_NORM_EPS = 1e-6


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """What ``ToPILImage`` then ``ToTensor`` make of ``[0, 1]`` floats: ``⌊x·255⌋ / 255``."""
    return torch.floor(images.clamp(0, 1) * 255) / 255


def reference_views(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, 3, H, W)`` in [0, 1] → global views ``(B, 3, 384, 384)`` and local views ``(4B, 3, 384, 384)``
    (sample-major, then row offset, then column offset), both 8-bit as the released encoder sees them."""
    reference = F.interpolate(images, size=(REFERENCE_SIZE, REFERENCE_SIZE), mode="bilinear", align_corners=False)
    global_view = F.interpolate(reference, size=(VIEW_SIZE, VIEW_SIZE), mode="bilinear", align_corners=True)
    local_views = rearrange(reference, "b c (h hp) (w wp) -> (b hp wp) c h w", hp=POLYPHASE, wp=POLYPHASE)
    return eight_bit(global_view), eight_bit(local_views)


def interleave_local_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``(4B, L, C)`` tokens of the local views → ``(B, 4L, C)``, token by token over the four views."""
    return rearrange(tokens, "(b hp wp) l c -> b (l hp wp) c", hp=POLYPHASE, wp=POLYPHASE)


def resample_position_embedding(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, g², D)`` patch position embedding → ``(1, grid², D)`` (bicubic, antialiased, like timm's loader)."""
    old = math.isqrt(pos_embed.shape[1])
    if old * old != pos_embed.shape[1]:
        raise ValueError(f"the position embedding has {pos_embed.shape[1]} entries, not a square grid of patches "
                         "(a DINOv2-with-registers file in timm's layout has one per patch)")
    if old == grid:
        return pos_embed
    square = pos_embed.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", antialias=True)
    return resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos_embed.dtype)


class _Attention(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _LayerScale(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class _Mlp(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(torch.nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=_NORM_EPS)
        self.attn = _Attention(dim)
        self.ls1 = _LayerScale(dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=_NORM_EPS)
        self.mlp = _Mlp(dim, hidden)
        self.ls2 = _LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RegisterViT(torch.nn.Module):
    """DINOv2 with register tokens (timm names), returning the patch tokens of its penultimate block."""

    def __init__(self, dim: int, depth: int, hidden: int, patch: int, registers: int, grid: int):
        super().__init__()
        if dim % HEAD_DIM:
            raise ValueError(f"a DINOv2 width must be a multiple of {HEAD_DIM} (its head size), got {dim}")
        self.patch_embed = torch.nn.Module()
        self.patch_embed.proj = torch.nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = torch.nn.Parameter(torch.zeros(1, registers, dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = torch.nn.ModuleList(_Block(dim, hidden) for _ in range(depth))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def width(self) -> int:
        return self.cls_token.shape[-1]

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], image_size: int = VIEW_SIZE) -> RegisterViT:
        """Build from a timm ``vit_*_reg*_dinov2`` state dict for ``image_size`` inputs (position embedding
        resampled); keys the features do not need (final norm, head) are ignored, missing ones are an error."""
        needed = ("patch_embed.proj.weight", "cls_token", "reg_token", "pos_embed", "blocks.0.mlp.fc1.weight")
        missing = [k for k in needed if k not in state_dict]
        if missing:
            raise ValueError(f"not a DINOv2-with-registers file in timm's layout (missing {', '.join(missing)})")
        dim, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        grid = image_size // patch
        model = cls(dim, depth, state_dict["blocks.0.mlp.fc1.weight"].shape[0], patch,
                    state_dict["reg_token"].shape[1], grid)
        tensors = {k: v for k, v in state_dict.items() if k in model.state_dict()}
        tensors["pos_embed"] = resample_position_embedding(state_dict["pos_embed"], grid)
        model.load_state_dict(tensors, strict=True)
        return model.train(False).requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` images in [0, 1] → ``(B, grid², D)`` patch tokens after the penultimate block."""
        x = self.patch_embed.proj((images.to(self.cls_token) - self.mean.to(self.cls_token)) / self.std.to(self.cls_token))
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        prefix = torch.cat([self.cls_token, self.reg_token], dim=1).expand(x.shape[0], -1, -1)
        x = torch.cat([prefix, x], dim=1)
        for block in self.blocks[:-1]:
            x = block(x)
        return x[:, prefix.shape[1]:]
