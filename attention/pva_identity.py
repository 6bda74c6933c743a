"""PVA's identity encoder (Xu et al., WACV 2024, §2.1 of specs/pva.md): face crop → ArcFace → tokens.

- :func:`arcface_crop`: the official fixed crop of a CelebA-HQ-style aligned face to ArcFace's 112².
- :class:`IResNet`: InsightFace's ``iresnet`` ArcFace backbone (``ms1mv3_arcface_r50`` is layers
  3/4/14/3), with InsightFace's parameter names so its released weights load; the depth is read from
  the weights, so any iresnet size loads.
- :class:`IdentityTokenTransformer`: the official ``TransformNetwork``: learnable query tokens appended
  to the reference features, a linear lift to the text width, a post-norm transformer encoder, the query
  slots kept, plus a learned positional embedding. Output width = the model's text-context width; on a wide DiT the
  transformer runs at its own narrower width and a final linear projection lifts the tokens to the block width (an
  addition of the pack: at Flux's 3072 the official layout alone would be 0.46 B parameters, see docs/pva.md).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ARCFACE_INPUT = 112
ARCFACE_FEATURES = 512


def arcface_crop(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [-1, 1], square aligned faces → ``(B, 3, 112, 112)`` ArcFace input.

    As the official FaceNet: resize to 256² (bilinear, align_corners), crop rows 35:223 and columns
    32:220 (the face box of a CelebA-HQ-aligned image), average-pool to 112².
    """
    x = F.interpolate(images, size=(256, 256), mode="bilinear", align_corners=True)
    return F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], ARCFACE_INPUT)


class IBasicBlock(nn.Module):
    """InsightFace's pre-activation residual block (BN → conv → BN → PReLU → conv(stride) → BN)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """ArcFace iresnet: 112² face → 512-d identity feature (not L2-normalised, as PVA uses it)."""

    WIDTHS = (64, 128, 256, 512)

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 14, 3), num_features: int = ARCFACE_FEATURES):
        super().__init__()
        self.layers = tuple(layers)
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        inplanes = 64
        for stage, (width, count) in enumerate(zip(self.WIDTHS, self.layers), start=1):
            blocks = [IBasicBlock(inplanes, width, stride=2)] + [IBasicBlock(width, width) for _ in range(count - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
            inplanes = width
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.fc = nn.Linear(512 * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.features(self.fc(torch.flatten(self.bn2(x), 1)))

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> "IResNet":
        """An IResNet of the depth the weights have (counted from ``layer<i>.<n>.`` keys), loaded strictly."""
        counts = []
        for stage in range(1, 5):
            indices = {int(m.group(1)) for key in state_dict if (m := re.match(rf"layer{stage}\.(\d+)\.", key))}
            if not indices:
                raise ValueError(f"these weights are not an InsightFace iresnet (no layer{stage}.* keys)")
            counts.append(max(indices) + 1)
        model = cls(tuple(counts), num_features=state_dict["fc.weight"].shape[0])
        model.load_state_dict(state_dict, strict=True)
        return model.train(False)


class IdentityTokenTransformer(nn.Module):
    """Reference features ``(G, R, F)`` → ``num_tokens`` identity tokens ``(G, N, width)``.

    ``width`` is the text-context width of the model (1024 for SD2, 768 for SD1.5); the output does not
    depend on the number of references R. The official ``TransformNetwork``'s weights map one to one
    (its ``0.*`` is ``lift.*``, ``1.*`` is ``encoder.*``; ``q_tokens`` and ``pos_enc`` keep their names).
    ``output_width`` (default ``width``): when it differs, a final ``project`` Linear(width, output_width) maps the
    tokens (positional embedding added) to it.
    """

    def __init__(self, feature_dim: int = ARCFACE_FEATURES, width: int = 1024, num_tokens: int = 10,
                 layers: int = 4, heads: int = 8, feedforward: int = 2048, dropout: float = 0.1,
                 output_width: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.project = None if output_width in (None, width) else nn.Linear(width, output_width)
        self.lift = nn.Linear(feature_dim, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=feedforward, dropout=dropout,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.q_tokens = nn.Parameter(torch.randn(num_tokens, feature_dim))
        self.pos_enc = nn.Parameter(torch.zeros(num_tokens, width))

    @property
    def num_tokens(self) -> int:
        return self.q_tokens.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.q_tokens.shape[1]

    @property
    def output_width(self) -> int:
        """Width of the tokens it gives (the identity tokens' context width)."""
        return self.pos_enc.shape[1] if self.project is None else self.project.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.q_tokens.to(features).unsqueeze(0).expand(features.shape[0], -1, -1)
        x = self.encoder(self.lift(torch.cat([features, queries], dim=1)))
        tokens = x[:, -self.num_tokens:] + self.pos_enc.to(x)
        return tokens if self.project is None else self.project(tokens)

    @classmethod
    def config_from_state_dict(cls, state_dict: dict[str, torch.Tensor], heads: int) -> dict:
        """Constructor arguments recovered from the weights' shapes (heads are not in the shapes)."""
        layers = {int(m.group(1)) for key in state_dict if (m := re.match(r"encoder\.layers\.(\d+)\.", key))}
        return dict(feature_dim=state_dict["q_tokens"].shape[1], width=state_dict["lift.weight"].shape[0],
                    num_tokens=state_dict["q_tokens"].shape[0], layers=max(layers) + 1, heads=heads,
                    feedforward=state_dict["encoder.layers.0.linear1.weight"].shape[0],
                    output_width=state_dict["project.weight"].shape[0] if "project.weight" in state_dict else None)
