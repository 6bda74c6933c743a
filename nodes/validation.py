"""Input checks shared by the pack's nodes: a bad input ends in a clear error that names the node and the
problem, before any slow work (encoding, training) starts.

- :func:`guard_nodes`: applied once to every node class the pack registers (nodes/__init__.py), so no node can
  miss it. Before the node runs, a FLOAT input that is NaN or ±inf is refused (JSON NaN passes ComfyUI's min/max
  check, every comparison with NaN being False). A ValueError/FileNotFoundError raised inside (by the node or by
  the helpers it calls: output names, checkpoints, token search) gets the node id in front of its message when
  the message does not already name it, and reaches ComfyUI as the builtin type (ComfyUI reports a class of this
  pack by its module path, which holds the install folder).
- :func:`require_images`: a non-empty batch of finite values (NaN/inf refused: a trainer would spend minutes
  on a loss of NaN, a sampler would spread NaN over every image).
- :func:`require_finite`: finite values only.
- :func:`read_safetensors`: a model file read as safetensors only (no pickle), with one message for truncated,
  renamed or pickled files and for weights holding NaN/inf.
- :func:`resolve_embedding`: the vectors an ``embedding:<name>`` gives a CLIP, telling a missing file from a
  damaged one and refusing NaN/inf.
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import math
import numbers
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .comfy_io import io

#: the id of the pack node running now. A node that another node calls (PVAIdentityTune runs
#: ParallelVisualAttention.execute) runs unguarded: its errors are named once, after the node the user placed.
_RUNNING_NODE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("personalization_node", default=None)


def guard_nodes(classes: list[type[io.ComfyNode]]) -> list[type[io.ComfyNode]]:
    """Wrap the ``execute`` of each class in place (see the module docstring); returns ``classes``.

    Named by the schema's node id: ComfyUI executes a copy of the class named ``<class>Clone``, and calls
    ``execute.__func__`` of the registered class on it, so ``execute`` stays a classmethod."""
    for cls in classes:
        schema = cls.GET_SCHEMA()
        execute = cls.execute.__func__
        if inspect.iscoroutinefunction(execute):
            raise TypeError(f"{schema.node_id}: guard_nodes wraps synchronous execute methods only")
        floats = {i.id: i for i in schema.inputs if isinstance(i, io.Float.Input)}
        cls.execute = classmethod(_guarded(execute, schema.node_id, floats))
    return classes


def _guarded(execute, node: str, floats: dict[str, io.Float.Input]):
    positional = list(inspect.signature(execute).parameters)[1:]  # after cls
    node_named = re.compile(rf"\b{re.escape(node)}\b")

    @functools.wraps(execute)
    def guarded(cls, *args, **kwargs):
        if _RUNNING_NODE.get() is not None:
            return execute(cls, *args, **kwargs)
        values = {**dict(zip(positional, args)), **kwargs}
        for name, spec in floats.items():
            _require_finite_number(node, name, spec, values.get(name))
        running = _RUNNING_NODE.set(node)
        try:
            return execute(cls, *args, **kwargs)
        except (ValueError, FileNotFoundError) as error:
            builtin = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
            message = str(error)
            if node_named.search(message) is None:
                message = f"{node}: {message}"
            elif type(error) is builtin:
                raise
            raise builtin(message) from error
        finally:
            _RUNNING_NODE.reset(running)
    return guarded


def _require_finite_number(node: str, name: str, spec: io.Float.Input, value) -> None:
    """A FLOAT input's value (a float from a widget, any real number from a link) must be finite."""
    if isinstance(value, numbers.Real) and not math.isfinite(value):
        shown = "NaN" if math.isnan(value) else str(value)
        allowed = f" from {spec.min} to {spec.max}" if spec.min is not None and spec.max is not None else ""
        raise ValueError(f"{node}: input '{name}' is {shown}; set a finite number{allowed}.")


def require_finite(node: str, what: str, tensor: Optional[torch.Tensor]) -> None:
    """Refuse NaN/inf in ``tensor`` (None passes: optional inputs)."""
    if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{node}: NaN or infinite values in the {what} ({bad} of {tensor.numel()}); check the node "
                         "that made them (a diverged sampler or VAE, a mask operation dividing by zero?).")


