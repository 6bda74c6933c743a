"""DETEX's image-specific attribute embeddings [P_i] (pose) and [B_i] (background).

DETEX (Cai et al., AAAI 2024) describes each training image with the shared subject token [V] plus
one pose and one background word produced by *attribute mappers* from image features. The paper's
mapper details could not be read (spec detex.md §3.2, all [R]); this module follows the authors' own
earlier ELITE global mapper (Wei et al., ICCV 2023), which is the most likely template:

* per attribute one :class:`AttributeMapper`: an MLP on the CLIP-vision [CLS] token plus an MLP applied
  to every patch token and averaged, the two summed (ELITE ``Mapper``, one word, last CLIP layer);
  MLP = Linear(F→1024)–LayerNorm–LeakyReLU–Linear(1024→1024)–LayerNorm–LeakyReLU–Linear(1024→D);
* the pose mapper reads the foreground image (subject on black), the background mapper the
  background-only image (subject blacked out), so each sees only its attribute's pixels.

Initialisation [R]: the last Linear of each branch starts at zero weight, and the [CLS] branch's bias
at the token embedding of an initial word, so an untrained mapper yields exactly that word for every
image and training starts from the plain prompt (ELITE trains from random init on millions of images;
a per-subject mapper trained from scratch for a few hundred steps needs a calm start).

The switchable alternative (``FREE_VECTORS``) gives every training image its own learnable pose and
background vectors, initialised the same way; it cannot follow a horizontal flip of the image.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

MAPPERS = "mappers"
FREE_VECTORS = "free vectors"
ATTRIBUTE_SOURCES = (MAPPERS, FREE_VECTORS)
ATTRIBUTES = ("pose", "background")
#: hidden width of ELITE's mapper MLPs (fixed there, independent of the CLIP width)
MAPPER_HIDDEN = 1024


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, out_dim))


class AttributeMapper(nn.Module):
    """One attribute word from CLIP-vision hidden states ``[B, 1 + patches, F]`` → ``[B, D]``."""

    def __init__(self, feature_dim: int, init_embedding: torch.Tensor, hidden: int = MAPPER_HIDDEN):
        super().__init__()
        embedding_dim = init_embedding.shape[-1]
        self.cls_branch = _mlp(feature_dim, hidden, embedding_dim)
        self.patch_branch = _mlp(feature_dim, hidden, embedding_dim)
        with torch.no_grad():
            for branch in (self.cls_branch, self.patch_branch):
                branch[-1].weight.zero_()
                branch[-1].bias.zero_()
            self.cls_branch[-1].bias.copy_(init_embedding.reshape(embedding_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.ndim != 3 or hidden_states.shape[1] < 2:
            raise ValueError(f"expected CLIP-vision hidden states [batch, 1 + patches, width], got {tuple(hidden_states.shape)}")
        return self.cls_branch(hidden_states[:, 0]) + self.patch_branch(hidden_states[:, 1:]).mean(dim=1)


class AttributeEmbeddings(nn.Module):
    """The pose and background word of each training image, from mappers or free vectors.

    ``features[attribute]`` (mappers only) holds the frozen CLIP-vision hidden states of every image,
    ``[N, 2, T, F]``: index 1 along dim 1 is the horizontally flipped image, so a flipped training sample
    gets the pose word of the flipped picture. They are buffers (not trained, not saved in
    checkpoints: they are recomputed from the same inputs).
    """

    def __init__(self, source: str, num_images: int, init_embeddings: dict[str, torch.Tensor],
                 features: Optional[dict[str, torch.Tensor]] = None, seed: int = 0):
        super().__init__()
        if source not in ATTRIBUTE_SOURCES:
            raise ValueError(f"attribute source must be one of {ATTRIBUTE_SOURCES}, got {source!r}")
        self.source = source
        self.num_images = num_images
        if source == MAPPERS:
            if features is None or set(features) != set(ATTRIBUTES):
                raise ValueError(f"mappers need CLIP-vision features for {ATTRIBUTES}")
            for attribute in ATTRIBUTES:
                feats = features[attribute]
                if feats.ndim != 4 or feats.shape[:2] != (num_images, 2):
                    raise ValueError(f"{attribute} features must be [{num_images}, 2, tokens, width], got {tuple(feats.shape)}")
                self.register_buffer(f"{attribute}_features", feats.detach().float().clone(), persistent=False)
            with torch.random.fork_rng(devices=[]):  # nn.Linear draws its init from the global RNG
                torch.manual_seed(seed)
                self.mappers = nn.ModuleDict({
                    a: AttributeMapper(features[a].shape[-1], init_embeddings[a]) for a in ATTRIBUTES})
        else:
            self.vectors = nn.ParameterDict({
                a: nn.Parameter(init_embeddings[a].detach().float().reshape(1, -1).repeat(num_images, 1))
                for a in ATTRIBUTES})

    def forward(self, attribute: str, image_index: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` words of ``attribute`` for training images ``image_index`` (flip state per sample)."""
        if attribute not in ATTRIBUTES:
            raise ValueError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")
        image_index = torch.as_tensor(image_index, dtype=torch.long)
        if self.source == FREE_VECTORS:
            return self.vectors[attribute][image_index]
        features = getattr(self, f"{attribute}_features")
        flipped = torch.as_tensor(flipped, dtype=torch.long, device=features.device)
        selected = features[image_index.to(features.device), flipped]
        return self.mappers[attribute](selected)

    @torch.no_grad()
    def per_image(self, attribute: str) -> torch.Tensor:
        """``[N, D]`` the word of every (unflipped) training image, for export."""
        indices = torch.arange(self.num_images)
        return self(attribute, indices, torch.zeros_like(indices)).detach().float().cpu()
