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

Export (spec §4, an extension: the paper reuses the training images' words): trained mappers are saved
as a plain state_dict (``pose.cls_branch.0.weight`` …) with metadata saying what they read (CLIP layer,
input images, training resolution), so pose and background words can be made for new reference images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import save_atomic

MAPPERS = "mappers"
FREE_VECTORS = "free vectors"
ATTRIBUTE_SOURCES = (MAPPERS, FREE_VECTORS)
ATTRIBUTES = ("pose", "background")
#: hidden width of ELITE's mapper MLPs (fixed there, independent of the CLIP width)
MAPPER_HIDDEN = 1024
MAPPER_FILE_FORMAT = "detex-attribute-mappers-v1"
#: what the mappers read, stored in the exported file (spec §4)
CLIP_LAYER = "last_hidden_state"
MAPPER_INPUTS = {"pose": "foreground: image * mask, background black",
                 "background": "background only: image * (1 - mask), subject black"}


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


def save_mappers(path: str | Path, attributes: AttributeEmbeddings, resolution: int, metadata: dict[str, str]) -> None:
    """Write the trained mappers (plain state_dict) with what they read in the file's metadata."""
    if attributes.source != MAPPERS:
        raise ValueError("only attribute mappers can be exported; free vectors belong to the training images")
    save_atomic(path, attributes.mappers.state_dict(), {
        **metadata, "format": MAPPER_FILE_FORMAT, "attribute_source": MAPPERS, "clip_layer": CLIP_LAYER,
        "inputs": json.dumps(MAPPER_INPUTS), "resolution": str(resolution)})


class MapperFileError(ValueError):
    """A file that is not an exported DETEX mapper file."""


def load_mappers(path: str | Path) -> tuple[nn.ModuleDict, dict[str, str]]:
    """The exported mappers ``{attribute: AttributeMapper}`` (sizes read from the weights) and the metadata."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != MAPPER_FILE_FORMAT:
            raise MapperFileError(f"{path} is not a DETEX mapper file (DecoupledTokenTrainer's <name>_detex_mappers)")
        state = {key: f.get_tensor(key) for key in f.keys()}
    hidden, feature_dim = state["pose.cls_branch.0.weight"].shape
    embedding_dim = state["pose.cls_branch.6.weight"].shape[0]
    with torch.device("meta"):  # no random init: every weight comes from the file
        mappers = nn.ModuleDict({a: AttributeMapper(feature_dim, torch.zeros(embedding_dim), hidden) for a in ATTRIBUTES})
    mappers.load_state_dict(state, assign=True)
    return mappers.requires_grad_(False), metadata


@torch.no_grad()
def map_attributes(mappers: nn.ModuleDict, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{attribute: [N, D]}`` words of new images from their CLIP-vision hidden states ``{attribute: [N, T, F]}``."""
    words = {}
    for attribute in ATTRIBUTES:
        expected = mappers[attribute].cls_branch[0].in_features
        if features[attribute].shape[-1] != expected:
            raise ValueError(f"these mappers read CLIP-vision features {expected} wide, but the CLIP vision model gives "
                             f"{features[attribute].shape[-1]}: use the CLIP vision model the trainer used")
        words[attribute] = mappers[attribute](features[attribute].float()).float().cpu()
    return words