def require_images(node: str, what: str, images: Optional[torch.Tensor], minimum: int = 1) -> None:
    """A batch of at least ``minimum`` images (or masks) with finite values."""
    count = 0 if images is None else images.shape[0]
    if count < minimum:
        raise ValueError(f"{node}: no {what}; connect at least {minimum} (got {count})." if count == 0 else
                         f"{node}: {minimum} or more {what} needed, got {count}.")
    require_finite(node, what, images)


def require_masks_for(node: str, masks: Optional[torch.Tensor], images: torch.Tensor) -> None:
    """One finite, non-empty mask ``[N, H, W]`` per image ``[N, H, W, C]`` (optional: None passes)."""
    if masks is None:
        return
    count, size = images.shape[0], tuple(images.shape[1:3])
    if masks.ndim != 3 or masks.shape[0] != count or tuple(masks.shape[1:]) != size:
        raise ValueError(f"{node}: {masks.shape[0]} masks of {tuple(masks.shape[1:])} for {count} images of {size}; "
                         "give one mask per image, of the image's size.")
    require_finite(node, "masks", masks)
    empty = [i for i in range(count) if not bool((masks[i] > 0.5).any())]
    if empty:
        raise ValueError(f"{node}: the mask of image(s) {empty} (0-based) is empty; every mask must mark the region "
                         "(white = 1).")


def read_safetensors(node: str, path: str | Path, what: str = "file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; clear errors for other formats, damaged files and NaN/inf."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{node}: {path.name} is not a .safetensors {what}; only .safetensors files are read (pickled "
                         ".pt/.pth/.ckpt files can run code). Convert it once to safetensors.")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for bad headers
        raise ValueError(f"{node}: {path.name} is not a readable safetensors {what} (truncated download, or another "
                         f"format renamed to .safetensors): {error}") from error
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise ValueError(f"{node}: {path.name} holds NaN or infinite values (in {', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); the file is damaged or comes from a diverged training.")
    return tensors, metadata


#: the names ComfyUI's tokenizer tries for ``embedding:<name>`` in each embeddings folder (sd1_clip.load_embed)
_EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")


def resolve_embedding(node: str, clip, name: str, missing_hint: str = "") -> torch.Tensor:
    """The vectors ``embedding:<name>`` gives the CLIP's first text encoder, as its tokenizer resolves them
    (the embeddings folders, or vectors a trainer's CLIP carries)."""
    from .training_glue import sub_tokenizers

    tokenizer = sub_tokenizers(clip.tokenizer)[0][1]
    found, _ = tokenizer._try_get_embedding(name)
    if found is None:
        folders = tokenizer.embedding_directory or []
        folders = [folders] if isinstance(folders, str) else folders
        files = [Path(f) / (name + suffix) for f in folders for suffix in _EMBEDDING_SUFFIXES]
        existing = next((f for f in files if f.is_file()), None)
        if existing is not None:
            raise ValueError(f"{node}: embedding:{name} ({existing}) could not be read: the file is damaged, truncated "
                             "or not an embedding file.")
        raise FileNotFoundError(f"{node}: embedding:{name} was not found in models/embeddings{missing_hint}.")
    if not bool(torch.isfinite(found).all()):
        raise ValueError(f"{node}: embedding:{name} holds NaN or infinite values; the file is damaged or comes from a "
                         "diverged training.")
    return found


def require_matching_clip(node: str, model, clip) -> None:
    """The CLIP must give the text width the MODEL's cross-attention reads (one checkpoint's pair): SD1.x 768
    (CLIP-L), SD2 1024 (CLIP-H), SDXL 2048 (CLIP-L + CLIP-G)."""
    from .training_glue import sub_tokenizers

    context_dim = model.model.model_config.unet_config.get("context_dim")
    encoders = {name: sub.embedding_size for name, sub in sub_tokenizers(clip.tokenizer)}
    if context_dim is not None and encoders and sum(encoders.values()) != context_dim:
        raise ValueError(f"{node}: this MODEL ({type(model.model).__name__}) reads {context_dim}-wide text, but the "
                         f"CLIP gives {sum(encoders.values())} ({' + '.join(f'{k} {v}' for k, v in encoders.items())}); "
                         "connect the MODEL and CLIP of the same checkpoint.")
